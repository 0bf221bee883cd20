"""Benchmarks rollcall beside its peers on this machine and writes BENCHMARKS.md.

Run through bench/run, which installs the peers first. Every figure is the
median of --repeats runs; every ratio compares figures from this same run.
Only loopback addresses are used, and every load is bounded in time.
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "target" / "release"
# The collector as shipped: built with the size-optimised `collector` profile.
COLLECTOR = ROOT / "target" / "collector"
SECRET = "ab" * 32
TOKEN = "bench-token-0123456789abcdef"
ENV = {**os.environ, "RUST_LOG": "warn"}
# Cost model inputs the emulator cannot measure, from AWS's documentation:
# a PutItem inside a region takes single-digit milliseconds; Lambda's
# START, END and REPORT lines are about 350 bytes per invocation; a history
# window is written once per five minutes.
DYNAMODB_ROUND_TRIP_MS = 8
PLATFORM_LOG_BYTES = 350
HISTORY_WINDOWS_PER_MONTH = 30 * 24 * 12


def log(message):
    print(f"==> {message}", flush=True)


def median(values):
    return statistics.median(values) if values else float("nan")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(url, limit=20):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Stack:
    """Release ingest and query on an embedded store in a fresh folder."""

    def __init__(self, durability="full"):
        self.dir = tempfile.mkdtemp(prefix="rollcall-bench-")
        db = os.path.join(self.dir, "bench.db")
        ingest_port, query_port = free_port(), free_port()
        self.ingest_url = f"http://127.0.0.1:{ingest_port}"
        self.query_url = f"http://127.0.0.1:{query_port}"
        self.logs = [open(os.path.join(self.dir, name), "w") for name in ("ingest.log", "query.log")]
        self.ingest = subprocess.Popen([RELEASE / "rollcall-ingest", "--listen", f"127.0.0.1:{ingest_port}", "--db", db,
                                        "--durability", durability],
                                       env={**ENV, "ROLLCALL_FLEET_SECRETS": f"k1={SECRET}"}, stderr=self.logs[0])
        self.query = subprocess.Popen([RELEASE / "rollcall-query", "--listen", f"127.0.0.1:{query_port}", "--db", db],
                                      env={**ENV, "ROLLCALL_QUERY_TOKENS": TOKEN}, stderr=self.logs[1])
        try:
            wait_http(f"{self.ingest_url}/healthz")
            wait_http(f"{self.query_url}/healthz")
        except RuntimeError:
            self.close(keep=True)
            raise RuntimeError(f"the stack did not start; logs in {self.dir}")

    def close(self, keep=False):
        for process in (self.ingest, self.query):
            process.terminate()
            process.wait()
        for handle in self.logs:
            handle.close()
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def loadgen(*args, target_url, query_url=None):
    command = [RELEASE / "rollcall-loadgen", "--ingest", target_url, "--json", *map(str, args)]
    if query_url:
        command += ["--query", query_url]
    output = subprocess.run(command, env={**ENV, "ROLLCALL_FLEET_SECRET": SECRET, "ROLLCALL_QUERY_TOKEN": TOKEN},
                            capture_output=True, text=True)
    if not output.stdout.strip():
        raise RuntimeError(f"loadgen failed: {output.stderr}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def collector_env(stack, agent):
    key = subprocess.run([COLLECTOR / "rollcall-collector", "keygen", "--agent-id", agent],
                         env={**ENV, "ROLLCALL_FLEET_SECRET": SECRET}, capture_output=True, text=True, check=True).stdout.strip()
    return {**ENV, "ROLLCALL_AGENT_KEY": key, "ROLLCALL_ENDPOINT": stack.ingest_url, "ROLLCALL_KEY_ID": "k1",
            "ROLLCALL_AGENT_ID": agent, "ROLLCALL_CONFIG": "/dev/null", "ROLLCALL_STATE_DIR": stack.dir}


def default_base():
    """The newest release tag before HEAD, else the commit whose collector
    the footprint issue named (2026-11-26)."""
    tag = subprocess.run(["git", "describe", "--tags", "--abbrev=0", "HEAD^"], cwd=ROOT,
                         capture_output=True, text=True)
    return tag.stdout.strip() if tag.returncode == 0 else "021de87"


def build_base_collector(ref):
    """Builds `ref`'s collector for size in a worktree of its own, with a
    target folder of its own, so that today's build is untouched."""
    sha = subprocess.run(["git", "rev-parse", "--short", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    work = ROOT / "target" / "base" / sha
    if not (work / "Cargo.toml").exists():
        work.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(work), sha], cwd=ROOT, check=True,
                       capture_output=True)
    target = ROOT / "target" / "base-target"
    log(f"building the base collector ({ref} = {sha}) for size")
    subprocess.run(["cargo", "build", "--locked", "--profile", "collector", "-p", "rollcall-collector"], cwd=work,
                   env={**os.environ, "CARGO_TARGET_DIR": str(target)}, check=True)
    return target / "collector" / "rollcall-collector", sha


def service_rss(binaries, stack, seconds):
    """Starts the collectors interleaved, so that each sees the same
    machine; resident memory of each after `seconds`."""
    services = [(label, subprocess.Popen([binary, "run", "--interval", "1"],
                                         env=collector_env(stack, f"svc-{label}-{n}"), stderr=subprocess.DEVNULL))
                for n, (label, binary) in enumerate(binaries)]
    time.sleep(seconds)
    rss = [(label, rss_kb(service.pid)) for label, service in services]
    for _, service in services:
        service.send_signal(signal.SIGTERM)
        service.wait()
    return rss


def bench_collector(results, args):
    stack = Stack()
    try:
        if args.base:
            base_binary, sha = build_base_collector(args.base)
            log(f"collector in service mode: {args.heartbeats} heartbeats at a 1 s interval, {args.repeats} of today's "
                f"and {args.repeats} of {args.base}'s at once")
            pairs = [("today", COLLECTOR / "rollcall-collector"), ("base", base_binary)] * args.repeats
        else:
            log(f"collector in service mode: {args.heartbeats} heartbeats at a 1 s interval, {args.repeats} collectors at once")
            pairs = [("today", COLLECTOR / "rollcall-collector")] * args.repeats
        rss = service_rss(pairs, stack, args.heartbeats)
        today = [kb for label, kb in rss if label == "today"]
        results["collector_rss_kb"] = median(today)
        if args.base:
            base = [kb for label, kb in rss if label == "base"]
            results["base"] = {
                "ref": args.base, "commit": sha,
                "rss_kb": base, "binary_bytes": base_binary.stat().st_size,
                "today_rss_kb": today,
            }

        log("collector CPU per heartbeat (collect + serialise + sign)")
        costs = [json.loads(subprocess.run([COLLECTOR / "collector-cost", "1000"], capture_output=True, text=True,
                                           check=True).stdout)["cpu_us_per_heartbeat"] for _ in range(args.repeats)]
        results["collector_cpu_us"] = median(costs)

        log("collector once: wall time, start to exit, POST to loopback included")
        env = collector_env(stack, "once")
        for label, extra in (("once_ms", []), ("once_fast_ms", ["--skip-cpu-usage"])):
            times = []
            for _ in range(max(args.repeats, 10)):
                started = time.perf_counter()
                subprocess.run([COLLECTOR / "rollcall-collector", "once", *extra], env=env, capture_output=True, check=True)
                times.append((time.perf_counter() - started) * 1000)
            results[label] = median(times)
        results["collector_binary_bytes"] = (COLLECTOR / "rollcall-collector").stat().st_size
    finally:
        stack.close()


def bench_peers(results, args):
    exporter = shutil.which("prometheus-node-exporter")
    if exporter:
        log(f"node_exporter: {args.heartbeats} scrapes")
        rss, cpu = [], []
        for _ in range(args.repeats):
            process = subprocess.Popen([exporter, "--web.listen-address=127.0.0.1:19100"], stderr=subprocess.DEVNULL)
            wait_http("http://127.0.0.1:19100/metrics")
            before = cpu_seconds(process.pid)
            size = 0
            for _ in range(args.heartbeats):
                size = len(urllib.request.urlopen("http://127.0.0.1:19100/metrics").read())
            cpu.append((cpu_seconds(process.pid) - before) / args.heartbeats * 1000)
            rss.append(rss_kb(process.pid))
            process.terminate()
            process.wait()
        results.update(node_exporter_rss_kb=median(rss), node_exporter_cpu_ms=median(cpu), node_exporter_bytes=size)
    python = ROOT / "bench" / ".venv" / "bin" / "python"
    if python.exists():
        log(f"psutil agent: {args.heartbeats} samples")
        runs = [json.loads(subprocess.run([python, ROOT / "bench" / "psutil_agent.py", "--samples", str(args.heartbeats)],
                                          capture_output=True, text=True, check=True).stdout) for _ in range(args.repeats)]
        results.update(psutil_rss_kb=median([r["rss_kb"] for r in runs]),
                       psutil_cpu_ms=median([r["cpu_ms_per_sample"] for r in runs]))


def bench_ingest(results, args):
    log(f"ingest throughput: {args.connections} connections, 10,000 agents, closed loop, {args.seconds} s")
    rates, p99s = [], []
    for _ in range(args.repeats):
        stack = Stack()
        try:
            run = loadgen("--agents", 10000, "--interval-s", 0, "--duration-s", args.seconds, "--connections",
                          args.connections, target_url=stack.ingest_url, query_url=stack.query_url)
            assert run["loss_check"]["lost"] == 0 and run["server_errors"] == 0, run
            rates.append(run["accepted_per_s"])
        finally:
            stack.close()
    results["ingest_per_s"] = median(rates)

    log("ingest latency at 1,000 heartbeats per second")
    stack = Stack()
    try:
        for _ in range(args.repeats):
            run = loadgen("--agents", 10000, "--rate", 1000, "--duration-s", args.seconds, "--connections", args.connections,
                          target_url=stack.ingest_url)
            p99s.append(run["latency_ms"]["p99"])
    finally:
        stack.close()
    results["ingest_p99_ms_at_1000"] = median(p99s)

    gateway = shutil.which("prometheus-pushgateway")
    if gateway:
        log(f"Pushgateway: same client, {args.connections} connections, 10,000 groups")
        rates = []
        for _ in range(args.repeats):
            process = subprocess.Popen([gateway, "--web.listen-address=127.0.0.1:19091"], stderr=subprocess.DEVNULL)
            wait_http("http://127.0.0.1:19091/-/healthy")
            try:
                run = loadgen("--agents", 10000, "--interval-s", 0, "--duration-s", args.seconds, "--connections",
                              args.connections, "--target", "pushgateway", target_url="http://127.0.0.1:19091")
                rates.append(run["accepted_per_s"])
            finally:
                process.terminate()
                process.wait()
        results["pushgateway_per_s"] = median(rates)


def bench_fleet(results, args):
    log(f"simulated fleet: 100,000 agents at a 30 s interval for {args.fleet_seconds} s")
    stack = Stack()
    try:
        run = loadgen("--agents", 100000, "--interval-s", 30, "--duration-s", args.fleet_seconds, "--connections", 64,
                      target_url=stack.ingest_url, query_url=stack.query_url)
        results["fleet"] = run
    finally:
        stack.close()


def bench_queries(results, args):
    for agents in (10000, 100000):
        log(f"capacity query over {agents:,} agents, a filter matching ~6 %")
        stack = Stack(durability="normal")
        try:
            # Closed loop until every agent has reported at least once.
            seeded = loadgen("--agents", agents, "--interval-s", 0, "--duration-s", max(10, agents / 2500),
                             "--connections", 32, target_url=stack.ingest_url)
            assert seeded["accepted"] >= agents, seeded
            url = f"{stack.query_url}/v1/agents?min_gpu_vram_gb=23&limit=100"
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
            times = []
            for _ in range(200):
                started = time.perf_counter()
                answer = json.loads(urllib.request.urlopen(request).read())
                times.append((time.perf_counter() - started) * 1000)
            assert len(answer["agents"]) == 100
            results[f"query_p50_ms_{agents}"] = median(times)
            # /metrics: a plain scrape (fleet aggregates) and a 1,000-agent selection.
            for name, query in (("plain", ""), ("selection", "?status=all&limit=1000")):
                scrape = urllib.request.Request(f"{stack.query_url}/metrics{query}", headers={"Authorization": f"Bearer {TOKEN}"})
                started = time.perf_counter()
                size = len(urllib.request.urlopen(scrape, timeout=60).read())
                results[f"metrics_{name}_{agents}"] = {"bytes": size, "ms": (time.perf_counter() - started) * 1000}
        finally:
            stack.close()


def bench_lambda(results, args):
    log("Lambda runtime harness with release binaries")
    colds, warms, beats = [], [], []
    for _ in range(args.repeats):
        output = subprocess.run(["cargo", "test", "-q", "--release", "-p", "rollcall-tests", "--test", "lambda_runtime", "--",
                                 "--nocapture"], cwd=ROOT, env={**ENV, "ROLLCALL_TEST_BIN_DIR": str(RELEASE)},
                                capture_output=True, text=True)
        line = next(l for l in output.stdout.splitlines() if "runtime harness" in l)
        numbers = re.findall(r"([\d.]+)(ms|µs)", line)
        to_ms = [float(v) / (1000 if unit == "µs" else 1) for v, unit in numbers]
        colds.append(to_ms[0])
        warms.append(to_ms[2])
        beats.append(to_ms[3])
    results.update(lambda_cold_ms=median(colds), lambda_warm_ms=median(warms), lambda_warm_heartbeat_ms=median(beats))


def bench_dynamodb(results, args):
    """DynamoDB units: the unit model over a long simulated run with churn (in memory), and the real store on the
    AWS emulator (ministack, from .venv; scripts/test installs it) with capacity queries that match 5 %."""
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "rollcall-bench", "--bin", "rollcall-dynamo-sim"],
                   cwd=ROOT, check=True)
    sim = RELEASE / "rollcall-dynamo-sim"
    hours = "4" if args.quick else "24"
    log(f"DynamoDB write units: churn model, 1,000 agents for {hours} h")
    model = subprocess.run([sim, "model", "--agents", "1000", "--hours", hours], capture_output=True, text=True, check=True)
    results["ddb_model"] = model.stdout.strip()
    chosen = re.search(r"\(chosen\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", model.stdout)
    results["ddb_write_units"] = float(chosen.group(3))
    results["ddb_table_units"] = float(chosen.group(1))
    sums = re.search(r"fleet sums: .* ([\d.]+) write units per heartbeat", model.stdout)
    if sums:
        results["ddb_fleet_sums_units"] = float(sums.group(1))
    ministack = ROOT / ".venv" / "bin" / "ministack"
    if not ministack.exists():
        log("DynamoDB on the emulator: skipped (run scripts/test once to install the emulator)")
        return
    port = 14566
    emulator = subprocess.Popen([ministack], env={**ENV, "BIND_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), "LOG_LEVEL": "WARNING"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/_ministack/health", limit=60)
        env = {**ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "ROLLCALL_TEST_AWS_ENDPOINT": f"http://127.0.0.1:{port}",
               "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        output = subprocess.run(["cargo", "test", "-q", "--release", "-p", "rollcall-tests", "--test", "dynamodb",
                                 "one_write_unit", "--", "--include-ignored", "--nocapture"],
                                cwd=ROOT, env=env, capture_output=True, text=True)
        window = re.search(r"five-minute window with two GPUs is (\d+) bytes", output.stdout)
        if window:
            results["ddb_history_window_bytes"] = int(window.group(1))
        size = re.search(r"two-GPU item: (\d+) bytes", output.stdout)
        if size:
            results["ddb_item_bytes"] = int(size.group(1))
        fleets = (2000,) if args.quick else (10000, 100000)
        results["ddb_emulator"] = []
        for fleet in fleets:
            log(f"DynamoDB on the emulator: {fleet:,} agents, then capacity queries")
            # The emulator answers a query over 100,000 items slowly: fewer samples there.
            queries = "5" if fleet >= 100000 else "20"
            run = subprocess.run([sim, "emulator", "--agents", str(fleet), "--intervals", "1", "--queries", queries],
                                 env=env, capture_output=True, text=True, check=True)
            results["ddb_emulator"].append(run.stdout.strip())
    finally:
        os.killpg(emulator.pid, signal.SIGTERM)
        emulator.wait()


def partitions(r):
    """The per-partition write rates of docs/dynamodb.md, from this run's unit figures."""
    found = re.search(r"\(chosen\) \| [\d.]+ \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \|", r.get("ddb_model", ""))
    if not found:
        return ""
    average, busiest = float(found.group(1)), float(found.group(2))
    rows = "\n".join(f"| {agents:,} | {agents / 30 * average / 8:.0f} / {agents / 30 * busiest / 8:.0f} | {agents / 30 * 1.1:,.0f} | "
                     f"{math.ceil(agents / 30 * 1.1 / 500)} |" for agents in (100_000, 1_000_000))
    return f"""**Partitions** (`docs/dynamodb.md`, "Partitions and shards"): index writes per second are agents / 30 × {average:.4f}
on average and × {busiest:.4f} in the model's busiest interval, over the 8 default shards; table writes spread over the
partitions that `FleetSize` pre-warms. No partition is asked for more than half of its 1,000 writes a second:

| agents | index writes/s per shard, average / busiest | table writes/s (with history) | table partitions at ≤ 500/s |
| --- | --- | --- | --- |
{rows}

"""


def machine():
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), platform.processor())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory_gb:.0f} GiB, {platform.platform()}"


def kept_section(title):
    """A section of the current BENCHMARKS.md that a test, not this script,
    measures (its command is in it): carried over as it stands."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else ""
    start = text.find(f"## {title}\n")
    if start < 0:
        return ""
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end + 1]


def base_section(r):
    """The collector beside a base commit's, both measured in this run
    (`--base`), or the section as it was when the run had none."""
    base = r.get("base")
    if not base:
        return kept_section("The collector against a base commit")
    today, then = r["base"]["today_rss_kb"], base["rss_kb"]
    change = 100 * (median(today) - median(then)) / median(then)
    size_change = 100 * (r["collector_binary_bytes"] - base["binary_bytes"]) / base["binary_bytes"]
    return f"""## The collector against a base commit

Measured by `bench/run` (`--base {base['ref']}`, commit `{base['commit']}`): both built for size, the base in a
worktree of its own, {len(then)} of each in service mode at a 1 s interval against one local ingest, started
interleaved, resident memory after the same time.

| collector | resident memory (each run) | median | stripped binary |
| --- | --- | --- | --- |
| base `{base['commit']}` | {", ".join(f"{kb:,} kB" for kb in then)} | {median(then):,.0f} kB | {base['binary_bytes']:,} bytes |
| today | {", ".join(f"{kb:,} kB" for kb in today)} | {median(today):,.0f} kB | {r['collector_binary_bytes']:,} bytes |
| change | | {change:+.1f} % | {size_change:+.1f} % |

"""


def write_report(results, args):
    r = results
    ratio = lambda a, b: f"{a / b:.1f}×" if a and b else "n/a"
    fleet = r.get("fleet", {})
    rows = [
        ("collector resident memory, service mode, after ~100 heartbeats", f"{r['collector_rss_kb'] / 1024:.1f} MiB",
         f"node_exporter {r.get('node_exporter_rss_kb', 0) / 1024:.1f} MiB ({ratio(r.get('node_exporter_rss_kb'), r['collector_rss_kb'])} more); "
         f"psutil agent {r.get('psutil_rss_kb', 0) / 1024:.1f} MiB ({ratio(r.get('psutil_rss_kb'), r['collector_rss_kb'])} more)",
         "≤ 6 MB and ≤ 1/3 of each peer"),
        ("collector CPU per heartbeat (collect + serialise + sign)", f"{r['collector_cpu_us'] / 1000:.3f} ms",
         f"node_exporter {r.get('node_exporter_cpu_ms', float('nan')):.2f} ms per scrape; psutil agent {r.get('psutil_cpu_ms', float('nan')):.2f} ms per sample",
         "≤ 0.25 ms"),
        ("`rollcall-collector once`, start to exit, POST included", f"{r['once_ms']:.0f} ms; {r['once_fast_ms']:.1f} ms with `--skip-cpu-usage`",
         "—", "≤ 250 ms / ≤ 30 ms"),
        ("stripped collector binary (`--profile collector`)", f"{r['collector_binary_bytes'] / 2**20:.1f} MiB", "—", "≤ 8 MB"),
        (f"local ingest, SQLite, fsync per commit: signed heartbeats per second ({args.connections} connections)",
         f"{r['ingest_per_s']:,.0f}/s", f"Pushgateway {r.get('pushgateway_per_s', 0):,.0f}/s ({ratio(r['ingest_per_s'], r.get('pushgateway_per_s'))})",
         "≥ 10,000/s and ≥ 20× the peer"),
        ("ingest p99 at 1,000 heartbeats/s", f"{r['ingest_p99_ms_at_1000']:.2f} ms", "—", "≤ 10 ms"),
        (f"simulated fleet: 100,000 agents at 30 s for {args.fleet_seconds} s",
         f"{fleet.get('accepted', 0):,} accepted, {fleet.get('server_errors', '?')} 5xx, {fleet.get('loss_check', {}).get('lost', '?')} lost, "
         f"p99 {fleet.get('latency_ms', {}).get('p99', float('nan')):.1f} ms", "—", "zero loss, zero 5xx"),
        ("capacity query p50, 10,000 / 100,000 agents, ~6 % match", f"{r['query_p50_ms_10000']:.2f} ms / {r['query_p50_ms_100000']:.2f} ms",
         "—", "≤ 5 ms / ≤ 30 ms"),
        ("DynamoDB write units per heartbeat, churn model (see below)",
         f"{r.get('ddb_write_units', float('nan')):.4f} (item {r.get('ddb_item_bytes', '?')} bytes)", "—", "≤ 1.05"),
        ("`/metrics` at 10,000 / 100,000 agents: plain scrape (fleet aggregates); 1,000-agent selection",
         f"{r['metrics_plain_10000']['bytes']:,} / {r['metrics_plain_100000']['bytes']:,} bytes in "
         f"{r['metrics_plain_10000']['ms']:.0f} / {r['metrics_plain_100000']['ms']:.0f} ms; selection "
         f"{r['metrics_selection_100000']['bytes']:,} bytes", "—", "well under the 6 MB function URL cap"),
        ("Lambda cold-start proxy / warm invoke (Runtime API harness, /healthz)",
         f"{r['lambda_cold_ms']:.1f} ms / {r['lambda_warm_ms']:.2f} ms (a heartbeat: {r['lambda_warm_heartbeat_ms']:.2f} ms)", "—", "≤ 20 ms / ≤ 2 ms"),
    ]
    table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
    heartbeats = 30 * 24 * 3600 / 30
    # Ingest writes without reading first: one round trip, and a second for
    # the heartbeats whose index entry moves (the table units past 1.0 are
    # those failed conditions).
    fallback = max(0.0, r.get("ddb_table_units", 1.0) - 1.0)
    billed_ms = math.ceil(r["lambda_warm_heartbeat_ms"] + (1 + fallback) * DYNAMODB_ROUND_TRIP_MS)
    cost = {
        "writes": heartbeats * r.get("ddb_write_units", float("nan")) * 0.625e-6,
        "history": HISTORY_WINDOWS_PER_MONTH * 0.625e-6,
        "requests": heartbeats * 0.20e-6,
        "compute": heartbeats * 128 / 1024 * billed_ms / 1000 * 0.0000166667,
        "logs": 0.0,
        # The churn model's fleet (1,000 agents, one stream shard): the
        # fleet function's bucket writes per heartbeat.
        "fleet_sums": heartbeats * r.get("ddb_fleet_sums_units", float("nan")) * 0.625e-6,
    }
    logs_without_config = heartbeats * PLATFORM_LOG_BYTES / 1e9 * 0.50
    text = f"""# Benchmarks

Produced by `bench/run` on {time.strftime('%Y-%m-%d')}. Each figure is the median of {args.repeats} runs. Every ratio
compares figures from this same run. Peers: Debian's `prometheus-node-exporter` and `prometheus-pushgateway`, and
the psutil agent in `bench/psutil_agent.py`.

Machine: {machine()}.

Reproduce it with:

    bench/run                 # full run: peers installed, ~45 minutes (half of it the DynamoDB simulator)
    bench/run --quick         # shorter loads, for a quick check

| what | rollcall | peers, same run | target |
| --- | --- | --- | --- |
{table}

## Cost per agent on AWS

Everything a deployed stack bills per agent-month at a 30 s interval ({heartbeats:,.0f} heartbeats), at on-demand
prices: $0.625 per million write units, $0.20 per million Lambda requests, $0.0000166667 per GB-second, $0.50 per GB
of CloudWatch log ingestion.

| item | per agent per month | how |
| --- | --- | --- |
| DynamoDB heartbeat writes | ${cost['writes']:.4f} | {r.get('ddb_write_units', float('nan')):.4f} units each, from the unit model over the churn model's run (below) |
| DynamoDB history writes | ${cost['history']:.4f} | one `UpdateItem` (1 unit) per five-minute window: 474–949 bytes with 0–16 GPUs (`history.rs`, `a_window_of_real_figures_fits_one_unit_up_to_16_gpus`) |
| fleet sums (`/metrics`) | ${cost['fleet_sums']:.4f} | the fleet function's transactional bucket writes, {r.get('ddb_fleet_sums_units', float('nan')):.4f} units per heartbeat at the churn model's 1,000 agents (one stream shard); far less per agent on larger fleets (docs/dynamodb.md, "Fleet sums") |
| Lambda requests | ${cost['requests']:.4f} | one per heartbeat; history rides along |
| Lambda duration | ${cost['compute']:.5f} | 128 MB for {billed_ms} ms: the measured warm heartbeat ({r['lambda_warm_heartbeat_ms']:.2f} ms) plus one {DYNAMODB_ROUND_TRIP_MS} ms DynamoDB round trip ({100 * fallback:.2f} % of heartbeats take a second), rounded up to the 1 ms billing step |
| CloudWatch logs | ${cost['logs']:.4f} | nothing per heartbeat: JSON logs at WARN, Lambda's per-invocation lines off (they would add ${logs_without_config:.4f}) |
| **total** | **${sum(cost.values()):.3f}** | |

Per stack, whatever the fleet size: three Secrets Manager secrets at $0.40 a month ($1.20), and one
`GetSecretValue` per warm function instance every five minutes ($0.04 per instance-month). Function URLs cost nothing
beyond Lambda. Capacity queries are billed by the reader, at $0.125 per million read units; what a query reads is
in the next section.

## DynamoDB: write and read units

Write units come from the unit model (`rollcall/src/store/dynamodb/units.rs`, AWS's documented rules) applied to
every heartbeat of a simulated fleet whose free VRAM moves like real machines' (the churn model is described in
`bench/src/bin/dynamo_sim.rs` and `docs/dynamodb.md`), under each index design weighed:

    cargo run --release -p rollcall-bench --bin rollcall-dynamo-sim -- model --agents 1000 --hours 24

{r.get('ddb_model', '(not run)')}

The real store on the AWS emulator: a fleet written through `DynamoStore` (one interval of churn after each agent's
first heartbeat, units computed from the old item each write returns), then the first page of 100 of a capacity
query matching 5 % and of one with no filter, against what the earlier exact-rank index read for the same page.
Latency is the emulator's on this machine, not DynamoDB's:

    AWS_ENDPOINT_URL=http://127.0.0.1:4566 rollcall-dynamo-sim emulator --agents 100000 --intervals 1

```
{chr(10).join(r.get('ddb_emulator', ['(not run: no emulator)']))}
```

{partitions(r)}{kept_section("`/metrics` at fleet scale")}{kept_section("Claims")}{kept_section("GPU processes")}{kept_section("State changes")}{base_section(r)}{kept_section("Faults on a real network")}{kept_section("Building the tests")}## Where a target is missed, and why

- **Cost per agent-month: the target is $0.08** (the table above). Writes at the floor and Lambda's per-request
  price are most of it; no read precedes a write, so history and one DynamoDB round trip of duration are the rest.
  A 60 s interval halves every per-heartbeat line. State changes' deadline index adds $0.054 on top (section
  "State changes"): with it the target is missed, at about $0.133.
- **Collector memory on a GPU host.** The figure above is for a host without an NVIDIA driver. Where one is present,
  NVML is loaded into the process. Measured by hand on an H200 host (driver 580.159; not by this script), the same binary in service mode held 24.2 MB
  resident: 8.6 MB of file pages and 15.6 MB of anonymous memory, nearly all of it NVML's own state. Without the driver
  the anonymous part is 0.5 MB. node_exporter does not read GPUs at all, and a psutil agent with pynvml loads the same
  library. Loading NVML only around each read and unloading it afterwards could cut this, at the cost of a driver
  initialisation per heartbeat. That is not done yet.

## Raw figures

```json
{json.dumps(results, indent=2, sort_keys=True)}
```
"""
    (ROOT / "BENCHMARKS.md").write_text(text)
    print(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter loads (fleet 60 s, 20 heartbeats, 3 repeats)")
    parser.add_argument("--base", default=default_base(),
                        help="a tag or commit whose collector runs beside today's, so that growth shows "
                             "(default: the newest release tag, else 021de87); --base '' skips it")
    parser.add_argument("--collector-only", action="store_true",
                        help="measure the collector (and the base beside it) only, print the figures, write nothing")
    args = parser.parse_args()
    args.repeats = 3 if args.quick else 5
    args.heartbeats = 20 if args.quick else 100
    args.seconds = 5 if args.quick else 10
    args.fleet_seconds = 60 if args.quick else 300
    args.connections = 32
    results = {}
    if args.collector_only:
        bench_collector(results, args)
        print(base_section(results) or json.dumps(results, indent=2))
        return
    bench_collector(results, args)
    bench_peers(results, args)
    bench_ingest(results, args)
    bench_queries(results, args)
    bench_lambda(results, args)
    bench_dynamodb(results, args)
    bench_fleet(results, args)
    write_report(results, args)


if __name__ == "__main__":
    main()
