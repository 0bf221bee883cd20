//! The ingest function: `POST /v1/heartbeats` (PROTOCOL.md §1), `/healthz`
//! and `/openapi.json`.
//!
//! The handler is thin: it runs the protocol's checks (in `rollcall::verify`),
//! asks the store for the newer-only write, then stores the optional history
//! (PROTOCOL.md §3: an extension never blocks liveness), and shapes the answer.

pub mod keys;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use rollcall::api::{self, ApiError};
use rollcall::heartbeat::{GpuProcesses, MinuteRollup};
use rollcall::history;
use rollcall::record::{Deadlines, StoredAgent};
use rollcall::store::{Store, Upsert};
use rollcall::time::{now_ms, rfc3339};
use rollcall::verify::Rejection;
use rollcall::wire::{Accepted, EXTENSION_HISTORY, EXTENSION_PROCESSES};

use crate::keys::KeySource;

/// This function's OpenAPI 3.1 document (PROTOCOL.md §3), served at
/// `/openapi.json`; `tests/tests/contract/openapi.rs` holds it to the router.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// How long a heartbeat waits for its extensions (history and, beside it,
/// GPU processes) before it is answered without them: well inside the
/// function's 5 s, after the record's write.
const EXTENSION_BUDGET: Duration = Duration::from_secs(2);

/// One extension's write within [`EXTENSION_BUDGET`]; false when it could
/// not be stored now. An extension never fails the heartbeat (PROTOCOL.md
/// §3): the collector sends it again, and `not_stored` says so.
async fn within_budget(
    extension: &str,
    agent_id: &str,
    write: impl std::future::Future<Output = Result<(), rollcall::store::StoreError>>,
) -> bool {
    match tokio::time::timeout(EXTENSION_BUDGET, write).await {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            tracing::warn!(agent_id, %error, "{extension} not stored; the heartbeat was, and the collector will send it again");
            false
        }
        Err(_) => {
            tracing::warn!(
                agent_id,
                budget_ms = EXTENSION_BUDGET.as_millis() as u64,
                "{extension} not stored in time; the heartbeat was, and the collector will send it again"
            );
            false
        }
    }
}

pub struct Ingest {
    /// The fleet secrets: fixed locally, fetched and refreshed in AWS.
    pub keyring: KeySource,
    pub deadlines: Deadlines,
    /// How long per-minute history is kept.
    pub history_retention_s: i64,
    pub store: Arc<dyn Store>,
}

pub fn router(ingest: Arc<Ingest>) -> Router {
    let routes = Router::new().route("/v1/heartbeats", post(heartbeat));
    api::common_routes(
        routes,
        OPENAPI,
        |_| "POST for /v1/heartbeats, GET for /healthz and /openapi.json",
    )
    .with_state(ingest)
}

async fn heartbeat(
    State(ingest): State<Arc<Ingest>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = api::read_json_body(&headers, body).await?;
    let received_at_ms = now_ms();
    let mut heartbeat = ingest
        .keyring
        .verify(
            |name| headers.get(name).map(|value| value.as_bytes()),
            &body,
            received_at_ms.div_euclid(1000),
        )
        .await
        .map_err(reject)?;
    let sent_at_ms = heartbeat.sent_at_ms;
    // History and GPU processes are kept apart from the agent record, so
    // the record stays small.
    let history = std::mem::take(&mut heartbeat.history);
    let processes = heartbeat.take_processes();
    let agent = StoredAgent::accept(heartbeat, received_at_ms, ingest.deadlines);
    let online_until_ms = agent.online_until_ms;
    let expires_at_s = agent.expires_at_s;
    let agent_id = agent.agent_id().to_owned();
    // PROTOCOL.md §3: the record first, under the newer-only check; a stale
    // or replayed heartbeat stores nothing at all.
    if ingest.store.upsert(agent).await? == Upsert::Stale {
        return Err(reject(Rejection::Stale { sent_at_ms }));
    }
    let mut not_stored = Vec::new();
    let (history_stored, processes_stored) = tokio::join!(
        ingest.store_history(&agent_id, history, received_at_ms),
        ingest.store_processes(&agent_id, processes.as_ref(), expires_at_s),
    );
    if !history_stored {
        not_stored.push(EXTENSION_HISTORY.to_owned());
    }
    if !processes_stored {
        not_stored.push(EXTENSION_PROCESSES.to_owned());
    }
    tracing::debug!(agent_id, sent_at_ms, ?not_stored, "heartbeat accepted");
    let accepted = Accepted {
        agent_id,
        online_until: rfc3339(online_until_ms),
        not_stored,
    };
    Ok((StatusCode::ACCEPTED, axum::Json(accepted)).into_response())
}

impl Ingest {
    /// Stores an accepted heartbeat's GPU processes (kept as long as its
    /// record); false when they could not be stored now. Like history, they
    /// never fail the heartbeat.
    async fn store_processes(
        &self,
        agent_id: &str,
        processes: Option<&GpuProcesses>,
        expires_at_s: i64,
    ) -> bool {
        let Some(processes) = processes else {
            return true;
        };
        let write = self.store.put_processes(agent_id, processes, expires_at_s);
        within_budget("GPU processes", agent_id, write).await
    }

    /// Stores an accepted heartbeat's history; false when it could not be
    /// stored now. History is optional: its failure never fails the heartbeat.
    async fn store_history(
        &self,
        agent_id: &str,
        mut minutes: Vec<MinuteRollup>,
        received_at_ms: i64,
    ) -> bool {
        // Minutes already past retention would be kept as if they were new.
        let oldest_kept =
            (received_at_ms.div_euclid(1000) - self.history_retention_s).div_euclid(60);
        minutes.retain(|rollup| i64::try_from(rollup.minute).is_ok_and(|m| m > oldest_kept));
        let (minutes, cut) = history::newest_windows(minutes, history::MAX_WINDOWS_PER_HEARTBEAT);
        if cut {
            tracing::info!(
                agent_id,
                "history spread over more than {} windows: the newest written, the rest reported not stored",
                history::MAX_WINDOWS_PER_HEARTBEAT
            );
        }
        if minutes.is_empty() {
            return true;
        }
        let expires_at_s = received_at_ms.div_euclid(1000) + self.history_retention_s;
        let write = self.store.put_history(agent_id, minutes, expires_at_s);
        within_budget("history", agent_id, write).await && !cut
    }
}

/// How often the plain-HTTP ingest looks for agents whose deadline passed.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Marks agents offline at their deadline without waiting for a request
/// (PROTOCOL.md §4 "State changes"): the embedded store's sweep, run beside
/// the server. On AWS the fleet function runs the same sweep on a schedule.
pub async fn sweep_forever(store: Arc<dyn Store>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        loop {
            match store.sweep(now_ms()).await {
                Ok(sweep) => {
                    if sweep.marked > 0 {
                        tracing::info!(
                            marked = sweep.marked,
                            "agents past their deadline marked offline"
                        );
                    }
                    if !sweep.more {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "sweep failed; trying again at the next tick");
                    break;
                }
            }
        }
    }
}

fn reject(rejection: Rejection) -> ApiError {
    // Debug, not info: a flood of refused requests must not become a flood of
    // billed log lines. The reason is an escaped field, never raw text.
    tracing::debug!(status = rejection.status(), reason = ?rejection.to_string(), "heartbeat refused");
    ApiError::from(rejection)
}
