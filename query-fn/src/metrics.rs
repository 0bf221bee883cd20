//! `GET /metrics`: the fleet in Prometheus' OpenMetrics text format, for
//! Grafana. Encoded by `prometheus-client`, from a fresh registry per scrape,
//! so that agents that expire disappear from the exposition with them.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use rollcall::capacity::{CapacityQuery, MAX_LIMIT, StatusFilter};
use rollcall::store::{Store, StoreError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
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

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every agent on record (any status, not expired), as one exposition.
pub async fn render(store: &dyn Store, now_ms: i64) -> Result<String, StoreError> {
    let agents_by_status = Family::<StatusLabels, Gauge>::default();
    let online = Family::<AgentLabels, Gauge>::default();
    let cores = Family::<AgentLabels, Gauge>::default();
    let memory = Family::<AgentLabels, FloatGauge>::default();
    let since = Family::<AgentLabels, FloatGauge>::default();
    let gpu_free = Family::<GpuLabels, FloatGauge>::default();
    let gpu_total = Family::<GpuLabels, FloatGauge>::default();
    let gpu_busy = Family::<GpuLabels, FloatGauge>::default();

    let query = CapacityQuery {
        status: StatusFilter::All,
        limit: MAX_LIMIT,
        ..CapacityQuery::default()
    };
    let mut after = None;
    loop {
        let page = store.query(&query, after.as_ref(), now_ms).await?;
        for agent in &page.agents {
            let view = agent.view(now_ms);
            let status = format!("{:?}", view.status).to_lowercase();
            agents_by_status
                .get_or_create(&StatusLabels {
                    status,
                    pool: view.pool.clone(),
                })
                .inc();
            let labels = AgentLabels {
                agent_id: view.agent_id.clone(),
                pool: view.pool.clone(),
            };
            online
                .get_or_create(&labels)
                .set(i64::from(agent.is_online(now_ms)));
            cores
                .get_or_create(&labels)
                .set(i64::from(view.cpu_cores_available));
            memory
                .get_or_create(&labels)
                .set(view.memory_available_gb * 1024.0 * 1024.0 * 1024.0);
            since
                .get_or_create(&labels)
                .set((now_ms - agent.received_at_ms).max(0) as f64 / 1000.0);
            for gpu in &agent.heartbeat.gpus {
                let gpu_labels = GpuLabels {
                    agent_id: view.agent_id.clone(),
                    gpu: gpu.index.to_string(),
                    vendor: gpu.vendor.as_str().to_owned(),
                };
                gpu_free
                    .get_or_create(&gpu_labels)
                    .set(gpu.memory_free_mb as f64 * 1024.0 * 1024.0);
                gpu_total
                    .get_or_create(&gpu_labels)
                    .set(gpu.memory_total_mb as f64 * 1024.0 * 1024.0);
                if let Some(percent) = gpu.utilization_percent {
                    gpu_busy.get_or_create(&gpu_labels).set(percent / 100.0);
                }
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }

    let mut registry = Registry::with_prefix("rollcall");
    registry.register(
        "agents",
        "Agents on record, by status and pool",
        agents_by_status,
    );
    registry.register(
        "agent_online",
        "1 while the agent is online (now < online_until), else 0",
        online,
    );
    registry.register(
        "agent_cores_available",
        "Cores free for new work: floor(cores - load_1m)",
        cores,
    );
    registry.register_with_unit(
        "agent_memory_available",
        "Memory available",
        Unit::Bytes,
        memory,
    );
    registry.register_with_unit(
        "agent_since_heartbeat",
        "Time since the agent's last accepted heartbeat",
        Unit::Seconds,
        since,
    );
    registry.register_with_unit(
        "gpu_memory_free",
        "Free VRAM per GPU",
        Unit::Bytes,
        gpu_free,
    );
    registry.register_with_unit(
        "gpu_memory_total",
        "Total VRAM per GPU",
        Unit::Bytes,
        gpu_total,
    );
    registry.register(
        "gpu_utilization_ratio",
        "GPU utilisation, 0 to 1, where the collector reports it",
        gpu_busy,
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|error| StoreError::Corrupt(format!("cannot encode metrics: {error}")))?;
    Ok(text)
}
