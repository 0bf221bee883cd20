"""A minimal, faithful psutil agent: the peer rollcall's collector is compared with.

It collects the same metric set as the collector (CPU cores, load, usage,
memory and swap, one disk, host name, OS, uptime, GPUs through pynvml when
present) and serialises the same v1 JSON body, but sends nothing. It reports
its CPU time per sample and its resident memory after the samples.

    python psutil_agent.py --samples 100
"""

import argparse
import json
import os
import platform
import resource
import socket
import time

import psutil


def gpus():
    try:
        import pynvml  # optional, as in the original agent
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    found = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        found.append({"index": index, "vendor": "nvidia", "name": pynvml.nvmlDeviceGetName(handle),
                      "memory_total_mb": memory.total // 2**20, "memory_free_mb": memory.free // 2**20})
    return found


def sample(agent_id, disk_path):
    load_1m, load_5m, load_15m = os.getloadavg()
    physical = psutil.cpu_count(logical=False) or 1
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    disk = psutil.disk_usage(disk_path)
    return {
        "v": 1, "agent_id": agent_id, "sent_at_ms": int(time.time() * 1000), "interval_s": 30,
        "state": "up", "pool": "default",
        "host": {"hostname": socket.gethostname(), "os": platform.platform(), "uptime_s": int(time.time() - psutil.boot_time())},
        "cpu": {"cores_physical": physical, "cores_logical": psutil.cpu_count(), "cores_available": max(0, int(physical - load_1m)),
                "load_1m": load_1m, "load_5m": load_5m, "load_15m": load_15m, "usage_percent": psutil.cpu_percent(interval=None)},
        "memory": {"total_mb": memory.total // 2**20, "available_mb": memory.available // 2**20,
                   "swap_total_mb": swap.total // 2**20, "swap_used_mb": swap.used // 2**20},
        "disk": {"path": disk_path, "total_gb": round(disk.total / 2**30, 2), "free_gb": round(disk.free / 2**30, 2)},
        "gpus": gpus(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--disk-path", default="/")
    args = parser.parse_args()
    psutil.cpu_percent(interval=None)  # prime the usage counter, as the collector does
    body = b""
    started = time.process_time()
    for _ in range(args.samples):
        body = json.dumps(sample("psutil-agent", args.disk_path)).encode()
    per_sample_ms = (time.process_time() - started) / args.samples * 1000
    with open("/proc/self/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    print(json.dumps({"cpu_ms_per_sample": per_sample_ms, "rss_kb": rss_kb,
                      "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "body_bytes": len(body)}))


if __name__ == "__main__":
    main()
