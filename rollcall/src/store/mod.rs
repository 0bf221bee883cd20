//! The agent store: one trait, one implementation per backend.
//!
//! Every backend keeps one record per agent, replaces it only with a strictly
//! newer `sent_at_ms` (atomically with the write), hides records past their
//! `expires_at_s`, and answers capacity queries in answer order.

#[cfg(feature = "dynamodb")]
pub mod dynamodb;
pub mod sqlite;

use async_trait::async_trait;

use crate::capacity::{CapacityQuery, Position};
use crate::changes::Event;
use crate::claims::{AgentClaims, Claim, ClaimId};
use crate::fleet::FleetTotals;
use crate::heartbeat::{GpuProcesses, MinuteRollup};
use crate::record::StoredAgent;

use std::path::PathBuf;
use std::sync::Arc;

pub use sqlite::{Durability, SqliteStore};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Written,
    /// The stored record is as new or newer: a replay or a reordering.
    Stale,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub agents: Vec<StoredAgent>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Position>,
}

/// One page, filled from matches offered in answer order: a match past the
/// limit proves a next page, which starts after this page's last agent.
/// Both stores fill their pages with it, after `CapacityQuery::matches`.
/// Each match comes with its place in the store's order (on DynamoDB its
/// index entry's, which the cursor must resume from).
pub struct PageFill {
    limit: usize,
    agents: Vec<StoredAgent>,
    positions: Vec<Position>,
}

impl PageFill {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            agents: Vec::new(),
            positions: Vec::new(),
        }
    }

    /// Adds the next match in answer order; `true` once the page is full
    /// and known to have a successor: offer no more.
    pub fn push(&mut self, position: Position, agent: StoredAgent) -> bool {
        self.agents.push(agent);
        self.positions.push(position);
        self.agents.len() > self.limit
    }

    /// How many more matches this page can use, the one that would prove a
    /// next page included.
    pub fn wanted(&self) -> usize {
        (self.limit + 1).saturating_sub(self.agents.len())
    }

    /// The page: at most `limit` agents, and where the next page starts if
    /// a match past the limit was offered.
    pub fn page(mut self) -> Page {
        let next = (self.agents.len() > self.limit)
            .then(|| self.limit.checked_sub(1))
            .flatten()
            .map(|last| self.positions.swap_remove(last));
        self.agents.truncate(self.limit);
        Page {
            agents: self.agents,
            next,
        }
    }

    /// A page that stopped early to stay inside its read budget
    /// (PROTOCOL.md §4 "Bounded pages"): what it has, and a next page that
    /// starts after `decided`, the last place it has ruled on.
    pub fn short_page(self, decided: Option<Position>) -> Page {
        if self.agents.len() > self.limit {
            return self.page();
        }
        Page {
            agents: self.agents,
            next: decided,
        }
    }
}

/// What one sweep did (PROTOCOL.md §4 "State changes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sweep {
    /// Agents it marked offline.
    pub marked: u64,
    /// It stopped at its bound: more agents may be due now.
    pub more: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or cannot write now; clients should retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend holds something this code cannot read.
    #[error("store corrupt: {0}")]
    Corrupt(String),
}

/// An agent's oldest event an endpoint has not handled, with the events on
/// either side of it (for the grace), and how often it was tried.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub event: Event,
    pub before: Option<Event>,
    pub after: Option<Event>,
    pub attempts: u32,
}

/// Webhook deliveries' progress, per endpoint and agent, where a store
/// keeps it (the embedded store). Events go out in order per agent: an
/// agent's next event is pending only once the one before it is handled.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// Starts an endpoint's progress at `now_ms` the first time it is seen:
    /// a new endpoint gets what happens from then on, not 30 days of past.
    async fn register(&self, endpoint: &str, now_ms: i64) -> Result<(), StoreError>;

    /// Up to `limit` agents' oldest unhandled event, due by `now_ms`.
    async fn pending(
        &self,
        endpoint: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError>;

    /// The event `key` of the agent is done with (delivered, suppressed or
    /// given up): the next one becomes pending.
    async fn handled(&self, endpoint: &str, agent_id: &str, key: &str) -> Result<(), StoreError>;

    /// Tries the agent's pending event again at `at_ms`.
    async fn retry(
        &self,
        endpoint: &str,
        agent_id: &str,
        at_ms: i64,
        attempts: u32,
    ) -> Result<(), StoreError>;
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes `agent` unless the stored record's `sent_at_ms` is as new or newer.
    async fn upsert(&self, agent: StoredAgent) -> Result<Upsert, StoreError>;

    /// One agent in any status, with its GPUs' live claims; `None` if
    /// unknown or expired.
    async fn get(&self, agent_id: &str, now_ms: i64) -> Result<Option<StoredAgent>, StoreError>;

    /// Up to `query.limit` matches after `after`, in answer order, each
    /// with its GPUs' live claims (read for the candidates that
    /// `CapacityQuery::matches_before_claims`, which claims may rule out).
    async fn query(
        &self,
        query: &CapacityQuery,
        after: Option<&Position>,
        now_ms: i64,
    ) -> Result<Page, StoreError>;

    /// The fleet's sums by pool at `now_ms` (`/metrics`), read without
    /// reading the fleet where the store can keep them summed.
    async fn fleet(&self, now_ms: i64) -> Result<FleetTotals, StoreError>;

    /// Deletes records past their expiry; returns how many went.
    async fn prune(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// Keeps an agent's per-minute roll-ups until `expires_at_s`. Writing the
    /// same minutes again replaces them, so retries are harmless.
    async fn put_history(
        &self,
        agent_id: &str,
        minutes: Vec<MinuteRollup>,
        expires_at_s: i64,
    ) -> Result<(), StoreError>;

    /// The live claims on an agent's GPUs. They outlive its record until
    /// they expire, so a claim stays readable and releasable.
    async fn claims(&self, agent_id: &str, now_ms: i64) -> Result<AgentClaims, StoreError>;

    /// Holds every GPU of `claim` for it unless a live claim holds any of
    /// them: all of them or none, and `false` for none.
    async fn put_claim(&self, claim: &Claim, now_ms: i64) -> Result<bool, StoreError>;

    /// Moves a live claim's expiry to `expires_at_ms`; `None` once it is
    /// released or expired.
    async fn extend_claim(
        &self,
        claim_id: &ClaimId,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<Option<Claim>, StoreError>;

    /// Frees the GPUs `claim_id` still holds; nothing when it holds none.
    async fn release_claim(&self, claim_id: &ClaimId, now_ms: i64) -> Result<(), StoreError>;

    /// Keeps the processes a heartbeat reported on the agent's GPUs until
    /// `expires_at_s`, unless a snapshot as new or newer is stored.
    async fn put_processes(
        &self,
        agent_id: &str,
        processes: &GpuProcesses,
        expires_at_s: i64,
    ) -> Result<(), StoreError>;

    /// The newest processes snapshot of an agent, unexpired.
    async fn processes(
        &self,
        agent_id: &str,
        now_ms: i64,
    ) -> Result<Option<GpuProcesses>, StoreError>;

    /// The newest processes snapshots of several agents (those that have
    /// one), for `/metrics` selections.
    async fn processes_of(
        &self,
        agent_ids: &[String],
        now_ms: i64,
    ) -> Result<Vec<(String, GpuProcesses)>, StoreError> {
        let mut found = Vec::new();
        for agent_id in agent_ids {
            if let Some(snapshot) = self.processes(agent_id, now_ms).await? {
                found.push((agent_id.clone(), snapshot));
            }
        }
        Ok(found)
    }

    /// The agent's state changes of the last 30 days after the event key
    /// `after`, oldest first, at most `limit`.
    async fn events(
        &self,
        agent_id: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<Event>, StoreError>;

    /// Marks offline the agents whose deadline passed by `now_ms` that are
    /// not marked yet, so that each one's `offline` is recorded at its
    /// deadline without waiting for a request. Reads a bounded amount.
    async fn sweep(&self, now_ms: i64) -> Result<Sweep, StoreError>;

    /// Where webhook deliveries keep their progress, if this store keeps
    /// it (the embedded store; on AWS the events table's stream keeps the order).
    fn outbox(&self) -> Option<&dyn Outbox> {
        None
    }

    /// The agent's roll-ups from `since_minute` on, oldest first, unexpired.
    async fn history(
        &self,
        agent_id: &str,
        since_minute: u64,
        now_ms: i64,
    ) -> Result<Vec<MinuteRollup>, StoreError>;
}

/// Shards of the DynamoDB capacity index unless configured (docs/dynamodb.md).
pub const DEFAULT_SHARDS: u32 = 8;

/// How long per-minute history is kept by default.
pub const DEFAULT_HISTORY_RETENTION_S: i64 = crate::history::DEFAULT_RETENTION_S;

/// Which store a function uses, from its flags and environment.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The embedded SQLite store at this path.
    Sqlite {
        path: PathBuf,
        durability: Durability,
    },
    /// A DynamoDB table, reached through the standard AWS configuration chain
    /// (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_DYNAMODB` for emulators).
    #[cfg(feature = "dynamodb")]
    DynamoDb {
        table: String,
        shards: u32,
        /// Where the fleet's sums for `/metrics` are kept.
        fleet_table: String,
        /// Where the agents' state changes are kept.
        events_table: String,
    },
}

impl StoreConfig {
    /// Opens the store. Call once per process: the DynamoDB client pools
    /// connections and must not be rebuilt per request.
    pub async fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        match self {
            StoreConfig::Sqlite { path, durability } => {
                Ok(Arc::new(SqliteStore::open(path, *durability)?))
            }
            #[cfg(feature = "dynamodb")]
            StoreConfig::DynamoDb {
                table,
                shards,
                fleet_table,
                events_table,
            } => {
                let client = dynamodb::DynamoStore::client_from_env().await;
                let fleet = dynamodb::fleet::FleetTable::new(client.clone(), fleet_table);
                let events = dynamodb::changes::EventsTable::new(client.clone(), events_table);
                Ok(Arc::new(
                    dynamodb::DynamoStore::new(client, table.clone(), *shards)
                        .with_fleet(fleet)
                        .with_events(events),
                ))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Sqlite { path, .. } => format!("sqlite:{}", path.display()),
            #[cfg(feature = "dynamodb")]
            StoreConfig::DynamoDb {
                table,
                shards,
                fleet_table,
                events_table,
            } => {
                format!(
                    "dynamodb:{table} ({shards} shards, fleet sums in {fleet_table}, events in {events_table})"
                )
            }
        }
    }
}

/// Which store a function keeps its records in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The embedded SQLite store.
    Sqlite,
    /// DynamoDB.
    #[cfg(feature = "dynamodb")]
    #[value(name = "dynamodb")]
    DynamoDb,
}

/// The store flags both functions take.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Store backend [default: dynamodb inside AWS Lambda, else sqlite]
    #[arg(long, env = "ROLLCALL_STORE", value_enum)]
    pub store: Option<Backend>,
    /// SQLite database file of the embedded store (created if missing).
    #[arg(long, env = "ROLLCALL_DB", default_value = "rollcall.db")]
    pub db: PathBuf,
    /// SQLite: `full` fsyncs every commit (survives power loss); `normal` survives process crashes only.
    #[arg(long, env = "ROLLCALL_DURABILITY", value_enum, default_value_t = Durability::Full)]
    pub durability: Durability,
    /// DynamoDB table name.
    #[arg(long, env = "ROLLCALL_TABLE", default_value = "rollcall-agents")]
    pub table: String,
    /// DynamoDB: shards of the capacity index; must match for every writer and reader of a table.
    #[arg(long, env = "ROLLCALL_DYNAMODB_SHARDS", default_value_t = DEFAULT_SHARDS, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub shards: u32,
    /// DynamoDB: the table of fleet sums that `/metrics` reads (kept by the fleet function).
    #[arg(long, env = "ROLLCALL_FLEET_TABLE", default_value = "rollcall-fleet")]
    pub fleet_table: String,
    /// DynamoDB: the table of the agents' state changes (kept by the fleet function).
    #[arg(long, env = "ROLLCALL_EVENTS_TABLE", default_value = "rollcall-events")]
    pub events_table: String,
}

impl StoreArgs {
    pub fn config(&self) -> StoreConfig {
        let backend = self.store.unwrap_or_else(|| {
            #[cfg(feature = "dynamodb")]
            if crate::api::in_lambda() {
                return Backend::DynamoDb;
            }
            Backend::Sqlite
        });
        match backend {
            #[cfg(feature = "dynamodb")]
            Backend::DynamoDb => StoreConfig::DynamoDb {
                table: self.table.clone(),
                shards: self.shards,
                fleet_table: self.fleet_table.clone(),
                events_table: self.events_table.clone(),
            },
            Backend::Sqlite => StoreConfig::Sqlite {
                path: self.db.clone(),
                durability: self.durability,
            },
        }
    }
}
