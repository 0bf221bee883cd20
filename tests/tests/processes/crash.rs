//! Crashes lose nothing that was acknowledged: `kill -9` the local server
//! under steady signed load, restart it, and every heartbeat that had been
//! answered 202 is in the store. The collector, killed and restarted, keeps
//! its agent id and is online again at its next heartbeat.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollcall::signing::FleetSecret;
use rollcall::store::{Durability, SqliteStore, Store};
use rollcall::time::now_ms;
use rollcall_tests::{Server, Stack, heartbeat, now_s, request, try_raw_request, wait_until};

const AGENTS_PER_CLIENT: usize = 25;
const CLIENTS: usize = 8;

#[test]
fn acknowledged_heartbeats_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let db_arg = db.display().to_string();
    let secret = FleetSecret::from_bytes(vec![5; 32]).unwrap();
    let secrets = format!("k1={}", secret.to_hex());
    let mut server = Server::start(
        "rollcall-ingest",
        &["--db", &db_arg],
        &[("ROLLCALL_FLEET_SECRETS", &secrets)],
    );
    let addr = server.addr;

    let acknowledged: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (acknowledged, stop, secret) = (Arc::clone(&acknowledged), Arc::clone(&stop), secret.clone());
            let accepted = Arc::clone(&accepted);
            std::thread::spawn(move || {
                let mut sent = 0u64;
                let mut attempts = 0u64;
                while !stop.load(Ordering::Relaxed) && attempts < 100_000 {
                    attempts += 1;
                    let agent = format!("crash-{client}-{}", attempts as usize % AGENTS_PER_CLIENT);
                    sent += 1;
                    let body = heartbeat(&agent, 1_000_000 + sent).to_string();
                    let timestamp = now_s();
                    let signature = secret.derive_agent_key(&agent).signature_header("k1", &agent, timestamp, body.as_bytes());
                    let raw = format!(
                        "POST /v1/heartbeats HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nX-Rollcall-Agent: {agent}\r\nX-Rollcall-Key-Id: k1\r\n\
                         X-Rollcall-Timestamp: {timestamp}\r\nX-Rollcall-Signature: {signature}\r\n\r\n{body}",
                        body.len()
                    );
                    match try_raw_request(addr, raw.as_bytes(), Duration::from_secs(5)) {
                        Ok(response) if response.status == 202 => {
                            acknowledged.lock().unwrap().insert(agent, 1_000_000 + sent);
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(response) => panic!("unexpected {} {}", response.status, response.text()),
                        // The server is gone: nothing was acknowledged for this one.
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();

    // Let the load run, then kill the server without warning.
    let loaded = wait_until(Duration::from_secs(20), || {
        acknowledged.lock().unwrap().len() >= CLIENTS * AGENTS_PER_CLIENT
    });
    assert!(loaded.is_some(), "load never reached every agent");
    std::thread::sleep(Duration::from_millis(500));
    server.kill();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();

    // Restart on the same file; the store must hold every acknowledged heartbeat.
    let restarted = Server::start(
        "rollcall-ingest",
        &["--db", &db_arg],
        &[("ROLLCALL_FLEET_SECRETS", &secrets)],
    );
    assert_eq!(
        request(restarted.addr, "GET", "/healthz", &[], b"").status,
        200
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = SqliteStore::open(&db, Durability::Full).unwrap();
    let mut lost = Vec::new();
    for (agent, sent) in &acknowledged {
        let stored = runtime
            .block_on(store.get(agent, now_ms()))
            .unwrap()
            .map(|a| a.heartbeat.sent_at_ms);
        // Equal, or newer if the server committed a heartbeat whose answer never arrived.
        if stored.is_none_or(|stored| stored < *sent) {
            lost.push((agent.clone(), *sent, stored));
        }
    }
    println!(
        "kill -9 under load: {} heartbeats acknowledged for {} agents; the last acknowledged of each checked, {} lost",
        accepted.load(Ordering::Relaxed),
        acknowledged.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged heartbeats lost: {lost:?}");
}

#[test]
fn a_killed_collector_keeps_its_id_and_comes_back_online() {
    let stack = Stack::start();
    let state = stack.dir.path().join("collector-state");
    let run = |args: &[&str], agent_key: Option<&str>| {
        let mut command = stack.collector("unused");
        command
            .env_remove("ROLLCALL_AGENT_ID")
            .env("ROLLCALL_STATE_DIR", &state)
            .args(args);
        if let Some(key) = agent_key {
            command.env("ROLLCALL_AGENT_KEY", key);
        }
        command
    };
    // The id this host gets, generated once and kept.
    let printed = run(&["print", "--skip-cpu-usage"], None).output().unwrap();
    let body: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    let agent_id = body["agent_id"].as_str().unwrap().to_owned();
    let key = stack.agent_key(&agent_id).to_hex();

    let spawn = || {
        run(&["run", "--interval", "1"], Some(&key))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    let online = wait_until(Duration::from_secs(10), || {
        stack
            .agent(&agent_id)
            .is_some_and(|a| a["status"] == "online")
    });
    assert!(online.is_some());
    first.kill().unwrap(); // SIGKILL: no leaving heartbeat
    first.wait().unwrap();
    let before = stack.agent(&agent_id).unwrap()["sent_at_ms"]
        .as_u64()
        .unwrap();

    let mut second = spawn();
    let newer = wait_until(Duration::from_secs(10), || {
        stack
            .agent(&agent_id)
            .is_some_and(|a| a["sent_at_ms"].as_u64().unwrap() > before && a["status"] == "online")
    });
    second.kill().unwrap();
    second.wait().unwrap();
    assert!(
        newer.is_some(),
        "the restarted collector did not report as {agent_id}"
    );
    let listed = stack.get("/v1/agents?status=all").json();
    assert_eq!(
        listed["agents"].as_array().unwrap().len(),
        1,
        "a restart must not create a second agent"
    );
}
