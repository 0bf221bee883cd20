//! DynamoDB-specific behaviour on the emulator: TTL, item size and write
//! units, read units that follow matches rather than fleet size, expired
//! items hidden before TTL deletes them, and the functions end to end.

use std::time::Instant;

use rollcall::capacity::CapacityQuery;
use rollcall::heartbeat::Heartbeat;
use rollcall::record::{Deadlines, StoredAgent};
use rollcall::store::Store;
use rollcall::store::dynamodb::{
    DynamoStore, FV_SLACK_MB, INDEX_NAME, IndexedVram, PageBudget, ReadCost, TTL_ATTRIBUTE, encode,
    item_size, set_index_figure,
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

    // The first heartbeat finds no entry to keep (a failed condition and a
    // put); the next is the steady one.
    let (_, first) = store.upsert_measured(&agent).await.unwrap();
    assert_eq!(first.conditional_failures, 1);
    if let Some(reported) = first.reported_table {
        // The emulator reports the put alone; it does not model indexes.
        assert_eq!(reported, (first.computed.table - 1) as f64);
    }
    let mut next = agent.clone();
    next.heartbeat.sent_at_ms += 30_000;
    next.received_at_ms += 30_000;
    let (_, cost) = store.upsert_measured(&next).await.unwrap();
    println!(
        "computed write units of a steady heartbeat: table {}, index {}",
        cost.computed.table, cost.computed.indexes
    );
    assert_eq!(cost.computed.table, 1);
    assert_eq!(cost.conditional_failures, 0);
}

/// The unit model applied to the store's real writes: each write's units are
/// computed from the old item DynamoDB hands back with it.
#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn a_steady_heartbeat_costs_one_write_unit_through_the_store() {
    let store = dynamodb_store(4).await;
    // A second past a minute, and the heartbeats a second apart: every
    // deadline falls in one minute, so the deadline index costs only its
    // first entry and what is measured is the capacity index (the
    // deadline index's once-a-minute move is `units.rs`'s test).
    let start = now_ms() / 60_000 * 60_000 - 60_000 + 1_000;
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
        (0, base),                         // first: a failed condition, the put and two new entries
        (1_000, base),                     // steady: the table alone
        (2_000, base - 100),               // dipped: the same rank, marked inexact (the flag)
        (3_000, base),                     // back: nothing moves
        (4_000, base + 100),               // rose: a bound with room either way (a key change)
        (5_000, base + 180),               // wandered inside the bound: the table alone
        (6_000, base + 100 + FV_SLACK_MB), // at its top: the table alone
        (7_000, 12_000),                   // a job started: the exact figure (a key change)
    ] {
        let (_, cost) = store
            .upsert_measured(&write(offset_ms, free_mb))
            .await
            .unwrap();
        // What the emulator reports is the last write's table, never the
        // failed condition before it.
        if let Some(reported) = cost.reported_table {
            let failed = u64::from(cost.conditional_failures);
            assert_eq!(reported, (cost.computed.table - failed) as f64);
        }
        totals.push(cost.computed.total());
    }
    assert_eq!(totals, [4, 1, 3, 1, 4, 1, 1, 4]);
}

/// An agent built from the test heartbeat with `free_mb` on its GPU and
/// `cores` available, received at `received_ms`.
fn agent_at(id: &str, sent_ms: u64, received_ms: u64, free_mb: u64, cores: u32) -> StoredAgent {
    let mut body = heartbeat(id, sent_ms);
    body["gpus"][0]["memory_total_mb"] = json!(81_559);
    body["gpus"][0]["memory_free_mb"] = json!(free_mb);
    body["cpu"]["cores_available"] = json!(cores);
    body["cpu"]["cores_physical"] = json!(cores.max(8));
    body["cpu"]["cores_logical"] = json!(cores.max(16));
    let parsed = Heartbeat::parse(body.to_string().as_bytes()).unwrap();
    StoredAgent::accept(parsed, received_ms as i64, Deadlines::default())
}

/// Every page of `text` from `store` within `budget`: the agents in order,
/// each with its real figure, and each page's cost.
async fn every_page(
    store: &DynamoStore,
    text: &str,
    now: i64,
    budget: PageBudget,
) -> (Vec<(u64, String)>, Vec<ReadCost>) {
    let query = CapacityQuery::from_query_string(text).unwrap();
    let (mut seen, mut costs, mut after) = (Vec::new(), Vec::new(), None);
    for _ in 0..10_000 {
        let (page, cost) = store
            .query_within(&query, after.as_ref(), now, budget)
            .await
            .unwrap();
        assert!(page.agents.len() <= query.limit);
        seen.extend(page.agents.iter().map(|agent| {
            (
                agent.heartbeat.max_gpu_free_mb(),
                agent.agent_id().to_owned(),
            )
        }));
        costs.push(cost);
        match page.next {
            Some(next) => after = Some(next),
            None => return (seen, costs),
        }
    }
    panic!("{text}: cursors never ended");
}

/// On DynamoDB answers come in the order of their index entries: exactly
/// by free VRAM for every agent whose entry is exact, and by the entry's
/// bound (at most twice the slack above its real figure) for an agent whose
/// figure wanders. Every page resumes where the last one stopped, across
/// shards, and no agent repeats or goes missing.
#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn pages_follow_the_index_and_each_agent_comes_once() {
    let store = dynamodb_store(3).await;
    let now = now_ms();
    let mut expected = Vec::new();
    for i in 0..40u64 {
        // Free VRAM rises as the id rises, and pairs share a value.
        let first_mb = 8192 + (i / 2) * 150;
        // A third then wander within the slack, so that their entries hold
        // a bound, no longer the exact figure.
        let free_mb = if i % 3 == 0 {
            first_mb + 37 * (i % 7)
        } else {
            first_mb
        };
        let id = format!("node-{i:02}");
        for (sent_ms, mb) in [(now - 30_000, first_mb), (now, free_mb)] {
            store
                .upsert(agent_at(&id, sent_ms, sent_ms, mb, 6))
                .await
                .unwrap();
        }
        let entry = IndexedVram::choose(free_mb, Some(IndexedVram::exact(first_mb)));
        assert!(entry.upper_mb - free_mb <= 2 * FV_SLACK_MB);
        expected.push((std::cmp::Reverse(entry.upper_mb), id, free_mb));
    }
    expected.sort();
    for (text, bound_mb) in [
        ("limit=3", 0),
        ("limit=7&min_gpu_vram_gb=9.5", 9728),
        ("limit=1&min_gpu_vram_gb=10", 10240),
        ("limit=2&min_gpu_vram_gb=10.05", 10292),
    ] {
        let (seen, _) = every_page(&store, text, now as i64, PageBudget::default()).await;
        let want: Vec<_> = expected
            .iter()
            .filter(|(_, _, free_mb)| *free_mb >= bound_mb)
            .map(|(_, id, free_mb)| (*free_mb, id.clone()))
            .collect();
        assert_eq!(seen, want, "{text}");
    }
}

/// The index lags its items (it is updated asynchronously, and reads are
/// eventually consistent): an item newer than its entry is still answered
/// at its entry's place, so no page places it before an agent it follows
/// there, and no agent repeats or goes missing across pages.
#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn an_index_that_lags_its_items_repeats_and_loses_no_agent() {
    let store = dynamodb_store(4).await;
    let client = dynamodb_client();
    let now = now_ms();
    let mut expected = Vec::new();
    for i in 0..30u64 {
        let id = format!("lag-{i:02}");
        let entry_mb = 4_000 + i * 1_000;
        // Every third item has moved far from what its entry still says.
        let item_mb = if i % 3 == 0 {
            60_000 - entry_mb
        } else {
            entry_mb
        };
        let agent = agent_at(&id, now, now, item_mb, 6);
        let mut item = encode(&agent, store.index_shards()).unwrap();
        set_index_figure(&mut item, &id, IndexedVram::exact(entry_mb));
        client
            .put_item()
            .table_name(store.table())
            .set_item(Some(item))
            .send()
            .await
            .unwrap();
        expected.push((std::cmp::Reverse(entry_mb), id, item_mb));
    }
    expected.sort();
    let want: Vec<_> = expected
        .iter()
        .map(|(_, id, item_mb)| (*item_mb, id.clone()))
        .collect();
    for limit in [1, 2, 3, 7, 100] {
        let (seen, _) = every_page(
            &store,
            &format!("limit={limit}"),
            now as i64,
            PageBudget::default(),
        )
        .await;
        assert_eq!(seen, want, "limit={limit}");
    }
}

/// A filter the index does not carry, matching one agent in 25: pages stop
/// at their budget, short and with a cursor, and following the cursors
/// still gives every match once, in order.
#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn a_selective_filter_pages_within_the_budget() {
    let store = dynamodb_store(4).await;
    let now = now_ms();
    let mut want = Vec::new();
    for i in 0..200u64 {
        let id = format!("sel-{i:03}");
        let free_mb = 10_000 + i * 10;
        let cores = if i % 25 == 0 { 64 } else { 4 };
        store
            .upsert(agent_at(&id, now, now, free_mb, cores))
            .await
            .unwrap();
        if cores == 64 {
            want.push((free_mb, id));
        }
    }
    want.reverse();
    let budget = PageBudget {
        read_units: 10.0,
        ..PageBudget::default()
    };
    let (seen, costs) = every_page(&store, "min_cpu_cores=64&limit=5", now as i64, budget).await;
    assert_eq!(seen, want);
    assert!(
        costs.len() > 2,
        "{} pages: the budget never cut one short",
        costs.len()
    );
    // A page stops before a round it cannot afford; index reads are sized
    // to what is left, at least half a unit for each of the 4 shards.
    for cost in &costs {
        assert!(cost.units <= budget.read_units + 2.0, "{cost:?}");
    }
    let items: u64 = costs.iter().map(|cost| cost.items_read).sum();
    assert!(
        items <= 200 + costs.len() as u64,
        "{items} items read for 200 agents"
    );
}

/// An agent that left is moved out of the online part of the index by its
/// `leaving` heartbeat; one that died without a word by the first query
/// that reads it. Either way an online query then reads neither.
#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn agents_that_left_cost_an_online_query_nothing() {
    let store = dynamodb_store(2).await;
    let now = now_ms();
    let online = CapacityQuery::from_query_string("limit=10").unwrap();
    let offline = CapacityQuery::from_query_string("status=offline&limit=10").unwrap();
    store
        .upsert(agent_at("alive", now, now, 9_000, 6))
        .await
        .unwrap();
    // Left: its last heartbeat said so.
    let mut body = heartbeat("left", now);
    body["state"] = json!("leaving");
    let leaving = StoredAgent::accept(
        Heartbeat::parse(body.to_string().as_bytes()).unwrap(),
        now as i64,
        Deadlines::default(),
    );
    store.upsert(leaving).await.unwrap();
    // Died: its deadline passed two minutes ago.
    store
        .upsert(agent_at("died", now - 210_000, now - 210_000, 30_000, 6))
        .await
        .unwrap();

    let (page, first) = store
        .query_measured(&online, None, now as i64)
        .await
        .unwrap();
    let ids: Vec<&str> = page.agents.iter().map(|a| a.agent_id()).collect();
    assert_eq!(ids, ["alive"]);
    assert_eq!(
        first.items_read, 2,
        "the dead agent is read once, the one that left never"
    );
    let (page, second) = store
        .query_measured(&online, None, now as i64)
        .await
        .unwrap();
    assert_eq!(page.agents.len(), 1);
    assert_eq!(
        second.items_read, 1,
        "the dead agent was moved out by the first query"
    );

    let (page, _) = store
        .query_measured(&offline, None, now as i64)
        .await
        .unwrap();
    let mut ids: Vec<&str> = page.agents.iter().map(|a| a.agent_id()).collect();
    ids.sort();
    assert_eq!(ids, ["died", "left"]);

    // A heartbeat brings it back into the online part.
    store
        .upsert(agent_at("died", now + 1, now, 30_000, 6))
        .await
        .unwrap();
    let (page, _) = store
        .query_measured(&online, None, now as i64)
        .await
        .unwrap();
    let ids: Vec<&str> = page.agents.iter().map(|a| a.agent_id()).collect();
    assert_eq!(ids, ["died", "alive"]);
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

/// The fleet's sums through a real fleet table: each write's old and new
/// item, as the stream hands them over, in batches; a redelivered batch
/// counts once; a scrape reads the sums the SQLite rule computes from the
/// agents themselves, and only the table of sums.
#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn the_fleet_sums_follow_every_change_and_count_a_redelivered_batch_once() {
    use rollcall::fleet::FleetTotals;
    use rollcall::store::dynamodb::fleet::{Change, FleetTable, StreamBatch};

    let store = dynamodb_store(4).await;
    let fleet = FleetTable::new(
        dynamodb_client(),
        rollcall_tests::fleet_table_of(store.table()),
    );
    let now = now_ms();
    let mut latest = std::collections::BTreeMap::new();
    let mut batches = Vec::new();
    // Three rounds of 20 agents in two pools, the free VRAM moving.
    for round in 0..3u64 {
        let mut changes = Vec::new();
        for n in 0..20u64 {
            let id = format!("sum-{n:02}");
            let received = now - 20_000 + round * 5_000 + n;
            let mut agent = agent_at(&id, received, received, 1_000 * (n + round), 4 + n as u32);
            agent.heartbeat.pool = if n % 3 == 0 { "render" } else { "train" }.into();
            let old = latest.get(&id).map(|agent| encode(agent, 4).unwrap());
            changes.push(Change {
                old,
                new: Some(encode(&agent, 4).unwrap()),
            });
            latest.insert(id, agent);
        }
        batches.push(StreamBatch {
            changes,
            id: format!("{}|round-{round}", store.table()),
            newest_s: Some((now / 1000) as i64),
        });
    }
    for batch in &batches {
        assert!(fleet.apply(batch).await.expect("apply") > 0);
    }
    let expected = |at_ms: i64| {
        let mut totals = FleetTotals::default();
        latest.values().for_each(|agent| totals.add(agent, at_ms));
        totals
    };
    let now = now as i64;
    assert_eq!(fleet.read(now).await.unwrap(), expected(now));
    // Lambda delivers a batch again after a failure: nothing is counted twice.
    fleet.apply(&batches[2]).await.expect("apply again");
    assert_eq!(fleet.read(now).await.unwrap(), expected(now));
    // Past every deadline the agents are still on record, all offline.
    let later = now + 200_000;
    let sums = fleet.read(later).await.unwrap();
    assert_eq!(sums, expected(later));
    assert_eq!(sums.pools["render"].offline(), 7);
    assert_eq!(sums.pools["train"].online.agents, 0);
    // Past the retention nothing is left.
    assert!(
        fleet
            .read(now + 8 * 86_400_000)
            .await
            .unwrap()
            .pools
            .is_empty()
    );
    // The store reads the same through `Store::fleet`.
    assert_eq!(store.fleet(now).await.unwrap(), expected(now));
}

/// A query that finds an agent past its deadline moves it out of the online
/// part; a heartbeat that lands between the query's read and its move wins,
/// and the agent stays online. The move is replayed here with the `until`
/// the query read, after the heartbeat, which is the race's decisive step.
#[tokio::test]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn a_heartbeat_wins_the_race_with_a_query_moving_its_agent_offline() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let store = dynamodb_store(4).await;
    let now = now_ms();
    let long_ago = now - 600_000;
    let until_read = |agent_id: &'static str| {
        let table = store.table().to_owned();
        async move {
            dynamodb_client()
                .get_item()
                .table_name(table)
                .key("agent_id", AttributeValue::S(agent_id.into()))
                .consistent_read(true)
                .send()
                .await
                .unwrap()
                .item()
                .and_then(|item| item.get("until").cloned())
                .expect("the agent's until")
        }
    };
    for agent_id in ["racer", "departed"] {
        store
            .upsert(agent_at(agent_id, long_ago, long_ago, 9_000, 8))
            .await
            .unwrap();
    }
    let seen = until_read("racer").await;
    store
        .upsert(agent_at("racer", now, now, 9_000, 8))
        .await
        .unwrap();
    assert!(
        !store.move_offline("racer", seen).await.unwrap(),
        "the move must lose to the heartbeat"
    );
    let seen = until_read("departed").await;
    assert!(store.move_offline("departed", seen.clone()).await.unwrap());
    assert!(
        !store.move_offline("departed", seen).await.unwrap(),
        "moved once"
    );
    let listed = |status: &'static str| {
        let store = store.clone();
        async move {
            let query = CapacityQuery::from_query_string(&format!("status={status}")).unwrap();
            let page = store.query(&query, None, now as i64).await.unwrap();
            page.agents
                .iter()
                .map(|agent| agent.agent_id().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed("online").await, ["racer"]);
    assert_eq!(listed("offline").await, ["departed"]);
}

/// Batches of different stream shards add to the same buckets at the same
/// moment: every one of them counts, none is lost to another's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
async fn concurrent_batches_on_the_same_buckets_all_count() {
    use rollcall::store::dynamodb::fleet::{Change, FleetTable, StreamBatch};

    let store = dynamodb_store(4).await;
    let fleet = FleetTable::new(
        dynamodb_client(),
        rollcall_tests::fleet_table_of(store.table()),
    );
    let now = now_ms();
    let batches: Vec<StreamBatch> = (0..16)
        .map(|shard| StreamBatch {
            changes: (0..5)
                .map(|n| Change {
                    old: None,
                    // The same times: the same deadline and expiry buckets.
                    new: Some(
                        encode(
                            &agent_at(&format!("race-{shard}-{n}"), now, now, 9_000, 4),
                            4,
                        )
                        .unwrap(),
                    ),
                })
                .collect(),
            id: format!("{}|shard-{shard}", store.table()),
            newest_s: None,
        })
        .collect();
    let mut writers = tokio::task::JoinSet::new();
    for batch in batches {
        let fleet = fleet.clone();
        writers.spawn(async move { fleet.apply(&batch).await });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap().expect("every batch is added");
    }
    let sums = fleet.read(now as i64).await.unwrap();
    let pool = sums.pools["default"];
    assert_eq!((pool.on_record, pool.online.agents), (80, 80), "{sums:?}");
    assert_eq!(pool.online.cores_available, 80 * 4);
}
