//! Ingest's checks on arbitrary requests: header parsing, signature
//! verification and body parsing. With the first byte even, the request is
//! signed correctly, so that the body parser sees arbitrary bodies too.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use rollcall::heartbeat::Heartbeat;
use rollcall::signing::{FleetSecret, HEADER_AGENT, HEADER_KEY_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use rollcall::verify::Keyring;

const NOW_S: i64 = 1_764_132_000;
static SECRET: LazyLock<FleetSecret> = LazyLock::new(|| FleetSecret::from_bytes(vec![7; 32]).unwrap());
static KEYRING: LazyLock<Keyring> = LazyLock::new(|| {
    let mut keyring = Keyring::default();
    keyring.insert("k1", SECRET.clone());
    keyring
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut parts = rest.splitn(5, |byte| *byte == 0);
    let agent = parts.next().unwrap_or_default();
    let key_id = parts.next().unwrap_or_default();
    let timestamp = parts.next().unwrap_or_default();
    let signature = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();

    let (key_id, timestamp, signature) = if mode % 2 == 0 {
        let agent_text = String::from_utf8_lossy(agent);
        let valid = SECRET.derive_agent_key(&agent_text).signature_header("k1", &agent_text, NOW_S, body);
        (b"k1".to_vec(), NOW_S.to_string().into_bytes(), valid.into_bytes())
    } else {
        (key_id.to_vec(), timestamp.to_vec(), signature.to_vec())
    };
    let headers = [
        (HEADER_AGENT, agent.to_vec()),
        (HEADER_KEY_ID, key_id),
        (HEADER_TIMESTAMP, timestamp),
        (HEADER_SIGNATURE, signature),
    ];
    let lookup = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_slice());
    if let Ok(heartbeat) = KEYRING.verify(lookup, body, NOW_S) {
        // Whatever passes must be a body the checks accept on their own too.
        assert!(heartbeat.validate().is_ok());
        assert_eq!(heartbeat.agent_id.as_bytes(), agent);
    }
    if let Ok(heartbeat) = Heartbeat::parse(rest) {
        // A parsed body re-serialises to one that parses to the same thing.
        let again = Heartbeat::parse(&serde_json::to_vec(&heartbeat).unwrap()).unwrap();
        assert_eq!(again, heartbeat);
    }
});
