//! A 10-second run of the fleet simulator against the local stack: every
//! heartbeat accepted, no 5xx, and each agent's last acknowledged heartbeat
//! is the one stored.

use std::process::Command;

use rollcall_tests::{Stack, binary};

#[test]
fn ten_seconds_of_simulated_fleet_lose_nothing() {
    let stack = Stack::start();
    let output = Command::new(binary("rollcall-loadgen"))
        .args([
            "--ingest",
            &stack.ingest.url(),
            "--query",
            &stack.query.url(),
        ])
        .args([
            "--agents",
            "2000",
            "--interval-s",
            "2",
            "--duration-s",
            "10",
            "--connections",
            "16",
            "--json",
        ])
        .env("ROLLCALL_FLEET_SECRET", stack.secret.to_hex())
        .env("ROLLCALL_QUERY_TOKEN", &stack.token)
        .output()
        .expect("run rollcall-loadgen");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON summary");
    println!("{summary}");
    assert_eq!(summary["server_errors"], 0);
    assert_eq!(summary["loss_check"]["lost"], 0);
    assert_eq!(summary["loss_check"]["agents_checked"], 2000);
    // 2,000 agents every ~2 s for 10 s: about 10,000 heartbeats, all accepted.
    let accepted = summary["accepted"].as_u64().unwrap();
    assert!(accepted >= 8_000, "{summary}");
    assert_eq!(
        summary["requests"].as_u64().unwrap(),
        accepted,
        "every request accepted: {summary}"
    );
}
