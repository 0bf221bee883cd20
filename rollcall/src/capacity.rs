//! The capacity question of PROTOCOL.md §2: parsing `GET /v1/agents`
//! parameters, the one definition of which agents match, their order, and the
//! tamper-checked pagination cursor.
//!
//! Stores may narrow candidates with their own indexes, but the final word on
//! a match is always [`CapacityQuery::matches`].

use std::cmp::Ordering;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::heartbeat::{AgentState, Gpu, MAX_GPUS, MAX_LABELS, MAX_POOL_LEN, Vendor};
use crate::record::StoredAgent;
use crate::signing::{id_rule, is_valid_id};

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StatusFilter {
    #[default]
    Online,
    Offline,
    All,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CapacityQuery {
    pub min_gpu_vram_gb: Option<f64>,
    pub min_gpus: Option<u32>,
    pub min_cpu_cores: Option<f64>,
    pub min_memory_gb: Option<f64>,
    pub gpu_vendor: Option<Vendor>,
    pub pool: Option<String>,
    pub labels: Vec<(String, String)>,
    pub status: StatusFilter,
    /// Draining agents match only when asked for (PROTOCOL.md §3).
    pub include_draining: bool,
    /// Claimed GPUs count towards `min_gpus` only when asked for
    /// (PROTOCOL.md §4 "Claims").
    pub include_claimed: bool,
    /// The least `uptime_30d` a matching agent has (PROTOCOL.md §4 "State
    /// changes"), 0 to 1.
    pub min_uptime: Option<f64>,
    /// The pools the caller's token may see (`None`: all). Not a parameter:
    /// set from the token, so that to a pool-limited token no other agent
    /// exists (PROTOCOL.md §4 "Scoped tokens").
    pub pools: Option<Vec<String>>,
    pub limit: usize,
    pub cursor: Option<String>,
}

impl Default for CapacityQuery {
    fn default() -> Self {
        Self {
            min_gpu_vram_gb: None,
            min_gpus: None,
            min_cpu_cores: None,
            min_memory_gb: None,
            gpu_vendor: None,
            pool: None,
            labels: Vec::new(),
            status: StatusFilter::Online,
            include_draining: false,
            include_claimed: false,
            min_uptime: None,
            pools: None,
            limit: DEFAULT_LIMIT,
            cursor: None,
        }
    }
}

/// A refused parameter: which one and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

fn param_error(param: &str, message: impl Into<String>) -> ParamError {
    ParamError {
        param: param.to_owned(),
        message: message.into(),
    }
}

impl CapacityQuery {
    /// Parses a raw query string. Unknown parameters and repeats of anything
    /// but `label` are refused rather than ignored: a typo such as
    /// `min_gpu_vram=40` must not silently answer every machine.
    pub fn from_query_string(query: &str) -> Result<Self, ParamError> {
        let mut parsed = CapacityQuery::default();
        let mut seen: Vec<String> = Vec::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            // The decoder replaces invalid UTF-8 with U+FFFD rather than failing.
            if name.contains('\u{FFFD}') || value.contains('\u{FFFD}') {
                return Err(param_error(
                    &name,
                    "is not valid UTF-8 once percent-decoded",
                ));
            }
            if name != "label" {
                if seen.iter().any(|s| *s == name) {
                    return Err(param_error(&name, "given more than once"));
                }
                seen.push(name.to_string());
            }
            parsed.set(&name, &value)?;
        }
        Ok(parsed)
    }

    /// One parameter, checked against its range: the one check for a filter
    /// whether it comes in a query string or in a claim's body.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ParamError> {
        match name {
            "min_gpu_vram_gb" => self.min_gpu_vram_gb = Some(bounded(name, value)?),
            "min_gpus" => self.min_gpus = Some(whole(name, value, 0..=MAX_GPUS as u32)?),
            "min_cpu_cores" => self.min_cpu_cores = Some(bounded(name, value)?),
            "min_memory_gb" => self.min_memory_gb = Some(bounded(name, value)?),
            "gpu_vendor" => {
                self.gpu_vendor = Some(Vendor::parse(value).ok_or_else(|| {
                    param_error(
                        name,
                        format!("must be one of nvidia, amd, intel, other; got {value:?}"),
                    )
                })?)
            }
            "pool" => {
                if !is_valid_id(value, MAX_POOL_LEN) {
                    return Err(param_error(name, id_rule(MAX_POOL_LEN)));
                }
                self.pool = Some(value.to_owned());
            }
            "label" => self.labels.push(label(name, value, self.labels.len())?),
            "status" => {
                self.status = one_of(
                    name,
                    value,
                    &[
                        ("online", StatusFilter::Online),
                        ("offline", StatusFilter::Offline),
                        ("all", StatusFilter::All),
                    ],
                )?
            }
            "limit" => self.limit = whole(name, value, 1..=MAX_LIMIT as u32)? as usize,
            "include_draining" => {
                self.include_draining = one_of(name, value, &[("true", true), ("false", false)])?
            }
            "include_claimed" => {
                self.include_claimed = one_of(name, value, &[("true", true), ("false", false)])?
            }
            "min_uptime" => {
                let share: f64 = value
                    .parse()
                    .ok()
                    .filter(|share: &f64| (0.0..=1.0).contains(share))
                    .ok_or_else(|| {
                        param_error(name, format!("must be a number from 0 to 1, got {value:?}"))
                    })?;
                self.min_uptime = Some(share);
            }
            "cursor" => self.cursor = Some(value.to_owned()),
            _ => return Err(param_error(name, "unknown parameter")),
        }
        Ok(())
    }

    /// The query as `GET /v1/agents` parameters: what
    /// [`CapacityQuery::from_query_string`] reads back as this query (the
    /// caller's pools, which are no parameter, aside). Clients build a
    /// query with [`CapacityQuery::set`] and send this, so that no client
    /// re-types the parameters' names or their encoding.
    pub fn to_query_string(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("min_gpu_vram_gb", self.min_gpu_vram_gb),
            ("min_gpus", self.min_gpus.map(f64::from)),
            ("min_cpu_cores", self.min_cpu_cores),
            ("min_memory_gb", self.min_memory_gb),
            ("min_uptime", self.min_uptime),
        ] {
            if let Some(value) = value {
                out.append_pair(name, &value.to_string());
            }
        }
        if let Some(vendor) = self.gpu_vendor {
            out.append_pair("gpu_vendor", vendor.as_str());
        }
        if let Some(pool) = &self.pool {
            out.append_pair("pool", pool);
        }
        for (key, value) in &self.labels {
            out.append_pair("label", &format!("{key}={value}"));
        }
        let status = match self.status {
            StatusFilter::Online => "online",
            StatusFilter::Offline => "offline",
            StatusFilter::All => "all",
        };
        out.append_pair("status", status);
        if self.include_draining {
            out.append_pair("include_draining", "true");
        }
        if self.include_claimed {
            out.append_pair("include_claimed", "true");
        }
        out.append_pair("limit", &self.limit.to_string());
        if let Some(cursor) = &self.cursor {
            out.append_pair("cursor", cursor);
        }
        out.finish()
    }

    /// Every filter, canonically (labels sorted), without `limit` and
    /// `cursor`: what a cursor is bound to. Prefixed by its length so that it
    /// cannot run into the payload that follows it in the MAC.
    fn filter_key(&self) -> Vec<u8> {
        let mut labels = self.labels.clone();
        labels.sort();
        let text = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
            self.min_gpu_vram_gb,
            self.min_gpus,
            self.min_cpu_cores,
            self.min_memory_gb,
            self.gpu_vendor,
            self.pool,
            labels,
            self.status,
            self.include_draining,
            self.include_claimed,
            self.pools,
            self.min_uptime
        );
        let mut key = (text.len() as u64).to_be_bytes().to_vec();
        key.extend_from_slice(text.as_bytes());
        key
    }

    /// How many qualifying GPUs an agent needs.
    pub fn required_gpus(&self) -> u32 {
        self.min_gpus.unwrap_or(
            if self.min_gpu_vram_gb.is_some() || self.gpu_vendor.is_some() {
                1
            } else {
                0
            },
        )
    }

    /// Free VRAM a qualifying GPU needs, in MiB (0 without a VRAM filter).
    pub fn min_gpu_free_mb(&self) -> f64 {
        self.min_gpu_vram_gb.map_or(0.0, |gb| gb * 1024.0)
    }

    /// The free VRAM a matching agent has on its best GPU at least, in MiB:
    /// what a store may narrow its candidates by.
    pub fn vram_floor_mb(&self) -> f64 {
        if self.required_gpus() > 0 {
            self.min_gpu_free_mb()
        } else {
            0.0
        }
    }

    /// Whether `pool` is one the caller may see.
    pub fn sees_pool(&self, pool: &str) -> bool {
        pool_visible(self.pools.as_deref(), pool)
    }

    /// The one definition of a match. Claims count as the store read them
    /// into `agent.claims`.
    pub fn matches(&self, agent: &StoredAgent, now_ms: i64) -> bool {
        self.matches_counting(agent, now_ms, self.include_claimed)
    }

    /// Whether `agent` would match if none of its GPUs were claimed: a store
    /// reads the claims of these candidates only.
    pub fn matches_before_claims(&self, agent: &StoredAgent, now_ms: i64) -> bool {
        self.matches_counting(agent, now_ms, true)
    }

    /// The GPUs of `agent` that count towards `min_gpus`: the vendor asked
    /// for, enough free VRAM, and not held by a live claim.
    pub fn unclaimed_qualifying_gpus<'a>(
        &'a self,
        agent: &'a StoredAgent,
    ) -> impl Iterator<Item = &'a Gpu> + 'a {
        self.qualifying_gpus(agent)
            .filter(|gpu| agent.claims.holder_of(gpu.index).is_none())
    }

    fn qualifying_gpus<'a>(&'a self, agent: &'a StoredAgent) -> impl Iterator<Item = &'a Gpu> + 'a {
        let min_free_mb = self.min_gpu_free_mb();
        agent
            .heartbeat
            .gpus
            .iter()
            .filter(|gpu| self.gpu_vendor.is_none_or(|vendor| gpu.vendor == vendor))
            .filter(move |gpu| gpu.memory_free_mb as f64 >= min_free_mb)
    }

    fn matches_counting(&self, agent: &StoredAgent, now_ms: i64, count_claimed: bool) -> bool {
        if agent.is_expired(now_ms) {
            return false;
        }
        let online = agent.is_online(now_ms);
        let status_ok = match self.status {
            StatusFilter::Online => online,
            StatusFilter::Offline => !online,
            StatusFilter::All => true,
        };
        let heartbeat = &agent.heartbeat;
        let draining_ok = self.include_draining || heartbeat.state != AgentState::Draining;
        if !status_ok
            || !draining_ok
            || !self.sees_pool(&heartbeat.pool)
            || self
                .pool
                .as_ref()
                .is_some_and(|pool| *pool != heartbeat.pool)
            || self
                .min_cpu_cores
                .is_some_and(|cores| f64::from(heartbeat.cpu.cores_available) < cores)
            || self
                .min_memory_gb
                .is_some_and(|gb| (heartbeat.memory.available_mb as f64) < gb * 1024.0)
            || !self
                .labels
                .iter()
                .all(|(key, value)| heartbeat.labels.get(key) == Some(value))
            || self
                .min_uptime
                .is_some_and(|least| agent.uptime_30d(now_ms) < least)
        {
            return false;
        }
        let qualifying = if count_claimed {
            self.qualifying_gpus(agent).count()
        } else {
            self.unclaimed_qualifying_gpus(agent).count()
        };
        qualifying >= self.required_gpus() as usize
    }
}

/// Whether a caller limited to `pools` (`None`: no limit) may see an agent
/// of `pool` (PROTOCOL.md §4 "Scoped tokens"): the one rule for queries,
/// claims and tokens.
pub fn pool_visible(pools: Option<&[String]>, pool: &str) -> bool {
    pools.is_none_or(|pools| pools.iter().any(|p| p == pool))
}

/// The most a numeric parameter may ask for: more than any machine has, and
/// small enough that every store can compare with it (DynamoDB numbers have
/// 38 digits at most; `1e200` would reach the store as a 201-digit number).
pub const MAX_QUERY_NUMBER: f64 = 1_048_576.0;

fn bounded(name: &str, value: &str) -> Result<f64, ParamError> {
    value
        .parse::<f64>()
        .ok()
        .filter(|number| number.is_finite() && (0.0..=MAX_QUERY_NUMBER).contains(number))
        .ok_or_else(|| {
            param_error(
                name,
                format!("must be a finite number from 0 to {MAX_QUERY_NUMBER}, got {value:?}"),
            )
        })
}

/// A whole number in `range`: the check every numeric parameter of the
/// capacity API's routes shares.
pub fn whole(
    name: &str,
    value: &str,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, ParamError> {
    value
        .parse::<u32>()
        .ok()
        .filter(|number| range.contains(number))
        .ok_or_else(|| {
            param_error(
                name,
                format!(
                    "must be a whole number from {} to {}, got {value:?}",
                    range.start(),
                    range.end()
                ),
            )
        })
}

/// The meaning of `value` among `choices`.
fn one_of<T: Copy>(name: &str, value: &str, choices: &[(&str, T)]) -> Result<T, ParamError> {
    choices
        .iter()
        .find(|(word, _)| *word == value)
        .map(|(_, meaning)| *meaning)
        .ok_or_else(|| {
            let words: Vec<&str> = choices.iter().map(|(word, _)| *word).collect();
            param_error(
                name,
                format!("must be one of {}; got {value:?}", words.join(", ")),
            )
        })
}

/// One `label=key=value`; at most as many as a heartbeat may carry.
fn label(name: &str, value: &str, already: usize) -> Result<(String, String), ParamError> {
    if already >= MAX_LABELS {
        return Err(param_error(
            name,
            format!("given more than {MAX_LABELS} times"),
        ));
    }
    let (key, label_value) = value
        .split_once('=')
        .ok_or_else(|| param_error(name, format!("must be key=value, got {value:?}")))?;
    crate::names::check_label(key, label_value)
        .map_err(|why| param_error(name, format!("must be key=value: {why}")))?;
    Ok((key.to_owned(), label_value.to_owned()))
}

/// Where a page ends, in answer order: most free single-GPU VRAM first, then
/// agent id, so that ties still page stably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub max_gpu_free_mb: u64,
    pub agent_id: String,
}

impl Position {
    pub fn of(agent: &StoredAgent) -> Self {
        Self {
            max_gpu_free_mb: agent.heartbeat.max_gpu_free_mb(),
            agent_id: agent.agent_id().to_owned(),
        }
    }
}

/// Answer order over positions.
pub fn answer_order(a: &Position, b: &Position) -> Ordering {
    b.max_gpu_free_mb
        .cmp(&a.max_gpu_free_mb)
        .then_with(|| a.agent_id.cmp(&b.agent_id))
}

/// Seals positions into opaque cursors and opens them again, refusing any
/// cursor this deployment did not issue.
#[derive(Clone)]
pub struct CursorSealer {
    key: Vec<u8>,
}

const CURSOR_TAG_LEN: usize = 16;

/// The shortest cursor key a deployment may configure, in bytes: a short
/// or empty key would let anyone forge cursors.
pub const MIN_CURSOR_KEY_LEN: usize = 32;

impl CursorSealer {
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.to_vec() }
    }

    /// A configured cursor key (`ROLLCALL_CURSOR_KEY` or its secret): its
    /// text, trimmed, at least `MIN_CURSOR_KEY_LEN` bytes. The error never
    /// repeats the key.
    pub fn parse_key(text: &str) -> Result<Vec<u8>, String> {
        let key = text.trim();
        if key.len() < MIN_CURSOR_KEY_LEN {
            return Err(format!(
                "the cursor key must be at least {MIN_CURSOR_KEY_LEN} bytes, got {} (generate one with `openssl rand -hex 32`)",
                key.len()
            ));
        }
        Ok(key.as_bytes().to_vec())
    }

    /// A cursor for the page after `position`, valid for `query`'s filters
    /// only: replayed against another query it is refused, not misread.
    pub fn seal(&self, position: &Position, query: &CapacityQuery) -> String {
        let payload = format!("{}:{}", position.max_gpu_free_mb, position.agent_id);
        let tag = self.tag(&query.filter_key(), payload.as_bytes());
        format!(
            "{}{}",
            hex::encode(&tag[..CURSOR_TAG_LEN]),
            hex::encode(payload)
        )
    }

    pub fn open(&self, cursor: &str, query: &CapacityQuery) -> Result<Position, ParamError> {
        let invalid = || {
            param_error(
                "cursor",
                "not a cursor issued by this API for these filters (copy next_cursor from the previous page unchanged, with the same parameters)",
            )
        };
        if cursor.len() < CURSOR_TAG_LEN * 2 || !cursor.is_ascii() {
            return Err(invalid());
        }
        let (tag_hex, payload_hex) = cursor.split_at(CURSOR_TAG_LEN * 2);
        let tag = hex::decode(tag_hex).map_err(|_| invalid())?;
        let payload = hex::decode(payload_hex).map_err(|_| invalid())?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).map_err(|_| invalid())?;
        mac.update(&query.filter_key());
        mac.update(&payload);
        mac.verify_truncated_left(&tag).map_err(|_| invalid())?;
        let text = String::from_utf8(payload).map_err(|_| invalid())?;
        let (free, agent_id) = text.split_once(':').ok_or_else(invalid)?;
        Ok(Position {
            max_gpu_free_mb: free.parse().map_err(|_| invalid())?,
            agent_id: agent_id.to_owned(),
        })
    }

    fn tag(&self, filters: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC accepts keys of any length");
        mac.update(filters);
        mac.update(payload);
        mac.finalize().into_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_beyond_any_machine_are_refused_by_name() {
        for (query, name) in [
            ("min_cpu_cores=1e200", "min_cpu_cores"),
            ("min_memory_gb=1048577", "min_memory_gb"),
            ("min_gpu_vram_gb=1e39", "min_gpu_vram_gb"),
            ("min_gpus=17", "min_gpus"),
        ] {
            let error = CapacityQuery::from_query_string(query)
                .unwrap_err()
                .to_string();
            assert!(error.starts_with(name), "{query}: {error}");
        }
        assert!(CapacityQuery::from_query_string("min_cpu_cores=1048576&min_gpus=16").is_ok());
    }

    #[test]
    fn draining_agents_are_included_only_when_asked() {
        assert!(
            !CapacityQuery::from_query_string("")
                .unwrap()
                .include_draining
        );
        assert!(
            CapacityQuery::from_query_string("include_draining=true")
                .unwrap()
                .include_draining
        );
        assert!(
            !CapacityQuery::from_query_string("include_draining=false")
                .unwrap()
                .include_draining
        );
        let error = CapacityQuery::from_query_string("include_draining=yes").unwrap_err();
        assert_eq!(error.param, "include_draining");
    }

    #[test]
    fn label_repeats_are_bounded() {
        let labels = |n: usize| {
            (0..n)
                .map(|i| format!("label=k{i}=v"))
                .collect::<Vec<_>>()
                .join("&")
        };
        assert_eq!(
            CapacityQuery::from_query_string(&labels(32))
                .unwrap()
                .labels
                .len(),
            32
        );
        let error = CapacityQuery::from_query_string(&labels(33))
            .unwrap_err()
            .to_string();
        assert!(error.contains("more than 32"), "{error}");
    }
    use crate::heartbeat::Heartbeat;
    use crate::heartbeat::tests::example;
    use crate::record::Deadlines;
    use serde_json::json;

    fn agent(gpus: serde_json::Value, cores_available: u32) -> StoredAgent {
        let mut body = example();
        body["gpus"] = gpus;
        body["cpu"]["cores_available"] = json!(cores_available);
        let heartbeat: Heartbeat = serde_json::from_value(body).unwrap();
        StoredAgent::accept(heartbeat, 1_000, Deadlines::default())
    }

    fn gpu(index: u32, vendor: &str, free_mb: u64) -> serde_json::Value {
        json!({"index": index, "vendor": vendor, "memory_total_mb": 81920, "memory_free_mb": free_mb})
    }

    fn query(text: &str) -> CapacityQuery {
        CapacityQuery::from_query_string(text).unwrap()
    }

    #[test]
    fn two_small_gpus_are_not_one_big_one() {
        let two_twelves = agent(
            json!([gpu(0, "nvidia", 12 * 1024), gpu(1, "nvidia", 12 * 1024)]),
            4,
        );
        assert!(!query("min_gpu_vram_gb=24").matches(&two_twelves, 2_000));
        assert!(query("min_gpu_vram_gb=12").matches(&two_twelves, 2_000));
        assert!(query("min_gpu_vram_gb=12&min_gpus=2").matches(&two_twelves, 2_000));
        assert!(!query("min_gpu_vram_gb=12&min_gpus=3").matches(&two_twelves, 2_000));
    }

    #[test]
    fn vendor_counts_only_its_own_gpus() {
        let mixed = agent(
            json!([gpu(0, "amd", 40 * 1024), gpu(1, "nvidia", 8 * 1024)]),
            4,
        );
        assert!(query("gpu_vendor=nvidia").matches(&mixed, 2_000));
        assert!(!query("gpu_vendor=intel").matches(&mixed, 2_000));
        assert!(!query("gpu_vendor=nvidia&min_gpu_vram_gb=16").matches(&mixed, 2_000));
        assert!(query("gpu_vendor=amd&min_gpu_vram_gb=16").matches(&mixed, 2_000));
        assert!(!query("min_gpus=1").matches(&agent(json!([]), 4), 2_000));
    }

    #[test]
    fn cores_memory_labels_pool_and_status() {
        let a = agent(json!([gpu(0, "nvidia", 1024)]), 6);
        assert!(query("min_cpu_cores=6").matches(&a, 2_000));
        assert!(!query("min_cpu_cores=6.5").matches(&a, 2_000));
        assert!(query("min_memory_gb=40").matches(&a, 2_000));
        assert!(!query("min_memory_gb=40.1").matches(&a, 2_000));
        assert!(query("label=site%3Db2&pool=default").matches(&a, 2_000));
        assert!(!query("label=site=b2&label=rack=1").matches(&a, 2_000));
        assert!(!query("pool=render").matches(&a, 2_000));
        assert!(!query("").matches(&a, 91_000));
        assert!(query("status=offline").matches(&a, 91_000));
        assert!(query("status=all").matches(&a, 91_000));
        assert!(!query("status=all").matches(&a, a.expires_at_s * 1000));
    }

    #[test]
    fn bad_parameters_are_named() {
        for (text, param) in [
            ("min_gpu_vram_gb=-1", "min_gpu_vram_gb"),
            ("min_gpu_vram_gb=abc", "min_gpu_vram_gb"),
            ("min_gpu_vram_gb=inf", "min_gpu_vram_gb"),
            ("min_gpu_vram_gb=NaN", "min_gpu_vram_gb"),
            ("min_gpus=1.5", "min_gpus"),
            ("min_gpus=-1", "min_gpus"),
            ("min_cpu_cores=1e309", "min_cpu_cores"),
            ("min_memory_gb=", "min_memory_gb"),
            ("gpu_vendor=NVIDIA", "gpu_vendor"),
            ("status=dead", "status"),
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("label=nokey", "label"),
            ("label=a%20b=1", "label"),
            ("label=k=%ff", "label"),
            ("pool=a/b", "pool"),
            ("min_cpu_cores=1&min_cpu_cores=2", "min_cpu_cores"),
            ("colour=red", "colour"),
        ] {
            let error = CapacityQuery::from_query_string(text).expect_err(text);
            assert_eq!(error.param, param, "{text}");
        }
    }

    #[test]
    fn a_query_string_reads_back_as_the_same_query() {
        for text in [
            "",
            "min_gpu_vram_gb=40.5&min_gpus=2&min_cpu_cores=8&min_memory_gb=100&gpu_vendor=amd",
            "pool=render&label=site%3Db2&label=note=a%20b%26c%3D&status=all&include_draining=true&include_claimed=true&limit=7",
            "status=offline&cursor=00ff",
        ] {
            let query = CapacityQuery::from_query_string(text).unwrap();
            let again = CapacityQuery::from_query_string(&query.to_query_string()).unwrap();
            assert_eq!(again, query, "{text} -> {}", query.to_query_string());
        }
    }

    #[test]
    fn defaults() {
        let q = query("");
        assert_eq!(q.status, StatusFilter::Online);
        assert_eq!(q.limit, 100);
        assert_eq!(q.required_gpus(), 0);
        assert_eq!(query("min_gpu_vram_gb=1").required_gpus(), 1);
        assert_eq!(query("min_gpus=0&min_gpu_vram_gb=1").required_gpus(), 0);
    }

    #[test]
    fn a_short_or_empty_cursor_key_is_refused_without_being_echoed() {
        for short in [
            "",
            "   ",
            "not-long-enough",
            &"k".repeat(MIN_CURSOR_KEY_LEN - 1),
        ] {
            let error = CursorSealer::parse_key(short).unwrap_err();
            assert!(error.contains("at least 32 bytes"), "{error}");
            assert!(
                short.trim().is_empty() || !error.contains(short.trim()),
                "{error}"
            );
        }
        let key = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            CursorSealer::parse_key(&format!(" {key}\n")).unwrap(),
            key.as_bytes()
        );
    }

    #[test]
    fn cursors_round_trip_and_refuse_tampering() {
        let sealer = CursorSealer::new(b"k");
        let query =
            CapacityQuery::from_query_string("min_gpu_vram_gb=20&label=a=1&label=b=2").unwrap();
        let position = Position {
            max_gpu_free_mb: 20110,
            agent_id: "lab:07".into(),
        };
        let cursor = sealer.seal(&position, &query);
        assert_eq!(sealer.open(&cursor, &query).unwrap(), position);
        // Same filters in another order, another page size: still valid.
        let reordered =
            CapacityQuery::from_query_string("label=b=2&label=a=1&min_gpu_vram_gb=20&limit=7")
                .unwrap();
        assert_eq!(sealer.open(&cursor, &reordered).unwrap(), position);
        let mut forged = cursor.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
        assert!(
            sealer
                .open(std::str::from_utf8(&forged).unwrap(), &query)
                .is_err()
        );
        assert!(CursorSealer::new(b"other").open(&cursor, &query).is_err());
        for junk in ["", "zz", "é", &"0".repeat(40)] {
            assert_eq!(sealer.open(junk, &query).unwrap_err().param, "cursor");
        }
    }

    #[test]
    fn a_cursor_is_refused_for_other_filters() {
        let sealer = CursorSealer::new(b"k");
        let issued = CapacityQuery::from_query_string("min_gpu_vram_gb=20").unwrap();
        let position = Position {
            max_gpu_free_mb: 20110,
            agent_id: "lab-07".into(),
        };
        let cursor = sealer.seal(&position, &issued);
        for other in [
            "min_gpu_vram_gb=2",
            "min_gpu_vram_gb=20&status=all",
            "",
            "min_gpu_vram_gb=20&pool=x",
        ] {
            let other = CapacityQuery::from_query_string(other).unwrap();
            assert!(sealer.open(&cursor, &other).is_err(), "{other:?}");
        }
    }

    #[test]
    fn answer_order_is_most_free_first_then_id() {
        let mut positions = [
            Position {
                max_gpu_free_mb: 1,
                agent_id: "b".into(),
            },
            Position {
                max_gpu_free_mb: 9,
                agent_id: "z".into(),
            },
            Position {
                max_gpu_free_mb: 1,
                agent_id: "a".into(),
            },
        ];
        positions.sort_by(answer_order);
        let ids: Vec<_> = positions.iter().map(|p| p.agent_id.as_str()).collect();
        assert_eq!(ids, ["z", "a", "b"]);
    }
}
