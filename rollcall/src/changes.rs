//! State changes (PROTOCOL.md §4): the transitions an agent goes through,
//! derived once from two versions of its stored record, and the
//! availability they add up to (`uptime_30d`).
//!
//! Both stores call [`transitions`] with the version they replace and the
//! one they write (SQLite inside the write's transaction; on AWS the
//! stream consumer, from the old and new images), so an `offline` has one
//! definition everywhere: it happens *at the deadline*, whoever notices it
//! and whenever. Events are keyed by time and kind ([`Event::key`]), so
//! recording one twice (a retried stream batch, a sweep racing a
//! heartbeat) stores it once.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::heartbeat::AgentState;
use crate::record::StoredAgent;
use crate::time::rfc3339;

/// How long events are kept, and the window `uptime_30d` covers.
pub const KEPT_MS: i64 = 30 * 24 * 3600 * 1000;

/// Closed spans of unavailability an agent's [`Availability`] keeps; past
/// this the oldest two are merged (which can only understate uptime).
pub const MAX_DOWN_SPANS: usize = 24;

/// A reboot is a boot time that moved later by more than this: the boot
/// time is derived from the collector's clock and uptime, which drift apart
/// by a little between samples.
const REBOOT_TOLERANCE_S: i64 = 60;

/// The transitions of PROTOCOL.md §4, in the order they sort within one
/// millisecond (an agent that comes back is first offline, then online).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Offline,
    Online,
    Rebooted,
    GpusChanged,
    Draining,
    Undrained,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Offline => "offline",
            EventKind::Online => "online",
            EventKind::Rebooted => "rebooted",
            EventKind::GpusChanged => "gpus_changed",
            EventKind::Draining => "draining",
            EventKind::Undrained => "undrained",
        }
    }

    /// Its place among events of one millisecond, one digit.
    fn ordinal(self) -> u8 {
        self as u8
    }

    /// Whether an agent is available (online and not draining) after it;
    /// `None` when it says nothing about that.
    fn available_after(self) -> Option<bool> {
        match self {
            EventKind::Online | EventKind::Undrained => Some(true),
            EventKind::Offline | EventKind::Draining => Some(false),
            EventKind::Rebooted | EventKind::GpusChanged => None,
        }
    }
}

/// Why an agent went offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflineReason {
    /// Its deadline passed without a heartbeat.
    Deadline,
    /// It said it was leaving.
    Leaving,
}

/// One transition of one agent: what `GET /v1/agents/{id}/events` lists
/// and what a webhook receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per agent and stable: `<agent_id>/<key>`.
    pub id: String,
    pub agent_id: String,
    pub kind: EventKind,
    /// RFC 3339, milliseconds: when it happened (an `offline` at the
    /// deadline, not when it was noticed).
    pub at: String,
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<OfflineReason>,
    /// `gpus_changed`: the GPUs (UUIDs, or `<vendor>:<index>` for a GPU
    /// without one) that appeared and that went.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus_added: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus_removed: Vec<String>,
}

impl Event {
    fn new(agent_id: &str, kind: EventKind, at_ms: i64) -> Self {
        let key = event_key(at_ms, kind);
        Self {
            id: format!("{agent_id}/{key}"),
            agent_id: agent_id.to_owned(),
            kind,
            at: rfc3339(at_ms),
            at_ms,
            reason: None,
            gpus_added: Vec::new(),
            gpus_removed: Vec::new(),
        }
    }

    /// Its place in the agent's events: sorts as the events happened, and
    /// names the event (a store keeps one event per key).
    pub fn key(&self) -> String {
        event_key(self.at_ms, self.kind)
    }
}

/// The first key after every event at or before `at_ms`.
pub fn key_after(at_ms: i64) -> String {
    format!("{:013}.9", at_ms.max(0))
}

/// `<at_ms, 13 digits>.<kind's ordinal>`: sorts as text in event order.
fn event_key(at_ms: i64, kind: EventKind) -> String {
    format!("{:013}.{}", at_ms.max(0), kind.ordinal())
}

/// Whether `text` is an event key (a cursor of the events list).
pub fn is_event_key(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 15
        && bytes[..13].iter().all(u8::is_ascii_digit)
        && bytes[13] == b'.'
        && bytes[14].is_ascii_digit()
}

/// One version of an agent's stored record, with whether the store has
/// marked it offline (a sweep found its deadline passed, or it left).
#[derive(Debug, Clone, Copy)]
pub struct Version<'a> {
    pub agent: &'a StoredAgent,
    pub marked_offline: bool,
}

/// The transitions between the version a store replaces (`None` if the
/// agent is new, or its record had expired) and the one it writes, in
/// event order.
pub fn transitions(before: Option<Version<'_>>, after: Version<'_>) -> Vec<Event> {
    let agent = after.agent;
    let agent_id = agent.agent_id();
    let now = agent.received_at_ms;
    let leaving = agent.heartbeat.state == AgentState::Leaving;
    let mut events = Vec::new();
    let Some(before) = before.filter(|before| !before.agent.is_expired(now)) else {
        if !leaving {
            events.push(Event::new(agent_id, EventKind::Online, now));
            if agent.heartbeat.state == AgentState::Draining {
                events.push(Event::new(agent_id, EventKind::Draining, now));
            }
        }
        return events;
    };
    let old = before.agent;
    let old_left = old.heartbeat.state == AgentState::Leaving;
    if old.heartbeat.sent_at_ms == agent.heartbeat.sent_at_ms {
        // The same heartbeat: only the store's mark can have changed.
        if after.marked_offline && !before.marked_offline && !old_left {
            events.push(offline(
                agent_id,
                old.online_until_ms,
                OfflineReason::Deadline,
            ));
        }
        return events;
    }
    if old.online_until_ms <= now {
        if !before.marked_offline && !old_left {
            events.push(offline(
                agent_id,
                old.online_until_ms,
                OfflineReason::Deadline,
            ));
        }
        if !leaving {
            events.push(Event::new(agent_id, EventKind::Online, now));
        }
    } else if leaving {
        events.push(offline(agent_id, now, OfflineReason::Leaving));
    }
    if rebooted(old, agent) {
        events.push(Event::new(agent_id, EventKind::Rebooted, now));
    }
    let (added, removed) = gpus_changed(old, agent);
    if !added.is_empty() || !removed.is_empty() {
        let mut event = Event::new(agent_id, EventKind::GpusChanged, now);
        event.gpus_added = added;
        event.gpus_removed = removed;
        events.push(event);
    }
    let was_draining = old.online_until_ms > now && old.heartbeat.state == AgentState::Draining;
    match agent.heartbeat.state {
        AgentState::Draining if !was_draining => {
            events.push(Event::new(agent_id, EventKind::Draining, now));
        }
        AgentState::Up if was_draining => {
            events.push(Event::new(agent_id, EventKind::Undrained, now));
        }
        _ => {}
    }
    events
}

/// The `offline` a store records when it marks an agent whose deadline
/// passed: the same event [`transitions`] derives from the mark.
pub fn offline_at_deadline(agent: &StoredAgent) -> Event {
    offline(
        agent.agent_id(),
        agent.online_until_ms,
        OfflineReason::Deadline,
    )
}

fn offline(agent_id: &str, at_ms: i64, reason: OfflineReason) -> Event {
    let mut event = Event::new(agent_id, EventKind::Offline, at_ms);
    event.reason = Some(reason);
    event
}

/// The host's boot time moved later: its uptime went down, allowing for
/// the time between the two heartbeats.
fn rebooted(old: &StoredAgent, new: &StoredAgent) -> bool {
    let boot = |agent: &StoredAgent| {
        let uptime_s = agent.heartbeat.host.as_ref()?.uptime_s?;
        let sent_s = i64::try_from(agent.heartbeat.sent_at_ms / 1000).ok()?;
        Some(sent_s - i64::try_from(uptime_s).ok()?)
    };
    match (boot(old), boot(new)) {
        (Some(old), Some(new)) => new > old + REBOOT_TOLERANCE_S,
        _ => false,
    }
}

fn gpu_identities(agent: &StoredAgent) -> BTreeSet<String> {
    agent
        .heartbeat
        .gpus
        .iter()
        .map(|gpu| {
            gpu.uuid
                .clone()
                .unwrap_or_else(|| format!("{}:{}", gpu.vendor.as_str(), gpu.index))
        })
        .collect()
}

fn gpus_changed(old: &StoredAgent, new: &StoredAgent) -> (Vec<String>, Vec<String>) {
    let (old, new) = (gpu_identities(old), gpu_identities(new));
    (
        new.difference(&old).cloned().collect(),
        old.difference(&new).cloned().collect(),
    )
}

/// What `uptime_30d` is computed from: when the agent was first seen and
/// the spans it was not available (offline or draining) in the last 30
/// days. Kept beside the record and updated only by transitions, so a
/// steady heartbeat never writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Availability {
    /// Epoch ms.
    #[serde(rename = "f")]
    pub first_seen_ms: i64,
    /// Closed spans `[from, to)` in epoch ms, oldest first.
    #[serde(rename = "d", default, skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<[i64; 2]>,
    /// Unavailable since then, until a transition says otherwise.
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub down_since_ms: Option<i64>,
    /// The key of the newest event applied: an event at or before it is
    /// not applied again (a stream batch delivered twice).
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub applied_key: Option<String>,
}

impl Availability {
    pub fn first_seen(at_ms: i64) -> Self {
        Self {
            first_seen_ms: at_ms,
            down: Vec::new(),
            down_since_ms: None,
            applied_key: None,
        }
    }

    /// Adds transitions (in event order) and forgets what is older than the
    /// window. The same events twice change nothing the second time.
    pub fn apply(&mut self, events: &[Event]) {
        for event in events {
            let key = event.key();
            if self
                .applied_key
                .as_ref()
                .is_some_and(|applied| key <= *applied)
            {
                continue;
            }
            self.applied_key = Some(key);
            match event.kind.available_after() {
                Some(false) if self.down_since_ms.is_none() => {
                    self.down_since_ms = Some(event.at_ms);
                }
                Some(true) => {
                    if let Some(from) = self.down_since_ms.take()
                        && event.at_ms > from
                    {
                        self.down.push([from, event.at_ms]);
                    }
                }
                _ => {}
            }
        }
        let newest = events.iter().map(|event| event.at_ms).max();
        if let Some(newest) = newest {
            self.down.retain(|[_, to]| *to > newest - KEPT_MS);
        }
        while self.down.len() > MAX_DOWN_SPANS {
            let second = self.down.remove(1);
            self.down[0][1] = second[1];
        }
    }

    /// The share of the last 30 days (or of the time since first seen, if
    /// shorter) up to `now_ms` that the agent was available, to 4 decimals.
    /// `offline_since_ms` is the record's deadline when it has passed but
    /// no store has marked it yet, so a reader never waits for a sweep.
    pub fn uptime(&self, now_ms: i64, offline_since_ms: Option<i64>) -> f64 {
        let from = self.first_seen_ms.max(now_ms - KEPT_MS);
        let span = now_ms - from;
        if span <= 0 {
            return 1.0;
        }
        let overlap = |start: i64, end: i64| (end.min(now_ms) - start.max(from)).max(0);
        let mut down: i64 = self.down.iter().map(|[a, b]| overlap(*a, *b)).sum();
        if let Some(since) = self.down_since_ms.or(offline_since_ms) {
            down += overlap(since, now_ms);
        }
        let share = 1.0 - down as f64 / span as f64;
        (share.clamp(0.0, 1.0) * 10_000.0).round() / 10_000.0
    }
}

/// The availability after a store writes `after` over `before` with
/// `events` between them: started at the first heartbeat (or the first
/// this version sees), then moved by transitions only.
pub fn next_availability(
    before: Option<&Availability>,
    after: &StoredAgent,
    events: &[Event],
) -> Availability {
    let mut availability = before
        .cloned()
        .unwrap_or_else(|| Availability::first_seen(after.received_at_ms));
    availability.apply(events);
    availability
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::Heartbeat;
    use crate::heartbeat::tests::example;
    use crate::record::Deadlines;

    const T0: i64 = 1_764_000_000_000;

    fn agent(sent_ms: i64, state: AgentState, uuids: &[&str], uptime_s: u64) -> StoredAgent {
        let mut heartbeat: Heartbeat = serde_json::from_value(example()).unwrap();
        heartbeat.sent_at_ms = sent_ms as u64;
        heartbeat.state = state;
        heartbeat.interval_s = 30;
        let template = heartbeat.gpus[0].clone();
        heartbeat.gpus = uuids
            .iter()
            .enumerate()
            .map(|(index, uuid)| {
                let mut gpu = template.clone();
                gpu.index = index as u32;
                gpu.uuid = Some((*uuid).to_owned());
                gpu
            })
            .collect();
        heartbeat.host.get_or_insert_with(Default::default).uptime_s = Some(uptime_s);
        StoredAgent::accept(heartbeat, sent_ms, Deadlines::default())
    }

    fn up(sent_ms: i64) -> StoredAgent {
        agent(
            sent_ms,
            AgentState::Up,
            &["GPU-a"],
            1_000 + (sent_ms - T0) as u64 / 1000,
        )
    }

    fn kinds(events: &[Event]) -> Vec<(EventKind, i64)> {
        events
            .iter()
            .map(|event| (event.kind, event.at_ms))
            .collect()
    }

    fn version(agent: &StoredAgent) -> Version<'_> {
        Version {
            agent,
            marked_offline: false,
        }
    }

    #[test]
    fn a_first_heartbeat_is_online_and_a_steady_one_is_nothing() {
        let first = up(T0);
        assert_eq!(
            kinds(&transitions(None, version(&first))),
            [(EventKind::Online, T0)]
        );
        let next = up(T0 + 30_000);
        assert!(transitions(Some(version(&first)), version(&next)).is_empty());
    }

    #[test]
    fn a_return_is_offline_at_the_old_deadline_then_online() {
        let first = up(T0);
        let back = up(T0 + 600_000);
        let events = transitions(Some(version(&first)), version(&back));
        assert_eq!(
            kinds(&events),
            [
                (EventKind::Offline, T0 + 90_000),
                (EventKind::Online, T0 + 600_000)
            ]
        );
        assert_eq!(events[0].reason, Some(OfflineReason::Deadline));
        // Once a sweep marked it, the offline is already recorded.
        let marked = Version {
            agent: &first,
            marked_offline: true,
        };
        assert_eq!(
            kinds(&transitions(Some(marked), version(&back))),
            [(EventKind::Online, T0 + 600_000)]
        );
    }

    #[test]
    fn a_mark_is_offline_at_the_deadline_once() {
        let first = up(T0);
        let marked = Version {
            agent: &first,
            marked_offline: true,
        };
        let events = transitions(Some(version(&first)), marked);
        assert_eq!(events, [offline_at_deadline(&first)]);
        assert_eq!(events[0].at, "2025-11-24T16:01:30.000Z");
        assert!(transitions(Some(marked), marked).is_empty());
    }

    #[test]
    fn draining_undrained_and_leaving() {
        let first = up(T0);
        let draining = agent(T0 + 30_000, AgentState::Draining, &["GPU-a"], 1_030);
        let undrained = agent(T0 + 60_000, AgentState::Up, &["GPU-a"], 1_060);
        let leaving = agent(T0 + 90_000, AgentState::Leaving, &["GPU-a"], 1_090);
        assert_eq!(
            kinds(&transitions(Some(version(&first)), version(&draining))),
            [(EventKind::Draining, T0 + 30_000)]
        );
        assert_eq!(
            kinds(&transitions(Some(version(&draining)), version(&undrained))),
            [(EventKind::Undrained, T0 + 60_000)]
        );
        let left = transitions(Some(version(&undrained)), version(&leaving));
        assert_eq!(kinds(&left), [(EventKind::Offline, T0 + 90_000)]);
        assert_eq!(left[0].reason, Some(OfflineReason::Leaving));
        // A record that left was never online past its word: no second offline.
        let back = up(T0 + 900_000);
        assert_eq!(
            kinds(&transitions(Some(version(&leaving)), version(&back))),
            [(EventKind::Online, T0 + 900_000)]
        );
        // Back while draining: online, then draining.
        let back_draining = agent(T0 + 900_000, AgentState::Draining, &["GPU-a"], 1_900);
        assert_eq!(
            kinds(&transitions(
                Some(version(&leaving)),
                version(&back_draining)
            )),
            [
                (EventKind::Online, T0 + 900_000),
                (EventKind::Draining, T0 + 900_000)
            ]
        );
    }

    #[test]
    fn a_gpu_falling_off_the_bus_and_a_reboot() {
        let first = agent(T0, AgentState::Up, &["GPU-a", "GPU-b"], 5_000);
        let lost = agent(T0 + 30_000, AgentState::Up, &["GPU-a"], 5_030);
        let events = transitions(Some(version(&first)), version(&lost));
        assert_eq!(kinds(&events), [(EventKind::GpusChanged, T0 + 30_000)]);
        assert_eq!(events[0].gpus_removed, ["GPU-b"]);
        assert!(events[0].gpus_added.is_empty());
        let rebooted = agent(T0 + 200_000, AgentState::Up, &["GPU-a"], 40);
        assert_eq!(
            kinds(&transitions(Some(version(&lost)), version(&rebooted))),
            [
                (EventKind::Offline, T0 + 120_000),
                (EventKind::Online, T0 + 200_000),
                (EventKind::Rebooted, T0 + 200_000)
            ]
        );
        // Uptime that grew by the time between heartbeats is no reboot,
        // even with the clocks a little apart.
        let later = agent(T0 + 260_000, AgentState::Up, &["GPU-a"], 130);
        assert!(transitions(Some(version(&rebooted)), version(&later)).is_empty());
    }

    #[test]
    fn keys_sort_in_event_order_and_parse_as_cursors() {
        let events = transitions(Some(version(&up(T0))), version(&up(T0 + 600_000)));
        let keys: Vec<String> = events.iter().map(Event::key).collect();
        assert!(keys.windows(2).all(|pair| pair[0] < pair[1]), "{keys:?}");
        assert!(keys.iter().all(|key| is_event_key(key)));
        assert!(!is_event_key("1764000000000"));
        assert!(!is_event_key("17640000000a0.1"));
        assert_eq!(events[1].id, format!("{}/{}", events[1].agent_id, keys[1]));
    }

    /// A simulated month: down 1 hour every 3 days, drained for 2 hours once.
    #[test]
    fn uptime_over_a_simulated_month() {
        let hour = 3_600_000;
        let day = 24 * hour;
        let mut availability = Availability::first_seen(T0);
        let mut down_ms = 0;
        let mut at = T0;
        for _ in 0..10 {
            at += 3 * day;
            let mut off = Event::new("a", EventKind::Offline, at);
            off.reason = Some(OfflineReason::Deadline);
            availability.apply(&[off]);
            availability.apply(&[Event::new("a", EventKind::Online, at + hour)]);
            down_ms += hour;
        }
        availability.apply(&[Event::new("a", EventKind::Draining, T0 + 31 * day)]);
        availability.apply(&[Event::new(
            "a",
            EventKind::Undrained,
            T0 + 31 * day + 2 * hour,
        )]);
        down_ms += 2 * hour;
        let now = T0 + 34 * day;
        // The window is the last 30 days: the first outage (day 3) is out.
        let window_down = down_ms - hour;
        let expected = 1.0 - window_down as f64 / KEPT_MS as f64;
        let uptime = availability.uptime(now, None);
        assert!((uptime - expected).abs() < 0.0001, "{uptime} vs {expected}");
        // Shorter than the window: the share of the time since first seen.
        let young = Availability::first_seen(now - day);
        assert_eq!(young.uptime(now, Some(now - 6 * hour)), 0.75);
        // Applying the same events again changes nothing.
        let mut twice = availability.clone();
        twice.apply(&[
            Event::new("a", EventKind::Draining, T0 + 31 * day),
            Event::new("a", EventKind::Undrained, T0 + 31 * day + 2 * hour),
        ]);
        assert_eq!(twice, availability);
    }

    #[test]
    fn down_spans_stay_bounded_and_never_overstate_uptime() {
        let mut availability = Availability::first_seen(T0);
        for n in 0..100 {
            let at = T0 + n * 60_000;
            availability.apply(&[Event::new("a", EventKind::Offline, at)]);
            availability.apply(&[Event::new("a", EventKind::Online, at + 10_000)]);
        }
        assert!(availability.down.len() <= MAX_DOWN_SPANS);
        let now = T0 + 100 * 60_000;
        let exact = 1.0 - (100.0 * 10_000.0) / (now - T0) as f64;
        assert!(availability.uptime(now, None) <= exact + 0.0001);
    }
}
