//! What the store keeps for an agent, and how it becomes the record the
//! capacity API shows (PROTOCOL.md §1 "Online and offline", §2 "An agent
//! record"; the record's type is `wire::AgentView`).

use crate::time::rfc3339;
use serde::{Deserialize, Serialize};

use crate::changes::Availability;
use crate::claims::{AgentClaims, GpuClaimView};
use crate::heartbeat::{AgentState, Heartbeat};
use crate::wire::{AgentView, GpuView, Status};

/// Bounds on the interval used for the deadline, so that a collector cannot
/// stay online for days with one heartbeat or flap with sub-second intervals.
pub const MIN_DEADLINE_INTERVAL_S: u32 = 5;
pub const MAX_DEADLINE_INTERVAL_S: u32 = 3600;
pub const DEFAULT_GRACE_MULTIPLIER: u32 = 3;
pub const DEFAULT_RETENTION_S: i64 = 7 * 24 * 3600;

/// How long an accepted heartbeat keeps its agent online and on record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub grace_multiplier: u32,
    pub retention_s: i64,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            grace_multiplier: DEFAULT_GRACE_MULTIPLIER,
            retention_s: DEFAULT_RETENTION_S,
        }
    }
}

/// One agent's latest accepted heartbeat and the times ingest derived from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredAgent {
    pub heartbeat: Heartbeat,
    pub received_at_ms: i64,
    /// Online exactly while `now < online_until_ms`.
    pub online_until_ms: i64,
    /// DynamoDB-style TTL, epoch seconds: past this the record is gone.
    pub expires_at_s: i64,
    /// The live claims on its GPUs when the store read it. Kept apart from
    /// the record (a heartbeat never carries or overwrites a claim), so
    /// never serialized with it.
    #[serde(skip)]
    pub claims: AgentClaims,
    /// What its `uptime_30d` is computed from, kept beside the record and
    /// moved by transitions only (`changes`); `None` until the store has
    /// recorded one.
    #[serde(skip)]
    pub availability: Option<Availability>,
}

impl StoredAgent {
    pub fn accept(heartbeat: Heartbeat, received_at_ms: i64, deadlines: Deadlines) -> Self {
        let online_until_ms = match heartbeat.state {
            AgentState::Leaving => received_at_ms,
            // A draining machine is online like any other (PROTOCOL.md §3).
            AgentState::Up | AgentState::Draining => {
                let interval = heartbeat
                    .interval_s
                    .clamp(MIN_DEADLINE_INTERVAL_S, MAX_DEADLINE_INTERVAL_S);
                received_at_ms + i64::from(deadlines.grace_multiplier) * i64::from(interval) * 1000
            }
        };
        // Rounded up so that the record never expires before it goes offline.
        let expires_at_s = online_until_ms.div_euclid(1000) + 1 + deadlines.retention_s;
        Self {
            heartbeat,
            received_at_ms,
            online_until_ms,
            expires_at_s,
            claims: AgentClaims::default(),
            availability: None,
        }
    }

    pub fn agent_id(&self) -> &str {
        &self.heartbeat.agent_id
    }

    pub fn is_online(&self, now_ms: i64) -> bool {
        now_ms < self.online_until_ms
    }

    pub fn is_expired(&self, now_ms: i64) -> bool {
        now_ms >= self.expires_at_s * 1000
    }

    pub fn status(&self, now_ms: i64) -> Status {
        if self.is_online(now_ms) {
            Status::Online
        } else {
            Status::Offline
        }
    }

    /// The share of the last 30 days it was available (PROTOCOL.md §4). A
    /// record whose availability is not yet recorded counts from its
    /// heartbeat; one past its deadline is down since then even before a
    /// store marks it.
    pub fn uptime_30d(&self, now_ms: i64) -> f64 {
        let offline_since = (!self.is_online(now_ms)).then_some(self.online_until_ms);
        match &self.availability {
            Some(availability) => availability.uptime(now_ms, offline_since),
            None => Availability::first_seen(self.received_at_ms).uptime(now_ms, offline_since),
        }
    }

    pub fn view(&self, now_ms: i64) -> AgentView {
        let heartbeat = &self.heartbeat;
        let memory = &heartbeat.memory;
        let memory_percent = if memory.total_mb == 0 {
            0.0
        } else {
            (memory.total_mb - memory.available_mb) as f64 / memory.total_mb as f64 * 100.0
        };
        AgentView {
            agent_id: heartbeat.agent_id.clone(),
            status: self.status(now_ms),
            state: heartbeat.state,
            pool: heartbeat.pool.clone(),
            labels: heartbeat.labels.clone(),
            hostname: heartbeat
                .host
                .as_ref()
                .and_then(|host| host.hostname.clone()),
            last_heartbeat_at: rfc3339(self.received_at_ms),
            online_until: rfc3339(self.online_until_ms),
            sent_at_ms: heartbeat.sent_at_ms,
            interval_s: heartbeat.interval_s,
            cpu_cores_physical: heartbeat.cpu.cores_physical,
            cpu_cores_logical: heartbeat.cpu.cores_logical,
            cpu_cores_available: heartbeat.cpu.cores_available,
            cpu_load_1min: heartbeat.cpu.load_1m,
            cpu_load_5min: heartbeat.cpu.load_5m,
            cpu_load_15min: heartbeat.cpu.load_15m,
            cpu_usage_percent: heartbeat.cpu.usage_percent,
            memory_total_gb: mb_to_gb(memory.total_mb),
            memory_available_gb: mb_to_gb(memory.available_mb),
            memory_percent: round2(memory_percent),
            gpu_type: heartbeat
                .gpus
                .first()
                .map_or("none", |gpu| gpu.vendor.as_str())
                .to_owned(),
            gpu_count: heartbeat.gpus.len(),
            gpu_vram_total_gb: mb_to_gb(heartbeat.gpus.iter().map(|gpu| gpu.memory_total_mb).sum()),
            gpu_vram_available_gb: mb_to_gb(
                heartbeat.gpus.iter().map(|gpu| gpu.memory_free_mb).sum(),
            ),
            gpu_vram_available_max_gb: mb_to_gb(heartbeat.max_gpu_free_mb()),
            gpus: heartbeat
                .gpus
                .iter()
                .map(|gpu| GpuView {
                    index: gpu.index,
                    vendor: gpu.vendor,
                    name: gpu.name.clone(),
                    uuid: gpu.uuid.clone(),
                    memory_total_gb: mb_to_gb(gpu.memory_total_mb),
                    memory_free_gb: mb_to_gb(gpu.memory_free_mb),
                    utilization_percent: gpu.utilization_percent,
                    claim: self.claims.holder_of(gpu.index).map(GpuClaimView::from),
                    processes: None,
                })
                .collect(),
            uptime_30d: self.uptime_30d(now_ms),
            collector_rss_mb: heartbeat.collector.as_ref().and_then(|c| c.rss_mb),
            collector_cpu_s: heartbeat.collector.as_ref().and_then(|c| c.cpu_s),
        }
    }
}

/// GiB with three decimals: MiB precision, without float noise in answers.
pub fn mb_to_gb(mb: u64) -> f64 {
    (mb as f64 / 1024.0 * 1000.0).round() / 1000.0
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::tests::example;

    fn heartbeat(interval_s: u32, state: AgentState) -> Heartbeat {
        let mut heartbeat: Heartbeat = serde_json::from_value(example()).unwrap();
        heartbeat.interval_s = interval_s;
        heartbeat.state = state;
        heartbeat
    }

    #[test]
    fn deadline_is_grace_times_clamped_interval() {
        let d = Deadlines::default();
        assert_eq!(
            StoredAgent::accept(heartbeat(30, AgentState::Up), 1_000, d).online_until_ms,
            91_000
        );
        assert_eq!(
            StoredAgent::accept(heartbeat(1, AgentState::Up), 1_000, d).online_until_ms,
            16_000
        );
        assert_eq!(
            StoredAgent::accept(heartbeat(100_000, AgentState::Up), 0, d).online_until_ms,
            10_800_000
        );
    }

    #[test]
    fn online_exactly_before_the_deadline_and_leaving_is_offline_at_once() {
        let agent = StoredAgent::accept(heartbeat(30, AgentState::Up), 1_000, Deadlines::default());
        assert!(agent.is_online(90_999));
        assert!(!agent.is_online(91_000));
        let leaving = StoredAgent::accept(
            heartbeat(30, AgentState::Leaving),
            1_000,
            Deadlines::default(),
        );
        assert_eq!(leaving.status(1_000), Status::Offline);
    }

    #[test]
    fn expiry_is_retention_after_the_deadline() {
        let agent = StoredAgent::accept(
            heartbeat(30, AgentState::Up),
            1_000,
            Deadlines {
                grace_multiplier: 3,
                retention_s: 60,
            },
        );
        assert_eq!(agent.expires_at_s, 92 + 60);
        assert!(!agent.is_expired(151_999));
        assert!(agent.is_expired(152_000));
    }

    #[test]
    fn view_derives_the_protocol_figures() {
        let agent = StoredAgent::accept(
            heartbeat(30, AgentState::Up),
            1_764_132_000_123,
            Deadlines::default(),
        );
        let view = agent.view(1_764_132_000_200);
        assert_eq!(view.status, Status::Online);
        assert_eq!(view.gpu_type, "nvidia");
        assert_eq!(view.gpu_vram_available_max_gb, 19.639);
        assert_eq!(view.memory_percent, 35.94);
        assert_eq!(view.last_heartbeat_at, "2025-11-26T04:40:00.123Z");
    }
}
