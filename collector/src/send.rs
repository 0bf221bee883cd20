//! Signing and POSTing heartbeats, and the backoff between retries.

use std::time::Duration;

use rollcall::heartbeat::Heartbeat;
use rollcall::signing::{
    AgentKey, HEADER_AGENT, HEADER_KEY_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use rollcall::transport::{self, Transport};

/// The longest one attempt may take, connection included; `run` lowers it
/// to half the interval (see [`attempt_timeout`]).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one attempt of `run` may take: half the interval, at most
/// [`REQUEST_TIMEOUT`]. An attempt stuck on a link that silently drops
/// packets gives way to a retry, and the sample after it still goes out on
/// time, instead of the agent waiting out a long timeout toward its deadline.
pub fn attempt_timeout(interval: Duration) -> Duration {
    REQUEST_TIMEOUT.min(interval / 2)
}

pub struct Sender {
    client: reqwest::Client,
    url: String,
    key_id: String,
    agent_key: AgentKey,
}

pub use rollcall::wire::Accepted;
use rollcall::wire::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot reach ingest: {0}")]
    Network(String),
    #[error("ingest answered {status}: {message}")]
    Refused {
        status: u16,
        message: String,
        /// The answer's machine-readable `code` (empty from an older ingest).
        code: String,
    },
    #[error("{0}")]
    Endpoint(String),
}

impl SendError {
    /// Worth trying again with the same (or a newer) sample.
    pub fn is_retryable(&self) -> bool {
        match self {
            SendError::Network(_) => true,
            SendError::Refused { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            SendError::Endpoint(_) => false,
        }
    }

    /// Ingest refused the timestamp: the local clock is off.
    pub fn is_clock_skew(&self) -> bool {
        matches!(self, SendError::Refused { code, .. } if code == rollcall::wire::code::CLOCK_SKEW)
    }

    /// A newer heartbeat is already stored; this one is obsolete, not failed.
    pub fn is_stale(&self) -> bool {
        matches!(self, SendError::Refused { status: 409, .. })
    }
}

impl Sender {
    /// `endpoint` is ingest's base URL; `/v1/heartbeats` is appended unless
    /// present. Plain `http://` is refused unless it goes to this machine or
    /// `insecure_plain_http` says the operator accepts the risk. `timeout`
    /// bounds each attempt, connecting included.
    pub fn new(
        endpoint: &str,
        key_id: String,
        agent_key: AgentKey,
        insecure_plain_http: bool,
        timeout: Duration,
    ) -> Result<Self, SendError> {
        let base = endpoint.trim_end_matches('/');
        let url = if base.ends_with("/v1/heartbeats") {
            base.to_owned()
        } else {
            format!("{base}/v1/heartbeats")
        };
        check_transport(&url, insecure_plain_http)?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("rollcall-collector/", env!("CARGO_PKG_VERSION")))
            // A redirect would re-send the signed body and headers to
            // wherever it points; a 3xx is an error to report instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| SendError::Network(error.to_string()))?;
        Ok(Self {
            client,
            url,
            key_id,
            agent_key,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn send(&self, heartbeat: &Heartbeat) -> Result<Accepted, SendError> {
        let body = serde_json::to_vec(heartbeat)
            .map_err(|error| SendError::Network(format!("cannot encode heartbeat: {error}")))?;
        let timestamp = rollcall::time::now_ms().div_euclid(1000);
        let signature =
            self.agent_key
                .signature_header(&self.key_id, &heartbeat.agent_id, timestamp, &body);
        let response = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(HEADER_AGENT, &heartbeat.agent_id)
            .header(HEADER_KEY_ID, &self.key_id)
            .header(HEADER_TIMESTAMP, timestamp.to_string())
            .header(HEADER_SIGNATURE, signature)
            .body(body)
            .send()
            .await
            .map_err(|error| SendError::Network(describe(&error)))?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        if status == 202 {
            return serde_json::from_str(&text).map_err(|_| SendError::Refused {
                status,
                message: format!("unexpected 202 body {text:?}"),
                code: String::new(),
            });
        }
        let (message, code) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => (body.error, body.code),
            Err(_) => (text.chars().take(200).collect(), String::new()),
        };
        Err(SendError::Refused {
            status,
            message,
            code,
        })
    }
}

/// https:// anywhere; http:// only to loopback, or when the operator said so.
fn check_transport(url: &str, insecure_plain_http: bool) -> Result<(), SendError> {
    match transport::check(url, insecure_plain_http, "read and replay heartbeats") {
        Ok(Transport::InsecurePlainHttp) => {
            tracing::warn!(
                endpoint = url,
                "sending heartbeats over plain http:// to another host (--insecure-plain-http): anyone on the path can read and replay them"
            );
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(error) => Err(SendError::Endpoint(format!("endpoint {error}"))),
    }
}

/// reqwest's top-level message hides the cause ("error sending request").
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Exponential backoff with full jitter: a random wait in
/// `[0, min(cap, base × 2^attempt))`, so a fleet that lost ingest at once
/// does not come back in lockstep.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(cap);
    ceiling.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_cap_and_grows() {
        let cap = Duration::from_secs(10);
        for attempt in 0..40 {
            assert!(backoff(attempt, Duration::from_millis(500), cap) < cap);
        }
        let early: Duration = (0..200)
            .map(|_| backoff(0, Duration::from_millis(500), cap))
            .sum();
        let late: Duration = (0..200)
            .map(|_| backoff(6, Duration::from_millis(500), cap))
            .sum();
        assert!(late > early * 4, "{early:?} {late:?}");
    }

    #[test]
    fn an_attempt_never_outlasts_half_the_interval() {
        assert_eq!(
            attempt_timeout(Duration::from_secs(5)),
            Duration::from_millis(2500)
        );
        assert_eq!(attempt_timeout(Duration::from_secs(30)), REQUEST_TIMEOUT);
    }

    #[test]
    fn the_endpoint_follows_the_shared_transport_rule() {
        assert!(check_transport("http://127.0.0.1:8080/v1/heartbeats", false).is_ok());
        let error = check_transport("http://10.0.0.5/v1/heartbeats", false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--insecure-plain-http") && error.contains("replay heartbeats"),
            "{error}"
        );
        assert!(check_transport("http://10.0.0.5/v1/heartbeats", true).is_ok());
    }

    #[test]
    fn retryable_classes() {
        let refused = |status: u16, message: &str, code: &str| SendError::Refused {
            status,
            message: message.into(),
            code: code.into(),
        };
        assert!(SendError::Network("x".into()).is_retryable());
        assert!(refused(503, "", "store_unavailable").is_retryable());
        assert!(!refused(400, "", "bad_request").is_retryable());
        // The code decides, not the words.
        assert!(refused(401, "anything", "clock_skew").is_clock_skew());
        assert!(!refused(401, "clock skew: 400s", "unauthorized").is_clock_skew());
        assert!(refused(409, "", "stale").is_stale());
    }
}
