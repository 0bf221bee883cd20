//! Answers that cross the wire, shared by the side that writes them and the
//! side that reads them, so that the two cannot drift apart: ingest's 202,
//! the agent record and a page of them, an agent's history, and the error
//! body. (A claim's answer, `claims::ClaimView`, lives with the claims.)

use serde::{Deserialize, Serialize};

use crate::heartbeat::AgentState;

/// An extension of the heartbeat that is stored apart from the agent record
/// (PROTOCOL.md §3). Its wire name is what `not_stored` lists.
pub const EXTENSION_HISTORY: &str = "history";
/// The GPU processes extension (PROTOCOL.md §4): a snapshot, so a collector
/// sends the next one rather than this one again.
pub const EXTENSION_PROCESSES: &str = "processes";

/// The capacity API's answer to `GET /v1/agents`: one page of agents in
/// answer order (PROTOCOL.md §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentPage {
    pub agents: Vec<AgentView>,
    /// Opaque; pass it back as `cursor` for the next page. `null` on the last.
    pub next_cursor: Option<String>,
    /// RFC 3339: when the answer was read.
    pub as_of: String,
}

/// Ingest's `202` answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub agent_id: String,
    /// RFC 3339: the agent is online until then unless it reports again.
    pub online_until: String,
    /// Extensions the heartbeat carried that were not stored this time (the
    /// agent record was). The collector sends them again later. Empty, and
    /// left out of the body, when everything was stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_stored: Vec<String>,
}

impl Accepted {
    /// True when ingest stored `extension` (or it was not sent at all).
    pub fn stored(&self, extension: &str) -> bool {
        !self.not_stored.iter().any(|name| name == extension)
    }
}

/// The body of every refusal by either function: what was wrong, in words
/// for people, and as a stable `code` for programs (which must not match on
/// the words).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// One of the `code` constants below; new ones may appear.
    #[serde(default)]
    pub code: String,
}

/// Stable error codes.
pub mod code {
    pub const BAD_REQUEST: &str = "bad_request";
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The heartbeat's timestamp is outside ±300 s of ingest's clock.
    pub const CLOCK_SKEW: &str = "clock_skew";
    pub const NOT_FOUND: &str = "not_found";
    /// The token lacks the scope the route needs (PROTOCOL.md §4).
    pub const FORBIDDEN: &str = "forbidden";
    /// A GPU asked for by name is held by a live claim.
    pub const CLAIMED: &str = "claimed";
    /// No agent matching a claim's filters has enough unclaimed GPUs.
    pub const NO_CAPACITY: &str = "no_capacity";
    /// The agent named by a claim is offline, draining or leaving.
    pub const NOT_AVAILABLE: &str = "not_available";
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// A newer heartbeat is already stored (a replay or a reordering).
    pub const STALE: &str = "stale";
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    pub const STORE_UNAVAILABLE: &str = "store_unavailable";
    pub const INTERNAL: &str = "internal";

    /// The code an answer with this HTTP status carries unless its cause
    /// names a more precise one (`clock_skew`, `claimed`, ...): the one table
    /// for both functions.
    pub fn for_status(status: u16) -> &'static str {
        match status {
            401 => UNAUTHORIZED,
            403 => FORBIDDEN,
            404 => NOT_FOUND,
            405 => METHOD_NOT_ALLOWED,
            408 => REQUEST_TIMEOUT,
            409 => STALE,
            413 => PAYLOAD_TOO_LARGE,
            415 => UNSUPPORTED_MEDIA_TYPE,
            503 => STORE_UNAVAILABLE,
            500..=599 => INTERNAL,
            _ => BAD_REQUEST,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Offline,
}

/// The agent record of PROTOCOL.md §2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub agent_id: String,
    pub status: Status,
    pub state: AgentState,
    pub pool: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub hostname: Option<String>,
    pub last_heartbeat_at: String,
    pub online_until: String,
    pub sent_at_ms: u64,
    pub interval_s: u32,
    pub cpu_cores_physical: u32,
    pub cpu_cores_logical: u32,
    pub cpu_cores_available: u32,
    pub cpu_load_1min: f64,
    pub cpu_load_5min: f64,
    pub cpu_load_15min: f64,
    pub cpu_usage_percent: Option<f64>,
    pub memory_total_gb: f64,
    pub memory_available_gb: f64,
    pub memory_percent: f64,
    pub gpu_type: String,
    pub gpu_count: usize,
    pub gpu_vram_total_gb: f64,
    pub gpu_vram_available_gb: f64,
    pub gpu_vram_available_max_gb: f64,
    pub gpus: Vec<GpuView>,
    /// The share of the last 30 days (or of the time since first seen) it
    /// was online and not draining, 0 to 1 (PROTOCOL.md §4).
    pub uptime_30d: f64,
    /// The collector's own resident memory (MiB) and CPU time (s), where it
    /// reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector_rss_mb: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector_cpu_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuView {
    pub index: u32,
    pub vendor: crate::heartbeat::Vendor,
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub memory_total_gb: f64,
    pub memory_free_gb: f64,
    pub utilization_percent: Option<f64>,
    /// The live claim holding it (PROTOCOL.md §4), `null` when free.
    #[serde(default)]
    pub claim: Option<crate::claims::GpuClaimView>,
    /// The processes holding its memory, largest first, as last reported
    /// (PROTOCOL.md §4): in the record by id only, never in pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<crate::heartbeat::GpuProcess>>,
}

impl AgentView {
    /// Shows a processes snapshot on the GPUs it names.
    pub fn show_processes(&mut self, snapshot: crate::heartbeat::GpuProcesses) {
        let mut by_gpu = snapshot.gpus;
        for gpu in &mut self.gpus {
            if let Some(processes) = by_gpu.remove(&gpu.index) {
                gpu.processes = Some(processes);
            }
        }
    }
}

/// The answer to `GET /v1/agents/{agent_id}/events`: a page of the
/// agent's state changes of the last 30 days, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPage {
    pub agent_id: String,
    pub events: Vec<crate::changes::Event>,
    /// The last event's place: pass it back as `cursor` for the events
    /// after it, now or later. `null` when the page is empty.
    pub next_cursor: Option<String>,
    /// RFC 3339: when the answer was read.
    pub as_of: String,
}

/// The answer to `GET /v1/agents/{agent_id}/history`: the agent's
/// per-minute roll-ups, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub agent_id: String,
    pub minutes: Vec<crate::heartbeat::MinuteRollup>,
    /// RFC 3339: when the answer was read.
    pub as_of: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_stored_is_optional_both_ways() {
        let v1: Accepted =
            serde_json::from_str(r#"{"agent_id":"a","online_until":"2026-01-01T00:00:00Z"}"#)
                .unwrap();
        assert!(v1.stored(EXTENSION_HISTORY));
        assert!(!serde_json::to_string(&v1).unwrap().contains("not_stored"));
        let partial = Accepted {
            not_stored: vec![EXTENSION_HISTORY.into()],
            ..v1
        };
        let text = serde_json::to_string(&partial).unwrap();
        assert!(text.contains(r#""not_stored":["history"]"#), "{text}");
        assert!(
            !serde_json::from_str::<Accepted>(&text)
                .unwrap()
                .stored(EXTENSION_HISTORY)
        );
    }

    #[test]
    fn each_status_has_its_code_and_the_unlisted_fall_back_by_class() {
        let cases = [
            (400, code::BAD_REQUEST),
            (401, code::UNAUTHORIZED),
            (403, code::FORBIDDEN),
            (404, code::NOT_FOUND),
            (405, code::METHOD_NOT_ALLOWED),
            (408, code::REQUEST_TIMEOUT),
            (409, code::STALE),
            (413, code::PAYLOAD_TOO_LARGE),
            (415, code::UNSUPPORTED_MEDIA_TYPE),
            (422, code::BAD_REQUEST),
            (500, code::INTERNAL),
            (502, code::INTERNAL),
            (503, code::STORE_UNAVAILABLE),
        ];
        for (status, expected) in cases {
            assert_eq!(code::for_status(status), expected, "{status}");
        }
    }
}
