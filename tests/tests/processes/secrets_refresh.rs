//! A slow Secrets Manager never holds a request: a stale secret is served
//! while its refresh runs in the background, each fetch is given up after a
//! short budget, and the new value arrives once Secrets Manager answers
//! again (issue "Hardening, third pass" item 2).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rollcall::secrets::{EARLY_WAIT, FETCH_BUDGET, Secret};
use rollcall_tests::iam::secrets_client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A proxy to the emulator that, while `stalled`, holds every request back,
/// as a Secrets Manager that has stopped answering does.
async fn stalling_proxy(stalled: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let upstream = rollcall_tests::emulator_endpoint()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (stalled, upstream) = (Arc::clone(&stalled), upstream.clone());
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                // Requests go up only while not stalled, on pooled
                // connections too; answers come back as they are.
                let up = async move {
                    let mut buffer = vec![0u8; 16 * 1024];
                    loop {
                        let read = client_read.read(&mut buffer).await.unwrap_or(0);
                        if read == 0 {
                            return;
                        }
                        while stalled.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        if server_write.write_all(&buffer[..read]).await.is_err() {
                            return;
                        }
                    }
                };
                let down = tokio::io::copy(&mut server_read, &mut client_write);
                let _ = tokio::join!(up, down);
            });
        }
    });
    format!("http://{address}")
}

fn proxied_client(endpoint: &str) -> aws_sdk_secretsmanager::Client {
    let config = secrets_client(None)
        .config()
        .to_builder()
        .endpoint_url(endpoint)
        .build();
    aws_sdk_secretsmanager::Client::from_conf(config)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn a_slow_secrets_manager_never_holds_a_request() {
    let name = rollcall_tests::unique_table("slow-secret");
    let admin = secrets_client(None);
    admin
        .create_secret()
        .name(&name)
        .secret_string("first")
        .send()
        .await
        .unwrap();
    let stalled = Arc::new(AtomicBool::new(false));
    let endpoint = stalling_proxy(Arc::clone(&stalled)).await;
    let secret = Secret::fetch(
        proxied_client(&endpoint),
        &name,
        |text| Ok(text.to_owned()),
        Duration::from_secs(1),
        Duration::from_secs(1),
    )
    .await
    .expect("first fetch through the proxy");
    assert_eq!(*secret.current().await, "first");

    stalled.store(true, Ordering::SeqCst);
    admin
        .put_secret_value()
        .secret_id(&name)
        .secret_string("second")
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Stale, and Secrets Manager silent: the value in hand, at once.
    let started = Instant::now();
    assert_eq!(*secret.current().await, "first");
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    // An early refresh waits at most EARLY_WAIT, and gets nothing new.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    assert!(!secret.refresh_early().await);
    let waited = started.elapsed();
    assert!(
        waited <= EARLY_WAIT + Duration::from_millis(300),
        "{waited:?}"
    );
    assert_eq!(*secret.current().await, "first");

    // Secrets Manager answers again: the new value arrives without a restart.
    stalled.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + FETCH_BUDGET + Duration::from_secs(8);
    loop {
        if *secret.current().await == "second" {
            break;
        }
        assert!(Instant::now() < deadline, "the new value never arrived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The cursor key is refreshed like the other secrets, and a cursor sealed
/// with the key before a rotation still opens (issue "Hardening, third
/// pass" item 8): a scheduler paging through the fleet is not cut off.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn a_rotated_cursor_key_takes_over_without_cutting_a_paging_client_off() {
    use rollcall::heartbeat::Heartbeat;
    use rollcall::record::{Deadlines, StoredAgent};
    use rollcall_tests::inprocess::{InProcess, request};

    const TOKEN: &str = "cursor-rotation-token-0123";
    let name = rollcall_tests::unique_table("cursor-key");
    let admin = secrets_client(None);
    let first_key = "a".repeat(64);
    admin
        .create_secret()
        .name(&name)
        .secret_string(&first_key)
        .send()
        .await
        .unwrap();
    let key = Secret::fetch(
        secrets_client(None),
        &name,
        rollcall::capacity::CursorSealer::parse_key,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let backend = rollcall_tests::sqlite_backend().await;
    let now = rollcall_tests::now_ms();
    for agent in ["cursor-a", "cursor-b", "cursor-c"] {
        let body = rollcall_tests::heartbeat(agent, now).to_string();
        let heartbeat = Heartbeat::parse(body.as_bytes()).unwrap();
        backend
            .store
            .upsert(StoredAgent::accept(
                heartbeat,
                now as i64,
                Deadlines::default(),
            ))
            .await
            .unwrap();
    }
    let tokens = rollcall_query::Tokens::parse(TOKEN).unwrap();
    let api = rollcall_query::QueryApi::new(Secret::fixed(tokens), key, Arc::clone(&backend.store));
    let server = InProcess::serve(rollcall_query::router(Arc::new(api))).await;
    let page = |cursor: Option<String>| {
        let path = match cursor {
            Some(cursor) => format!("/v1/agents?limit=1&cursor={cursor}"),
            None => "/v1/agents?limit=1".to_owned(),
        };
        let auth = vec![("Authorization".to_owned(), format!("Bearer {TOKEN}"))];
        async move { request(server.addr, "GET", path, auth, Vec::new()).await }
    };
    let first = page(None).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let old_cursor = first.json()["next_cursor"].as_str().unwrap().to_owned();

    admin
        .put_secret_value()
        .secret_id(&name)
        .secret_string("b".repeat(64))
        .send()
        .await
        .unwrap();
    // Past the max age: the next requests refresh in the background and
    // then seal with the new key.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let new_cursor = loop {
        let second = page(Some(old_cursor.clone())).await;
        assert_eq!(
            second.status,
            200,
            "the old cursor still opens: {}",
            second.text()
        );
        let cursor = second.json()["next_cursor"].as_str().unwrap().to_owned();
        if cursor != old_cursor && page(Some(cursor.clone())).await.status == 200 {
            // Sealed with the new key: the old key alone would not open it.
            let old_only = rollcall::capacity::CursorSealer::new(first_key.as_bytes());
            let query = rollcall::capacity::CapacityQuery::from_query_string("limit=1").unwrap();
            if old_only.open(&cursor, &query).is_err() {
                break cursor;
            }
        }
        assert!(Instant::now() < deadline, "the new key never took over");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let third = page(Some(new_cursor)).await;
    assert_eq!(third.status, 200, "{}", third.text());
    assert_eq!(third.json()["agents"].as_array().unwrap().len(), 1);
    server.stop().await;
}
