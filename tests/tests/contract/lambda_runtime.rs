//! The compiled functions on their real Lambda code path: `lambda_http`
//! serving the axum routers, driven through a loopback Runtime API with
//! function-URL (payload 2.0) events, base64-encoded bodies included.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rollcall::signing::FleetSecret;
use rollcall_tests::runtime_api::{Outcome, RuntimeApi, http_event, response_body};
use rollcall_tests::{binary, heartbeat, now_ms, now_s};

const TOKEN: &str = "harness-token-0123456789";

struct Function {
    child: Child,
    started: Instant,
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(name: &str, api: &RuntimeApi, env: &[(&str, String)]) -> Function {
    let mut command = Command::new(binary(name));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_LAMBDA_RUNTIME_API", api.addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", name)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_REGION", "us-east-1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let started = Instant::now();
    Function {
        child: command.spawn().expect("start bootstrap"),
        started,
    }
}

fn status(outcome: &Outcome) -> u64 {
    assert_eq!(
        outcome.kind, "response",
        "function reported an error: {}",
        outcome.body
    );
    outcome.body["statusCode"].as_u64().expect("statusCode")
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[test]
fn ingest_and_query_answer_function_url_events() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lambda.db").display().to_string();
    let secret = FleetSecret::from_bytes(vec![9; 32]).unwrap();
    let store = [("ROLLCALL_STORE", "sqlite".to_owned()), ("ROLLCALL_DB", db)];

    let ingest_api = RuntimeApi::start();
    let mut ingest_env = store.to_vec();
    ingest_env.push(("ROLLCALL_FLEET_SECRETS", format!("k1={}", secret.to_hex())));
    let ingest = start("rollcall-ingest", &ingest_api, &ingest_env);

    let health = ingest_api.invoke(http_event("GET", "/healthz", "", &[], None, false));
    let cold_start = health.answered_at - ingest.started;
    assert_eq!(status(&health), 200);
    assert_eq!(response_body(&health), serde_json::json!({"ok": true}));

    let post = |body: &[u8], base64: bool, content_type: &str, key: &FleetSecret| {
        let timestamp = now_s();
        let signature = key
            .derive_agent_key("lam")
            .signature_header("k1", "lam", timestamp, body);
        let timestamp = timestamp.to_string();
        let headers = [
            ("Content-Type", content_type),
            ("X-Rollcall-Agent", "lam"),
            ("X-Rollcall-Key-Id", "k1"),
            ("X-Rollcall-Timestamp", timestamp.as_str()),
            ("X-Rollcall-Signature", signature.as_str()),
        ];
        ingest_api.invoke(http_event(
            "POST",
            "/v1/heartbeats",
            "",
            &headers,
            Some(body),
            base64,
        ))
    };
    let first = heartbeat("lam", now_ms()).to_string();
    let accepted = post(first.as_bytes(), true, "application/json", &secret);
    assert_eq!(status(&accepted), 202, "{}", accepted.body);
    assert_eq!(response_body(&accepted)["agent_id"], "lam");

    let second = heartbeat("lam", now_ms() + 1).to_string();
    assert_eq!(
        status(&post(
            second.as_bytes(),
            false,
            "application/json; charset=utf-8",
            &secret
        )),
        202
    );
    let replay = post(second.as_bytes(), false, "application/json", &secret);
    assert_eq!(status(&replay), 409);

    let forged = post(
        heartbeat("lam", now_ms() + 2).to_string().as_bytes(),
        true,
        "application/json",
        &FleetSecret::from_bytes(vec![7; 32]).unwrap(),
    );
    assert_eq!(status(&forged), 401);
    assert!(
        response_body(&forged)["error"]
            .as_str()
            .unwrap()
            .contains("signature")
    );
    let wrong_type = post(second.as_bytes(), false, "text/plain", &secret);
    assert_eq!(status(&wrong_type), 415);

    let warm: Vec<Duration> = (0..50)
        .map(|_| {
            ingest_api
                .invoke(http_event("GET", "/healthz", "", &[], None, false))
                .took
        })
        .collect();
    let warm_heartbeats: Vec<Duration> = (0..20)
        .map(|i| {
            let body = heartbeat("lam", now_ms() + 10 + i).to_string();
            let outcome = post(body.as_bytes(), true, "application/json", &secret);
            assert_eq!(status(&outcome), 202);
            outcome.took
        })
        .collect();

    let query_api = RuntimeApi::start();
    let mut query_env = store.to_vec();
    query_env.push(("ROLLCALL_QUERY_TOKENS", TOKEN.to_owned()));
    let query = start("rollcall-query", &query_api, &query_env);
    let auth = format!("Bearer {TOKEN}");
    let listed = query_api.invoke(http_event(
        "GET",
        "/v1/agents",
        "min_gpu_vram_gb=1&limit=5",
        &[("Authorization", &auth)],
        None,
        false,
    ));
    let query_cold_start = listed.answered_at - query.started;
    assert_eq!(status(&listed), 200, "{}", listed.body);
    let agents = response_body(&listed)["agents"].clone();
    assert_eq!(agents[0]["agent_id"], "lam");
    assert_eq!(agents[0]["status"], "online");

    let unauthorised = query_api.invoke(http_event("GET", "/v1/agents", "", &[], None, false));
    assert_eq!(status(&unauthorised), 401);
    let bad = query_api.invoke(http_event(
        "GET",
        "/v1/agents",
        "limit=0",
        &[("Authorization", &auth)],
        None,
        false,
    ));
    assert_eq!(status(&bad), 400);
    assert!(
        response_body(&bad)["error"]
            .as_str()
            .unwrap()
            .contains("limit")
    );
    let one = query_api.invoke(http_event(
        "GET",
        "/v1/agents/lam",
        "",
        &[("Authorization", &auth)],
        None,
        false,
    ));
    assert_eq!(response_body(&one)["agent_id"], "lam");

    println!(
        "runtime harness ({}): ingest cold start to first response {:?}, query {:?}; \
         warm /healthz median {:?}, warm heartbeat median {:?}",
        binary("rollcall-ingest").display(),
        cold_start,
        query_cold_start,
        median(warm),
        median(warm_heartbeats)
    );
}

/// The fleet function on its real Lambda path: a stream event in, the sums
/// in the fleet table and the agent's `online` in the events table on the
/// emulator; a scheduled event sweeps; an event that is neither is reported
/// as the invocation's error (Lambda then retries it).
#[test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
fn the_fleet_function_adds_a_stream_batch_to_the_sums() {
    use rollcall::heartbeat::Heartbeat;
    use rollcall::record::{Deadlines, StoredAgent};
    use rollcall::store::dynamodb::encode;
    use rollcall::store::dynamodb::fleet::{FleetTable, item_to_json};

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(rollcall_tests::dynamodb_store(4));
    let table = store.table().to_owned();
    let fleet = FleetTable::new(
        rollcall_tests::dynamodb_client(),
        rollcall_tests::fleet_table_of(&table),
    );
    let api = RuntimeApi::start();
    let mut env: Vec<(&str, String)> = vec![
        ("ROLLCALL_FLEET_TABLE", fleet.name().to_owned()),
        ("ROLLCALL_TABLE", table.clone()),
        ("ROLLCALL_DYNAMODB_SHARDS", "4".to_owned()),
        (
            "ROLLCALL_EVENTS_TABLE",
            rollcall_tests::events_table_of(&table),
        ),
    ];
    let emulator = rollcall_tests::emulator_env();
    env.extend(
        emulator
            .iter()
            .map(|(name, value)| (name.as_str(), value.clone())),
    );
    let _function = start("rollcall-fleet", &api, &env);

    let now = now_ms();
    let agent = Heartbeat::parse(heartbeat("fleet-fn-agent", now).to_string().as_bytes()).unwrap();
    let agent = StoredAgent::accept(agent, now as i64, Deadlines::default());
    let event = serde_json::json!({"Records": [{
        "eventName": "INSERT",
        "eventSourceARN": format!("arn:aws:dynamodb:us-east-1:000000000000:table/{table}/stream/1"),
        "dynamodb": {"NewImage": item_to_json(&encode(&agent, 4).unwrap()),
                     "SequenceNumber": "1", "ApproximateCreationDateTime": now as f64 / 1000.0},
    }]});
    let outcome = api.invoke(event);
    assert_eq!(outcome.kind, "response", "{}", outcome.body);
    let sums = runtime.block_on(fleet.read(now as i64)).unwrap();
    let default = sums.pools["default"];
    assert_eq!(
        (default.on_record, default.online.agents),
        (1, 1),
        "{sums:?}"
    );
    assert_eq!(
        default.online.gpu_total_mb,
        agent
            .heartbeat
            .gpus
            .iter()
            .map(|gpu| gpu.memory_total_mb as i64)
            .sum::<i64>()
    );

    let events = runtime
        .block_on(rollcall::store::Store::events(
            &store,
            "fleet-fn-agent",
            None,
            10,
            now as i64,
        ))
        .unwrap();
    let kinds: Vec<&str> = events.iter().map(|event| event.kind.as_str()).collect();
    assert_eq!(kinds, ["online"]);

    let swept = api.invoke(
        serde_json::json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}}),
    );
    assert_eq!(swept.kind, "response", "{}", swept.body);
    assert_eq!(swept.body["marked"], 0, "{}", swept.body);

    let refused = api.invoke(serde_json::json!({"not": "a stream event"}));
    assert_eq!(refused.kind, "error", "{}", refused.body);
    assert!(
        refused
            .body
            .to_string()
            .contains("neither a DynamoDB stream batch nor an EventBridge scheduled event"),
        "{}",
        refused.body
    );
}
