//! Key rotation as SECURITY.md describes it: add the new fleet secret beside
//! the old one, re-key collectors, retire the old one. Query tokens rotate the
//! same way.

use std::path::Path;

use rollcall::signing::{AgentKey, FleetSecret};
use rollcall_tests::{Server, heartbeat, now_ms, now_s, request};

/// Ingest (re)started on `db` with `secrets` as ROLLCALL_FLEET_SECRETS holds them.
fn ingest(db: &Path, secrets: &str) -> Server {
    Server::ingest_in_process(db, secrets)
}

fn send(server: &Server, key_id: &str, secret: &FleetSecret, agent: &str) -> (u16, String) {
    send_signed(server, key_id, &secret.derive_agent_key(agent), agent)
}

/// A heartbeat for `agent`, signed with whatever key is given.
fn send_signed(server: &Server, key_id: &str, key: &AgentKey, agent: &str) -> (u16, String) {
    let body = heartbeat(agent, now_ms()).to_string();
    let timestamp = now_s();
    let signature = key.signature_header(key_id, agent, timestamp, body.as_bytes());
    let timestamp = timestamp.to_string();
    let response = request(
        server.addr,
        "POST",
        "/v1/heartbeats",
        &[
            ("Content-Type", "application/json"),
            ("X-Rollcall-Agent", agent),
            ("X-Rollcall-Key-Id", key_id),
            ("X-Rollcall-Timestamp", &timestamp),
            ("X-Rollcall-Signature", &signature),
        ],
        body.as_bytes(),
    );
    let error = if response.status == 202 {
        String::new()
    } else {
        response.error()
    };
    (response.status, error)
}

#[test]
fn fleet_secrets_rotate_without_downtime_and_the_old_one_stops_working() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rotation.db");
    let old = FleetSecret::from_bytes(vec![1; 32]).unwrap();
    let new = FleetSecret::from_bytes(vec![2; 32]).unwrap();

    // 1. Only A.
    let server = ingest(&db, &format!("A={}", old.to_hex()));
    assert_eq!(send(&server, "A", &old, "gpu-01").0, 202);
    assert_eq!(send(&server, "B", &new, "gpu-01").0, 401);
    drop(server);

    // 2. A and B together: collectors move over one by one.
    let server = ingest(&db, &format!("A={},B={}", old.to_hex(), new.to_hex()));
    assert_eq!(send(&server, "A", &old, "gpu-01").0, 202);
    assert_eq!(send(&server, "B", &new, "gpu-02").0, 202);
    assert_eq!(send(&server, "B", &new, "gpu-01").0, 202);
    drop(server);

    // 3. A retired: its keys are refused, B's still work.
    let server = ingest(&db, &format!("B={}", new.to_hex()));
    let (status, error) = send(&server, "A", &old, "gpu-01");
    assert_eq!(status, 401);
    assert!(error.contains("unknown key id \"A\""), "{error}");
    assert_eq!(send(&server, "B", &new, "gpu-01").0, 202);

    // A key derived for one agent does not sign for another, under any key id.
    let stolen = new.derive_agent_key("gpu-01");
    assert_eq!(send_signed(&server, "B", &stolen, "gpu-02").0, 401);
}

#[test]
fn query_tokens_rotate_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tokens.db");
    let (old, new) = ("old-token-0123456789abcdef", "new-token-0123456789abcdef");
    let status = |server: &Server, token: &str| {
        request(
            server.addr,
            "GET",
            "/v1/agents",
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        )
        .status
    };

    let both = Server::query_in_process(&db, &format!("{old},{new}"));
    assert_eq!(status(&both, old), 200);
    assert_eq!(status(&both, new), 200);
    drop(both);

    let only_new = Server::query_in_process(&db, new);
    assert_eq!(status(&only_new, old), 401);
    assert_eq!(status(&only_new, new), 200);
}
