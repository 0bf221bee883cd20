//! Webhooks (PROTOCOL.md §4 "State changes"): what a receiver gets for each
//! transition, signed the Standard Webhooks way
//! (<https://www.standardwebhooks.com>), and when it is sent, held back by
//! the grace, retried or given up.
//!
//! Delivery itself (an HTTP POST per endpoint) is [`post`], feature
//! `webhooks`; the embedded store keeps each endpoint's progress per agent
//! (`store::Outbox`), so that events go out in order per agent and an
//! endpoint that is down holds back only its own deliveries.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::changes::{Event, EventKind, OfflineReason};

/// How long a transition is retried before it is given up.
pub const GIVE_UP_AFTER_MS: i64 = 24 * 3600 * 1000;
/// The first retry's wait; each next one doubles, up to [`MAX_RETRY_MS`].
const FIRST_RETRY_MS: i64 = 5_000;
const MAX_RETRY_MS: i64 = 3600 * 1000;

/// The signing secret, given as `whsec_<base64>` as Standard Webhooks
/// writes it (so receivers' libraries take it as it is).
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl WebhookSecret {
    pub fn parse(text: &str) -> Result<Self, String> {
        let encoded = text.trim().strip_prefix("whsec_").ok_or(
            "a webhook secret is whsec_ and base64, as Standard Webhooks writes it (generate one with: echo whsec_$(openssl rand -base64 32))",
        )?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| "the part after whsec_ is not base64")?;
        if bytes.len() < 24 {
            return Err(format!(
                "a webhook secret needs at least 24 bytes, this one has {}",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    /// `webhook-signature`'s value: `v1,<base64 HMAC-SHA256 of
    /// "<id>.<timestamp>.<body>">`.
    pub fn sign(&self, id: &str, timestamp_s: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp_s.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let digest = mac.finalize().into_bytes();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    }
}

/// What a receiver's body looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"type": "agent.<kind>", "timestamp", "data": <the event>}`.
    Standard,
    /// `{"text": "..."}`, which a Slack (or Mattermost) incoming webhook posts.
    Slack,
}

/// One configured receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub format: Format,
}

impl Endpoint {
    /// `url[,url...]`, each optionally prefixed `slack:` for Slack's body.
    /// A URL must be https, or plain http to a loopback address.
    pub fn parse_list(text: &str) -> Result<Vec<Endpoint>, String> {
        let mut endpoints = Vec::new();
        for (position, entry) in text.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let (format, url) = match entry.strip_prefix("slack:") {
                Some(url) => (Format::Slack, url),
                None => (Format::Standard, entry),
            };
            // The errors never repeat the URL: a Slack URL is a credential.
            use crate::transport::TransportError;
            crate::transport::check(url, false, "read the events").map_err(|error| {
                let why = match error {
                    TransportError::PlainHttp { .. } => {
                        "plain http:// to another host; use https:// (plain http only to this machine)"
                            .to_owned()
                    }
                    TransportError::NotAUrl { reason, .. } => format!("not a URL ({reason})"),
                    TransportError::Scheme { scheme, .. } => {
                        format!("scheme {scheme:?} is not https")
                    }
                };
                format!("webhook URL {}: {why}", position + 1)
            })?;
            endpoints.push(Endpoint {
                url: url.to_owned(),
                format,
            });
        }
        Ok(endpoints)
    }

    /// Names the endpoint in the store's progress without keeping its URL
    /// (which may carry a token, as Slack's do).
    pub fn key(&self) -> String {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(self.url.as_bytes())[..8])
    }
}

/// One POST: its `webhook-id` (the event's id, the same on every retry, so
/// that a receiver can drop a repeat), `webhook-timestamp` and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: String,
    pub body: Vec<u8>,
}

impl Message {
    pub fn of(event: &Event, format: Format) -> Self {
        let body = match format {
            Format::Standard => json!({
                "type": format!("agent.{}", event.kind.as_str()),
                "timestamp": event.at,
                "data": event,
            }),
            Format::Slack => json!({ "text": describe(event) }),
        };
        Self {
            id: event.id.clone(),
            body: body.to_string().into_bytes(),
        }
    }

    /// The three Standard Webhooks headers, signed at `timestamp_s`.
    pub fn headers(&self, secret: &WebhookSecret, timestamp_s: i64) -> [(&'static str, String); 3] {
        [
            ("webhook-id", self.id.clone()),
            ("webhook-timestamp", timestamp_s.to_string()),
            (
                "webhook-signature",
                secret.sign(&self.id, timestamp_s, &self.body),
            ),
        ]
    }
}

/// A line for people: "gpu-01 went offline at 2026-12-01T11:52:01.560Z
/// (deadline passed)".
pub fn describe(event: &Event) -> String {
    let what = match event.kind {
        EventKind::Online => "came online".to_owned(),
        EventKind::Offline => match event.reason {
            Some(OfflineReason::Leaving) => "went offline (it left)".to_owned(),
            _ => "went offline (deadline passed)".to_owned(),
        },
        EventKind::Draining => "started draining".to_owned(),
        EventKind::Undrained => "stopped draining".to_owned(),
        EventKind::Rebooted => "rebooted".to_owned(),
        EventKind::GpusChanged => {
            let mut parts = Vec::new();
            if !event.gpus_removed.is_empty() {
                parts.push(format!("lost {}", event.gpus_removed.join(", ")));
            }
            if !event.gpus_added.is_empty() {
                parts.push(format!("gained {}", event.gpus_added.join(", ")));
            }
            format!("GPUs changed: {}", parts.join("; "))
        }
    };
    format!("{} {what} at {}", event.agent_id, event.at)
}

/// What to do with an agent's oldest undelivered event now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Send,
    /// An `offline` inside the grace: wait to see whether the agent comes
    /// back.
    HoldUntil(i64),
    /// One half of an `offline`/`online` pair shorter than the grace.
    Suppress,
    /// Retried for 24 hours already.
    GiveUp,
}

/// The grace suppresses an `offline` followed within it by an `online`, and
/// that `online`; `before` and `after` are the agent's events on either
/// side of `event`.
pub fn decide(
    event: &Event,
    before: Option<&Event>,
    after: Option<&Event>,
    now_ms: i64,
    grace_ms: i64,
) -> Decision {
    let within_grace = |offline: &Event, online: &Event| {
        offline.kind == EventKind::Offline
            && online.kind == EventKind::Online
            && online.at_ms - offline.at_ms < grace_ms
    };
    if grace_ms > 0 {
        match event.kind {
            EventKind::Offline if after.is_some_and(|next| within_grace(event, next)) => {
                return Decision::Suppress;
            }
            EventKind::Offline if now_ms < event.at_ms + grace_ms => {
                return Decision::HoldUntil(event.at_ms + grace_ms);
            }
            EventKind::Online if before.is_some_and(|previous| within_grace(previous, event)) => {
                return Decision::Suppress;
            }
            _ => {}
        }
    }
    if now_ms - event.at_ms > GIVE_UP_AFTER_MS {
        return Decision::GiveUp;
    }
    Decision::Send
}

/// When the next try after `attempts` failed ones is due: 5 s, doubling, at
/// most an hour apart, with up to a fifth of jitter so that receivers
/// coming back are not hit by every sender at once.
pub fn retry_at(attempts: u32, now_ms: i64, jitter: f64) -> i64 {
    let wait = FIRST_RETRY_MS
        .saturating_mul(1i64 << attempts.saturating_sub(1).min(20))
        .min(MAX_RETRY_MS);
    now_ms + wait + (wait as f64 * 0.2 * jitter.clamp(0.0, 1.0)) as i64
}

/// POSTs one message; `Err` says why it was not taken (any answer but 2xx,
/// or no answer within `timeout`).
#[cfg(feature = "webhooks")]
pub async fn post(
    client: &reqwest::Client,
    endpoint: &Endpoint,
    secret: &WebhookSecret,
    message: &Message,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let mut request = client
        .post(&endpoint.url)
        .timeout(timeout)
        .header("content-type", "application/json")
        .body(message.body.clone());
    for (name, value) in message.headers(secret, crate::time::now_ms().div_euclid(1000)) {
        request = request.header(name, value);
    }
    match request.send().await {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(format!("answered {}", response.status().as_u16())),
        Err(error) if error.is_timeout() => Err(format!("no answer within {timeout:?}")),
        Err(error) => Err(format!("unreachable: {error}")),
    }
}

/// Delivers every endpoint's pending events from a store that keeps an
/// outbox (the embedded store), beside the server: each endpoint in a task
/// of its own, each agent's oldest event at once, so that a slow or dead
/// receiver delays only its own deliveries and never a heartbeat.
#[cfg(feature = "webhooks")]
pub struct Dispatcher {
    endpoints: Vec<Endpoint>,
    secret: WebhookSecret,
    grace_ms: i64,
    client: reqwest::Client,
}

/// How long a receiver has to answer.
#[cfg(feature = "webhooks")]
const POST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How often each endpoint looks for due events.
#[cfg(feature = "webhooks")]
const ROUND_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// Agents one round delivers to at most.
#[cfg(feature = "webhooks")]
const ROUND_AGENTS: usize = 64;

#[cfg(feature = "webhooks")]
impl Dispatcher {
    pub fn new(
        endpoints: Vec<Endpoint>,
        secret: WebhookSecret,
        grace: std::time::Duration,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            // A receiver that redirects is misconfigured; following it
            // could send the signed event somewhere nobody chose.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| format!("cannot build an HTTP client: {error}"))?;
        Ok(Self {
            endpoints,
            secret,
            grace_ms: i64::try_from(grace.as_millis()).unwrap_or(i64::MAX),
            client,
        })
    }

    /// The dispatcher a deployment's configuration asks for: `urls` as
    /// [`Endpoint::parse_list`] reads them (none: `None`), signed with the
    /// secret in `ROLLCALL_WEBHOOK_SECRET`, or in Secrets Manager under
    /// `ROLLCALL_WEBHOOK_SECRET_SECRET_ID`, read once.
    #[cfg(feature = "dynamodb")]
    pub async fn configured(
        urls: &str,
        grace: std::time::Duration,
    ) -> Result<Option<Self>, String> {
        let endpoints = Endpoint::parse_list(urls)?;
        if endpoints.is_empty() {
            return Ok(None);
        }
        let secret = crate::secrets::SecretsFromEnv::default()
            .load("ROLLCALL_WEBHOOK_SECRET", WebhookSecret::parse)
            .await
            .map_err(|error| error.to_string())?
            .ok_or(
                "webhook URLs need ROLLCALL_WEBHOOK_SECRET (whsec_ and base64: echo whsec_$(openssl rand -base64 32)) or ROLLCALL_WEBHOOK_SECRET_SECRET_ID",
            )?;
        let secret = (*secret.current().await).clone();
        tracing::info!(
            endpoints = endpoints.len(),
            grace_s = grace.as_secs(),
            "webhooks on"
        );
        Self::new(endpoints, secret, grace).map(Some)
    }

    /// Runs until the process ends.
    pub async fn run(self, store: std::sync::Arc<dyn crate::store::Store>) {
        if store.outbox().is_none() {
            tracing::error!("this store keeps no webhook outbox; no webhook will be sent");
            return;
        }
        let dispatcher = std::sync::Arc::new(self);
        let mut endpoints = tokio::task::JoinSet::new();
        for endpoint in dispatcher.endpoints.clone() {
            let (dispatcher, store) = (dispatcher.clone(), store.clone());
            endpoints.spawn(async move { dispatcher.serve(endpoint, store).await });
        }
        while endpoints.join_next().await.is_some() {}
    }

    async fn serve(
        self: std::sync::Arc<Self>,
        endpoint: Endpoint,
        store: std::sync::Arc<dyn crate::store::Store>,
    ) {
        let key = endpoint.key();
        let mut ticks = tokio::time::interval(ROUND_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut registered = false;
        loop {
            ticks.tick().await;
            let Some(outbox) = store.outbox() else { return };
            if !registered {
                match outbox.register(&key, crate::time::now_ms()).await {
                    Ok(()) => registered = true,
                    Err(error) => {
                        tracing::warn!(endpoint = key, %error, "webhook endpoint not registered yet");
                        continue;
                    }
                }
            }
            let pending = match outbox
                .pending(&key, crate::time::now_ms(), ROUND_AGENTS)
                .await
            {
                Ok(pending) => pending,
                Err(error) => {
                    tracing::warn!(endpoint = key, %error, "pending webhooks not read");
                    continue;
                }
            };
            let mut deliveries = tokio::task::JoinSet::new();
            for pending in pending {
                let (dispatcher, store, endpoint, key) =
                    (self.clone(), store.clone(), endpoint.clone(), key.clone());
                deliveries.spawn(async move {
                    if let Some(outbox) = store.outbox() {
                        dispatcher.deliver(outbox, &endpoint, &key, pending).await;
                    }
                });
            }
            while deliveries.join_next().await.is_some() {}
        }
    }

    /// One agent's oldest pending event to one endpoint, and what the
    /// outbox keeps of the outcome.
    async fn deliver(
        &self,
        outbox: &dyn crate::store::Outbox,
        endpoint: &Endpoint,
        key: &str,
        pending: crate::store::Pending,
    ) {
        let event = &pending.event;
        let agent_id = event.agent_id.as_str();
        let now = crate::time::now_ms();
        let decision = decide(
            event,
            pending.before.as_ref(),
            pending.after.as_ref(),
            now,
            self.grace_ms,
        );
        let outcome = match decision {
            Decision::Send => {
                let message = Message::of(event, endpoint.format);
                match post(&self.client, endpoint, &self.secret, &message, POST_TIMEOUT).await {
                    Ok(()) => {
                        tracing::info!(endpoint = key, event = event.id, "webhook delivered");
                        outbox.handled(key, agent_id, &event.key()).await
                    }
                    Err(why) => {
                        let attempts = pending.attempts.saturating_add(1);
                        let at = retry_at(attempts, now, fastrand::f64());
                        tracing::warn!(
                            endpoint = key,
                            event = event.id,
                            attempts,
                            retry_in_ms = at - now,
                            "webhook not delivered: {why}"
                        );
                        outbox.retry(key, agent_id, at, attempts).await
                    }
                }
            }
            Decision::HoldUntil(at) => outbox.retry(key, agent_id, at, pending.attempts).await,
            Decision::Suppress => {
                tracing::info!(
                    endpoint = key,
                    event = event.id,
                    "webhook suppressed: an offline and online pair inside the grace"
                );
                outbox.handled(key, agent_id, &event.key()).await
            }
            Decision::GiveUp => {
                tracing::warn!(
                    endpoint = key,
                    event = event.id,
                    attempts = pending.attempts,
                    "webhook given up after 24 hours of retries"
                );
                outbox.handled(key, agent_id, &event.key()).await
            }
        };
        if let Err(error) = outcome {
            tracing::warn!(endpoint = key, event = event.id, %error, "webhook progress not kept; it will be tried again");
        }
    }
}

/// The events on either side of one of an agent's events, for the grace,
/// where a store keeps them (the events table on AWS).
#[cfg(feature = "webhooks")]
#[async_trait::async_trait]
pub trait Neighbours: Send + Sync {
    async fn around(&self, event: &Event) -> Result<(Option<Event>, Option<Event>), String>;
}

#[cfg(feature = "webhooks")]
impl Dispatcher {
    /// Delivers events that arrive in order (a stream of the events table)
    /// to every endpoint, one after another; stops at the first that cannot
    /// go yet (a receiver refused it, or the grace holds it), so that the
    /// caller has the same events delivered again, in order, later. An event
    /// may then reach an endpoint twice, under the same `webhook-id`.
    pub async fn deliver_in_order(
        &self,
        events: &[Event],
        neighbours: &dyn Neighbours,
    ) -> Result<usize, String> {
        let now = crate::time::now_ms();
        for event in events {
            let (before, after) = if self.grace_ms > 0 {
                neighbours.around(event).await?
            } else {
                (None, None)
            };
            match decide(event, before.as_ref(), after.as_ref(), now, self.grace_ms) {
                Decision::Send => {
                    for endpoint in &self.endpoints {
                        let message = Message::of(event, endpoint.format);
                        post(&self.client, endpoint, &self.secret, &message, POST_TIMEOUT)
                            .await
                            .map_err(|why| {
                                format!(
                                    "{} not delivered to endpoint {}: {why}",
                                    event.id,
                                    endpoint.key()
                                )
                            })?;
                    }
                    tracing::info!(
                        event = event.id,
                        endpoints = self.endpoints.len(),
                        "webhook delivered"
                    );
                }
                Decision::HoldUntil(at) => {
                    return Err(format!(
                        "{} is held by the grace for {} ms more",
                        event.id,
                        at - now
                    ));
                }
                Decision::Suppress => {
                    tracing::info!(
                        event = event.id,
                        "webhook suppressed: an offline and online pair inside the grace"
                    );
                }
                Decision::GiveUp => {
                    tracing::warn!(event = event.id, "webhook given up after 24 hours");
                }
            }
        }
        Ok(events.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, at_ms: i64) -> Event {
        serde_json::from_value(json!({
            "id": format!("a/{at_ms:013}.0"), "agent_id": "a", "kind": kind.as_str(),
            "at": crate::time::rfc3339(at_ms), "at_ms": at_ms
        }))
        .unwrap()
    }

    /// The test vector every Standard Webhooks library carries.
    #[test]
    fn signatures_match_the_standard_webhooks_vector() {
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            secret.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(WebhookSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(WebhookSecret::parse("whsec_c2hvcnQ=").is_err());
        assert!(!format!("{secret:?}").contains("MfKQ"));
    }

    #[test]
    fn endpoints_are_https_or_loopback_and_may_be_slack() {
        let endpoints = Endpoint::parse_list(
            "https://hooks.example/a, slack:https://hooks.slack.com/T/B/x,http://127.0.0.1:9/h",
        )
        .unwrap();
        assert_eq!(endpoints.len(), 3);
        assert_eq!(endpoints[1].format, Format::Slack);
        assert_eq!(endpoints[1].url, "https://hooks.slack.com/T/B/x");
        let refused =
            Endpoint::parse_list("https://ok.example,http://hooks.example/h").unwrap_err();
        assert!(refused.contains("webhook URL 2"), "{refused}");
        assert_ne!(endpoints[0].key(), endpoints[2].key());
        assert!(!endpoints[1].key().contains("slack"));
    }

    #[test]
    fn messages_carry_the_event_and_its_stable_id() {
        let offline = event(EventKind::Offline, 1_764_000_000_000);
        let message = Message::of(&offline, Format::Standard);
        let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
        assert_eq!(body["type"], "agent.offline");
        assert_eq!(body["data"]["agent_id"], "a");
        assert_eq!(message.id, offline.id);
        let slack: serde_json::Value =
            serde_json::from_slice(&Message::of(&offline, Format::Slack).body).unwrap();
        assert_eq!(
            slack["text"],
            "a went offline (deadline passed) at 2025-11-24T16:00:00.000Z"
        );
    }

    #[test]
    fn the_grace_holds_offlines_and_suppresses_short_pairs() {
        let grace = 60_000;
        let offline = event(EventKind::Offline, 1_000_000);
        let quick_return = event(EventKind::Online, 1_030_000);
        let late_return = event(EventKind::Online, 1_090_000);
        assert_eq!(
            decide(&offline, None, None, 1_010_000, grace),
            Decision::HoldUntil(1_060_000)
        );
        assert_eq!(
            decide(&offline, None, Some(&quick_return), 1_031_000, grace),
            Decision::Suppress
        );
        assert_eq!(
            decide(&quick_return, Some(&offline), None, 1_031_000, grace),
            Decision::Suppress
        );
        assert_eq!(
            decide(&offline, None, None, 1_060_000, grace),
            Decision::Send
        );
        assert_eq!(
            decide(&late_return, Some(&offline), None, 1_091_000, grace),
            Decision::Send
        );
        // Without a grace every event goes at once, until a day has passed.
        assert_eq!(
            decide(&offline, None, Some(&quick_return), 1_000_001, 0),
            Decision::Send
        );
        assert_eq!(
            decide(&offline, None, None, 1_000_001 + GIVE_UP_AFTER_MS, 0),
            Decision::GiveUp
        );
    }

    #[test]
    fn retries_back_off_to_an_hour() {
        assert_eq!(retry_at(1, 0, 0.0), 5_000);
        assert_eq!(retry_at(2, 0, 0.0), 10_000);
        assert_eq!(retry_at(40, 0, 0.0), 3_600_000);
        assert_eq!(retry_at(1, 0, 1.0), 6_000);
    }
}
