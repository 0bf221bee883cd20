//! Claims (PROTOCOL.md §4 "Claims"): a scheduler holds GPUs so that two jobs
//! never take the same free GPU from the same answer.
//!
//! This module owns what a claim is, its identifier, the body of
//! `POST /v1/claims` and its bounds, and (feature `server`) the one claiming
//! procedure every store serves: by name, or the first agent in answer order
//! whose unclaimed GPUs satisfy the filters. Stores only keep the slots: a
//! GPU's slot holds one live claim at most, and a claim's slots are written
//! all together or not at all (`Store::put_claim`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::capacity::{CapacityQuery, ParamError};
use crate::heartbeat::MAX_GPUS;
use crate::time::rfc3339;

/// The longest a claim may be held or extended at once: a day. Every live
/// claim therefore expires within a day of its last write, which is what
/// lets DynamoDB's TTL remove a claims item a day after its last write.
pub const MAX_TTL_S: u64 = 86_400;
/// The longest holder text.
pub const MAX_HOLDER_LEN: usize = 128;
/// Bytes in a claim id's random part.
const NONCE_LEN: usize = 16;

/// What holds one GPU: its claim, as a record shows it and a store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuClaim {
    pub claim_id: String,
    pub holder: String,
    /// The GPU's UUID when the claim was made, for `CUDA_VISIBLE_DEVICES`
    /// even if the agent stops reporting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    pub expires_at_ms: i64,
}

impl GpuClaim {
    pub fn is_live(&self, now_ms: i64) -> bool {
        now_ms < self.expires_at_ms
    }
}

/// The live claims on one agent's GPUs, by GPU index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentClaims {
    slots: BTreeMap<u32, GpuClaim>,
}

impl AgentClaims {
    /// The slots as a store read them; those expired at `now_ms` are left out.
    pub fn live(slots: impl IntoIterator<Item = (u32, GpuClaim)>, now_ms: i64) -> Self {
        Self {
            slots: slots
                .into_iter()
                .filter(|(_, claim)| claim.is_live(now_ms))
                .collect(),
        }
    }

    /// The claim holding GPU `index`, if one does.
    pub fn holder_of(&self, index: u32) -> Option<&GpuClaim> {
        self.slots.get(&index)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The claim `claim_id` as these slots hold it, if any of them do.
    pub fn claim(&self, claim_id: &ClaimId) -> Option<Claim> {
        let id = claim_id.to_string();
        let mut held = self
            .slots
            .iter()
            .filter(|(_, slot)| slot.claim_id == id)
            .peekable();
        let (_, first) = held.peek()?;
        let (holder, expires_at_ms) = (first.holder.clone(), first.expires_at_ms);
        Some(Claim {
            claim_id: claim_id.clone(),
            gpus: held
                .map(|(index, slot)| ClaimedGpu {
                    index: *index,
                    uuid: slot.uuid.clone(),
                })
                .collect(),
            holder,
            expires_at_ms,
        })
    }
}

/// A claim's identifier: a random part and the agent it holds GPUs of, so
/// that every store finds a claim by its agent's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimId {
    nonce: String,
    agent_id: String,
}

impl ClaimId {
    #[cfg(feature = "server")]
    pub fn new(agent_id: &str) -> Result<Self, String> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|error| format!("no system randomness: {error}"))?;
        Ok(Self {
            nonce: hex::encode(nonce),
            agent_id: agent_id.to_owned(),
        })
    }

    /// `None` for text that no claim id has: the API answers it with 404,
    /// like an id that was never issued.
    pub fn parse(text: &str) -> Option<Self> {
        let (nonce, agent) = text.split_once('.')?;
        let valid_nonce = nonce.len() == NONCE_LEN * 2
            && nonce
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let agent_id = String::from_utf8(hex::decode(agent).ok()?).ok()?;
        (valid_nonce && crate::signing::is_valid_agent_id(&agent_id)).then(|| Self {
            nonce: nonce.to_owned(),
            agent_id,
        })
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }
}

impl std::fmt::Display for ClaimId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.nonce, hex::encode(&self.agent_id))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedGpu {
    pub index: u32,
    pub uuid: Option<String>,
}

/// GPUs of one agent held by one claim until `expires_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub claim_id: ClaimId,
    pub gpus: Vec<ClaimedGpu>,
    pub holder: String,
    pub expires_at_ms: i64,
}

impl Claim {
    /// Each GPU's slot, as a store writes it.
    pub fn slots(&self) -> impl Iterator<Item = (u32, GpuClaim)> + '_ {
        let claim_id = self.claim_id.to_string();
        self.gpus.iter().map(move |gpu| {
            (
                gpu.index,
                GpuClaim {
                    claim_id: claim_id.clone(),
                    holder: self.holder.clone(),
                    uuid: gpu.uuid.clone(),
                    expires_at_ms: self.expires_at_ms,
                },
            )
        })
    }

    pub fn view(&self) -> ClaimView {
        ClaimView {
            claim_id: self.claim_id.to_string(),
            agent_id: self.claim_id.agent_id.clone(),
            gpus: self.gpus.clone(),
            holder: self.holder.clone(),
            expires_at: rfc3339(self.expires_at_ms),
            cuda_visible_devices: cuda_visible_devices(&self.gpus),
        }
    }
}

/// What `CUDA_VISIBLE_DEVICES` should be for these GPUs: UUIDs, which stay
/// right whatever order the driver enumerates in, else indices.
pub fn cuda_visible_devices(gpus: &[ClaimedGpu]) -> String {
    gpus.iter()
        .map(|gpu| gpu.uuid.clone().unwrap_or_else(|| gpu.index.to_string()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The answer to `POST`, `GET` and `PUT` on claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimView {
    pub claim_id: String,
    pub agent_id: String,
    pub gpus: Vec<ClaimedGpu>,
    pub holder: String,
    /// RFC 3339.
    pub expires_at: String,
    pub cuda_visible_devices: String,
}

/// A GPU's claim as an agent record shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuClaimView {
    pub claim_id: String,
    pub holder: String,
    pub expires_at: String,
}

impl From<&GpuClaim> for GpuClaimView {
    fn from(claim: &GpuClaim) -> Self {
        Self {
            claim_id: claim.claim_id.clone(),
            holder: claim.holder.clone(),
            expires_at: rfc3339(claim.expires_at_ms),
        }
    }
}

/// Which GPUs a claim asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Wanted {
    /// These GPUs of this agent.
    ByName { agent_id: String, gpus: Vec<u32> },
    /// `required_gpus()` GPUs of the first agent in answer order that has
    /// that many unclaimed GPUs matching the filters.
    ByFilters(Box<CapacityQuery>),
}

/// A checked `POST /v1/claims` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimRequest {
    pub wanted: Wanted,
    pub ttl_s: u64,
    pub holder: String,
}

/// The body as sent: every field optional here, so that what is missing or
/// mixed is named by [`ClaimRequest::parse`] rather than by serde.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    agent_id: Option<String>,
    gpus: Option<Vec<serde_json::Value>>,
    min_gpu_vram_gb: Option<serde_json::Number>,
    min_gpus: Option<serde_json::Number>,
    min_cpu_cores: Option<serde_json::Number>,
    min_memory_gb: Option<serde_json::Number>,
    gpu_vendor: Option<String>,
    pool: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    min_uptime: Option<serde_json::Number>,
    ttl_s: Option<serde_json::Number>,
    holder: Option<String>,
}

/// The `PUT /v1/claims/{id}` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtendBody {
    ttl_s: Option<serde_json::Number>,
}

impl ClaimRequest {
    /// Checks a body against PROTOCOL.md §4; the error names the field.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let body: ClaimBody = parse_json(body)?;
        let ttl_s = ttl(body.ttl_s.as_ref())?;
        let holder = holder(body.holder.as_deref())?;
        let by_name = body.agent_id.is_some() || body.gpus.is_some();
        let by_filters = body.min_gpu_vram_gb.is_some()
            || body.min_gpus.is_some()
            || body.min_cpu_cores.is_some()
            || body.min_memory_gb.is_some()
            || body.gpu_vendor.is_some()
            || body.pool.is_some()
            || body.labels.is_some()
            || body.min_uptime.is_some();
        let wanted = match (by_name, by_filters) {
            (true, true) => {
                return Err(
                    "give either agent_id and gpus (a claim by name) or capacity filters, not both"
                        .into(),
                );
            }
            (true, false) => {
                let agent_id = body.agent_id.ok_or("agent_id: required with gpus")?;
                if !crate::signing::is_valid_agent_id(&agent_id) {
                    return Err(format!("agent_id: {}", crate::signing::AGENT_ID_RULE));
                }
                let gpus =
                    gpu_indices(body.gpus.as_deref().ok_or("gpus: required with agent_id")?)?;
                Wanted::ByName { agent_id, gpus }
            }
            (false, _) => {
                let mut query = CapacityQuery::default();
                let number = |name: &str, value: &Option<serde_json::Number>| {
                    value.as_ref().map(|n| (name.to_owned(), n.to_string()))
                };
                let settings = [
                    number("min_gpu_vram_gb", &body.min_gpu_vram_gb),
                    number("min_gpus", &body.min_gpus),
                    number("min_cpu_cores", &body.min_cpu_cores),
                    number("min_memory_gb", &body.min_memory_gb),
                    number("min_uptime", &body.min_uptime),
                    body.gpu_vendor.map(|v| ("gpu_vendor".to_owned(), v)),
                    body.pool.map(|v| ("pool".to_owned(), v)),
                ];
                for (name, value) in settings.into_iter().flatten() {
                    query.set(&name, &value).map_err(|e| e.to_string())?;
                }
                for (key, value) in body.labels.unwrap_or_default() {
                    // Checked alone: `key=value` splits at the first `=`.
                    crate::names::check_label(&key, &value)
                        .map_err(|why| format!("labels: {key:?}: {why}"))?;
                    query
                        .set("label", &format!("{key}={value}"))
                        .map_err(|ParamError { message, .. }| format!("labels: {message}"))?;
                }
                if query.min_gpus.is_none() {
                    query.min_gpus = Some(1);
                }
                if query.min_gpus == Some(0) {
                    return Err("min_gpus: a claim holds at least one GPU".into());
                }
                Wanted::ByFilters(Box::new(query))
            }
        };
        Ok(Self {
            wanted,
            ttl_s,
            holder,
        })
    }
}

/// The `ttl_s` of a `PUT /v1/claims/{id}` body.
pub fn parse_extension(body: &[u8]) -> Result<u64, String> {
    let body: ExtendBody = parse_json(body)?;
    ttl(body.ttl_s.as_ref())
}

/// A JSON object with no `null` members (a field is given or left out:
/// `null` is neither), as `T`.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| format!("body: not JSON: {error}"))?;
    let object = value.as_object().ok_or("body: must be a JSON object")?;
    if let Some((name, _)) = object.iter().find(|(_, value)| value.is_null()) {
        return Err(format!("{name}: must not be null (leave it out instead)"));
    }
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        if path == "." {
            format!("body: {}", error.inner())
        } else {
            format!("{path}: {}", error.inner())
        }
    })
}

fn ttl(value: Option<&serde_json::Number>) -> Result<u64, String> {
    let value = value.ok_or("ttl_s: required (seconds the claim is held, 1 to 86400)")?;
    value
        .as_u64()
        .filter(|ttl| (1..=MAX_TTL_S).contains(ttl))
        .ok_or_else(|| {
            format!("ttl_s: must be a whole number of seconds from 1 to {MAX_TTL_S}, got {value}")
        })
}

fn holder(value: Option<&str>) -> Result<String, String> {
    let value = value.ok_or("holder: required (who holds the claim, e.g. a job id)")?;
    let length = value.chars().count();
    if !(1..=MAX_HOLDER_LEN).contains(&length) || value.chars().any(char::is_control) {
        return Err(format!(
            "holder: must be 1-{MAX_HOLDER_LEN} printable characters, got {length} characters{}",
            if value.chars().any(char::is_control) {
                " with control characters"
            } else {
                ""
            }
        ));
    }
    Ok(value.to_owned())
}

fn gpu_indices(values: &[serde_json::Value]) -> Result<Vec<u32>, String> {
    if values.is_empty() || values.len() > MAX_GPUS {
        return Err(format!(
            "gpus: must list 1 to {MAX_GPUS} GPU indices, got {}",
            values.len()
        ));
    }
    let mut indices = Vec::with_capacity(values.len());
    for value in values {
        let index = value
            .as_u64()
            .and_then(|index| u32::try_from(index).ok())
            .filter(|index| (*index as usize) < MAX_GPUS * 64)
            .ok_or_else(|| {
                format!("gpus: each must be a GPU index (a whole number), got {value}")
            })?;
        if indices.contains(&index) {
            return Err(format!("gpus: index {index} is listed twice"));
        }
        indices.push(index);
    }
    indices.sort_unstable();
    Ok(indices)
}

#[cfg(feature = "server")]
pub use procedure::*;

#[cfg(feature = "server")]
mod procedure {
    use super::*;
    use crate::capacity::{Position, pool_visible};
    use crate::heartbeat::AgentState;
    use crate::record::StoredAgent;
    use crate::store::{Store, StoreError};

    /// Claim writes one claimer makes before it answers `no_capacity` or
    /// `claimed`: each lost write means another claim won a GPU, so this
    /// bounds the work of one request, not the claims the fleet can take.
    pub const MAX_CLAIM_WRITES: usize = 64;
    /// Candidates a claim by filters reads per page: most claims take the
    /// first, so a page of 100 would mostly be read for nothing.
    pub const CANDIDATE_PAGE: usize = 25;
    /// Pages of candidates a claim by filters reads before it gives up:
    /// 1,000 matching agents, each with too few unclaimed GPUs.
    pub const MAX_CANDIDATE_PAGES: usize = 40;

    /// Why a claim was not made (PROTOCOL.md §4's answers).
    #[derive(Debug, thiserror::Error)]
    pub enum Refusal {
        #[error("GPU {index} of agent {agent_id:?} is held by another claim")]
        Claimed { agent_id: String, index: u32 },
        #[error("no agent matching the filters has enough unclaimed GPUs{}", if *.searched_all { "" } else { " among the first matches searched; narrow the filters" })]
        NoCapacity {
            /// Whether every matching agent was tried, rather than the
            /// bounded first part.
            searched_all: bool,
        },
        #[error("agent {agent_id:?} is {why}: it takes no new claims")]
        NotAvailable { agent_id: String, why: &'static str },
        #[error("unknown agent {0:?}")]
        UnknownAgent(String),
        #[error("agent {agent_id:?} has no GPU with index {index}")]
        UnknownGpu { agent_id: String, index: u32 },
        #[error(transparent)]
        Store(#[from] StoreError),
    }

    /// Which pools a caller may see: `None` for all.
    pub type Pools<'a> = Option<&'a [String]>;

    /// Makes the claim `request` asks for, at `now_ms`.
    pub async fn claim(
        store: &dyn Store,
        request: &ClaimRequest,
        pools: Pools<'_>,
        now_ms: i64,
    ) -> Result<Claim, Refusal> {
        let expires_at_ms = now_ms + request.ttl_s as i64 * 1000;
        match &request.wanted {
            Wanted::ByName { agent_id, gpus } => {
                let agent = store
                    .get(agent_id, now_ms)
                    .await?
                    .filter(|agent| pool_visible(pools, &agent.heartbeat.pool))
                    .ok_or_else(|| Refusal::UnknownAgent(agent_id.clone()))?;
                if let Some(why) = unavailable(&agent, now_ms) {
                    return Err(Refusal::NotAvailable {
                        agent_id: agent_id.clone(),
                        why,
                    });
                }
                let mut chosen = Vec::with_capacity(gpus.len());
                for index in gpus {
                    let gpu = agent
                        .heartbeat
                        .gpus
                        .iter()
                        .find(|gpu| gpu.index == *index)
                        .ok_or_else(|| Refusal::UnknownGpu {
                            agent_id: agent_id.clone(),
                            index: *index,
                        })?;
                    chosen.push(ClaimedGpu {
                        index: *index,
                        uuid: gpu.uuid.clone(),
                    });
                }
                let claim = new_claim(agent_id, chosen, request, expires_at_ms)?;
                if store.put_claim(&claim, now_ms).await? {
                    return Ok(claim);
                }
                let held = store.claims(agent_id, now_ms).await?;
                let index = gpus
                    .iter()
                    .copied()
                    .find(|index| held.holder_of(*index).is_some())
                    .unwrap_or(gpus[0]);
                Err(Refusal::Claimed {
                    agent_id: agent_id.clone(),
                    index,
                })
            }
            Wanted::ByFilters(filters) => {
                let mut query = (**filters).clone();
                query.pools = pools.map(<[String]>::to_vec);
                query.include_claimed = false;
                query.limit = CANDIDATE_PAGE;
                let mut after: Option<Position> = None;
                let mut writes = 0;
                for _ in 0..MAX_CANDIDATE_PAGES {
                    let page = store.query(&query, after.as_ref(), now_ms).await?;
                    for mut agent in page.agents {
                        // Another claimer may take the GPUs between the read
                        // and the write: the agent is read again and tried
                        // until it has too few left.
                        while let Some(gpus) = choose(&query, &agent, now_ms) {
                            let claim = new_claim(agent.agent_id(), gpus, request, expires_at_ms)?;
                            writes += 1;
                            if store.put_claim(&claim, now_ms).await? {
                                return Ok(claim);
                            }
                            if writes >= MAX_CLAIM_WRITES {
                                return Err(Refusal::NoCapacity {
                                    searched_all: false,
                                });
                            }
                            agent.claims = store.claims(agent.agent_id(), now_ms).await?;
                        }
                    }
                    match page.next {
                        Some(next) => after = Some(next),
                        None => return Err(Refusal::NoCapacity { searched_all: true }),
                    }
                }
                Err(Refusal::NoCapacity {
                    searched_all: false,
                })
            }
        }
    }

    /// Why a claim by name is refused on this agent, if it is.
    fn unavailable(agent: &StoredAgent, now_ms: i64) -> Option<&'static str> {
        match agent.heartbeat.state {
            // Leaving is offline at once; its own word says more.
            AgentState::Leaving => Some("leaving"),
            _ if !agent.is_online(now_ms) => Some("offline"),
            AgentState::Draining => Some("draining"),
            AgentState::Up => None,
        }
    }

    /// The GPUs a claim by filters takes on `agent`: `required_gpus()` of
    /// the unclaimed ones that qualify, most free VRAM first. `None` when
    /// it has too few.
    fn choose(query: &CapacityQuery, agent: &StoredAgent, now_ms: i64) -> Option<Vec<ClaimedGpu>> {
        if !query.matches(agent, now_ms) {
            return None;
        }
        let mut free: Vec<_> = query.unclaimed_qualifying_gpus(agent).collect();
        free.sort_by(|a, b| {
            b.memory_free_mb
                .cmp(&a.memory_free_mb)
                .then(a.index.cmp(&b.index))
        });
        let wanted = query.required_gpus() as usize;
        (free.len() >= wanted).then(|| {
            let mut gpus: Vec<ClaimedGpu> = free[..wanted]
                .iter()
                .map(|gpu| ClaimedGpu {
                    index: gpu.index,
                    uuid: gpu.uuid.clone(),
                })
                .collect();
            gpus.sort_by_key(|gpu| gpu.index);
            gpus
        })
    }

    fn new_claim(
        agent_id: &str,
        gpus: Vec<ClaimedGpu>,
        request: &ClaimRequest,
        expires_at_ms: i64,
    ) -> Result<Claim, Refusal> {
        Ok(Claim {
            claim_id: ClaimId::new(agent_id).map_err(StoreError::Unavailable)?,
            gpus,
            holder: request.holder.clone(),
            expires_at_ms,
        })
    }

    /// The live claim `claim_id`, if the caller may see its agent.
    pub async fn get(
        store: &dyn Store,
        claim_id: &ClaimId,
        pools: Pools<'_>,
        now_ms: i64,
    ) -> Result<Option<Claim>, StoreError> {
        if !agent_visible(store, claim_id, pools, now_ms).await? {
            return Ok(None);
        }
        Ok(store
            .claims(claim_id.agent_id(), now_ms)
            .await?
            .claim(claim_id))
    }

    /// Holds a live claim for `ttl_s` from now; `None` once it is released
    /// or expired.
    pub async fn extend(
        store: &dyn Store,
        claim_id: &ClaimId,
        ttl_s: u64,
        pools: Pools<'_>,
        now_ms: i64,
    ) -> Result<Option<Claim>, StoreError> {
        if !agent_visible(store, claim_id, pools, now_ms).await? {
            return Ok(None);
        }
        store
            .extend_claim(claim_id, now_ms + ttl_s as i64 * 1000, now_ms)
            .await
    }

    /// Lets a claim's GPUs go; releasing one already gone is no error.
    /// `false` when the caller may not see its agent.
    pub async fn release(
        store: &dyn Store,
        claim_id: &ClaimId,
        pools: Pools<'_>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        if !agent_visible(store, claim_id, pools, now_ms).await? {
            return Ok(false);
        }
        store.release_claim(claim_id, now_ms).await?;
        Ok(true)
    }

    /// A pool-limited caller knows nothing of agents outside its pools; an
    /// agent no longer on record still has its claims, seen by every caller
    /// without a pool limit.
    async fn agent_visible(
        store: &dyn Store,
        claim_id: &ClaimId,
        pools: Pools<'_>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let Some(pools) = pools else {
            return Ok(true);
        };
        Ok(store
            .get(claim_id.agent_id(), now_ms)
            .await?
            .is_some_and(|agent| pool_visible(Some(pools), &agent.heartbeat.pool)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: serde_json::Value) -> Result<ClaimRequest, String> {
        ClaimRequest::parse(body.to_string().as_bytes())
    }

    #[test]
    fn a_claim_id_carries_its_agent_and_refuses_anything_else() {
        let id = ClaimId {
            nonce: "0123456789abcdef0123456789abcdef".into(),
            agent_id: "lab-07.b2".into(),
        };
        let text = id.to_string();
        assert_eq!(ClaimId::parse(&text), Some(id));
        for junk in [
            "",
            ".",
            "abc.6c6162",
            &format!("{}.zz", "0".repeat(32)),
            &format!("{}.", "0".repeat(32)),
        ] {
            assert_eq!(ClaimId::parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn by_name_or_by_filters_never_both() {
        let name = parse(
            serde_json::json!({"agent_id": "a", "gpus": [1, 0], "ttl_s": 60, "holder": "job-1"}),
        )
        .unwrap();
        assert_eq!(
            name.wanted,
            Wanted::ByName {
                agent_id: "a".into(),
                gpus: vec![0, 1]
            }
        );
        let filters = parse(serde_json::json!({"min_gpu_vram_gb": 40, "labels": {"site": "b2"}, "ttl_s": 60, "holder": "j"})).unwrap();
        let Wanted::ByFilters(query) = filters.wanted else {
            panic!("by filters")
        };
        assert_eq!(query.required_gpus(), 1);
        assert_eq!(query.labels, vec![("site".into(), "b2".into())]);
        let both = parse(serde_json::json!({"agent_id": "a", "gpus": [0], "min_gpus": 1, "ttl_s": 60, "holder": "j"}))
            .unwrap_err();
        assert!(both.contains("not both"), "{both}");
    }

    #[test]
    fn hostile_bodies_are_named() {
        for (body, field) in [
            (
                serde_json::json!({"agent_id": "a", "gpus": [0], "ttl_s": 1e30, "holder": "j"}),
                "ttl_s",
            ),
            (
                serde_json::json!({"agent_id": "a", "gpus": [0], "ttl_s": 86401, "holder": "j"}),
                "ttl_s",
            ),
            (
                serde_json::json!({"agent_id": "a", "gpus": [0], "ttl_s": 0, "holder": "j"}),
                "ttl_s",
            ),
            (
                serde_json::json!({"agent_id": "a", "gpus": [0], "holder": "j"}),
                "ttl_s",
            ),
            (
                serde_json::json!({"agent_id": "a", "gpus": [0], "ttl_s": 5, "holder": "a\u{7}b"}),
                "holder",
            ),
            (
                serde_json::json!({"agent_id": "a", "gpus": [0], "ttl_s": 5, "holder": ""}),
                "holder",
            ),
            (
                serde_json::json!({"agent_id": "a", "gpus": [0], "ttl_s": 5, "holder": "x".repeat(129)}),
                "holder",
            ),
            (
                serde_json::json!({"agent_id": "a", "gpus": (0..10_000).collect::<Vec<_>>(), "ttl_s": 5, "holder": "j"}),
                "gpus",
            ),
            (
                serde_json::json!({"agent_id": "a", "gpus": [0, 0], "ttl_s": 5, "holder": "j"}),
                "gpus",
            ),
            (
                serde_json::json!({"agent_id": "a", "gpus": [-1], "ttl_s": 5, "holder": "j"}),
                "gpus",
            ),
            (
                serde_json::json!({"agent_id": "a b", "gpus": [0], "ttl_s": 5, "holder": "j"}),
                "agent_id",
            ),
            (
                serde_json::json!({"min_gpus": 0, "ttl_s": 5, "holder": "j"}),
                "min_gpus",
            ),
            (
                serde_json::json!({"min_gpu_vram_gb": -1, "ttl_s": 5, "holder": "j"}),
                "min_gpu_vram_gb",
            ),
            (
                serde_json::json!({"gpu_vendor": "NVIDIA", "ttl_s": 5, "holder": "j"}),
                "gpu_vendor",
            ),
            (
                serde_json::json!({"colour": "red", "ttl_s": 5, "holder": "j"}),
                "colour",
            ),
            (
                serde_json::json!({"min_uptime": 2, "ttl_s": 5, "holder": "j"}),
                "min_uptime",
            ),
        ] {
            let error = parse(body.clone()).expect_err(&body.to_string());
            assert!(error.contains(field), "{body}: {error}");
        }
        assert!(ClaimRequest::parse(b"[").unwrap_err().starts_with("body"));
        assert!(ClaimRequest::parse(b"[1]").unwrap_err().starts_with("body"));
        let null =
            parse(serde_json::json!({"min_gpus": null, "ttl_s": 5, "holder": "j"})).unwrap_err();
        assert!(null.starts_with("min_gpus"), "{null}");
        let sneaky = parse(serde_json::json!({"labels": {"a=b": "c"}, "ttl_s": 5, "holder": "j"}))
            .unwrap_err();
        assert!(sneaky.contains("a=b"), "{sneaky}");
    }

    #[test]
    fn extensions_are_bounded_like_claims() {
        assert_eq!(parse_extension(br#"{"ttl_s": 600}"#), Ok(600));
        assert!(parse_extension(br#"{"ttl_s": 86401}"#).is_err());
        assert!(parse_extension(br#"{}"#).unwrap_err().contains("ttl_s"));
    }

    #[test]
    fn live_claims_drop_the_expired_and_gather_a_claim() {
        let id = ClaimId {
            nonce: "0".repeat(32),
            agent_id: "a".into(),
        };
        let slot = |expires_at_ms| GpuClaim {
            claim_id: id.to_string(),
            holder: "j".into(),
            uuid: Some(format!("GPU-{expires_at_ms}")),
            expires_at_ms,
        };
        let claims = AgentClaims::live([(0, slot(100)), (1, slot(50)), (3, slot(100))], 60);
        assert!(claims.holder_of(1).is_none());
        let claim = claims.claim(&id).unwrap();
        assert_eq!(
            claim.gpus.iter().map(|g| g.index).collect::<Vec<_>>(),
            [0, 3]
        );
        assert_eq!(claim.view().cuda_visible_devices, "GPU-100,GPU-100");
    }
}
