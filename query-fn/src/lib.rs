//! The query function: the capacity API of PROTOCOL.md §2.
//!
//! `GET /v1/agents`, `GET /v1/agents/{agent_id}`, its `/history` and `/events`,
//! `GET /metrics` (see [`metrics`]) and the claims of PROTOCOL.md §4 behind
//! bearer tokens with scopes and pools ([`Grant`]); `/healthz`,
//! `/openapi.json` and the live fleet page at `/` without. The handlers
//! parse, ask the store, and shape the answer; the match rule and answer
//! order live in `rollcall::capacity`, the claiming procedure in
//! `rollcall::claims`.

pub mod metrics;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rollcall::api::{self, ApiError};
use rollcall::capacity::{CapacityQuery, CursorSealer};
use rollcall::claims::{self, ClaimId, ClaimRequest, ClaimView, Refusal};
use rollcall::secrets::Secret;
use rollcall::signing::{AGENT_ID_RULE, is_valid_agent_id};
use rollcall::store::Store;
use rollcall::time::{now_ms, rfc3339};
use rollcall::wire::{AgentPage, AgentView, EventPage, History, code};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// This function's OpenAPI 3.1 document (PROTOCOL.md §3), served at
/// `/openapi.json`; `tests/tests/contract/openapi.rs` holds it to the router.
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
    #[error(
        "no query tokens given (expected token[,token2], each optionally token:scopes[:pools])"
    )]
    Empty,
    #[error("query tokens must be at least {MIN_TOKEN_LEN} characters of visible ASCII")]
    Weak,
    #[error("a query token's scopes must be read, claim or read+claim; got {0:?}")]
    Scopes(String),
    #[error("a query token's pools must be pool names joined by +; got {0:?}")]
    Pools(String),
}

/// What a token may do (PROTOCOL.md §4 "Scoped tokens"): `read` for every
/// `GET`, `claim` for the claim routes that change something, and the pools
/// whose agents exist for it (`None`: all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub read: bool,
    pub claim: bool,
    pub pools: Option<Vec<String>>,
}

impl Grant {
    /// What a v1 token (no scopes given) may do: read every pool.
    pub const V1: Grant = Grant {
        read: true,
        claim: false,
        pools: None,
    };

    pub fn sees(&self, pool: &str) -> bool {
        rollcall::capacity::pool_visible(self.pools.as_deref(), pool)
    }

    fn parse(scopes: Option<&str>, pools: Option<&str>) -> Result<Self, TokenError> {
        let mut grant = Grant {
            read: false,
            claim: false,
            pools: None,
        };
        let Some(scopes) = scopes else {
            return Ok(Self::V1);
        };
        for scope in scopes.split('+') {
            match scope {
                "read" => grant.read = true,
                "claim" => grant.claim = true,
                _ => return Err(TokenError::Scopes(scopes.to_owned())),
            }
        }
        if let Some(pools) = pools {
            let names: Vec<String> = pools.split('+').map(str::to_owned).collect();
            if names.iter().any(|pool| {
                !rollcall::signing::is_valid_id(pool, rollcall::heartbeat::MAX_POOL_LEN)
            }) {
                return Err(TokenError::Pools(pools.to_owned()));
            }
            grant.pools = Some(names);
        }
        Ok(grant)
    }
}

/// The bearer tokens the API accepts: `token[,token2]`, two at once while
/// rotating, each optionally `token:scopes[:pools]`. Only their digests are
/// kept.
pub struct Tokens {
    entries: Vec<([u8; 32], Grant)>,
}

impl Tokens {
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let mut entries: Vec<([u8; 32], Grant)> = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let mut parts = entry.splitn(3, ':');
            let token = parts.next().unwrap_or_default();
            if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(TokenError::Weak);
            }
            let grant = Grant::parse(parts.next(), parts.next())?;
            entries.push((Sha256::digest(token.as_bytes()).into(), grant));
        }
        if entries.is_empty() {
            return Err(TokenError::Empty);
        }
        Ok(Self { entries })
    }

    /// Compares digests so that neither a token's content nor its length
    /// leaks through timing, and checks every token without stopping early.
    fn grant(&self, presented: &[u8]) -> Option<Grant> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for (known, grant) in &self.entries {
            if bool::from(known.ct_eq(&digest)) {
                found = Some(grant.clone());
            }
        }
        found
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
    async fn grant(&self, presented: &[u8]) -> Option<Grant> {
        if let Some(grant) = self.tokens.current().await.grant(presented) {
            return Some(grant);
        }
        if could_be_a_token(presented) && self.tokens.refresh_early().await {
            return self.tokens.current().await.grant(presented);
        }
        None
    }
}

pub fn router(api: Arc<QueryApi>) -> Router {
    let protected = Router::new()
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/{agent_id}", get(get_agent))
        .route("/v1/agents/{agent_id}/history", get(agent_history))
        .route("/v1/agents/{agent_id}/events", get(agent_events))
        .route("/metrics", get(prometheus))
        .route("/v1/claims", post(create_claim))
        .route(
            "/v1/claims/{claim_id}",
            get(get_claim).put(extend_claim).delete(release_claim),
        )
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&api),
            require_token,
        ));
    let routes = Router::new().merge(protected).route("/", get(fleet_page));
    api::common_routes(routes, OPENAPI, |method| {
        if method == Method::GET { "POST" } else { "GET" }
    })
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
    let Some(grant) = api.grant(token).await else {
        return Err(ApiError::unauthorized("unknown bearer token"));
    };
    // Every GET reads; every other method changes a claim.
    let (allowed, scope) = if request.method() == Method::GET {
        (grant.read, "read")
    } else {
        (grant.claim, "claim")
    };
    if !allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("this token lacks the {scope} scope"),
        ));
    }
    let mut request = request;
    request.extensions_mut().insert(grant);
    Ok(next.run(request).await)
}

async fn list_agents(
    State(api): State<Arc<QueryApi>>,
    Extension(grant): Extension<Grant>,
    RawQuery(query): RawQuery,
) -> Result<Json<AgentPage>, ApiError> {
    let mut query = CapacityQuery::from_query_string(query.as_deref().unwrap_or(""))
        .map_err(|error| ApiError::bad_request(format!("parameter {error}")))?;
    query.pools = grant.pools;
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

/// `GET /v1/agents/{id}/history?minutes=N`: the agent's per-minute roll-ups
/// for the last N minutes (default 60, at most 1440), oldest first.
async fn agent_history(
    State(api): State<Arc<QueryApi>>,
    Extension(grant): Extension<Grant>,
    Path(agent_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<History>, ApiError> {
    if !is_valid_agent_id(&agent_id) {
        return Err(ApiError::bad_request(format!("agent id {AGENT_ID_RULE}")));
    }
    let [minutes] = parameters(query.as_deref(), ["minutes"])?;
    let minutes = match minutes {
        Some(text) => whole(
            "minutes",
            &text,
            1..=rollcall::history::MAX_READ_MINUTES as u32,
        )?,
        None => 60,
    };
    let now = now_ms();
    visible_agent(&api, &grant, &agent_id, now).await?;
    let now_minute = u64::try_from(now.div_euclid(60_000)).unwrap_or(0);
    let since = now_minute.saturating_sub(u64::from(minutes) - 1);
    let rollups = api.store.history(&agent_id, since, now).await?;
    Ok(Json(History {
        agent_id,
        minutes: rollups,
        as_of: rfc3339(now),
    }))
}

/// The values of a route's parameters, each given at most once; an unknown
/// or repeated one is the caller's mistake, named in the 400.
fn parameters<const N: usize>(
    query: Option<&str>,
    known: [&str; N],
) -> Result<[Option<String>; N], ApiError> {
    let mut values: [Option<String>; N] = std::array::from_fn(|_| None);
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let Some(slot) = known.iter().position(|known| *known == name) else {
            return Err(ApiError::bad_request(format!(
                "parameter {name}: unknown parameter"
            )));
        };
        if values[slot].replace(value.into_owned()).is_some() {
            return Err(ApiError::bad_request(format!(
                "parameter {name}: given more than once"
            )));
        }
    }
    Ok(values)
}

/// A whole-number parameter in `range`, by the capacity API's one rule.
fn whole(name: &str, text: &str, range: std::ops::RangeInclusive<u32>) -> Result<u32, ApiError> {
    rollcall::capacity::whole(name, text, range)
        .map_err(|error| ApiError::bad_request(format!("parameter {error}")))
}

/// Most events one call returns.
const MAX_EVENTS: usize = 500;
const DEFAULT_EVENTS: usize = 100;

/// `GET /v1/agents/{id}/events?limit=N&cursor=C`: the agent's state changes
/// of the last 30 days, oldest first, `limit` (1–500, default 100) at a
/// time. `next_cursor` names the last event returned, so a caller can also
/// keep it to ask later for what happened since; it is `null` once a page
/// is empty.
async fn agent_events(
    State(api): State<Arc<QueryApi>>,
    Extension(grant): Extension<Grant>,
    Path(agent_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<EventPage>, ApiError> {
    if !is_valid_agent_id(&agent_id) {
        return Err(ApiError::bad_request(format!("agent id {AGENT_ID_RULE}")));
    }
    let [limit, cursor] = parameters(query.as_deref(), ["limit", "cursor"])?;
    let limit = match limit {
        Some(text) => whole("limit", &text, 1..=MAX_EVENTS as u32)? as usize,
        None => DEFAULT_EVENTS,
    };
    if cursor
        .as_deref()
        .is_some_and(|cursor| !rollcall::changes::is_event_key(cursor))
    {
        return Err(ApiError::bad_request(
            "parameter cursor: not a cursor of this list (pass back next_cursor as it came)",
        ));
    }
    let now = now_ms();
    visible_agent(&api, &grant, &agent_id, now).await?;
    let events = api
        .store
        .events(&agent_id, cursor.as_deref(), limit, now)
        .await?;
    let next_cursor = events.last().map(rollcall::changes::Event::key);
    Ok(Json(EventPage {
        agent_id,
        events,
        next_cursor,
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
    Extension(grant): Extension<Grant>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let selection = match query.as_deref().filter(|q| !q.is_empty()) {
        Some(query) => {
            let mut selection = CapacityQuery::from_query_string(query)
                .map_err(|error| ApiError::bad_request(format!("parameter {error}")))?;
            selection.pools = grant.pools.clone();
            if selection.cursor.is_some() {
                return Err(ApiError::bad_request(
                    "parameter cursor: /metrics takes one page; narrow the selection instead",
                ));
            }
            Some(selection)
        }
        None => None,
    };
    let text = metrics::render(
        api.store.as_ref(),
        selection.as_ref(),
        grant.pools.as_deref(),
        now_ms(),
    )
    .await?;
    Ok(([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response())
}

async fn get_agent(
    State(api): State<Arc<QueryApi>>,
    Extension(grant): Extension<Grant>,
    Path(agent_id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    let now = now_ms();
    let agent = visible_agent(&api, &grant, &agent_id, now).await?;
    let mut view = agent.view(now);
    // Processes are an extension: a record without them beats no record.
    match api.store.processes(&agent_id, now).await {
        Ok(Some(snapshot)) => view.show_processes(snapshot),
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(agent_id, %error, "GPU processes not read; the record is answered without them")
        }
    }
    Ok(Json(view))
}

/// The agent, if it exists for this token: an agent outside a
/// pool-limited token's pools is as unknown as one never seen.
async fn visible_agent(
    api: &QueryApi,
    grant: &Grant,
    agent_id: &str,
    now: i64,
) -> Result<rollcall::record::StoredAgent, ApiError> {
    if !is_valid_agent_id(agent_id) {
        return Err(ApiError::bad_request(format!("agent id {AGENT_ID_RULE}")));
    }
    api.store
        .get(agent_id, now)
        .await?
        .filter(|agent| grant.sees(&agent.heartbeat.pool))
        .ok_or_else(|| ApiError::not_found(format!("unknown agent {agent_id:?}")))
}

/// `POST /v1/claims`: holds GPUs by name or by filters (PROTOCOL.md §4).
async fn create_claim(
    State(api): State<Arc<QueryApi>>,
    Extension(grant): Extension<Grant>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = api::read_json_body(&headers, body).await?;
    let request = ClaimRequest::parse(&body).map_err(ApiError::bad_request)?;
    let now = now_ms();
    match claims::claim(api.store.as_ref(), &request, grant.pools.as_deref(), now).await {
        Ok(claim) => {
            tracing::info!(
                claim_id = %claim.claim_id,
                agent_id = claim.claim_id.agent_id(),
                gpus = claim.gpus.len(),
                holder = ?claim.holder,
                "claim made"
            );
            Ok((StatusCode::CREATED, Json(claim.view())).into_response())
        }
        Err(refusal) => Err(refused(refusal)),
    }
}

fn refused(refusal: Refusal) -> ApiError {
    let message = refusal.to_string();
    match refusal {
        Refusal::Claimed { .. } => {
            ApiError::new(StatusCode::CONFLICT, message).with_code(code::CLAIMED)
        }
        Refusal::NoCapacity { .. } => {
            ApiError::new(StatusCode::CONFLICT, message).with_code(code::NO_CAPACITY)
        }
        Refusal::NotAvailable { .. } => {
            ApiError::new(StatusCode::CONFLICT, message).with_code(code::NOT_AVAILABLE)
        }
        Refusal::UnknownAgent(_) | Refusal::UnknownGpu { .. } => ApiError::not_found(message),
        Refusal::Store(error) => error.into(),
    }
}

/// A claim id from the path; text no claim id has is an unknown claim.
fn claim_id(text: &str) -> Result<ClaimId, ApiError> {
    ClaimId::parse(text).ok_or_else(|| unknown_claim(text))
}

fn unknown_claim(text: &str) -> ApiError {
    let shown: String = text.chars().take(200).collect();
    ApiError::not_found(format!(
        "no live claim {shown:?} (released, expired or never made)"
    ))
}

async fn get_claim(
    State(api): State<Arc<QueryApi>>,
    Extension(grant): Extension<Grant>,
    Path(id): Path<String>,
) -> Result<Json<ClaimView>, ApiError> {
    let claim_id = claim_id(&id)?;
    claims::get(
        api.store.as_ref(),
        &claim_id,
        grant.pools.as_deref(),
        now_ms(),
    )
    .await?
    .map(|claim| Json(claim.view()))
    .ok_or_else(|| unknown_claim(&id))
}

/// `PUT /v1/claims/{id}` with `{"ttl_s"}`: held for that long from now.
async fn extend_claim(
    State(api): State<Arc<QueryApi>>,
    Extension(grant): Extension<Grant>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ClaimView>, ApiError> {
    let body = api::read_json_body(&headers, body).await?;
    let ttl_s = claims::parse_extension(&body).map_err(ApiError::bad_request)?;
    let claim_id = claim_id(&id)?;
    claims::extend(
        api.store.as_ref(),
        &claim_id,
        ttl_s,
        grant.pools.as_deref(),
        now_ms(),
    )
    .await?
    .map(|claim| Json(claim.view()))
    .ok_or_else(|| unknown_claim(&id))
}

/// `DELETE /v1/claims/{id}`: 204, also for a claim already gone.
async fn release_claim(
    State(api): State<Arc<QueryApi>>,
    Extension(grant): Extension<Grant>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let claim_id = claim_id(&id)?;
    if claims::release(
        api.store.as_ref(),
        &claim_id,
        grant.pools.as_deref(),
        now_ms(),
    )
    .await?
    {
        tracing::info!(claim_id = %claim_id, "claim released");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(unknown_claim(&id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_entries_carry_scopes_and_pools() {
        let tokens = Tokens::parse(
            "reader-0123456789abcdef, claimer-0123456789abcdef:read+claim ,lab-0123456789abcdef:claim:lab-a+lab-b",
        )
        .unwrap();
        assert_eq!(tokens.grant(b"reader-0123456789abcdef"), Some(Grant::V1));
        let claimer = tokens.grant(b"claimer-0123456789abcdef").unwrap();
        assert!(claimer.read && claimer.claim && claimer.pools.is_none());
        let lab = tokens.grant(b"lab-0123456789abcdef").unwrap();
        assert!(!lab.read && lab.claim);
        assert!(lab.sees("lab-b") && !lab.sees("default"));
        // The scopes are not part of the token.
        assert_eq!(tokens.grant(b"claimer-0123456789abcdef:read+claim"), None);
        for (text, expected) in [
            ("reader-0123456789abcdef:write", "scopes"),
            ("reader-0123456789abcdef:read:", "pools"),
            ("reader-0123456789abcdef:read:a/b", "pools"),
            ("short:read", "at least"),
            (" , ", "no query tokens"),
        ] {
            let error = Tokens::parse(text).err().expect(text).to_string();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(!error.contains("0123456789abcdef"), "{error}");
        }
    }

    #[test]
    fn only_what_could_be_a_token_is_worth_an_early_refresh() {
        assert!(could_be_a_token(b"0123456789abcdef"));
        assert!(!could_be_a_token(b"short"));
        assert!(!could_be_a_token(b"0123456789abcdef with spaces"));
        assert!(!could_be_a_token(&[b'a'; MAX_TOKEN_LEN + 1]));
    }
}
