//! Faults injected into real stores, for what must survive them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use rollcall::capacity::{CapacityQuery, Position};
use rollcall::claims::{AgentClaims, Claim, ClaimId};
use rollcall::fleet::FleetTotals;
use rollcall::heartbeat::{GpuProcesses, MinuteRollup};
use rollcall::record::StoredAgent;
use rollcall::store::{Page, Store, StoreError, Upsert};

/// A real store whose history writes fail while `failing` is set; every
/// other call goes straight through. PROTOCOL.md §3's rule under test: an
/// extension that cannot be stored never blocks the agent record.
pub struct HistoryOutage {
    inner: Arc<dyn Store>,
    failing: AtomicBool,
    /// Each history write first waits this long (ms), like a store that
    /// answers slowly.
    slow_ms: AtomicU64,
}

impl HistoryOutage {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            failing: AtomicBool::new(false),
            slow_ms: AtomicU64::new(0),
        })
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    pub fn set_slow(&self, delay: std::time::Duration) {
        self.slow_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

#[async_trait]
impl Store for HistoryOutage {
    async fn upsert(&self, agent: StoredAgent) -> Result<Upsert, StoreError> {
        self.inner.upsert(agent).await
    }

    async fn get(&self, agent_id: &str, now_ms: i64) -> Result<Option<StoredAgent>, StoreError> {
        self.inner.get(agent_id, now_ms).await
    }

    async fn query(
        &self,
        query: &CapacityQuery,
        after: Option<&Position>,
        now_ms: i64,
    ) -> Result<Page, StoreError> {
        self.inner.query(query, after, now_ms).await
    }

    async fn fleet(&self, now_ms: i64) -> Result<FleetTotals, StoreError> {
        self.inner.fleet(now_ms).await
    }

    async fn prune(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.inner.prune(now_ms).await
    }

    async fn claims(&self, agent_id: &str, now_ms: i64) -> Result<AgentClaims, StoreError> {
        self.inner.claims(agent_id, now_ms).await
    }

    async fn put_claim(&self, claim: &Claim, now_ms: i64) -> Result<bool, StoreError> {
        self.inner.put_claim(claim, now_ms).await
    }

    async fn extend_claim(
        &self,
        claim_id: &ClaimId,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<Option<Claim>, StoreError> {
        self.inner
            .extend_claim(claim_id, expires_at_ms, now_ms)
            .await
    }

    async fn release_claim(&self, claim_id: &ClaimId, now_ms: i64) -> Result<(), StoreError> {
        self.inner.release_claim(claim_id, now_ms).await
    }

    async fn put_processes(
        &self,
        agent_id: &str,
        processes: &GpuProcesses,
        expires_at_s: i64,
    ) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected extension outage".into()));
        }
        self.inner
            .put_processes(agent_id, processes, expires_at_s)
            .await
    }

    async fn processes(
        &self,
        agent_id: &str,
        now_ms: i64,
    ) -> Result<Option<GpuProcesses>, StoreError> {
        self.inner.processes(agent_id, now_ms).await
    }

    async fn put_history(
        &self,
        agent_id: &str,
        minutes: Vec<MinuteRollup>,
        expires_at_s: i64,
    ) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected history outage".into()));
        }
        let slow_ms = self.slow_ms.load(Ordering::SeqCst);
        if slow_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(slow_ms)).await;
        }
        self.inner
            .put_history(agent_id, minutes, expires_at_s)
            .await
    }

    async fn history(
        &self,
        agent_id: &str,
        since_minute: u64,
        now_ms: i64,
    ) -> Result<Vec<MinuteRollup>, StoreError> {
        self.inner.history(agent_id, since_minute, now_ms).await
    }

    async fn events(
        &self,
        agent_id: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<rollcall::changes::Event>, StoreError> {
        self.inner.events(agent_id, after, limit, now_ms).await
    }

    async fn sweep(&self, now_ms: i64) -> Result<rollcall::store::Sweep, StoreError> {
        self.inner.sweep(now_ms).await
    }

    fn outbox(&self) -> Option<&dyn rollcall::store::Outbox> {
        self.inner.outbox()
    }
}
