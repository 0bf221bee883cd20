//! Each function's IAM policy in infra/template.yaml grants exactly what its
//! code calls: the SDK operations are recorded (tests/src/iam.rs) while every
//! route of each function runs against the emulator, and the template's
//! statements must name the same (action, resource) pairs, no fewer and no
//! more. Removing a needed grant or adding an unneeded one fails this test.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rollcall::heartbeat::Heartbeat;
use rollcall::record::{Deadlines, StoredAgent};
use rollcall::secrets::Secret;
use rollcall::signing::FleetSecret;
use rollcall::store::Store;
use rollcall::store::dynamodb::changes::{ChangeRecorder, EventsTable};
use rollcall::store::dynamodb::fleet::{Change, FleetTable, StreamBatch};
use rollcall::store::dynamodb::{DynamoStore, encode};
use rollcall::verify::Keyring;
use rollcall_tests::iam::{Call, CallRecorder, recorded_dynamodb_client, secrets_client};
use rollcall_tests::inprocess::{InProcess, request};
use rollcall_tests::{KEY_ID, dynamodb_client, heartbeat, now_ms, signed_heartbeat, unique_table};
use serde_json::json;
use serde_yaml::Value;

const TOKEN: &str = "iam-test-token-0123456789";

async fn create_secret(name: &str, value: &str) {
    secrets_client(None)
        .create_secret()
        .name(name)
        .secret_string(value)
        .send()
        .await
        .expect("create a secret on the emulator");
}

async fn fetch<T: Send + Sync + 'static>(
    recorder: &CallRecorder,
    label: &str,
    name: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Secret<T> {
    let client = secrets_client(Some(&recorder.labelled(label)));
    // A zero refresh window: every unknown key id or token refreshes, so the
    // refresh path is exercised too.
    Secret::fetch(
        client,
        name,
        parse,
        Duration::from_secs(300),
        Duration::ZERO,
    )
    .await
    .expect("fetch secret")
}

/// Every ingest path: fresh heartbeat with history and GPU processes, a
/// stale one, an unknown key id.
async fn drive_ingest(
    recorder: &CallRecorder,
    table: &str,
    secret_name: &str,
    secret: &FleetSecret,
) {
    let store = DynamoStore::new(
        recorded_dynamodb_client(&recorder.labelled("table")),
        table,
        4,
    );
    let keyring = fetch(recorder, "secret:fleet", secret_name, |text| {
        Keyring::parse(text).map_err(|e| e.to_string())
    })
    .await;
    let ingest = rollcall_ingest::Ingest {
        keyring: rollcall_ingest::keys::KeySource::new(keyring),
        deadlines: Deadlines::default(),
        history_retention_s: 24 * 3600,
        store: Arc::new(store),
    };
    let server = InProcess::serve(rollcall_ingest::router(Arc::new(ingest))).await;
    let now = now_ms();
    let mut body = heartbeat("iam-agent", now);
    let spread = json!({"min": 0.5, "avg": 1.0, "max": 1.5});
    body["history"] =
        json!([{"minute": now / 60_000 - 1, "load_1m": spread, "memory_available_mb": spread}]);
    body["gpus"][0]["processes"] = json!([{"pid": 4242, "used_mb": 1024, "name": "python3"}]);
    let (headers, bytes) = signed_heartbeat(secret, KEY_ID, &body);
    let accepted = request(
        server.addr,
        "POST",
        "/v1/heartbeats".into(),
        headers.clone(),
        bytes.clone(),
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    assert!(
        accepted.json().get("not_stored").is_none(),
        "{}",
        accepted.text()
    );
    let replay = request(server.addr, "POST", "/v1/heartbeats".into(), headers, bytes).await;
    assert_eq!(replay.status, 409, "{}", replay.text());
    let (headers, bytes) =
        signed_heartbeat(secret, "unknown-kid", &heartbeat("iam-agent", now + 1));
    let unknown = request(server.addr, "POST", "/v1/heartbeats".into(), headers, bytes).await;
    assert_eq!(unknown.status, 401, "{}", unknown.text());
    server.stop().await;
}

/// The fleet function's jobs: a stream batch added to the sums and its
/// state changes recorded, and a sweep that marks a dead agent.
async fn drive_fleet(recorder: &CallRecorder, table: &str, fleet_table: &str, events_table: &str) {
    let fleet = FleetTable::new(
        recorded_dynamodb_client(&recorder.labelled("fleet")),
        fleet_table,
    );
    let now = now_ms();
    let agent = Heartbeat::parse(heartbeat("iam-fleet", now).to_string().as_bytes())
        .expect("test heartbeat");
    let item = encode(
        &StoredAgent::accept(agent, now as i64, Deadlines::default()),
        4,
    )
    .expect("encode");
    let batch = StreamBatch {
        changes: vec![Change {
            old: None,
            new: Some(item),
        }],
        id: format!("iam-test-batch-{now}"),
        newest_s: None,
    };
    assert!(fleet.apply(&batch).await.expect("apply a batch") > 0);
    let recorder_of_changes = ChangeRecorder::new(
        recorded_dynamodb_client(&recorder.labelled("table")),
        table,
        EventsTable::new(
            recorded_dynamodb_client(&recorder.labelled("events")),
            events_table,
        ),
    );
    // The agent's item exists, so its availability is kept.
    DynamoStore::new(dynamodb_client(), table, 4)
        .upsert(StoredAgent::accept(
            Heartbeat::parse(heartbeat("iam-fleet", now).to_string().as_bytes()).unwrap(),
            now as i64,
            Deadlines::default(),
        ))
        .await
        .expect("write the agent");
    let recorded = recorder_of_changes
        .record(&batch.changes)
        .await
        .expect("record the batch's state changes");
    assert_eq!(recorded.events, 1, "its first heartbeat: online");
    // An agent past its deadline, for the sweep to mark.
    let long_ago = now_ms() - 600_000;
    DynamoStore::new(dynamodb_client(), table, 4)
        .upsert(StoredAgent::accept(
            Heartbeat::parse(heartbeat("iam-swept", long_ago).to_string().as_bytes()).unwrap(),
            long_ago as i64,
            Deadlines::default(),
        ))
        .await
        .expect("write the dead agent");
    let sweeper = DynamoStore::new(
        recorded_dynamodb_client(&recorder.labelled("table")),
        table,
        4,
    )
    .with_events(EventsTable::new(
        recorded_dynamodb_client(&recorder.labelled("events")),
        events_table,
    ));
    let sweep = sweeper.sweep(now_ms() as i64).await.expect("sweep");
    assert!(sweep.marked >= 1, "{sweep:?}");
}

/// The webhook function's job: its secret read, and an event sent with
/// its neighbours read for the grace.
async fn drive_webhooks(recorder: &CallRecorder, events_table: &str, secret_name: &str) {
    use rollcall::webhooks::{Dispatcher, Endpoint, WebhookSecret};
    let secret = fetch(
        recorder,
        "secret:webhook",
        secret_name,
        WebhookSecret::parse,
    )
    .await;
    let receiver = InProcess::serve(axum::Router::new().route(
        "/hook",
        axum::routing::post(|| async { axum::http::StatusCode::NO_CONTENT }),
    ))
    .await;
    let endpoints = Endpoint::parse_list(&format!("http://{}/hook", receiver.addr)).unwrap();
    let dispatcher = Dispatcher::new(
        endpoints,
        (*secret.current().await).clone(),
        Duration::from_secs(30),
    )
    .unwrap();
    let events = EventsTable::new(
        recorded_dynamodb_client(&recorder.labelled("events")),
        events_table,
    );
    let now = now_ms() as i64;
    let online: rollcall::changes::Event = serde_json::from_value(json!({
        "id": format!("iam-hooked/{now:013}.1"), "agent_id": "iam-hooked", "kind": "online",
        "at": rollcall::time::rfc3339(now), "at_ms": now
    }))
    .unwrap();
    assert_eq!(dispatcher.deliver_in_order(&[online], &events).await, Ok(1));
    receiver.stop().await;
}

/// Every query route, paging included.
async fn drive_query(
    recorder: &CallRecorder,
    table: &str,
    fleet_table: &str,
    events_table: &str,
    tokens_name: &str,
    cursor_name: &str,
) {
    let store = DynamoStore::new(
        recorded_dynamodb_client(&recorder.labelled("table")),
        table,
        4,
    )
    .with_fleet(FleetTable::new(
        recorded_dynamodb_client(&recorder.labelled("fleet")),
        fleet_table,
    ))
    .with_events(EventsTable::new(
        recorded_dynamodb_client(&recorder.labelled("events")),
        events_table,
    ));
    let tokens = fetch(recorder, "secret:tokens", tokens_name, |text| {
        rollcall_query::Tokens::parse(text).map_err(|e| e.to_string())
    })
    .await;
    let cursor_key = fetch(recorder, "secret:cursor", cursor_name, |text| {
        Ok(text.as_bytes().to_vec())
    })
    .await;
    // An agent whose deadline passed without a word: the first query that
    // reads it moves it out of the online part of the index.
    let long_ago = now_ms() - 600_000;
    let dead = Heartbeat::parse(heartbeat("iam-dead", long_ago).to_string().as_bytes())
        .expect("test heartbeat");
    DynamoStore::new(dynamodb_client(), table, 4)
        .upsert(StoredAgent::accept(
            dead,
            long_ago as i64,
            Deadlines::default(),
        ))
        .await
        .expect("write the dead agent");
    let api = rollcall_query::QueryApi::new(tokens, cursor_key, Arc::new(store));
    let server = InProcess::serve(rollcall_query::router(Arc::new(api))).await;
    let auth = vec![("Authorization".to_owned(), format!("Bearer {TOKEN}"))];
    for path in [
        "/v1/agents?status=all&limit=1",
        "/v1/agents",
        "/v1/agents?min_gpu_vram_gb=1&min_cpu_cores=1&pool=default",
        "/v1/agents/iam-agent",
        "/v1/agents/iam-agent/history?minutes=10",
        "/v1/agents/iam-agent/events?limit=10",
        "/metrics",
        "/metrics?status=all",
        "/healthz",
        "/",
    ] {
        let answer = request(server.addr, "GET", path.into(), auth.clone(), Vec::new()).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
    }
    // Claims: made by name and by filters, read, extended, released.
    let mut with_body = auth.clone();
    with_body.push(("Content-Type".to_owned(), "application/json".to_owned()));
    let mut made = Vec::new();
    for body in [
        json!({"agent_id": "iam-agent", "gpus": [0], "ttl_s": 60, "holder": "iam"}),
        json!({"min_gpus": 1, "ttl_s": 60, "holder": "iam"}),
    ] {
        let answer = request(
            server.addr,
            "POST",
            "/v1/claims".into(),
            with_body.clone(),
            body.to_string().into_bytes(),
        )
        .await;
        assert!(matches!(answer.status, 201 | 409), "{}", answer.text());
        if answer.status == 201 {
            made.push(
                answer.json()["claim_id"]
                    .as_str()
                    .expect("claim_id")
                    .to_owned(),
            );
        }
    }
    let path = format!(
        "/v1/claims/{}",
        made.first().expect("the claim by name is made")
    );
    for (method, body, status) in [
        ("GET", None, 200),
        ("PUT", Some(json!({"ttl_s": 120})), 200),
        ("DELETE", None, 204),
    ] {
        let body = body
            .map(|b: serde_json::Value| b.to_string().into_bytes())
            .unwrap_or_default();
        let answer = request(server.addr, method, path.clone(), with_body.clone(), body).await;
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.text());
    }
    let unknown = vec![(
        "Authorization".to_owned(),
        "Bearer not-a-known-token-at-all".to_owned(),
    )];
    assert_eq!(
        request(server.addr, "GET", "/v1/agents".into(), unknown, Vec::new())
            .await
            .status,
        401
    );
    server.stop().await;
}

/// Statements for what the Lambda service calls on a function's behalf, not
/// its code: the fleet function's role lets the event source mapping read
/// the agents table's stream.
const SERVICE_STATEMENTS: &[(&str, &str)] = &[
    ("FleetFunction", "ReadAgentsStream"),
    ("WebhookFunction", "ReadEventsStream"),
];

/// The IAM actions a recorded call needs: a transaction is authorised as
/// the single-item actions it carries (the fleet function's are updates).
fn as_iam(call: &Call) -> Call {
    match call.action.as_str() {
        "dynamodb:TransactWriteItems" => Call {
            action: "dynamodb:UpdateItem".into(),
            resource: call.resource.clone(),
        },
        _ => call.clone(),
    }
}

/// (action, resource label) pairs one function's policy grants.
fn granted(template: &Value, function: &str) -> BTreeSet<Call> {
    let statements = &template["Resources"][function]["Properties"]["Policies"][0]["Statement"];
    let as_list = |value: &Value| match value {
        Value::Sequence(items) => items.clone(),
        other => vec![other.clone()],
    };
    let mut calls = BTreeSet::new();
    for statement in statements.as_sequence().expect("Statement list") {
        assert_eq!(statement["Effect"].as_str(), Some("Allow"));
        let sid = statement["Sid"].as_str().unwrap_or_default();
        if SERVICE_STATEMENTS.contains(&(function, sid)) {
            assert_eq!(
                resource_label(&statement["Resource"]),
                "stream",
                "{function} {sid}: the service's reads are of the agents stream only"
            );
            continue;
        }
        for action in as_list(&statement["Action"]) {
            for resource in as_list(&statement["Resource"]) {
                calls.insert(Call {
                    action: action.as_str().expect("action text").to_owned(),
                    resource: resource_label(&resource),
                });
            }
        }
    }
    calls
}

/// The template's resource expressions, named as the recorder names them.
fn resource_label(resource: &Value) -> String {
    let text = serde_yaml::to_string(resource).unwrap();
    let labels = [
        ("${AgentsTable.Arn}/index/", "index/"),
        ("${AgentsTable.Arn}/stream/", "stream"),
        ("${EventsTable.Arn}/stream/", "stream"),
        ("AgentsTable.Arn", "table"),
        ("FleetTable.Arn", "fleet"),
        ("EventsTable.Arn", "events"),
        ("${FleetSecretsSecretName}-??????", "secret:fleet"),
        ("${QueryTokensSecretName}-??????", "secret:tokens"),
        ("${WebhookSecretName}-??????", "secret:webhook"),
        ("${AWS::StackName}/cursor-key-??????", "secret:cursor"),
    ];
    for (pattern, label) in labels {
        if let Some(position) = text.find(pattern) {
            if label == "index/" {
                let rest = &text[position + pattern.len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                return format!("index/{name}");
            }
            return label.to_owned();
        }
    }
    panic!("a resource this test cannot name: {text}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn each_function_is_granted_exactly_what_its_code_calls() {
    let table = unique_table("rollcall-iam");
    let admin = DynamoStore::new(rollcall_tests::dynamodb_client(), &table, 4);
    admin.create_table().await.expect("create table");
    let fleet_table = format!("{table}-fleet");
    FleetTable::new(rollcall_tests::dynamodb_client(), &fleet_table)
        .create()
        .await
        .expect("create the fleet table");
    let events_table = format!("{table}-events");
    EventsTable::new(rollcall_tests::dynamodb_client(), &events_table)
        .create_table()
        .await
        .expect("create the events table");
    let secret = FleetSecret::from_bytes(vec![9; 32]).unwrap();
    let names = [&table, "tokens", "cursor", "webhook"].map(|part| format!("{table}/{part}"));
    create_secret(&names[0], &format!("{KEY_ID}={}", secret.to_hex())).await;
    create_secret(&names[1], &format!("{TOKEN}:read+claim")).await;
    create_secret(
        &names[2],
        "a-cursor-key-of-sixty-four-characters-0123456789abcdefghijklmn",
    )
    .await;
    create_secret(&names[3], "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").await;

    let ingest = CallRecorder::default();
    drive_ingest(&ingest, &table, &names[0], &secret).await;
    let query = CallRecorder::default();
    drive_query(
        &query,
        &table,
        &fleet_table,
        &events_table,
        &names[1],
        &names[2],
    )
    .await;
    let fleet = CallRecorder::default();
    drive_fleet(&fleet, &table, &fleet_table, &events_table).await;
    let webhook = CallRecorder::default();
    drive_webhooks(&webhook, &events_table, &names[3]).await;

    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../infra/template.yaml"
    ))
    .unwrap();
    let template: Value = serde_yaml::from_str(&text).expect("template parses");
    for (function, recorder) in [
        ("IngestFunction", &ingest),
        ("QueryFunction", &query),
        ("FleetFunction", &fleet),
        ("WebhookFunction", &webhook),
    ] {
        let called: BTreeSet<Call> = recorder.calls().iter().map(as_iam).collect();
        println!("{function} calls:");
        for call in &called {
            println!("  {} on {}", call.action, call.resource);
        }
        let granted = granted(&template, function);
        let missing: Vec<_> = called.difference(&granted).collect();
        let unneeded: Vec<_> = granted.difference(&called).collect();
        assert!(
            missing.is_empty() && unneeded.is_empty(),
            "{function}: the template must grant exactly what the code calls\n  not granted but called: {missing:?}\n  granted but never called: {unneeded:?}"
        );
    }
}
