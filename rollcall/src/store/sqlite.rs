//! The embedded store: SQLite in WAL mode.
//!
//! Writes go through one writer thread that commits whatever arrived while the
//! previous commit was syncing as one transaction (group commit), so the cost
//! of a durable fsync is shared by every heartbeat waiting on it. Reads use a
//! small pool of their own connections, which WAL lets run beside the writer.
//! Claims are rows of their own, one per claimed GPU, written by the same
//! writer thread, which makes a claim's check-and-take atomic. State
//! changes are derived in the same transaction as the write that causes
//! them (`changes::transitions` over the row it replaces), and a sweep in
//! the writer thread marks agents whose deadline passed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{Outbox, Page, PageFill, Pending, Store, StoreError, Sweep, Upsert};
use crate::capacity::{CapacityQuery, Position, StatusFilter};
use crate::changes::{self, Availability, Event, Version};
use crate::claims::{AgentClaims, Claim, ClaimId, GpuClaim};
use crate::fleet::FleetTotals;
use crate::heartbeat::{GpuProcesses, MinuteRollup};
use crate::record::StoredAgent;

/// Most heartbeats committed in one transaction.
const MAX_BATCH: usize = 512;
/// How often the writer deletes expired records when otherwise idle.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Candidates read per round while filling a page.
const READ_BATCH: usize = 256;

/// How hard a commit holds on to the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// fsync on every commit: an acknowledged heartbeat survives power loss.
    #[default]
    Full,
    /// fsync at WAL checkpoints only: survives a process crash, not power loss.
    Normal,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY NOT NULL,
    sent_at_ms INTEGER NOT NULL,
    online_until_ms INTEGER NOT NULL,
    expires_at_s INTEGER NOT NULL,
    pool TEXT NOT NULL,
    cores_available INTEGER NOT NULL,
    memory_available_mb INTEGER NOT NULL,
    gpu_free_max_mb INTEGER NOT NULL,
    record TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS agents_by_gpu_free ON agents (gpu_free_max_mb DESC, agent_id);
CREATE INDEX IF NOT EXISTS agents_by_expiry ON agents (expires_at_s);
CREATE TABLE IF NOT EXISTS agent_history (
    agent_id TEXT NOT NULL,
    minute INTEGER NOT NULL,
    expires_at_s INTEGER NOT NULL,
    rollup TEXT NOT NULL,
    PRIMARY KEY (agent_id, minute)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_by_expiry ON agent_history (expires_at_s);
CREATE TABLE IF NOT EXISTS gpu_claims (
    agent_id TEXT NOT NULL,
    gpu_index INTEGER NOT NULL,
    claim_id TEXT NOT NULL,
    holder TEXT NOT NULL,
    uuid TEXT,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, gpu_index)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS claims_by_id ON gpu_claims (claim_id);
CREATE INDEX IF NOT EXISTS claims_by_expiry ON gpu_claims (expires_at_ms);
CREATE TABLE IF NOT EXISTS agent_events (
    agent_id TEXT NOT NULL,
    event_key TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (agent_id, event_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_time ON agent_events (at_ms);
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    endpoint TEXT PRIMARY KEY NOT NULL,
    since_key TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_progress (
    endpoint TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    handled_key TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_at_ms INTEGER NOT NULL,
    PRIMARY KEY (endpoint, agent_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gpu_processes (
    agent_id TEXT PRIMARY KEY NOT NULL,
    sent_at_ms INTEGER NOT NULL,
    expires_at_s INTEGER NOT NULL,
    processes TEXT NOT NULL
) WITHOUT ROWID;
";

/// Columns added since the first schema, with what existing rows get.
/// `offline_marked`: a sweep (or the agent's `leaving`) recorded its
/// `offline`; `availability`: `changes::Availability` as JSON.
const ADDED_COLUMNS: [(&str, &str); 2] = [
    ("offline_marked", "INTEGER NOT NULL DEFAULT 0"),
    ("availability", "TEXT"),
];
const SWEEP_INDEX: &str = "CREATE INDEX IF NOT EXISTS agents_to_sweep ON agents (online_until_ms) WHERE offline_marked = 0";

const UPSERT: &str = "
INSERT INTO agents (agent_id, sent_at_ms, online_until_ms, expires_at_s, pool, cores_available,
                    memory_available_mb, gpu_free_max_mb, record)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
ON CONFLICT (agent_id) DO UPDATE SET
    sent_at_ms = excluded.sent_at_ms, online_until_ms = excluded.online_until_ms,
    expires_at_s = excluded.expires_at_s, pool = excluded.pool,
    cores_available = excluded.cores_available, memory_available_mb = excluded.memory_available_mb,
    gpu_free_max_mb = excluded.gpu_free_max_mb, record = excluded.record
WHERE excluded.sent_at_ms > agents.sent_at_ms OR agents.expires_at_s <= ?10
";

// Narrows candidates with indexed columns; CapacityQuery::matches decides.
const CANDIDATES: &str = "
SELECT record, availability FROM agents
WHERE expires_at_s > ?1
  AND (?2 = 0 OR (?2 = 1 AND online_until_ms > ?3) OR (?2 = 2 AND online_until_ms <= ?3))
  AND (?4 IS NULL OR pool = ?4)
  AND cores_available >= ?5
  AND memory_available_mb >= ?6
  AND gpu_free_max_mb >= ?7
  AND (gpu_free_max_mb < ?8 OR (gpu_free_max_mb = ?8 AND agent_id > ?9))
ORDER BY gpu_free_max_mb DESC, agent_id ASC
LIMIT ?10
";

enum Command {
    Upsert(
        Box<StoredAgent>,
        oneshot::Sender<Result<Upsert, StoreError>>,
    ),
    Prune(i64, oneshot::Sender<Result<u64, StoreError>>),
    History(HistoryWrite, oneshot::Sender<Result<u64, StoreError>>),
    /// The slots it wrote, changed or freed.
    Claim(ClaimWrite, oneshot::Sender<Result<u64, StoreError>>),
    Processes(ProcessesWrite, oneshot::Sender<Result<u64, StoreError>>),
    /// Marks agents whose deadline passed by then; how many.
    Sweep(i64, oneshot::Sender<Result<u64, StoreError>>),
    Outbox(OutboxWrite, oneshot::Sender<Result<u64, StoreError>>),
}

/// Webhook progress, written by the writer thread like everything else.
enum OutboxWrite {
    Register {
        endpoint: String,
        since_key: String,
    },
    Handled {
        endpoint: String,
        agent_id: String,
        key: String,
    },
    Retry {
        endpoint: String,
        agent_id: String,
        at_ms: i64,
        attempts: u32,
    },
}

struct ProcessesWrite {
    agent_id: String,
    sent_at_ms: i64,
    expires_at_s: i64,
    json: String,
}

/// Claims are written by the one writer thread, so that checking a GPU's
/// slot and taking it cannot interleave with another claim.
enum ClaimWrite {
    Put {
        claim: Claim,
        now_ms: i64,
    },
    Extend {
        claim_id: String,
        expires_at_ms: i64,
        now_ms: i64,
    },
    Release {
        claim_id: String,
    },
}

struct HistoryWrite {
    agent_id: String,
    minutes: Vec<MinuteRollup>,
    expires_at_s: i64,
}

const ON_RECORD: &str = "SELECT record FROM agents WHERE expires_at_s > ?1";
const PRUNE: &str = "DELETE FROM agents WHERE expires_at_s <= ?1";
const PRUNE_HISTORY: &str = "DELETE FROM agent_history WHERE expires_at_s <= ?1";
const PRUNE_CLAIMS: &str = "DELETE FROM gpu_claims WHERE expires_at_ms <= ?1";
const LIVE_CLAIMS: &str = "SELECT gpu_index, claim_id, holder, uuid, expires_at_ms FROM gpu_claims WHERE agent_id = ?1 AND expires_at_ms > ?2";
const SLOT_HELD: &str =
    "SELECT 1 FROM gpu_claims WHERE agent_id = ?1 AND gpu_index = ?2 AND expires_at_ms > ?3";
const PUT_SLOT: &str = "INSERT OR REPLACE INTO gpu_claims (agent_id, gpu_index, claim_id, holder, uuid, expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const EXTEND_CLAIM: &str =
    "UPDATE gpu_claims SET expires_at_ms = ?1 WHERE claim_id = ?2 AND expires_at_ms > ?3";
const RELEASE_CLAIM: &str = "DELETE FROM gpu_claims WHERE claim_id = ?1";
const PUT_PROCESSES: &str = "
INSERT INTO gpu_processes (agent_id, sent_at_ms, expires_at_s, processes) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (agent_id) DO UPDATE SET
    sent_at_ms = excluded.sent_at_ms, expires_at_s = excluded.expires_at_s, processes = excluded.processes
WHERE excluded.sent_at_ms > gpu_processes.sent_at_ms";
const PRUNE_PROCESSES: &str = "DELETE FROM gpu_processes WHERE expires_at_s <= ?1";
const PREVIOUS: &str =
    "SELECT record, offline_marked, availability FROM agents WHERE agent_id = ?1";
const SET_STATE: &str =
    "UPDATE agents SET offline_marked = ?2, availability = ?3 WHERE agent_id = ?1";
const PUT_EVENT: &str = "INSERT OR IGNORE INTO agent_events (agent_id, event_key, at_ms, event) VALUES (?1, ?2, ?3, ?4)";
const TO_SWEEP: &str = "
SELECT record, availability FROM agents
WHERE offline_marked = 0 AND online_until_ms <= ?1 AND expires_at_s > ?2
ORDER BY online_until_ms LIMIT ?3";
const EVENTS: &str = "
SELECT event FROM agent_events
WHERE agent_id = ?1 AND event_key > ?2 AND at_ms > ?3
ORDER BY event_key LIMIT ?4";
const PRUNE_EVENTS: &str = "DELETE FROM agent_events WHERE at_ms <= ?1";
// Progress outlives an agent's record until its last event is gone: with
// the progress, an event still kept would be sent again.
const PRUNE_PROGRESS: &str =
    "DELETE FROM webhook_progress WHERE agent_id NOT IN (SELECT agent_id FROM agent_events)";
const REGISTER_ENDPOINT: &str =
    "INSERT OR IGNORE INTO webhook_endpoints (endpoint, since_key) VALUES (?1, ?2)";
// An agent's oldest event past what the endpoint handled (or past where the
// endpoint started, for an agent it never handled), if due.
const PENDING: &str = "
SELECT e.agent_id, MIN(e.event_key), COALESCE(p.attempts, 0)
FROM agent_events e
JOIN webhook_endpoints w ON w.endpoint = ?1
LEFT JOIN webhook_progress p ON p.endpoint = ?1 AND p.agent_id = e.agent_id
WHERE e.event_key > COALESCE(p.handled_key, w.since_key) AND COALESCE(p.next_at_ms, 0) <= ?2
GROUP BY e.agent_id
LIMIT ?3";
const EVENT_AT: &str = "SELECT event FROM agent_events WHERE agent_id = ?1 AND event_key = ?2";
const EVENT_BEFORE: &str = "SELECT event FROM agent_events WHERE agent_id = ?1 AND event_key < ?2 ORDER BY event_key DESC LIMIT 1";
const EVENT_AFTER: &str = "SELECT event FROM agent_events WHERE agent_id = ?1 AND event_key > ?2 ORDER BY event_key LIMIT 1";
const HANDLED: &str = "
INSERT INTO webhook_progress (endpoint, agent_id, handled_key, attempts, next_at_ms) VALUES (?1, ?2, ?3, 0, 0)
ON CONFLICT (endpoint, agent_id) DO UPDATE SET handled_key = excluded.handled_key, attempts = 0, next_at_ms = 0";
const RETRY: &str = "
INSERT INTO webhook_progress (endpoint, agent_id, handled_key, attempts, next_at_ms)
SELECT ?1, ?2, since_key, ?3, ?4 FROM webhook_endpoints WHERE endpoint = ?1
ON CONFLICT (endpoint, agent_id) DO UPDATE SET attempts = excluded.attempts, next_at_ms = excluded.next_at_ms";

/// Agents one sweep marks at most; the rest wait for the next.
const SWEEP_BATCH: i64 = 1000;
const PUT_HISTORY: &str = "INSERT OR REPLACE INTO agent_history (agent_id, minute, expires_at_s, rollup) VALUES (?1, ?2, ?3, ?4)";

pub struct SqliteStore {
    path: PathBuf,
    writer: mpsc::Sender<Command>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        let mut connection = open_connection(path, durability)?;
        connection.execute_batch(SCHEMA).map_err(unavailable)?;
        add_columns(&mut connection)?;
        let (writer, commands) = mpsc::channel();
        std::thread::Builder::new()
            .name("rollcall-sqlite-writer".into())
            .spawn(move || run_writer(connection, commands))
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            path: path.to_owned(),
            writer,
            readers: Arc::new(Mutex::new(Vec::new())),
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = Arc::clone(&self.readers);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers
                .lock()
                .map_err(|_| StoreError::Unavailable("reader pool poisoned".into()))?
                .pop();
            let connection = match pooled {
                Some(connection) => connection,
                None => open_connection(&path, Durability::Full)?,
            };
            let result = work(&connection);
            if let Ok(mut pool) = readers.lock() {
                pool.push(connection);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }

    async fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(make(reply))
            .map_err(|_| StoreError::Unavailable("writer thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("writer thread dropped the request".into()))?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn upsert(&self, agent: StoredAgent) -> Result<Upsert, StoreError> {
        self.send(|reply| Command::Upsert(Box::new(agent), reply))
            .await
    }

    async fn get(&self, agent_id: &str, now_ms: i64) -> Result<Option<StoredAgent>, StoreError> {
        let agent_id = agent_id.to_owned();
        self.read(move |connection| {
            let row: Option<(String, Option<String>)> = connection
                .prepare_cached(
                    "SELECT record, availability FROM agents WHERE agent_id = ?1 AND expires_at_s > ?2",
                )
                .and_then(|mut statement| {
                    statement
                        .query_row(params![agent_id, now_ms.div_euclid(1000)], |row| {
                            Ok((row.get(0)?, row.get(1)?))
                        })
                        .optional()
                })
                .map_err(unavailable)?;
            let Some(mut agent) = row.map(|(record, availability)| decode_with(&record, availability.as_deref())).transpose()? else {
                return Ok(None);
            };
            agent.claims = read_claims(connection, &agent_id, now_ms)?;
            Ok(Some(agent))
        })
        .await
    }

    async fn query(
        &self,
        query: &CapacityQuery,
        after: Option<&Position>,
        now_ms: i64,
    ) -> Result<Page, StoreError> {
        let query = query.clone();
        let mut cursor = after.cloned();
        self.read(move |connection| {
            let mut statement = connection.prepare_cached(CANDIDATES).map_err(unavailable)?;
            let status = match query.status {
                StatusFilter::All => 0,
                StatusFilter::Online => 1,
                StatusFilter::Offline => 2,
            };
            let min_free_mb = query.vram_floor_mb();
            let mut fill = PageFill::new(query.limit);
            loop {
                let (after_free, after_id) = match &cursor {
                    Some(position) => (
                        i64::try_from(position.max_gpu_free_mb).unwrap_or(i64::MAX),
                        position.agent_id.clone(),
                    ),
                    // Above any real figure, so the first row qualifies.
                    None => (i64::MAX, String::new()),
                };
                let rows: Vec<(String, Option<String>)> = statement
                    .query_map(
                        params![
                            now_ms.div_euclid(1000),
                            status,
                            now_ms,
                            query.pool,
                            query.min_cpu_cores.unwrap_or(0.0),
                            query.min_memory_gb.unwrap_or(0.0) * 1024.0,
                            min_free_mb,
                            after_free,
                            after_id,
                            READ_BATCH as i64,
                        ],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .and_then(Iterator::collect)
                    .map_err(unavailable)?;
                let exhausted = rows.len() < READ_BATCH;
                for (record, availability) in rows {
                    let mut agent = decode_with(&record, availability.as_deref())?;
                    let position = Position::of(&agent);
                    cursor = Some(position.clone());
                    if !query.matches_before_claims(&agent, now_ms) {
                        continue;
                    }
                    agent.claims = read_claims(connection, agent.agent_id(), now_ms)?;
                    if query.matches(&agent, now_ms) && fill.push(position, agent) {
                        return Ok(fill.page());
                    }
                }
                if exhausted {
                    return Ok(fill.page());
                }
            }
        })
        .await
    }

    /// Sums every record on each call: the embedded store serves one
    /// machine's fleet, where that is a few milliseconds.
    async fn fleet(&self, now_ms: i64) -> Result<FleetTotals, StoreError> {
        self.read(move |connection| {
            let mut statement = connection.prepare_cached(ON_RECORD).map_err(unavailable)?;
            let mut rows = statement
                .query(params![now_ms.div_euclid(1000)])
                .map_err(unavailable)?;
            let mut totals = FleetTotals::default();
            while let Some(row) = rows.next().map_err(unavailable)? {
                let text: String = row.get(0).map_err(unavailable)?;
                totals.add(&decode(&text)?, now_ms);
            }
            Ok(totals)
        })
        .await
    }

    async fn prune(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.send(|reply| Command::Prune(now_ms, reply)).await
    }

    async fn claims(&self, agent_id: &str, now_ms: i64) -> Result<AgentClaims, StoreError> {
        let agent_id = agent_id.to_owned();
        self.read(move |connection| read_claims(connection, &agent_id, now_ms))
            .await
    }

    async fn put_claim(&self, claim: &Claim, now_ms: i64) -> Result<bool, StoreError> {
        let write = ClaimWrite::Put {
            claim: claim.clone(),
            now_ms,
        };
        Ok(self.send(|reply| Command::Claim(write, reply)).await? > 0)
    }

    async fn extend_claim(
        &self,
        claim_id: &ClaimId,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<Option<Claim>, StoreError> {
        let write = ClaimWrite::Extend {
            claim_id: claim_id.to_string(),
            expires_at_ms,
            now_ms,
        };
        if self.send(|reply| Command::Claim(write, reply)).await? == 0 {
            return Ok(None);
        }
        Ok(self
            .claims(claim_id.agent_id(), now_ms)
            .await?
            .claim(claim_id))
    }

    async fn release_claim(&self, claim_id: &ClaimId, _now_ms: i64) -> Result<(), StoreError> {
        let write = ClaimWrite::Release {
            claim_id: claim_id.to_string(),
        };
        self.send(|reply| Command::Claim(write, reply)).await?;
        Ok(())
    }

    async fn put_processes(
        &self,
        agent_id: &str,
        processes: &GpuProcesses,
        expires_at_s: i64,
    ) -> Result<(), StoreError> {
        let write = ProcessesWrite {
            agent_id: agent_id.to_owned(),
            sent_at_ms: i64::try_from(processes.sent_at_ms)
                .map_err(|_| StoreError::Unavailable("sent_at_ms out of range".into()))?,
            expires_at_s,
            json: serde_json::to_string(processes)
                .map_err(|e| StoreError::Unavailable(format!("cannot encode processes: {e}")))?,
        };
        self.send(|reply| Command::Processes(write, reply))
            .await
            .map(|_| ())
    }

    async fn processes(
        &self,
        agent_id: &str,
        now_ms: i64,
    ) -> Result<Option<GpuProcesses>, StoreError> {
        let agent_id = agent_id.to_owned();
        self.read(move |connection| {
            json_row(
                connection,
                "SELECT processes FROM gpu_processes WHERE agent_id = ?1 AND expires_at_s > ?2",
                params![agent_id, now_ms.div_euclid(1000)],
                "processes",
            )
        })
        .await
    }

    async fn put_history(
        &self,
        agent_id: &str,
        minutes: Vec<MinuteRollup>,
        expires_at_s: i64,
    ) -> Result<(), StoreError> {
        let write = HistoryWrite {
            agent_id: agent_id.to_owned(),
            minutes,
            expires_at_s,
        };
        self.send(|reply| Command::History(write, reply))
            .await
            .map(|_| ())
    }

    async fn history(
        &self,
        agent_id: &str,
        since_minute: u64,
        now_ms: i64,
    ) -> Result<Vec<MinuteRollup>, StoreError> {
        let agent_id = agent_id.to_owned();
        self.read(move |connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT rollup FROM agent_history WHERE agent_id = ?1 AND minute >= ?2 AND expires_at_s > ?3 ORDER BY minute",
                )
                .map_err(unavailable)?;
            let since = i64::try_from(since_minute).unwrap_or(i64::MAX);
            let rows: Vec<String> = statement
                .query_map(params![agent_id, since, now_ms.div_euclid(1000)], |row| row.get(0))
                .and_then(Iterator::collect)
                .map_err(unavailable)?;
            rows.iter()
                .map(|text| decode_json(text, "history"))
                .collect()
        })
        .await
    }

    async fn events(
        &self,
        agent_id: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<Event>, StoreError> {
        let agent_id = agent_id.to_owned();
        let after = after.unwrap_or("").to_owned();
        self.read(move |connection| {
            let texts: Vec<String> = connection
                .prepare_cached(EVENTS)
                .and_then(|mut statement| {
                    statement
                        .query_map(
                            params![agent_id, after, now_ms - changes::KEPT_MS, limit as i64],
                            |row| row.get(0),
                        )?
                        .collect()
                })
                .map_err(unavailable)?;
            texts
                .iter()
                .map(|text| decode_json(text, "event"))
                .collect()
        })
        .await
    }

    fn outbox(&self) -> Option<&dyn Outbox> {
        Some(self)
    }

    async fn sweep(&self, now_ms: i64) -> Result<Sweep, StoreError> {
        let marked = self.send(|reply| Command::Sweep(now_ms, reply)).await?;
        Ok(Sweep {
            marked,
            more: marked >= SWEEP_BATCH as u64,
        })
    }
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn register(&self, endpoint: &str, now_ms: i64) -> Result<(), StoreError> {
        let write = OutboxWrite::Register {
            endpoint: endpoint.to_owned(),
            since_key: changes::key_after(now_ms),
        };
        self.send(|reply| Command::Outbox(write, reply)).await?;
        Ok(())
    }

    async fn pending(
        &self,
        endpoint: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        let endpoint = endpoint.to_owned();
        self.read(move |connection| {
            let heads: Vec<(String, String, u32)> = connection
                .prepare_cached(PENDING)
                .and_then(|mut statement| {
                    statement
                        .query_map(params![endpoint, now_ms, limit as i64], |row| {
                            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                        })?
                        .collect()
                })
                .map_err(unavailable)?;
            let event =
                |sql: &str, agent_id: &str, key: &str| -> Result<Option<Event>, StoreError> {
                    json_row(connection, sql, params![agent_id, key], "event")
                };
            let mut pending = Vec::with_capacity(heads.len());
            for (agent_id, key, attempts) in heads {
                let Some(head) = event(EVENT_AT, &agent_id, &key)? else {
                    continue;
                };
                pending.push(Pending {
                    event: head,
                    before: event(EVENT_BEFORE, &agent_id, &key)?,
                    after: event(EVENT_AFTER, &agent_id, &key)?,
                    attempts,
                });
            }
            Ok(pending)
        })
        .await
    }

    async fn handled(&self, endpoint: &str, agent_id: &str, key: &str) -> Result<(), StoreError> {
        let write = OutboxWrite::Handled {
            endpoint: endpoint.to_owned(),
            agent_id: agent_id.to_owned(),
            key: key.to_owned(),
        };
        self.send(|reply| Command::Outbox(write, reply)).await?;
        Ok(())
    }

    async fn retry(
        &self,
        endpoint: &str,
        agent_id: &str,
        at_ms: i64,
        attempts: u32,
    ) -> Result<(), StoreError> {
        let write = OutboxWrite::Retry {
            endpoint: endpoint.to_owned(),
            agent_id: agent_id.to_owned(),
            at_ms,
            attempts,
        };
        self.send(|reply| Command::Outbox(write, reply)).await?;
        Ok(())
    }
}

fn open_connection(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    create_private(path)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    let synchronous = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    // Switching a new file to WAL takes an exclusive lock, and SQLite answers
    // "locked" at once, without its busy handler, when another connection
    // holds the file for the same switch: ingest and query started together
    // on one new file would fail. So that switch is retried for a while.
    connection
        .busy_timeout(Duration::from_secs(5))
        .map_err(|e| configure_error(path, e))?;
    let pragmas = format!("PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match connection.execute_batch(&pragmas) {
            Ok(()) => break,
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == rusqlite::ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => return Err(configure_error(path, error)),
        }
    }
    Ok(connection)
}

/// A new database is created readable by its owner only: it holds every
/// agent's record (SQLite gives its WAL and shared-memory files the same
/// mode). An existing one keeps the mode its operator gave it.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Err(error) if error.kind() != std::io::ErrorKind::AlreadyExists => Err(
            StoreError::Unavailable(format!("cannot create {}: {error}", path.display())),
        ),
        _ => Ok(()),
    }
}

fn configure_error(path: &Path, error: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("cannot configure {}: {error}", path.display()))
}

fn run_writer(mut connection: Connection, commands: mpsc::Receiver<Command>) {
    let mut last_prune = Instant::now();
    loop {
        let first = match commands.recv_timeout(PRUNE_EVERY) {
            Ok(command) => command,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                prune_expired(&connection);
                last_prune = Instant::now();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match commands.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        commit_batch(&mut connection, batch);
        if last_prune.elapsed() >= PRUNE_EVERY {
            prune_expired(&connection);
            last_prune = Instant::now();
        }
    }
}

/// Runs a batch in one transaction and answers every caller only after the
/// commit: nothing is acknowledged that is not on disk.
fn commit_batch(connection: &mut Connection, batch: Vec<Command>) {
    let mut outcomes: Vec<Result<u64, String>> = Vec::with_capacity(batch.len());
    let committed = (|| -> rusqlite::Result<()> {
        let transaction =
            connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for command in &batch {
            outcomes.push(run_command(&transaction, command)?);
        }
        transaction.commit()
    })();
    reply(batch, committed, outcomes);
}

/// One command inside its batch's transaction: the rows it changed, or why
/// this command alone could not be written (the rest of the batch goes on).
/// A database error fails the whole batch.
fn run_command(
    transaction: &rusqlite::Transaction,
    command: &Command,
) -> rusqlite::Result<Result<u64, String>> {
    match command {
        Command::Upsert(agent, _) => {
            let columns = match encode(agent) {
                Ok(columns) => columns,
                Err(message) => return Ok(Err(message)),
            };
            let previous: Option<(String, bool, Option<String>)> = transaction
                .prepare_cached(PREVIOUS)?
                .query_row(params![agent.agent_id()], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .optional()?;
            let changed = transaction.prepare_cached(UPSERT)?.execute(params![
                agent.agent_id(),
                columns.sent_at_ms,
                agent.online_until_ms,
                agent.expires_at_s,
                agent.heartbeat.pool,
                agent.heartbeat.cpu.cores_available,
                columns.memory_available_mb,
                columns.max_gpu_free_mb,
                columns.record,
                // An expired record is gone, whatever its sent_at_ms.
                agent.received_at_ms.div_euclid(1000),
            ])?;
            if changed > 0 {
                record_changes(transaction, agent, previous)?;
            }
            Ok(Ok(changed as u64))
        }
        Command::Sweep(now_ms, _) => Ok(Ok(sweep(transaction, *now_ms)?)),
        Command::Outbox(write, _) => Ok(Ok(match write {
            OutboxWrite::Register {
                endpoint,
                since_key,
            } => transaction
                .prepare_cached(REGISTER_ENDPOINT)?
                .execute(params![endpoint, since_key])?,
            OutboxWrite::Handled {
                endpoint,
                agent_id,
                key,
            } => transaction
                .prepare_cached(HANDLED)?
                .execute(params![endpoint, agent_id, key])?,
            OutboxWrite::Retry {
                endpoint,
                agent_id,
                at_ms,
                attempts,
            } => transaction
                .prepare_cached(RETRY)?
                .execute(params![endpoint, agent_id, attempts, at_ms])?,
        } as u64)),
        Command::Prune(now_ms, _) => Ok(Ok(delete_expired(transaction, *now_ms)?)),
        Command::History(write, _) => {
            let mut put = transaction.prepare_cached(PUT_HISTORY)?;
            for rollup in &write.minutes {
                let text = serde_json::to_string(rollup)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                put.execute(params![
                    write.agent_id,
                    i64::try_from(rollup.minute).unwrap_or(i64::MAX),
                    write.expires_at_s,
                    text
                ])?;
            }
            Ok(Ok(write.minutes.len() as u64))
        }
        Command::Claim(write, _) => Ok(Ok(write_claim(transaction, write)?)),
        Command::Processes(write, _) => Ok(Ok(transaction.prepare_cached(PUT_PROCESSES)?.execute(
            params![
                write.agent_id,
                write.sent_at_ms,
                write.expires_at_s,
                write.json
            ],
        )? as u64)),
    }
}

fn write_claim(transaction: &rusqlite::Transaction, write: &ClaimWrite) -> rusqlite::Result<u64> {
    match write {
        ClaimWrite::Put { claim, now_ms } => {
            let agent_id = claim.claim_id.agent_id();
            let mut held = transaction.prepare_cached(SLOT_HELD)?;
            for gpu in &claim.gpus {
                if held.exists(params![agent_id, gpu.index, now_ms])? {
                    return Ok(0);
                }
            }
            let mut put = transaction.prepare_cached(PUT_SLOT)?;
            for (index, slot) in claim.slots() {
                put.execute(params![
                    agent_id,
                    index,
                    slot.claim_id,
                    slot.holder,
                    slot.uuid,
                    slot.expires_at_ms
                ])?;
            }
            Ok(claim.gpus.len() as u64)
        }
        ClaimWrite::Extend {
            claim_id,
            expires_at_ms,
            now_ms,
        } => Ok(transaction.prepare_cached(EXTEND_CLAIM)?.execute(params![
            expires_at_ms,
            claim_id,
            now_ms
        ])? as u64),
        ClaimWrite::Release { claim_id } => Ok(transaction
            .prepare_cached(RELEASE_CLAIM)?
            .execute(params![claim_id])? as u64),
    }
}

/// The live claims on `agent_id`'s GPUs.
fn read_claims(
    connection: &Connection,
    agent_id: &str,
    now_ms: i64,
) -> Result<AgentClaims, StoreError> {
    let mut statement = connection
        .prepare_cached(LIVE_CLAIMS)
        .map_err(unavailable)?;
    let slots: Vec<(u32, GpuClaim)> = statement
        .query_map(params![agent_id, now_ms], |row| {
            Ok((
                row.get(0)?,
                GpuClaim {
                    claim_id: row.get(1)?,
                    holder: row.get(2)?,
                    uuid: row.get(3)?,
                    expires_at_ms: row.get(4)?,
                },
            ))
        })
        .and_then(Iterator::collect)
        .map_err(unavailable)?;
    Ok(AgentClaims::live(slots, now_ms))
}

/// Answers each command of a batch once its transaction is over: its own
/// outcome if the batch committed, else the batch's error.
fn reply(batch: Vec<Command>, committed: rusqlite::Result<()>, outcomes: Vec<Result<u64, String>>) {
    for (position, command) in batch.into_iter().enumerate() {
        let outcome = match &committed {
            Ok(()) => outcomes
                .get(position)
                .cloned()
                .unwrap_or_else(|| Err("not run".into())),
            Err(error) => Err(error.to_string()),
        };
        match command {
            Command::Upsert(_, reply) => {
                let written = |changed: u64| {
                    if changed == 0 {
                        Upsert::Stale
                    } else {
                        Upsert::Written
                    }
                };
                let _ = reply.send(outcome.map(written).map_err(StoreError::Unavailable));
            }
            Command::Prune(_, reply)
            | Command::Sweep(_, reply)
            | Command::Outbox(_, reply)
            | Command::History(_, reply)
            | Command::Claim(_, reply)
            | Command::Processes(_, reply) => {
                let _ = reply.send(outcome.map_err(StoreError::Unavailable));
            }
        }
    }
}

/// Records the transitions between the row an upsert replaced and the
/// agent it wrote, and the availability they leave.
fn record_changes(
    transaction: &rusqlite::Transaction,
    agent: &StoredAgent,
    previous: Option<(String, bool, Option<String>)>,
) -> rusqlite::Result<()> {
    let previous = match previous {
        Some((record, marked, availability)) => {
            match decode_with(&record, availability.as_deref()) {
                Ok(old) => Some((old, marked)),
                // The record is replaced anyway; its history of changes
                // starts again rather than failing the heartbeat.
                Err(error) => {
                    tracing::warn!(agent_id = agent.agent_id(), %error, "replaced an unreadable record");
                    None
                }
            }
        }
        None => None,
    };
    let previous = previous.filter(|(old, _)| !old.is_expired(agent.received_at_ms));
    let before = previous.as_ref().map(|(old, marked)| Version {
        agent: old,
        marked_offline: *marked,
    });
    let marked = agent.heartbeat.state == crate::heartbeat::AgentState::Leaving;
    let events = changes::transitions(
        before,
        Version {
            agent,
            marked_offline: marked,
        },
    );
    let kept = previous
        .as_ref()
        .and_then(|(old, was_marked)| Some((old.availability.as_ref()?, *was_marked)));
    // A steady heartbeat leaves both as they are: no second write for it.
    if events.is_empty() && kept.is_some_and(|(_, was_marked)| was_marked == marked) {
        return Ok(());
    }
    let availability =
        changes::next_availability(kept.map(|(availability, _)| availability), agent, &events);
    put_events(transaction, &events)?;
    transaction.prepare_cached(SET_STATE)?.execute(params![
        agent.agent_id(),
        marked,
        to_json(&availability)?
    ])?;
    Ok(())
}

/// Marks up to [`SWEEP_BATCH`] agents whose deadline passed by `now_ms`,
/// recording each one's `offline` at its deadline.
fn sweep(transaction: &rusqlite::Transaction, now_ms: i64) -> rusqlite::Result<u64> {
    let due: Vec<(String, Option<String>)> = transaction
        .prepare_cached(TO_SWEEP)?
        .query_map(
            params![now_ms, now_ms.div_euclid(1000), SWEEP_BATCH],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let mut marked = 0;
    for (record, availability) in due {
        let agent = match decode_with(&record, availability.as_deref()) {
            Ok(agent) => agent,
            Err(error) => {
                tracing::warn!(%error, "an unreadable record was left unswept");
                continue;
            }
        };
        let events = changes::transitions(
            Some(Version {
                agent: &agent,
                marked_offline: false,
            }),
            Version {
                agent: &agent,
                marked_offline: true,
            },
        );
        let availability = changes::next_availability(agent.availability.as_ref(), &agent, &events);
        put_events(transaction, &events)?;
        transaction.prepare_cached(SET_STATE)?.execute(params![
            agent.agent_id(),
            true,
            to_json(&availability)?
        ])?;
        marked += 1;
    }
    Ok(marked)
}

fn put_events(transaction: &rusqlite::Transaction, events: &[Event]) -> rusqlite::Result<()> {
    let mut put = transaction.prepare_cached(PUT_EVENT)?;
    for event in events {
        put.execute(params![
            event.agent_id,
            event.key(),
            event.at_ms,
            to_json(event)?
        ])?;
    }
    Ok(())
}

fn to_json(value: &impl serde::Serialize) -> rusqlite::Result<String> {
    serde_json::to_string(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Brings a database made by an earlier version up to this schema, inside
/// one write transaction: ingest and query may open it at the same moment.
fn add_columns(connection: &mut Connection) -> Result<(), StoreError> {
    let transaction = connection
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    let existing: Vec<String> = transaction
        .prepare("SELECT name FROM pragma_table_info('agents')")
        .and_then(|mut statement| statement.query_map([], |row| row.get(0))?.collect())
        .map_err(unavailable)?;
    for (column, definition) in ADDED_COLUMNS {
        if !existing.iter().any(|name| name == column) {
            transaction
                .execute_batch(&format!(
                    "ALTER TABLE agents ADD COLUMN {column} {definition}"
                ))
                .map_err(unavailable)?;
        }
    }
    transaction
        .execute_batch(SWEEP_INDEX)
        .map_err(unavailable)?;
    transaction.commit().map_err(unavailable)
}

fn prune_expired(connection: &Connection) {
    match delete_expired(connection, crate::time::now_ms()) {
        Ok(0) => {}
        Ok(count) => tracing::info!(count, "pruned agents past their retention"),
        Err(error) => tracing::warn!(%error, "could not prune expired records"),
    }
}

/// Deletes agents and history past their expiry; how many agents went.
fn delete_expired(connection: &Connection, now_ms: i64) -> rusqlite::Result<u64> {
    let now_s = now_ms.div_euclid(1000);
    let agents = connection.execute(PRUNE, params![now_s])?;
    connection.execute(PRUNE_HISTORY, params![now_s])?;
    connection.execute(PRUNE_CLAIMS, params![now_ms])?;
    connection.execute(PRUNE_PROCESSES, params![now_s])?;
    connection.execute(PRUNE_EVENTS, params![now_ms - changes::KEPT_MS])?;
    connection.execute(PRUNE_PROGRESS, [])?;
    Ok(agents as u64)
}

/// The figures a record is queried by, each in its own column. The column
/// for `max_gpu_free_mb` is `gpu_free_max_mb`, its name in every database
/// written so far; renaming it would take a migration for no reader's gain.
struct Columns {
    sent_at_ms: i64,
    memory_available_mb: i64,
    max_gpu_free_mb: i64,
    record: String,
}

fn encode(agent: &StoredAgent) -> Result<Columns, String> {
    // SQLite integers are signed 64-bit; validation keeps real figures far below.
    let signed = |value: u64, what: &str| {
        i64::try_from(value).map_err(|_| format!("{what} {value} is out of range"))
    };
    Ok(Columns {
        sent_at_ms: signed(agent.heartbeat.sent_at_ms, "sent_at_ms")?,
        memory_available_mb: signed(agent.heartbeat.memory.available_mb, "memory.available_mb")?,
        max_gpu_free_mb: signed(agent.heartbeat.max_gpu_free_mb(), "gpu free VRAM")?,
        record: serde_json::to_string(agent).map_err(|e| e.to_string())?,
    })
}

/// A JSON column's value; `what` names it in the error, never its text.
fn decode_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("unreadable {what}: {e}")))
}

/// The JSON column of the one row `sql` selects, if there is one.
fn json_row<T: serde::de::DeserializeOwned>(
    connection: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    what: &str,
) -> Result<Option<T>, StoreError> {
    let text: Option<String> = connection
        .prepare_cached(sql)
        .and_then(|mut statement| statement.query_row(params, |row| row.get(0)).optional())
        .map_err(unavailable)?;
    text.map(|text| decode_json(&text, what)).transpose()
}

fn decode(text: &str) -> Result<StoredAgent, StoreError> {
    decode_json(text, "agent record")
}

/// A record with the availability kept beside it.
fn decode_with(record: &str, availability: Option<&str>) -> Result<StoredAgent, StoreError> {
    let mut agent = decode(record)?;
    agent.availability = availability
        .map(|text| decode_json::<Availability>(text, "availability"))
        .transpose()?;
    Ok(agent)
}

fn unavailable(error: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `scripts/up` and a laptop's service manager start ingest and query
    /// together on one new file: neither may fail for the other's lock.
    #[test]
    fn a_new_database_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let _store = SqliteStore::open(&path, Durability::Normal).unwrap();
        for file in [path.clone(), dir.path().join("fleet.db-wal")] {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
    }

    #[test]
    fn openers_of_one_new_file_wait_for_each_other() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..20 {
            let path = dir.path().join(format!("race-{round}.db"));
            let openers: Vec<_> = (0..3)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || SqliteStore::open(&path, Durability::Full).map(drop))
                })
                .collect();
            for opener in openers {
                let opened = opener.join().unwrap();
                assert!(opened.is_ok(), "round {round}: {opened:?}");
            }
        }
    }
}
