//! The ingest checks of PROTOCOL.md §1, in order, free of any HTTP framework
//! so that the Lambda and local paths, tests and fuzzers all run the same code.

use std::collections::HashMap;

use crate::heartbeat::{Heartbeat, MAX_BODY_BYTES};
use crate::signing::{
    AGENT_ID_RULE, FleetSecret, HEADER_AGENT, HEADER_KEY_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP,
    KeyError, MAX_KEY_ID_LEN, MAX_SKEW_S, id_rule, is_valid_agent_id, is_valid_id,
    parse_signature_header,
};

/// Why a heartbeat was refused; each maps to one status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("content type must be application/json, got {0}")]
    UnsupportedMediaType(String),
    #[error("body is larger than {MAX_BODY_BYTES} bytes")]
    PayloadTooLarge,
    #[error("{0}")]
    Unauthorized(String),
    /// A key id this keyring does not hold: a rotated secret not fetched
    /// yet, or a made-up one. Ingest refreshes its secrets early only for a
    /// request inside the clock window, so that an old or made-up request
    /// cannot choose when Secrets Manager is called.
    #[error("unknown key id {key_id:?} in X-Rollcall-Key-Id")]
    UnknownKeyId {
        key_id: String,
        in_clock_window: bool,
    },
    #[error("{0}")]
    ClockSkew(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "stale heartbeat: sent_at_ms {sent_at_ms} is not newer than the stored one (replayed or reordered)"
    )]
    Stale { sent_at_ms: u64 },
}

impl Rejection {
    pub fn status(&self) -> u16 {
        match self {
            Rejection::UnsupportedMediaType(_) => 415,
            Rejection::PayloadTooLarge => 413,
            Rejection::Unauthorized(_)
            | Rejection::UnknownKeyId { .. }
            | Rejection::ClockSkew(_) => 401,
            Rejection::BadRequest(_) => 400,
            Rejection::Stale { .. } => 409,
        }
    }

    /// The stable code the answer carries (`rollcall::wire::code`).
    pub fn code(&self) -> &'static str {
        use crate::wire::code;
        match self {
            Rejection::ClockSkew(_) => code::CLOCK_SKEW,
            _ => code::for_status(self.status()),
        }
    }
}

/// The fleet secrets ingest accepts, by key id (two at once during rotation).
#[derive(Clone, Debug, Default)]
pub struct Keyring {
    secrets: HashMap<String, FleetSecret>,
}

impl Keyring {
    /// Parses `kid=hex,kid2=hex`.
    pub fn parse(text: &str) -> Result<Self, KeyringError> {
        let mut keyring = Keyring::default();
        for (number, entry) in text
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .enumerate()
            .map(|(index, entry)| (index + 1, entry))
        {
            let (key_id, secret) = entry.split_once('=').ok_or(KeyringError::Entry(number))?;
            if !is_valid_id(key_id, MAX_KEY_ID_LEN) {
                return Err(KeyringError::KeyId(number));
            }
            let secret = FleetSecret::from_hex(secret).map_err(|source| KeyringError::Secret {
                key_id: key_id.to_owned(),
                source,
            })?;
            if keyring.secrets.insert(key_id.to_owned(), secret).is_some() {
                return Err(KeyringError::Duplicate(key_id.to_owned()));
            }
        }
        if keyring.secrets.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(keyring)
    }

    pub fn insert(&mut self, key_id: &str, secret: FleetSecret) {
        self.secrets.insert(key_id.to_owned(), secret);
    }

    pub fn knows(&self, key_id: &str) -> bool {
        self.secrets.contains_key(key_id)
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.secrets.keys().map(String::as_str)
    }

    /// PROTOCOL.md §1 checks 1 (headers) to 3, given the request's headers
    /// (looked up by lowercase name), its body and the server clock.
    pub fn verify<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h [u8]>,
        body: &[u8],
        now_s: i64,
    ) -> Result<Heartbeat, Rejection> {
        let headers = SignedHeaders::parse(header)?;
        let secret = self
            .secrets
            .get(&headers.key_id)
            .ok_or_else(|| Rejection::UnknownKeyId {
                key_id: headers.key_id.clone(),
                in_clock_window: headers.timestamp.saturating_sub(now_s).abs() <= MAX_SKEW_S,
            })?;
        let agent_key = secret.derive_agent_key(&headers.agent_id);
        if !agent_key.verify(
            &headers.key_id,
            &headers.agent_id,
            headers.timestamp,
            body,
            &headers.signature,
        ) {
            return Err(Rejection::Unauthorized(
                "signature does not match (wrong agent key, or body altered)".into(),
            ));
        }
        let skew = headers.timestamp.saturating_sub(now_s);
        if skew.abs() > MAX_SKEW_S {
            let direction = if skew > 0 { "ahead of" } else { "behind" };
            return Err(Rejection::ClockSkew(format!(
                "clock skew: X-Rollcall-Timestamp is {}s {direction} the server clock (allowed ±{MAX_SKEW_S}s); fix the agent's clock",
                skew.unsigned_abs()
            )));
        }
        let heartbeat = Heartbeat::parse(body)
            .map_err(|error| Rejection::BadRequest(format!("invalid body: {error}")))?;
        // A key holder could otherwise park sent_at_ms far ahead and lock the
        // real collector out with 409s until the record expires.
        let latest_ms = now_s.saturating_add(MAX_SKEW_S).saturating_mul(1000);
        if i64::try_from(heartbeat.sent_at_ms).unwrap_or(i64::MAX) > latest_ms {
            return Err(Rejection::BadRequest(format!(
                "sent_at_ms: {} is more than {MAX_SKEW_S}s ahead of the server clock",
                heartbeat.sent_at_ms
            )));
        }
        if heartbeat.agent_id != headers.agent_id {
            return Err(Rejection::BadRequest(format!(
                "agent_id: body says {:?} but X-Rollcall-Agent says {:?}",
                heartbeat.agent_id, headers.agent_id
            )));
        }
        Ok(heartbeat)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("no fleet secrets given (expected kid=hex,...)")]
    Empty,
    #[error("fleet secret entry {0} is not kid=hex")]
    Entry(usize),
    /// Names the entry by its place, not its text: a secret given in the
    /// wrong order (`<hex>=k1`) would otherwise be logged whole.
    #[error("fleet secret entry {0}: the key id {rule}", rule = id_rule(MAX_KEY_ID_LEN))]
    KeyId(usize),
    #[error("key id {0:?} given twice")]
    Duplicate(String),
    #[error("fleet secret for key id {key_id:?}: {source}")]
    Secret { key_id: String, source: KeyError },
}

/// The four signing headers, well formed.
struct SignedHeaders {
    agent_id: String,
    key_id: String,
    timestamp: i64,
    signature: [u8; 32],
}

impl SignedHeaders {
    fn parse<'h>(header: impl Fn(&str) -> Option<&'h [u8]>) -> Result<Self, Rejection> {
        let text = |name: &str, display: &str| -> Result<&'h str, Rejection> {
            let value = header(name)
                .ok_or_else(|| Rejection::Unauthorized(format!("missing header {display}")))?;
            std::str::from_utf8(value).map_err(|_| {
                Rejection::Unauthorized(format!("malformed header {display}: not ASCII"))
            })
        };
        let agent_id = text(HEADER_AGENT, "X-Rollcall-Agent")?;
        if !is_valid_agent_id(agent_id) {
            return Err(Rejection::Unauthorized(format!(
                "malformed header X-Rollcall-Agent: {AGENT_ID_RULE}"
            )));
        }
        let key_id = text(HEADER_KEY_ID, "X-Rollcall-Key-Id")?;
        if !is_valid_id(key_id, MAX_KEY_ID_LEN) {
            return Err(Rejection::Unauthorized(format!(
                "malformed header X-Rollcall-Key-Id: {}",
                id_rule(MAX_KEY_ID_LEN)
            )));
        }
        let timestamp_text = text(HEADER_TIMESTAMP, "X-Rollcall-Timestamp")?;
        let timestamp = timestamp_text
            .parse::<i64>()
            .ok()
            .filter(|_| {
                !timestamp_text.is_empty() && timestamp_text.bytes().all(|b| b.is_ascii_digit())
            })
            .ok_or_else(|| {
                Rejection::Unauthorized(
                    "malformed header X-Rollcall-Timestamp: must be whole Unix seconds".into(),
                )
            })?;
        let signature = parse_signature_header(text(HEADER_SIGNATURE, "X-Rollcall-Signature")?).ok_or_else(|| {
            Rejection::Unauthorized("malformed header X-Rollcall-Signature: must be v1= and 64 lowercase hex digits".into())
        })?;
        Ok(Self {
            agent_id: agent_id.to_owned(),
            key_id: key_id.to_owned(),
            timestamp,
            signature,
        })
    }
}

/// `application/json`, with or without parameters, case-insensitively.
pub fn is_json_content_type(value: Option<&[u8]>) -> bool {
    let Some(value) = value.and_then(|v| std::str::from_utf8(v).ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::tests::example;

    const SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const NOW: i64 = 1_764_132_000;

    fn keyring() -> Keyring {
        Keyring::parse(&format!("k1={SECRET}")).unwrap()
    }

    fn signed(body: &[u8], agent: &str, timestamp: i64) -> Vec<(String, Vec<u8>)> {
        let key = FleetSecret::from_hex(SECRET)
            .unwrap()
            .derive_agent_key(agent);
        vec![
            (HEADER_AGENT.into(), agent.as_bytes().to_vec()),
            (HEADER_KEY_ID.into(), b"k1".to_vec()),
            (HEADER_TIMESTAMP.into(), timestamp.to_string().into_bytes()),
            (
                HEADER_SIGNATURE.into(),
                key.signature_header("k1", agent, timestamp, body)
                    .into_bytes(),
            ),
        ]
    }

    fn check(headers: &[(String, Vec<u8>)], body: &[u8], now: i64) -> Result<Heartbeat, Rejection> {
        keyring().verify(
            |name| {
                headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_slice())
            },
            body,
            now,
        )
    }

    #[test]
    fn a_signed_example_is_accepted() {
        let body = example().to_string();
        let heartbeat = check(
            &signed(body.as_bytes(), "lab-07", NOW),
            body.as_bytes(),
            NOW,
        )
        .unwrap();
        assert_eq!(heartbeat.agent_id, "lab-07");
    }

    #[test]
    fn skew_is_checked_after_the_signature_and_says_how_much() {
        let body = example().to_string();
        let headers = signed(body.as_bytes(), "lab-07", NOW - 301);
        let Err(Rejection::ClockSkew(message)) = check(&headers, body.as_bytes(), NOW) else {
            panic!()
        };
        assert!(message.contains("301s behind"), "{message}");
        assert!(
            check(
                &signed(body.as_bytes(), "lab-07", NOW + 300),
                body.as_bytes(),
                NOW
            )
            .is_ok()
        );
        // A forged signature with a stale timestamp is reported as a bad signature.
        let mut forged = headers.clone();
        forged[3].1 = format!("v1={}", "0".repeat(64)).into_bytes();
        let Err(Rejection::Unauthorized(message)) = check(&forged, body.as_bytes(), NOW) else {
            panic!()
        };
        assert!(message.contains("signature"), "{message}");
    }

    #[test]
    fn each_header_is_named_when_missing() {
        let body = example().to_string();
        for (position, display) in [
            "X-Rollcall-Agent",
            "X-Rollcall-Key-Id",
            "X-Rollcall-Timestamp",
            "X-Rollcall-Signature",
        ]
        .iter()
        .enumerate()
        {
            let mut headers = signed(body.as_bytes(), "lab-07", NOW);
            headers.remove(position);
            let error = check(&headers, body.as_bytes(), NOW).unwrap_err();
            assert_eq!(error.status(), 401);
            assert!(error.to_string().contains(display), "{error}");
        }
    }

    #[test]
    fn sent_at_ms_may_not_run_ahead_of_the_server_clock() {
        let mut body = example();
        body["sent_at_ms"] = serde_json::json!((NOW + 301) * 1000);
        let body = body.to_string();
        let error = check(
            &signed(body.as_bytes(), "lab-07", NOW),
            body.as_bytes(),
            NOW,
        )
        .unwrap_err();
        assert_eq!(error.status(), 400);
        assert!(error.to_string().starts_with("sent_at_ms:"), "{error}");
    }

    #[test]
    fn header_and_body_agent_must_agree() {
        let body = example().to_string();
        let error = check(
            &signed(body.as_bytes(), "lab-08", NOW),
            body.as_bytes(),
            NOW,
        )
        .unwrap_err();
        assert_eq!(error.status(), 400);
        assert!(error.to_string().contains("agent_id"));
    }

    #[test]
    fn unknown_key_id_and_bad_keyrings() {
        let body = example().to_string();
        let mut headers = signed(body.as_bytes(), "lab-07", NOW);
        headers[1].1 = b"k9".to_vec();
        let error = check(&headers, body.as_bytes(), NOW).unwrap_err();
        assert!(
            error.to_string().contains("unknown key id \"k9\""),
            "{error}"
        );
        assert!(matches!(
            error,
            Rejection::UnknownKeyId {
                in_clock_window: true,
                ..
            }
        ));
        assert_eq!(
            (error.status(), error.code()),
            (401, crate::wire::code::UNAUTHORIZED)
        );
        // An old request for an unknown key id is no reason to call Secrets Manager.
        let error = check(&headers, body.as_bytes(), NOW + MAX_SKEW_S + 1).unwrap_err();
        assert!(matches!(
            error,
            Rejection::UnknownKeyId {
                in_clock_window: false,
                ..
            }
        ));
        assert!(Keyring::parse("").is_err());
        assert!(Keyring::parse("k1").is_err());
        assert!(Keyring::parse(&format!("k1={SECRET},k1={SECRET}")).is_err());
        assert!(Keyring::parse("k1=abcd").is_err());
        // A secret given in the wrong order is named by its place, never
        // echoed: the error reaches the logs.
        for wrong in [
            format!("k1={SECRET},{SECRET}=k2"),
            format!("k1={SECRET},{SECRET}"),
        ] {
            let error = Keyring::parse(&wrong).unwrap_err().to_string();
            assert!(error.contains("entry 2"), "{error}");
            assert!(!error.contains(&SECRET[..16]), "{error}");
        }
        assert_eq!(
            Keyring::parse(&format!("a={SECRET}, b={SECRET}"))
                .unwrap()
                .key_ids()
                .count(),
            2
        );
    }

    #[test]
    fn content_types() {
        assert!(is_json_content_type(Some(b"application/json")));
        assert!(is_json_content_type(Some(
            b"Application/JSON; charset=utf-8"
        )));
        assert!(!is_json_content_type(Some(b"text/plain")));
        assert!(!is_json_content_type(Some(b"application/jsonx")));
        assert!(!is_json_content_type(None));
    }
}
