//! Heartbeat signing and verification (PROTOCOL.md §1, "Keys" and "Signature").
//!
//! Ingest holds fleet secrets; each agent holds only the key derived from one
//! of them for its own id, so a stolen agent key impersonates that agent only.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Agent keys are the full HMAC-SHA256 output.
pub const AGENT_KEY_LEN: usize = 32;
/// Fleet secrets shorter than this are refused: they would be guessable.
pub const MIN_FLEET_SECRET_LEN: usize = 32;
/// The protocol's clock-skew window.
pub const MAX_SKEW_S: i64 = 300;

pub const HEADER_AGENT: &str = "x-rollcall-agent";
pub const HEADER_KEY_ID: &str = "x-rollcall-key-id";
pub const HEADER_TIMESTAMP: &str = "x-rollcall-timestamp";
pub const HEADER_SIGNATURE: &str = "x-rollcall-signature";

const SIGNATURE_PREFIX: &str = "v1=";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{what} is not lowercase hex")]
    NotHex { what: &'static str },
    #[error("{what} must be at least {min} bytes ({} hex digits), got {got} bytes", min * 2)]
    TooShort {
        what: &'static str,
        min: usize,
        got: usize,
    },
    #[error("{what} must be exactly {len} bytes ({} hex digits), got {got} bytes", len * 2)]
    WrongLength {
        what: &'static str,
        len: usize,
        got: usize,
    },
}

/// A fleet secret: the root from which agent keys are derived.
#[derive(Clone)]
pub struct FleetSecret(Vec<u8>);

impl FleetSecret {
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        Self::from_bytes(decode_lower_hex(text.trim(), "fleet secret")?)
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, KeyError> {
        if bytes.len() < MIN_FLEET_SECRET_LEN {
            return Err(KeyError::TooShort {
                what: "fleet secret",
                min: MIN_FLEET_SECRET_LEN,
                got: bytes.len(),
            });
        }
        Ok(Self(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    /// `agent_key = HMAC-SHA256(fleet_secret, "rollcall-agent-key\n" + agent_id)`.
    pub fn derive_agent_key(&self, agent_id: &str) -> AgentKey {
        let mut mac = new_mac(&self.0);
        mac.update(b"rollcall-agent-key\n");
        mac.update(agent_id.as_bytes());
        AgentKey(mac.finalize().into_bytes().into())
    }
}

impl std::fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetSecret(<redacted>)")
    }
}

/// The key one agent signs with.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentKey([u8; AGENT_KEY_LEN]);

impl AgentKey {
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let bytes = decode_lower_hex(text.trim(), "agent key")?;
        let got = bytes.len();
        let array: [u8; AGENT_KEY_LEN] = bytes.try_into().map_err(|_| KeyError::WrongLength {
            what: "agent key",
            len: AGENT_KEY_LEN,
            got,
        })?;
        Ok(Self(array))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// `hex(HMAC-SHA256(agent_key, string_to_sign))`, without the `v1=` prefix.
    pub fn sign(&self, key_id: &str, agent_id: &str, timestamp: i64, body: &[u8]) -> String {
        hex::encode(
            self.mac(key_id, agent_id, timestamp, body)
                .finalize()
                .into_bytes(),
        )
    }

    /// The `X-Rollcall-Signature` header value.
    pub fn signature_header(
        &self,
        key_id: &str,
        agent_id: &str,
        timestamp: i64,
        body: &[u8],
    ) -> String {
        format!(
            "{SIGNATURE_PREFIX}{}",
            self.sign(key_id, agent_id, timestamp, body)
        )
    }

    /// Checks a signature (raw 32 bytes) in constant time.
    pub fn verify(
        &self,
        key_id: &str,
        agent_id: &str,
        timestamp: i64,
        body: &[u8],
        signature: &[u8; 32],
    ) -> bool {
        self.mac(key_id, agent_id, timestamp, body)
            .verify_slice(signature)
            .is_ok()
    }

    fn mac(&self, key_id: &str, agent_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        let mut mac = new_mac(&self.0);
        mac.update(string_to_sign(key_id, agent_id, timestamp, body).as_bytes());
        mac
    }
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKey(<redacted>)")
    }
}

/// The five lines of PROTOCOL.md §1 joined by `\n`, no trailing newline.
pub fn string_to_sign(key_id: &str, agent_id: &str, timestamp: i64, body: &[u8]) -> String {
    let body_hash = hex::encode(Sha256::digest(body));
    format!("rollcall-v1\n{key_id}\n{agent_id}\n{timestamp}\n{body_hash}")
}

/// Parses `v1=<64 lowercase hex>` into raw bytes; `None` if malformed.
pub fn parse_signature_header(value: &str) -> Option<[u8; 32]> {
    let digits = value.strip_prefix(SIGNATURE_PREFIX)?;
    if digits.len() != 64 {
        return None;
    }
    decode_lower_hex(digits, "signature").ok()?.try_into().ok()
}

// The id rules live in `names`; signing is where most callers met them.
pub use crate::names::{
    AGENT_ID_RULE, MAX_AGENT_ID_LEN, MAX_KEY_ID_LEN, id_rule, is_id_char, is_valid_agent_id,
    is_valid_id,
};

fn new_mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn decode_lower_hex(text: &str, what: &'static str) -> Result<Vec<u8>, KeyError> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(KeyError::NotHex { what });
    }
    hex::decode(text).map_err(|_| KeyError::NotHex { what })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published known-answer vector (README, "Signing test vector").
    /// Other implementations check themselves against these exact values.
    const VECTOR_SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const VECTOR_AGENT: &str = "lab-07";
    const VECTOR_KEY_ID: &str = "k1";
    const VECTOR_TIMESTAMP: i64 = 1764132000;
    const VECTOR_BODY: &[u8] = br#"{"v":1,"agent_id":"lab-07"}"#;

    #[test]
    fn known_answer_vector() {
        let secret = FleetSecret::from_hex(VECTOR_SECRET).unwrap();
        let key = secret.derive_agent_key(VECTOR_AGENT);
        let signature = key.sign(VECTOR_KEY_ID, VECTOR_AGENT, VECTOR_TIMESTAMP, VECTOR_BODY);
        assert_eq!(key.to_hex(), KNOWN_AGENT_KEY);
        assert_eq!(signature, KNOWN_SIGNATURE);
    }

    // Computed once with Python's hmac module (see README) and frozen here.
    const KNOWN_AGENT_KEY: &str =
        "d448e8e4083417b74d26bb8403268930d92f9edda246f9eacd4489899af06726";
    const KNOWN_SIGNATURE: &str =
        "5ddb87c107ffc4e919426521bd3ba24c8a9585004cf41e00669541dfd4d9bd82";

    #[test]
    fn string_to_sign_has_five_lines_and_no_trailing_newline() {
        let text = string_to_sign("k1", "a", 5, b"");
        assert_eq!(text.lines().count(), 5);
        assert!(!text.ends_with('\n'));
        assert!(text.ends_with("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    }

    #[test]
    fn verify_accepts_own_signature_and_rejects_any_change() {
        let key = FleetSecret::from_hex(VECTOR_SECRET)
            .unwrap()
            .derive_agent_key("a");
        let sig = parse_signature_header(&key.signature_header("k1", "a", 10, b"{}")).unwrap();
        assert!(key.verify("k1", "a", 10, b"{}", &sig));
        assert!(!key.verify("k2", "a", 10, b"{}", &sig));
        assert!(!key.verify("k1", "b", 10, b"{}", &sig));
        assert!(!key.verify("k1", "a", 11, b"{}", &sig));
        assert!(!key.verify("k1", "a", 10, b"{ }", &sig));
    }

    #[test]
    fn signature_header_must_be_v1_and_64_lowercase_hex() {
        let good = format!("v1={}", "ab".repeat(32));
        assert!(parse_signature_header(&good).is_some());
        assert!(parse_signature_header(&good.to_uppercase()).is_none());
        assert!(parse_signature_header(&format!("v2={}", "ab".repeat(32))).is_none());
        assert!(parse_signature_header(&format!("v1={}", "ab".repeat(31))).is_none());
        assert!(parse_signature_header(&format!("v1={}", "zz".repeat(32))).is_none());
    }

    #[test]
    fn short_or_malformed_secrets_are_refused() {
        assert!(matches!(
            FleetSecret::from_hex(&"ab".repeat(31)),
            Err(KeyError::TooShort { .. })
        ));
        assert!(matches!(
            FleetSecret::from_hex(&"AB".repeat(32)),
            Err(KeyError::NotHex { .. })
        ));
        assert!(matches!(
            AgentKey::from_hex(&"ab".repeat(33)),
            Err(KeyError::WrongLength { .. })
        ));
    }

    #[test]
    fn ids_follow_the_alphabet() {
        assert!(is_valid_id("lab-07.gpu_a", 64));
        assert!(!is_valid_id("", 64));
        assert!(!is_valid_id(&"a".repeat(65), 64));
        for bad in ["a/b", "..%2F", "a b", "é"] {
            assert!(!is_valid_id(bad, 64), "{bad}");
        }
        assert!(is_valid_agent_id("a..b") && is_valid_agent_id(".hidden"));
        assert!(!is_valid_agent_id("..") && !is_valid_agent_id("."));
    }
}
