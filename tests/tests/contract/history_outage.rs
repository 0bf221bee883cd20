//! PROTOCOL.md §3, "extensions never block liveness", on both stores: the
//! agent record is written first; history only after that write succeeded;
//! a history store that fails still answers 202, says so, and the agent
//! stays online; the history arrives once the failure ends; a stale
//! heartbeat stores no history at all.

use std::sync::Arc;

use rollcall::record::Deadlines;
use rollcall::signing::FleetSecret;
use rollcall::store::Store;
use rollcall::verify::Keyring;
use rollcall_ingest::keys::KeySource;
use rollcall_ingest::{Ingest, router};
use rollcall_tests::faults::HistoryOutage;
use rollcall_tests::inprocess::{InProcess, request};
use rollcall_tests::{KEY_ID, heartbeat, now_ms, signed_heartbeat};
use serde_json::{Value, json};

async fn post(server: &InProcess, secret: &FleetSecret, body: &Value) -> rollcall_tests::Response {
    let (headers, bytes) = signed_heartbeat(secret, KEY_ID, body);
    request(server.addr, "POST", "/v1/heartbeats".into(), headers, bytes).await
}

fn with_history(agent_id: &str, sent_at_ms: u64, minutes: &[u64]) -> Value {
    let spread = json!({"min": 0.5, "avg": 1.0, "max": 1.5});
    let mut body = heartbeat(agent_id, sent_at_ms);
    body["history"] = minutes
        .iter()
        .map(|minute| json!({"minute": minute, "load_1m": spread, "memory_available_mb": spread}))
        .collect();
    body
}

/// Ingest in this process over `store` behind a switchable fault, with the
/// fleet secret it knows.
async fn serve(store: Arc<dyn Store>) -> (InProcess, Arc<HistoryOutage>, FleetSecret) {
    let outage = HistoryOutage::new(store);
    let secret = FleetSecret::from_bytes(vec![7; 32]).unwrap();
    let mut keyring = Keyring::default();
    keyring.insert(KEY_ID, secret.clone());
    let ingest = Ingest {
        keyring: KeySource::fixed(keyring),
        deadlines: Deadlines::default(),
        history_retention_s: 24 * 3600,
        store: outage.clone(),
    };
    (
        InProcess::serve(router(Arc::new(ingest))).await,
        outage,
        secret,
    )
}

async fn history_outage_never_blocks_liveness(store: Arc<dyn Store>) {
    let (server, outage, secret) = serve(store).await;
    let agent = "history-outage";
    let now = now_ms();
    let minute = now / 60_000;
    let (early, late) = (minute - 3, minute - 2);

    outage.set_failing(true);
    let answer = post(
        &server,
        &secret,
        &with_history(agent, now - 2_000, &[early, late]),
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert_eq!(
        answer.json()["not_stored"],
        json!(["history"]),
        "{}",
        answer.text()
    );
    let stored = outage
        .get(agent, now_ms() as i64)
        .await
        .unwrap()
        .expect("agent recorded");
    assert!(
        stored.is_online(now_ms() as i64),
        "a history outage must not take the agent offline"
    );
    assert!(
        outage
            .history(agent, minute - 30, now_ms() as i64)
            .await
            .unwrap()
            .is_empty()
    );

    // Still failing: the next heartbeat is recorded too.
    let answer = post(
        &server,
        &secret,
        &with_history(agent, now - 1_000, &[early, late]),
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert_eq!(
        outage
            .get(agent, now_ms() as i64)
            .await
            .unwrap()
            .unwrap()
            .heartbeat
            .sent_at_ms,
        now - 1_000
    );

    // Healthy again. A stale heartbeat (older than the stored one) stores no history.
    outage.set_failing(false);
    let stale = post(
        &server,
        &secret,
        &with_history(agent, now - 1_500, &[minute - 4]),
    )
    .await;
    assert_eq!(stale.status, 409, "{}", stale.text());
    assert!(
        outage
            .history(agent, minute - 30, now_ms() as i64)
            .await
            .unwrap()
            .is_empty(),
        "a stale heartbeat stored history"
    );

    // The collector sends what was not stored again, and now it is.
    let answer = post(&server, &secret, &with_history(agent, now, &[early, late])).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert!(
        answer.json().get("not_stored").is_none(),
        "{}",
        answer.text()
    );
    let minutes: Vec<u64> = outage
        .history(agent, 0, now_ms() as i64)
        .await
        .unwrap()
        .iter()
        .map(|rollup| rollup.minute)
        .collect();
    assert_eq!(minutes, [early, late]);
    server.stop().await;
}

/// issue "Hardening, third pass" item 3: one heartbeat's history touches a
/// bounded number of windows, and a slow history store never holds the
/// answer past ingest's budget: the heartbeat is 202 either way, history
/// reported not stored.
async fn history_is_bounded_in_windows_and_in_time(store: Arc<dyn Store>) {
    let (server, outage, secret) = serve(store).await;
    let now = now_ms();
    let minute = now / 60_000;

    // 30 minutes half an hour apart: 30 windows, over 14 hours.
    let spread: Vec<u64> = (0..30).rev().map(|n| minute - 1 - 30 * n).collect();
    let answer = post(&server, &secret, &with_history("spread", now, &spread)).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert_eq!(
        answer.json()["not_stored"],
        json!(["history"]),
        "{}",
        answer.text()
    );
    let stored: Vec<u64> = outage
        .history("spread", 0, now_ms() as i64)
        .await
        .unwrap()
        .iter()
        .map(|rollup| rollup.minute)
        .collect();
    let newest = &spread[spread.len() - rollcall::history::MAX_WINDOWS_PER_HEARTBEAT..];
    assert_eq!(stored, newest, "the newest windows are written");
    assert!(
        outage
            .get("spread", now_ms() as i64)
            .await
            .unwrap()
            .is_some()
    );

    // A store that takes 30 s: the answer comes within the budget.
    outage.set_slow(std::time::Duration::from_secs(30));
    let started = std::time::Instant::now();
    let answer = post(&server, &secret, &with_history("slow", now, &[minute - 1])).await;
    let took = started.elapsed();
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert_eq!(
        answer.json()["not_stored"],
        json!(["history"]),
        "{}",
        answer.text()
    );
    assert!(
        took < std::time::Duration::from_secs(4),
        "answered after {took:?}"
    );
    assert!(outage.get("slow", now_ms() as i64).await.unwrap().is_some());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_history_is_bounded_in_windows_and_in_time() {
    let backend = rollcall_tests::sqlite_backend().await;
    history_is_bounded_in_windows_and_in_time(Arc::clone(&backend.store)).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn dynamodb_history_is_bounded_in_windows_and_in_time() {
    let backend = rollcall_tests::dynamodb_backend().await;
    history_is_bounded_in_windows_and_in_time(Arc::clone(&backend.store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_history_outage_never_blocks_liveness() {
    let backend = rollcall_tests::sqlite_backend().await;
    history_outage_never_blocks_liveness(Arc::clone(&backend.store)).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn dynamodb_history_outage_never_blocks_liveness() {
    let backend = rollcall_tests::dynamodb_backend().await;
    history_outage_never_blocks_liveness(Arc::clone(&backend.store)).await;
}
