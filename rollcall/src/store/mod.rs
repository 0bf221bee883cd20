//! The agent store: one trait, one implementation per backend.
//!
//! Every backend keeps one record per agent, replaces it only with a strictly
//! newer `sent_at_ms` (atomically with the write), hides records past their
//! `expires_at_s`, and answers capacity queries in answer order.

pub mod sqlite;

use async_trait::async_trait;

use crate::capacity::{CapacityQuery, Position};
use crate::record::StoredAgent;

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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or cannot write now; clients should retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend holds something this code cannot read.
    #[error("store corrupt: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes `agent` unless the stored record's `sent_at_ms` is as new or newer.
    async fn upsert(&self, agent: StoredAgent) -> Result<Upsert, StoreError>;

    /// One agent in any status; `None` if unknown or expired.
    async fn get(&self, agent_id: &str, now_ms: i64) -> Result<Option<StoredAgent>, StoreError>;

    /// Up to `query.limit` matches after `after`, in answer order.
    async fn query(
        &self,
        query: &CapacityQuery,
        after: Option<&Position>,
        now_ms: i64,
    ) -> Result<Page, StoreError>;

    /// Deletes records past their expiry; returns how many went.
    async fn prune(&self, now_ms: i64) -> Result<u64, StoreError>;
}
