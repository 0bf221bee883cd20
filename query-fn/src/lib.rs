//! The query function: the capacity API of PROTOCOL.md §2.
//!
//! `GET /v1/agents`, `GET /v1/agents/{agent_id}`, its `/history`, and
//! `GET /metrics` (see [`metrics`]) behind bearer tokens; `/healthz`,
//! `/openapi.json` and the live fleet page at `/` without. The handlers parse, ask the store, and shape the answer;
//! the match rule and answer order live in `rollcall::capacity`.

pub mod metrics;

use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rollcall::api::{self, ApiError};
use rollcall::capacity::{CapacityQuery, CursorSealer};
use rollcall::record::AgentView;
use rollcall::secrets::Secret;
use rollcall::signing::{AGENT_ID_RULE, is_valid_agent_id};
use rollcall::store::Store;
use rollcall::time::{now_ms, rfc3339};
use rollcall::wire::AgentPage;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// This function's OpenAPI 3.1 document (PROTOCOL.md §3), served at
/// `/openapi.json`; `tests/tests/openapi.rs` holds it to the router.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Query tokens shorter than this are refused at start-up.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longer than any token an operator generates; longer ones are not looked up again.
const MAX_TOKEN_LEN: usize = 512;

/// Whether `presented` has the form `Tokens::parse` accepts.
fn could_be_a_token(presented: &[u8]) -> bool {
    (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&presented.len())
        && presented.iter().all(|b| b.is_ascii_graphic())
}

pub struct QueryApi {
    tokens: Secret<Tokens>,
    cursors: CursorKeys,
    store: Arc<dyn Store>,
}

/// The cursor key, refreshed like the other secrets. A cursor sealed with
/// the key before a rotation still opens, so a client paging through a
/// fleet is not cut off halfway.
struct CursorKeys {
    key: Secret<Vec<u8>>,
    /// The key seen last, and the one before it.
    seen: std::sync::Mutex<Option<(Key, Option<Key>)>>,
}

type Key = Arc<Vec<u8>>;

impl CursorKeys {
    fn new(key: Secret<Vec<u8>>) -> Self {
        Self {
            key,
            seen: std::sync::Mutex::new(None),
        }
    }

    /// The current key and the previous one, if the key has changed.
    async fn sealers(&self) -> (CursorSealer, Option<CursorSealer>) {
        let current = self.key.current().await;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (last, previous) = seen.get_or_insert_with(|| (Arc::clone(&current), None));
        if **last != *current {
            *previous = Some(std::mem::replace(last, Arc::clone(&current)));
        }
        (
            CursorSealer::new(&current),
            previous.as_ref().map(|key| CursorSealer::new(key)),
        )
    }

    async fn seal(&self, position: &rollcall::capacity::Position, query: &CapacityQuery) -> String {
        self.sealers().await.0.seal(position, query)
    }

    async fn open(
        &self,
        cursor: &str,
        query: &CapacityQuery,
    ) -> Result<rollcall::capacity::Position, rollcall::capacity::ParamError> {
        let (current, previous) = self.sealers().await;
        current.open(cursor, query).or_else(|error| match previous {
            Some(previous) => previous.open(cursor, query).map_err(|_| error),
            None => Err(error),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no query tokens given (expected token[,token2])")]
    Empty,
    #[error("query tokens must be at least {MIN_TOKEN_LEN} characters of visible ASCII")]
    Weak,
}

/// The bearer tokens the API accepts: `token[,token2]`, two at once while
/// rotating. Only their digests are kept.
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl Tokens {
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let mut tokens: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if tokens.is_empty() {
            return Err(TokenError::Empty);
        }
        if tokens
            .iter()
            .any(|t| t.len() < MIN_TOKEN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(TokenError::Weak);
        }
        tokens.sort_unstable();
        Ok(Self {
            digests: tokens
                .iter()
                .map(|token| Sha256::digest(token.as_bytes()).into())
                .collect(),
        })
    }

    /// Compares digests so that neither a token's content nor its length
    /// leaks through timing, and checks every token without stopping early.
    fn authorised(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |any, known| {
                any | known.ct_eq(&digest)
            })
            .into()
    }
}

impl QueryApi {
    /// Cursors are sealed with `cursor_key`: a secret of its own, never
    /// derived from the tokens, so that a leaked cursor says nothing about
    /// a token.
    pub fn new(tokens: Secret<Tokens>, cursor_key: Secret<Vec<u8>>, store: Arc<dyn Store>) -> Self {
        Self {
            cursors: CursorKeys::new(cursor_key),
            tokens,
            store,
        }
    }

    /// An unknown token may be one rotated in since the tokens were fetched:
    /// one early refresh (rate-limited and time-bounded inside [`Secret`])
    /// and one more look, only for a token that could be one, so that
    /// garbage cannot choose when Secrets Manager is called.
    async fn authorised(&self, presented: &[u8]) -> bool {
        if self.tokens.current().await.authorised(presented) {
            return true;
        }
        could_be_a_token(presented)
            && self.tokens.refresh_early().await
            && self.tokens.current().await.authorised(presented)
    }
}

pub fn router(api: Arc<QueryApi>) -> Router {
    let protected = Router::new()
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/{agent_id}", get(get_agent))
        .route("/v1/agents/{agent_id}/history", get(agent_history))
        .route("/metrics", get(prometheus))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&api),
            require_token,
        ));
    Router::new()
        .merge(protected)
        .route("/healthz", get(api::healthz))
        .route(
            "/openapi.json",
            get(|| async { api::openapi_json(OPENAPI) }),
        )
        .route("/", get(fleet_page))
        .method_not_allowed_fallback(|| async { api::method_not_allowed("GET") })
        .fallback(api::not_found)
        .layer(axum::middleware::map_response(api::no_sniff_no_store))
        .with_state(api)
}

async fn require_token(
    State(api): State<Arc<QueryApi>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "missing Authorization: Bearer <token>",
        ));
    };
    let token = value
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .ok_or_else(|| ApiError::unauthorized("Authorization must be Bearer <token>"))?;
    if !api.authorised(token).await {
        return Err(ApiError::unauthorized("unknown bearer token"));
    }
    Ok(next.run(request).await)
}

async fn list_agents(
    State(api): State<Arc<QueryApi>>,
    RawQuery(query): RawQuery,
) -> Result<Json<AgentPage>, ApiError> {
    let query = CapacityQuery::from_query_string(query.as_deref().unwrap_or(""))
        .map_err(|error| ApiError::bad_request(format!("parameter {error}")))?;
    let after = match query.cursor.as_deref() {
        Some(cursor) => Some(
            api.cursors
                .open(cursor, &query)
                .await
                .map_err(|error| ApiError::bad_request(format!("parameter {error}")))?,
        ),
        None => None,
    };
    let now = now_ms();
    let page = api.store.query(&query, after.as_ref(), now).await?;
    let next_cursor = match page.next.as_ref() {
        Some(position) => Some(api.cursors.seal(position, &query).await),
        None => None,
    };
    Ok(Json(AgentPage {
        agents: page.agents.iter().map(|agent| agent.view(now)).collect(),
        next_cursor,
        as_of: rfc3339(now),
    }))
}

/// Most history one call returns: the default retention, 24 h.
const MAX_HISTORY_MINUTES: u64 = 1440;

#[derive(Serialize)]
struct History {
    agent_id: String,
    minutes: Vec<rollcall::heartbeat::MinuteRollup>,
    as_of: String,
}

/// `GET /v1/agents/{id}/history?minutes=N`: the agent's per-minute roll-ups
/// for the last N minutes (default 60, at most 1440), oldest first.
async fn agent_history(
    State(api): State<Arc<QueryApi>>,
    Path(agent_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<History>, ApiError> {
    if !is_valid_agent_id(&agent_id) {
        return Err(ApiError::bad_request(format!("agent id {AGENT_ID_RULE}")));
    }
    let mut minutes = 60u64;
    let mut seen = false;
    for (name, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "minutes" if !seen => {
                seen = true;
                minutes = value.parse::<u64>().ok().filter(|m| (1..=MAX_HISTORY_MINUTES).contains(m)).ok_or_else(|| {
                    ApiError::bad_request(format!("parameter minutes: must be a whole number from 1 to {MAX_HISTORY_MINUTES}, got {value:?}"))
                })?;
            }
            "minutes" => {
                return Err(ApiError::bad_request(
                    "parameter minutes: given more than once",
                ));
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "parameter {other}: unknown parameter"
                )));
            }
        }
    }
    let now = now_ms();
    if api.store.get(&agent_id, now).await?.is_none() {
        return Err(ApiError::not_found(format!("unknown agent {agent_id:?}")));
    }
    let now_minute = u64::try_from(now.div_euclid(60_000)).unwrap_or(0);
    let since = now_minute.saturating_sub(minutes - 1);
    let rollups = api.store.history(&agent_id, since, now).await?;
    Ok(Json(History {
        agent_id,
        minutes: rollups,
        as_of: rfc3339(now),
    }))
}

/// The live fleet page: self-contained (no build step, nothing fetched from
/// elsewhere), so it is served without a token; its data calls need one.
const FLEET_PAGE: &str = include_str!("fleet.html");

async fn fleet_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, fleet_page_policy()),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        FLEET_PAGE,
    )
        .into_response()
}

/// The page's Content-Security-Policy: its one inline script is allowed by
/// its SHA-256 and nothing else runs, so an injected `<script>` or inline
/// event handler would not execute even if one got in. Connections go to
/// this origin only (the page keeps a bearer token).
pub fn fleet_page_policy() -> &'static str {
    static POLICY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        use base64::Engine as _;
        let script = FLEET_PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(script, _)| script);
        let hash =
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(script.as_bytes()));
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
        )
    });
    &POLICY
}

/// The content type `prometheus-client` encodes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /metrics[?<capacity query>]`: the fleet's sums by pool, and per-agent series
/// for the selection the parameters name (see [`metrics`]).
async fn prometheus(
    State(api): State<Arc<QueryApi>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let selection = match query.as_deref().filter(|q| !q.is_empty()) {
        Some(query) => {
            let selection = CapacityQuery::from_query_string(query)
                .map_err(|error| ApiError::bad_request(format!("parameter {error}")))?;
            if selection.cursor.is_some() {
                return Err(ApiError::bad_request(
                    "parameter cursor: /metrics takes one page; narrow the selection instead",
                ));
            }
            Some(selection)
        }
        None => None,
    };
    let text = metrics::render(api.store.as_ref(), selection.as_ref(), now_ms()).await?;
    Ok(([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response())
}

async fn get_agent(
    State(api): State<Arc<QueryApi>>,
    Path(agent_id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    if !is_valid_agent_id(&agent_id) {
        return Err(ApiError::bad_request(format!("agent id {AGENT_ID_RULE}")));
    }
    let now = now_ms();
    match api.store.get(&agent_id, now).await? {
        Some(agent) => Ok(Json(agent.view(now))),
        None => Err(ApiError::not_found(format!("unknown agent {agent_id:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_could_be_a_token_is_worth_an_early_refresh() {
        assert!(could_be_a_token(b"0123456789abcdef"));
        assert!(!could_be_a_token(b"short"));
        assert!(!could_be_a_token(b"0123456789abcdef with spaces"));
        assert!(!could_be_a_token(&[b'a'; MAX_TOKEN_LEN + 1]));
    }
}
