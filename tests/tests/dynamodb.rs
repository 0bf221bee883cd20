//! DynamoDB-specific behaviour on the emulator: TTL, item size and write
//! units, read units that follow matches rather than fleet size, expired
//! items hidden before TTL deletes them, and the functions end to end.

use std::time::Instant;

use rollcall::capacity::CapacityQuery;
use rollcall::heartbeat::Heartbeat;
use rollcall::record::{Deadlines, StoredAgent};
use rollcall::store::Store;
use rollcall::store::dynamodb::{
    FV_SLACK_MB, INDEX_NAME, ReadCost, TTL_ATTRIBUTE, encode, item_size,
};
use rollcall_tests::{
    Stack, dynamodb_client, dynamodb_store, emulator_env, heartbeat, now_ms, request, unique_table,
};
use serde_json::json;

/// A heartbeat as big as a realistic two-GPU desktop sends.
fn two_gpu_heartbeat(agent_id: &str) -> Heartbeat {
    let mut body = heartbeat(agent_id, now_ms());
    body["labels"] = json!({"site": "b2", "rack": "r12", "team": "vision"});
    body["host"] = json!({"hostname": "render-node-0042.lab.example.org", "os": "Linux (Ubuntu 24.04.1 LTS)", "uptime_s": 8_640_000});
    body["cpu"]["usage_percent"] = json!(23.5);
    body["memory"]["swap_total_mb"] = json!(2048);
    body["memory"]["swap_used_mb"] = json!(12);
    body["disk"] = json!({"path": "/", "total_gb": 931.51, "free_gb": 402.27});
    let gpu = |index: u32| {
        json!({"index": index, "vendor": "nvidia", "name": "NVIDIA GeForce RTX 4090",
               "uuid": format!("GPU-5f1c2d3e-1234-5678-9abc-def01234567{index}"),
               "memory_total_mb": 24564, "memory_free_mb": 20110 - index as u64,
               "utilization_percent": 7.0, "temperature_c": 41.0, "power_w": 31.5})
    };
    body["gpus"] = json!([gpu(0), gpu(1)]);
    Heartbeat::parse(body.to_string().as_bytes()).unwrap()
}

#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn ttl_is_enabled_on_expires_at() {
    let store = dynamodb_store(4).await;
    let ttl = dynamodb_client()
        .describe_time_to_live()
        .table_name(store.table())
        .send()
        .await
        .unwrap();
    let description = ttl.time_to_live_description().expect("TTL description");
    assert_eq!(description.attribute_name(), Some(TTL_ATTRIBUTE));
    assert_eq!(
        description.time_to_live_status().map(|s| s.as_str()),
        Some("ENABLED")
    );
    let table = dynamodb_client()
        .describe_table()
        .table_name(store.table())
        .send()
        .await
        .unwrap();
    let indexes = table.table().unwrap().global_secondary_indexes();
    assert!(
        indexes
            .iter()
            .any(|index| index.index_name() == Some(INDEX_NAME))
    );
}

#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn a_two_gpu_heartbeat_is_one_write_unit() {
    let store = dynamodb_store(4).await;
    let agent = StoredAgent::accept(
        two_gpu_heartbeat("render-node-0042"),
        now_ms() as i64,
        Deadlines::default(),
    );
    let size = item_size(&encode(&agent, 4).unwrap());
    let json_size = serde_json::to_vec(&agent).unwrap().len();
    println!(
        "two-GPU item: {size} bytes by DynamoDB's size rules (the record as plain JSON would be {json_size} bytes)"
    );
    assert!(
        size <= 1024,
        "item is {size} bytes: more than one write unit"
    );

    let (_, cost) = store.upsert_measured(&agent).await.unwrap();
    println!(
        "computed write units: table {}, index {}; the emulator reports the table at {:?}",
        cost.computed.table, cost.computed.indexes, cost.reported_table
    );
    assert_eq!(cost.computed.table, 1);
    // The emulator does not model indexes; where it reports the table, it
    // must agree with the model.
    if let Some(reported) = cost.reported_table {
        assert_eq!(reported, cost.computed.table as f64);
    }
}

/// The unit model applied to the store's real writes: each write's units are
/// computed from the old item DynamoDB hands back with it.
#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn a_steady_heartbeat_costs_one_write_unit_through_the_store() {
    let store = dynamodb_store(4).await;
    let start = now_ms();
    let write = |offset_ms: u64, free_mb: u64| {
        let mut body = heartbeat("steady-01", start + offset_ms);
        body["gpus"][0]["memory_total_mb"] = json!(81_559);
        body["gpus"][0]["memory_free_mb"] = json!(free_mb);
        let heartbeat = Heartbeat::parse(body.to_string().as_bytes()).unwrap();
        StoredAgent::accept(heartbeat, (start + offset_ms) as i64, Deadlines::default())
    };
    let base = 73_000;
    let mut totals = Vec::new();
    for (offset_ms, free_mb) in [
        (0, base),                           // first: the table and a new index entry
        (30_000, base),                      // steady: the table alone
        (60_000, base + 100), // wandered: the entry keeps its figure, re-ranked as inexact
        (90_000, base + 180), // wandered within the slack: the table alone
        (120_000, base + FV_SLACK_MB + 600), // past the slack: re-ranked at the exact figure
        (150_000, 12_000),    // a job started: re-ranked
    ] {
        let (_, cost) = store
            .upsert_measured(&write(offset_ms, free_mb))
            .await
            .unwrap();
        if let Some(reported) = cost.reported_table {
            assert_eq!(reported, cost.computed.table as f64);
        }
        totals.push(cost.computed.total());
    }
    assert_eq!(totals, [2, 1, 3, 1, 3, 3]);
}

/// Entries whose figure wandered are ranked by the most their agent can
/// have, not by what it has; every page must still come out exactly in
/// answer order and resume where the last one stopped, across shards.
#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn pages_are_in_exact_order_when_entries_have_wandered() {
    let store = dynamodb_store(3).await;
    let now = now_ms();
    let mut expected = Vec::new();
    for i in 0..40u64 {
        // Free VRAM rises as the id rises, and pairs share a value.
        let first_mb = 8192 + (i / 2) * 150;
        // A third then wander within the slack, so that their entries keep
        // a figure that is no longer exact, and may overtake a neighbour.
        let free_mb = if i % 3 == 0 {
            first_mb + 37 * (i % 7)
        } else {
            first_mb
        };
        let id = format!("node-{i:02}");
        for (sent_ms, mb) in [(now - 30_000, first_mb), (now, free_mb)] {
            let mut body = heartbeat(&id, sent_ms);
            body["gpus"][0]["memory_total_mb"] = json!(81_559);
            body["gpus"][0]["memory_free_mb"] = json!(mb);
            let agent = StoredAgent::accept(
                Heartbeat::parse(body.to_string().as_bytes()).unwrap(),
                sent_ms as i64,
                Deadlines::default(),
            );
            store.upsert(agent).await.unwrap();
        }
        expected.push((std::cmp::Reverse(free_mb), id));
    }
    expected.sort();
    for (text, bound_mb) in [
        ("limit=3", 0),
        ("limit=7&min_gpu_vram_gb=9.5", 9728),
        ("limit=1&min_gpu_vram_gb=10", 10240),
        ("limit=2&min_gpu_vram_gb=10.05", 10292),
    ] {
        let query = CapacityQuery::from_query_string(text).unwrap();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .query(&query, after.as_ref(), now as i64)
                .await
                .unwrap();
            assert!(page.agents.len() <= query.limit);
            seen.extend(page.agents.iter().map(|agent| {
                (
                    std::cmp::Reverse(agent.heartbeat.gpu_free_max_mb()),
                    agent.agent_id().to_owned(),
                )
            }));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let want: Vec<_> = expected
            .iter()
            .filter(|(std::cmp::Reverse(free_mb), _)| *free_mb >= bound_mb)
            .cloned()
            .collect();
        assert_eq!(seen, want, "{text}");
    }
}

#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn an_expired_item_is_never_returned_even_before_ttl_deletes_it() {
    let store = dynamodb_store(4).await;
    let now = now_ms() as i64;
    let deadlines = Deadlines {
        grace_multiplier: 3,
        retention_s: 1,
    };
    let expired = StoredAgent::accept(two_gpu_heartbeat("ghost"), now - 120_000, deadlines);
    assert!(expired.is_expired(now));
    store.upsert(expired).await.unwrap();

    let raw = dynamodb_client()
        .get_item()
        .table_name(store.table())
        .key(
            "agent_id",
            aws_sdk_dynamodb::types::AttributeValue::S("ghost".into()),
        )
        .send()
        .await
        .unwrap();
    assert!(
        raw.item().is_some(),
        "the emulator has not deleted it yet, which is the case under test"
    );
    assert_eq!(store.get("ghost", now).await.unwrap(), None);
    let all = CapacityQuery::from_query_string("status=all").unwrap();
    assert!(
        store
            .query(&all, None, now)
            .await
            .unwrap()
            .agents
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn read_units_follow_matches_not_fleet_size() {
    let store = std::sync::Arc::new(dynamodb_store(4).await);
    let now = now_ms() as i64;
    // bench/run measures larger fleets through ROLLCALL_TEST_DDB_AGENTS.
    let fleet: usize = std::env::var("ROLLCALL_TEST_DDB_AGENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for chunk in 0..8 {
        let store = std::sync::Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in (chunk..fleet).step_by(8) {
                let mut body = heartbeat(&format!("agent-{i:04}"), 1);
                // 5 % of the fleet has a GPU with 40 GiB free; the rest 8 GiB.
                body["gpus"][0]["memory_total_mb"] = json!(49_152);
                body["gpus"][0]["memory_free_mb"] = json!(if i % 20 == 0 { 40_960 } else { 8_192 });
                let agent = StoredAgent::accept(
                    Heartbeat::parse(body.to_string().as_bytes()).unwrap(),
                    now,
                    Deadlines::default(),
                );
                store.upsert(agent).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    println!("seeded {fleet} agents in {:?}", started.elapsed());

    let measure = |text: &str| {
        let store = std::sync::Arc::clone(&store);
        let query = CapacityQuery::from_query_string(text).unwrap();
        async move {
            let mut cost = ReadCost::default();
            let mut matches = 0;
            let mut after = None;
            loop {
                let (page, page_cost) = store
                    .query_measured(&query, after.as_ref(), now)
                    .await
                    .unwrap();
                cost.requests += page_cost.requests;
                cost.index_entries += page_cost.index_entries;
                cost.items_read += page_cost.items_read;
                cost.units += page_cost.units;
                matches += page.agents.len();
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            (matches, cost)
        }
    };
    let (few, few_cost) = measure("min_gpu_vram_gb=32&limit=1000").await;
    let (all, all_cost) = measure("limit=1000").await;
    for (label, matches, cost) in [("5 % filter", few, few_cost), ("no filter", all, all_cost)] {
        println!(
            "{fleet} agents, {label}: {matches} matches, {} index entries and {} items read in {} requests, {} read units",
            cost.index_entries, cost.items_read, cost.requests, cost.units
        );
    }
    let expected_few = fleet.div_ceil(20);
    assert_eq!((few, all), (expected_few, fleet));
    // Reads follow the matches: the 5 % with enough VRAM, not the whole fleet.
    assert_eq!(few_cost.items_read, expected_few as u64);
    assert_eq!(few_cost.index_entries, expected_few as u64);
    assert_eq!(all_cost.items_read, fleet as u64);
    assert!(few_cost.units * 5.0 <= all_cost.units);
}

#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn the_functions_work_end_to_end_on_dynamodb() {
    let stack = Stack::start_dynamodb().await;
    let output = stack
        .collector("ddb-host")
        .args(["once", "--skip-cpu-usage"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let agent = stack.agent("ddb-host").expect("stored in DynamoDB");
    assert_eq!(agent["status"], "online");

    // Replays are conflicts here too.
    let body = heartbeat("replayed", now_ms()).to_string();
    let timestamp = rollcall_tests::now_s();
    assert_eq!(
        stack
            .post_heartbeat_at("replayed", body.as_bytes(), timestamp)
            .status,
        202
    );
    assert_eq!(
        stack
            .post_heartbeat_at("replayed", body.as_bytes(), timestamp)
            .status,
        409
    );

    // Pages and a forged cursor.
    let page = stack.get("/v1/agents?limit=1").json();
    let cursor = page["next_cursor"]
        .as_str()
        .expect("two agents, one per page")
        .to_owned();
    assert_eq!(
        stack
            .get(&format!("/v1/agents?limit=1&cursor={cursor}"))
            .json()["agents"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let mut forged = cursor.clone();
    forged.replace_range(0..2, if &cursor[0..2] == "00" { "11" } else { "00" });
    let refused = stack.get(&format!("/v1/agents?limit=1&cursor={forged}"));
    assert_eq!(refused.status, 400);
    assert!(refused.error().contains("cursor"));
}

#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn an_unreachable_table_answers_503_with_retry_after() {
    // A port nothing listens on: every DynamoDB call fails to connect.
    let mut env = emulator_env();
    env.retain(|(key, _)| key != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL".into(), "http://127.0.0.1:9".into()));
    let stack = Stack::start_dynamodb_table(&unique_table("unreachable"), &env);
    let response = stack.post_heartbeat(&heartbeat("nowhere", now_ms()));
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(response.header("retry-after").is_some());
    assert!(response.error().contains("store unavailable"));
    let query = stack.get("/v1/agents");
    assert_eq!(query.status, 503);
    // The process stays up.
    assert_eq!(
        request(stack.ingest.addr, "GET", "/healthz", &[], b"").status,
        200
    );
}

#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn a_five_minute_history_window_is_one_write_unit() {
    use rollcall::heartbeat::{MinuteRollup, Spread};
    use rollcall::store::dynamodb::{encode_history, history_key};
    let spread = Spread {
        min: 0.52,
        avg: 1.734,
        max: 3.96,
    };
    let memory = Spread {
        min: 40_961.0,
        avg: 41_234.5,
        max: 41_777.0,
    };
    let minutes: Vec<MinuteRollup> = (0..5)
        .map(|m| MinuteRollup {
            minute: 29_402_000 + m,
            load_1m: spread,
            memory_available_mb: memory,
            gpu_free_mb_min: vec![20_110, 19_876],
        })
        .collect();
    let size = item_size(
        &encode_history(
            &history_key("render-node-0042", 5_880_400),
            &minutes,
            1_795_700_000,
        )
        .unwrap(),
    );
    let heartbeat_units = 2.5;
    println!(
        "history: a five-minute window with two GPUs is {size} bytes (1 write unit); against ten heartbeats at \
         {heartbeat_units} units each it adds {:.0} % to an agent's write units, and 10 % to its write requests",
        100.0 / (10.0 * heartbeat_units)
    );
    assert!(size <= 1024, "{size}");
}
