//! `GET /metrics`: the fleet in Prometheus' OpenMetrics text format, for
//! Grafana. Encoded by `prometheus-client`, from a fresh registry per scrape,
//! so that agents that expire disappear from the exposition with them.
//!
//! A function URL answer is capped at 6 MB, and a scrape of 100,000 agents'
//! own series would pass that. So a plain scrape carries the fleet's sums
//! only (by status and pool: a few lines whatever the fleet size, read from
//! the store's sums, never by reading the fleet: `Store::fleet`), and
//! per-agent and per-GPU series come only for a selection the scrape names
//! with the capacity API's parameters (`?pool=render&status=all&limit=500`):
//! one page of at most `MAX_LIMIT` agents.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use rollcall::capacity::CapacityQuery;
use rollcall::fleet::FleetTotals;
use rollcall::record::StoredAgent;
use rollcall::store::{Store, StoreError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent_id: String,
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    agent_id: String,
    gpu: String,
    vendor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    agent_id: String,
    gpu: String,
    /// A command name; `other` for the rest of a GPU's processes.
    process: String,
}

/// Process names per GPU with series of their own; the rest are summed as
/// `other`, so that a GPU shows at most this many plus one.
const PROCESS_SERIES_PER_GPU: usize = 3;

type FloatGauge = Gauge<f64, AtomicU64>;

const MIB: f64 = 1024.0 * 1024.0;

/// Fleet-wide figures by pool, from the store's sums.
#[derive(Default)]
struct Fleet {
    agents: Family<StatusLabels, Gauge>,
    cores_available: Family<PoolLabels, Gauge>,
    gpus: Family<PoolLabels, Gauge>,
    gpu_free: Family<PoolLabels, FloatGauge>,
    gpu_total: Family<PoolLabels, FloatGauge>,
}

impl Fleet {
    fn of(totals: &FleetTotals) -> Self {
        let fleet = Fleet::default();
        for (pool, sums) in &totals.pools {
            for (status, agents) in [("online", sums.online.agents), ("offline", sums.offline())] {
                fleet
                    .agents
                    .get_or_create(&StatusLabels {
                        status: status.into(),
                        pool: pool.clone(),
                    })
                    .set(agents);
            }
            let labels = PoolLabels { pool: pool.clone() };
            let online = &sums.online;
            fleet
                .cores_available
                .get_or_create(&labels)
                .set(online.cores_available);
            fleet.gpus.get_or_create(&labels).set(online.gpus);
            fleet
                .gpu_free
                .get_or_create(&labels)
                .set(online.gpu_free_mb as f64 * MIB);
            fleet
                .gpu_total
                .get_or_create(&labels)
                .set(online.gpu_total_mb as f64 * MIB);
        }
        fleet
    }

    fn register(self, registry: &mut Registry) {
        registry.register(
            "agents",
            "Agents on record, by status and pool",
            self.agents,
        );
        registry.register(
            "pool_cores_available",
            "Free cores of the online agents, by pool",
            self.cores_available,
        );
        registry.register("pool_gpus", "GPUs of the online agents, by pool", self.gpus);
        registry.register_with_unit(
            "pool_gpu_memory_free",
            "Free VRAM of the online agents, by pool",
            Unit::Bytes,
            self.gpu_free,
        );
        registry.register_with_unit(
            "pool_gpu_memory_total",
            "Total VRAM of the online agents, by pool",
            Unit::Bytes,
            self.gpu_total,
        );
    }
}

/// One series per selected agent and per GPU of it.
#[derive(Default)]
struct PerAgent {
    online: Family<AgentLabels, Gauge>,
    cores: Family<AgentLabels, Gauge>,
    memory: Family<AgentLabels, FloatGauge>,
    since: Family<AgentLabels, FloatGauge>,
    gpu_free: Family<GpuLabels, FloatGauge>,
    gpu_total: Family<GpuLabels, FloatGauge>,
    gpu_busy: Family<GpuLabels, FloatGauge>,
    collector_memory: Family<AgentLabels, FloatGauge>,
    collector_cpu: Family<AgentLabels, FloatGauge>,
    gpu_claimed: Family<GpuLabels, Gauge>,
    process_memory: Family<ProcessLabels, FloatGauge>,
}

impl PerAgent {
    /// GPU memory held by process name: the largest names each, the rest
    /// as `other` (unnamed processes count as `other` too).
    fn add_processes(&self, agent_id: &str, snapshot: &rollcall::heartbeat::GpuProcesses) {
        for (gpu, processes) in &snapshot.gpus {
            let mut by_name: std::collections::BTreeMap<&str, u64> = Default::default();
            let mut other = 0;
            for process in processes {
                match &process.name {
                    Some(name) => *by_name.entry(name).or_default() += process.used_mb,
                    None => other += process.used_mb,
                }
            }
            let mut named: Vec<(&str, u64)> = by_name.into_iter().collect();
            named.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            other += named
                .iter()
                .skip(PROCESS_SERIES_PER_GPU)
                .map(|(_, used)| used)
                .sum::<u64>();
            named.truncate(PROCESS_SERIES_PER_GPU);
            let series = named
                .into_iter()
                .chain((other > 0).then_some(("other", other)));
            for (name, used_mb) in series {
                self.process_memory
                    .get_or_create(&ProcessLabels {
                        agent_id: agent_id.to_owned(),
                        gpu: gpu.to_string(),
                        process: name.to_owned(),
                    })
                    .set(used_mb as f64 * MIB);
            }
        }
    }

    fn add(&self, agent: &StoredAgent, now_ms: i64) {
        let heartbeat = &agent.heartbeat;
        let labels = AgentLabels {
            agent_id: heartbeat.agent_id.clone(),
            pool: heartbeat.pool.clone(),
        };
        self.online
            .get_or_create(&labels)
            .set(i64::from(agent.is_online(now_ms)));
        self.cores
            .get_or_create(&labels)
            .set(i64::from(heartbeat.cpu.cores_available));
        self.memory
            .get_or_create(&labels)
            .set(heartbeat.memory.available_mb as f64 * MIB);
        self.since
            .get_or_create(&labels)
            .set((now_ms - agent.received_at_ms).max(0) as f64 / 1000.0);
        if let Some(cost) = &heartbeat.collector {
            if let Some(rss_mb) = cost.rss_mb {
                self.collector_memory
                    .get_or_create(&labels)
                    .set(rss_mb * MIB);
            }
            if let Some(cpu_s) = cost.cpu_s {
                self.collector_cpu.get_or_create(&labels).set(cpu_s);
            }
        }
        for gpu in &heartbeat.gpus {
            let gpu_labels = GpuLabels {
                agent_id: heartbeat.agent_id.clone(),
                gpu: gpu.index.to_string(),
                vendor: gpu.vendor.as_str().to_owned(),
            };
            self.gpu_free
                .get_or_create(&gpu_labels)
                .set(gpu.memory_free_mb as f64 * MIB);
            self.gpu_total
                .get_or_create(&gpu_labels)
                .set(gpu.memory_total_mb as f64 * MIB);
            if let Some(percent) = gpu.utilization_percent {
                self.gpu_busy
                    .get_or_create(&gpu_labels)
                    .set(percent / 100.0);
            }
            self.gpu_claimed
                .get_or_create(&gpu_labels)
                .set(i64::from(agent.claims.holder_of(gpu.index).is_some()));
        }
    }

    fn register(self, registry: &mut Registry) {
        registry.register(
            "agent_online",
            "1 while the agent is online (now < online_until), else 0",
            self.online,
        );
        registry.register(
            "agent_cores_available",
            "Cores free for new work: floor(cores - load_1m)",
            self.cores,
        );
        registry.register_with_unit(
            "agent_memory_available",
            "Memory available",
            Unit::Bytes,
            self.memory,
        );
        registry.register_with_unit(
            "agent_since_heartbeat",
            "Time since the agent's last accepted heartbeat",
            Unit::Seconds,
            self.since,
        );
        registry.register_with_unit(
            "gpu_memory_free",
            "Free VRAM per GPU",
            Unit::Bytes,
            self.gpu_free,
        );
        registry.register_with_unit(
            "gpu_memory_total",
            "Total VRAM per GPU",
            Unit::Bytes,
            self.gpu_total,
        );
        registry.register(
            "gpu_utilization_ratio",
            "GPU utilisation, 0 to 1, where the collector reports it",
            self.gpu_busy,
        );
        registry.register_with_unit(
            "collector_resident_memory",
            "The collector's own resident memory on its machine",
            Unit::Bytes,
            self.collector_memory,
        );
        registry.register(
            "gpu_claimed",
            "1 while a live claim holds the GPU (PROTOCOL.md §4), else 0",
            self.gpu_claimed,
        );
        registry.register_with_unit(
            "gpu_process_memory_used",
            "GPU memory held by processes of one name: the largest few per GPU, the rest as process=\"other\"",
            Unit::Bytes,
            self.process_memory,
        );
        registry.register_with_unit(
            "collector_cpu",
            "CPU time the collector has used since it started",
            Unit::Seconds,
            self.collector_cpu,
        );
    }
}

/// The exposition: the fleet's sums by pool, plus
/// per-agent series for the first page of `selection` when one is given.
/// The exposition for a caller that sees `pools` (`None`: every pool; a
/// pool-limited token learns nothing of the others, not even their names).
pub async fn render(
    store: &dyn Store,
    selection: Option<&CapacityQuery>,
    pools: Option<&[String]>,
    now_ms: i64,
) -> Result<String, StoreError> {
    let mut totals = store.fleet(now_ms).await?;
    if let Some(pools) = pools {
        totals.pools.retain(|pool, _| pools.contains(pool));
    }
    let fleet = Fleet::of(&totals);
    let mut registry = Registry::with_prefix("rollcall");
    fleet.register(&mut registry);
    if let Some(selection) = selection {
        let per_agent = PerAgent::default();
        let page = store.query(selection, None, now_ms).await?;
        page.agents
            .iter()
            .for_each(|agent| per_agent.add(agent, now_ms));
        let ids: Vec<String> = page
            .agents
            .iter()
            .map(|agent| agent.agent_id().to_owned())
            .collect();
        // Processes are an extension: series without them beat no scrape.
        match store.processes_of(&ids, now_ms).await {
            Ok(snapshots) => snapshots
                .iter()
                .for_each(|(agent_id, snapshot)| per_agent.add_processes(agent_id, snapshot)),
            Err(error) => tracing::warn!(%error, "GPU processes not read for /metrics"),
        }
        per_agent.register(&mut registry);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|error| StoreError::Corrupt(format!("cannot encode metrics: {error}")))?;
    Ok(text)
}
