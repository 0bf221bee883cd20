//! The fleet's figures that `/metrics` shows on every scrape: what one agent
//! adds to them ([`Share`]) and their sums by pool ([`FleetTotals`]).
//!
//! SQLite sums them from its records when asked. DynamoDB keeps them summed
//! as agents write (`store::dynamodb::fleet`), so that a scrape of a fleet
//! of a million reads a few small items, never the fleet. Both add agents
//! with the one rule here.

use std::collections::BTreeMap;

use crate::record::StoredAgent;

/// Figures that add up over agents. Signed, because DynamoDB keeps them as
/// sums of changes, and a change takes an agent's old share away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub agents: i64,
    pub cores_available: i64,
    pub gpus: i64,
    pub gpu_free_mb: i64,
    pub gpu_total_mb: i64,
}

impl Figures {
    pub fn add(&mut self, other: &Figures, sign: i64) {
        self.agents += sign * other.agents;
        self.cores_available += sign * other.cores_available;
        self.gpus += sign * other.gpus;
        self.gpu_free_mb += sign * other.gpu_free_mb;
        self.gpu_total_mb += sign * other.gpu_total_mb;
    }

    pub fn is_zero(&self) -> bool {
        *self == Figures::default()
    }
}

/// What one agent's record adds to the fleet: one agent on record until it
/// expires, and its figures to its pool's online sums until its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub pool: String,
    pub received_at_ms: i64,
    pub online_until_ms: i64,
    pub expires_at_s: i64,
    pub online: Figures,
}

impl Share {
    pub fn of(agent: &StoredAgent) -> Self {
        let heartbeat = &agent.heartbeat;
        let gpu_sum = |figure: fn(&crate::heartbeat::Gpu) -> u64| {
            heartbeat
                .gpus
                .iter()
                .map(|gpu| i64::try_from(figure(gpu)).unwrap_or(i64::MAX))
                .fold(0i64, i64::saturating_add)
        };
        Self {
            pool: heartbeat.pool.clone(),
            received_at_ms: agent.received_at_ms,
            online_until_ms: agent.online_until_ms,
            expires_at_s: agent.expires_at_s,
            online: Figures {
                agents: 1,
                cores_available: i64::from(heartbeat.cpu.cores_available),
                gpus: heartbeat.gpus.len() as i64,
                gpu_free_mb: gpu_sum(|gpu| gpu.memory_free_mb),
                gpu_total_mb: gpu_sum(|gpu| gpu.memory_total_mb),
            },
        }
    }
}

/// One pool's sums: agents on record (online or not), and the figures of
/// those online.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolTotals {
    pub on_record: i64,
    pub online: Figures,
}

impl PoolTotals {
    pub fn offline(&self) -> i64 {
        self.on_record - self.online.agents
    }
}

/// The fleet's sums by pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetTotals {
    pub pools: BTreeMap<String, PoolTotals>,
}

impl FleetTotals {
    /// Adds one agent as it stands at `now_ms`.
    pub fn add(&mut self, agent: &StoredAgent, now_ms: i64) {
        if agent.is_expired(now_ms) {
            return;
        }
        let share = Share::of(agent);
        let pool = self.pools.entry(share.pool).or_default();
        pool.on_record += 1;
        if agent.is_online(now_ms) {
            pool.online.add(&share.online, 1);
        }
    }
}
