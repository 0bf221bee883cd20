//! One conformance suite for every store backend. Each case takes a fresh,
//! empty store; the same case passes on SQLite and on DynamoDB, or one of
//! them has a bug.

use std::sync::Arc;

use rollcall::capacity::{CapacityQuery, Position, answer_order};
use rollcall::claims::{self, Claim, ClaimRequest, Refusal};
use rollcall::heartbeat::{AgentState, GpuProcess, GpuProcesses, Heartbeat};
use rollcall::record::{Deadlines, StoredAgent};
use rollcall::store::{Store, Upsert};
use serde_json::json;

use crate::{heartbeat, now_ms};

/// A fresh, empty store and what keeps it alive.
pub struct Backend {
    pub store: Arc<dyn Store>,
    pub name: &'static str,
    /// DynamoDB derives state changes from its stream, off the write path;
    /// the tests play it (`StreamPump`). SQLite derives them as it writes.
    stream: Option<Arc<crate::StreamPump>>,
    _guard: Box<dyn std::any::Any + Send>,
}

impl Backend {
    pub fn new(
        name: &'static str,
        store: Arc<dyn Store>,
        guard: impl std::any::Any + Send,
    ) -> Self {
        Self {
            store,
            name,
            stream: None,
            _guard: Box::new(guard),
        }
    }

    pub fn with_stream(mut self, pump: Arc<crate::StreamPump>) -> Self {
        self.stream = Some(pump);
        self
    }

    /// Lets the writes so far reach wherever the backend derives state
    /// changes.
    pub async fn settle(&self) {
        if let Some(pump) = &self.stream {
            pump.pump().await;
        }
    }
}

/// The test's "now": the wall clock, so that records look current to every
/// backend (SQLite prunes by the wall clock).
fn base_ms() -> i64 {
    now_ms() as i64
}

fn agent_at(
    id: &str,
    sent_at_ms: u64,
    received_at_ms: i64,
    edit: impl FnOnce(&mut serde_json::Value),
) -> StoredAgent {
    let mut body = heartbeat(id, sent_at_ms);
    edit(&mut body);
    let heartbeat = Heartbeat::parse(body.to_string().as_bytes()).expect("valid test heartbeat");
    StoredAgent::accept(heartbeat, received_at_ms, Deadlines::default())
}

fn query(text: &str) -> CapacityQuery {
    CapacityQuery::from_query_string(text).expect("valid test query")
}

async fn ids(store: &dyn Store, text: &str, now: i64) -> Vec<String> {
    let page = store.query(&query(text), None, now).await.expect("query");
    page.agents
        .iter()
        .map(|agent| agent.agent_id().to_owned())
        .collect()
}

/// The record as written by its heartbeat: without the availability kept
/// beside it (SQLite writes it with the record, DynamoDB's stream consumer
/// after it).
async fn record_of(store: &dyn Store, agent_id: &str, now: i64) -> Option<StoredAgent> {
    let mut agent = store.get(agent_id, now).await.unwrap()?;
    agent.availability = None;
    Some(agent)
}

pub async fn upsert_then_get(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    let agent = agent_at("solo", 1_000, now, |_| {});
    assert_eq!(store.upsert(agent.clone()).await.unwrap(), Upsert::Written);
    assert_eq!(record_of(store, "solo", now).await, Some(agent));
}

pub async fn unknown_agent(backend: &Backend) {
    assert_eq!(backend.store.get("nobody", base_ms()).await.unwrap(), None);
    assert!(
        ids(&*backend.store, "status=all", base_ms())
            .await
            .is_empty()
    );
}

pub async fn newer_only(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    assert_eq!(
        store
            .upsert(agent_at("a", 2_000, now, |_| {}))
            .await
            .unwrap(),
        Upsert::Written
    );
    let newer = agent_at("a", 3_000, now + 1, |b| {
        b["cpu"]["cores_available"] = json!(2)
    });
    assert_eq!(store.upsert(newer.clone()).await.unwrap(), Upsert::Written);
    // A replay (equal) and a reordered older heartbeat are both refused.
    assert_eq!(
        store
            .upsert(agent_at("a", 3_000, now + 2, |_| {}))
            .await
            .unwrap(),
        Upsert::Stale
    );
    assert_eq!(
        store
            .upsert(agent_at("a", 2_500, now + 3, |_| {}))
            .await
            .unwrap(),
        Upsert::Stale
    );
    assert_eq!(record_of(store, "a", now + 4).await, Some(newer));
}

pub async fn concurrent_writers_keep_the_newest(backend: &Backend) {
    let store = Arc::clone(&backend.store);
    let now = base_ms();
    let mut tasks = Vec::new();
    for sent in 1..=40u64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .upsert(agent_at("race", sent, now, |_| {}))
                .await
                .unwrap()
        }));
    }
    let mut written = 0;
    for task in tasks {
        if task.await.unwrap() == Upsert::Written {
            written += 1;
        }
    }
    assert!(written >= 1);
    let stored = store.get("race", now).await.unwrap().unwrap();
    assert_eq!(
        stored.heartbeat.sent_at_ms, 40,
        "the newest heartbeat must win whatever the arrival order"
    );
}

pub async fn status_at_the_deadline(backend: &Backend) {
    let store = &*backend.store;
    let received = base_ms();
    let agent = agent_at("edge", 1, received, |_| {});
    let deadline = agent.online_until_ms;
    assert_eq!(deadline, received + 90_000);
    store.upsert(agent).await.unwrap();
    assert_eq!(ids(store, "", deadline - 1).await, ["edge"]);
    assert!(ids(store, "status=offline", deadline - 1).await.is_empty());
    assert!(ids(store, "", deadline).await.is_empty());
    assert_eq!(ids(store, "status=offline", deadline).await, ["edge"]);
    let view = store
        .get("edge", deadline)
        .await
        .unwrap()
        .unwrap()
        .view(deadline);
    assert_eq!(view.status, rollcall::wire::Status::Offline);
}

pub async fn leaving_is_offline_at_once(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    store
        .upsert(agent_at("bye", 1, now - 5, |_| {}))
        .await
        .unwrap();
    assert_eq!(ids(store, "", now).await, ["bye"]);
    let leaving = agent_at("bye", 2, now, |b| b["state"] = json!("leaving"));
    assert_eq!(leaving.heartbeat.state, AgentState::Leaving);
    store.upsert(leaving).await.unwrap();
    assert!(ids(store, "", now).await.is_empty());
    assert_eq!(ids(store, "status=offline", now).await, ["bye"]);
}

/// PROTOCOL.md §3: a draining agent is online with the normal deadline, left
/// out of listings unless `include_draining=true`, and shown by id.
pub async fn draining_is_online_but_listed_only_when_asked(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    store
        .upsert(agent_at("busy", 1, now, |_| {}))
        .await
        .unwrap();
    let draining = agent_at("gaming", 1, now, |b| b["state"] = json!("draining"));
    assert_eq!(draining.heartbeat.state, AgentState::Draining);
    assert!(
        draining.online_until_ms > now,
        "draining keeps the normal deadline"
    );
    store.upsert(draining).await.unwrap();
    assert_eq!(ids(store, "", now).await, ["busy"]);
    assert_eq!(ids(store, "status=all", now).await, ["busy"]);
    let mut all = ids(store, "include_draining=true", now).await;
    all.sort();
    assert_eq!(all, ["busy", "gaming"]);
    let shown = store
        .get("gaming", now)
        .await
        .unwrap()
        .expect("shown by id");
    assert!(shown.is_online(now));
    assert_eq!(shown.view(now).state, AgentState::Draining);
    // Back to work: listed again.
    store
        .upsert(agent_at("gaming", 2, now, |_| {}))
        .await
        .unwrap();
    let mut all = ids(store, "", now).await;
    all.sort();
    assert_eq!(all, ["busy", "gaming"]);
}

/// A small fleet that exercises every filter of PROTOCOL.md §2.
async fn seed_fleet(store: &dyn Store, now: i64) {
    let gpu = |index: u32, vendor: &str, free_mb: u64| json!({"index": index, "vendor": vendor, "memory_total_mb": 81920, "memory_free_mb": free_mb});
    let fleet = [
        (
            "big",
            "default",
            6,
            200_000,
            json!([gpu(0, "nvidia", 80_000)]),
            json!({"rack": "r1"}),
        ),
        (
            "twin12",
            "default",
            2,
            30_000,
            json!([gpu(0, "nvidia", 12_288), gpu(1, "nvidia", 12_288)]),
            json!({"rack": "r1"}),
        ),
        (
            "radeon",
            "render",
            12,
            60_000,
            json!([gpu(0, "amd", 20_480)]),
            json!({"rack": "r2", "site": "b2"}),
        ),
        (
            "mixed",
            "render",
            4,
            40_000,
            json!([gpu(0, "amd", 40_960), gpu(1, "intel", 8_192)]),
            json!({"rack": "r2"}),
        ),
        (
            "cpuonly",
            "default",
            30,
            100_000,
            json!([]),
            json!({"rack": "r3"}),
        ),
    ];
    for (id, pool, cores, memory_mb, gpus, labels) in fleet {
        let agent = agent_at(id, 1, now, |b| {
            b["pool"] = json!(pool);
            b["cpu"] = json!({"cores_physical": 32, "cores_logical": 64, "cores_available": cores,
                              "load_1m": 1.0, "load_5m": 1.0, "load_15m": 1.0});
            b["memory"] = json!({"total_mb": 262_144, "available_mb": memory_mb});
            b["gpus"] = gpus;
            b["labels"] = labels;
        });
        store.upsert(agent).await.unwrap();
    }
    // Gone offline a minute ago: only `status=offline|all` may show it.
    let stale = agent_at("stale", 1, now - 200_000, |b| {
        b["gpus"][0]["memory_free_mb"] = json!(24_000)
    });
    store.upsert(stale).await.unwrap();
}

pub async fn every_filter(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    seed_fleet(store, now).await;
    for (text, expected) in [
        ("", &["big", "mixed", "radeon", "twin12", "cpuonly"][..]),
        ("min_gpu_vram_gb=16", &["big", "mixed", "radeon"]),
        ("min_gpu_vram_gb=24", &["big", "mixed"]),
        ("min_gpu_vram_gb=12&min_gpus=2", &["twin12"]),
        ("min_gpus=2", &["mixed", "twin12"]),
        ("min_gpus=1", &["big", "mixed", "radeon", "twin12"]),
        ("min_cpu_cores=10", &["radeon", "cpuonly"]),
        ("min_cpu_cores=4.5", &["big", "radeon", "cpuonly"]),
        ("min_memory_gb=97", &["big", "cpuonly"]),
        ("min_memory_gb=100", &["big"]),
        ("gpu_vendor=amd", &["mixed", "radeon"]),
        ("gpu_vendor=intel", &["mixed"]),
        ("gpu_vendor=intel&min_gpu_vram_gb=10", &[]),
        ("gpu_vendor=nvidia&min_gpus=2", &["twin12"]),
        ("gpu_vendor=other", &[]),
        ("pool=render", &["mixed", "radeon"]),
        ("label=rack=r2", &["mixed", "radeon"]),
        ("label=rack=r2&label=site=b2", &["radeon"]),
        ("label=site=nowhere", &[]),
        ("status=offline", &["stale"]),
        ("status=all&min_gpu_vram_gb=23", &["big", "mixed", "stale"]),
        (
            "min_gpu_vram_gb=78&min_cpu_cores=6&min_memory_gb=190&pool=default&label=rack=r1",
            &["big"],
        ),
        ("min_gpu_vram_gb=1000000", &[]),
    ] {
        assert_eq!(
            ids(store, text, now).await,
            expected,
            "{} store, query {text:?}",
            backend.name
        );
    }
}

pub async fn pagination_over_260_agents(backend: &Backend) {
    let store = Arc::clone(&backend.store);
    let now = base_ms();
    let mut tasks = Vec::new();
    for i in 0..260u64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            // Many ties in free VRAM, and every fifth agent has too few cores.
            let agent = agent_at(&format!("node-{i:03}"), 1, now, |b| {
                b["gpus"][0]["memory_free_mb"] = json!(1024 * (i % 7));
                b["cpu"]["cores_available"] = json!(if i % 5 == 0 { 1 } else { 6 });
            });
            store.upsert(agent).await.unwrap()
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        task.await.unwrap();
    }
    for i in 0..260u64 {
        all.push(
            store
                .get(&format!("node-{i:03}"), now)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    for text in [
        "limit=100",
        "limit=37&min_cpu_cores=2",
        "limit=1&min_gpu_vram_gb=5",
        "limit=1000",
    ] {
        let q = query(text);
        let mut expected: Vec<&StoredAgent> =
            all.iter().filter(|agent| q.matches(agent, now)).collect();
        expected.sort_by(|a, b| answer_order(&Position::of(a), &Position::of(b)));
        let expected: Vec<&str> = expected.iter().map(|agent| agent.agent_id()).collect();

        let mut seen: Vec<String> = Vec::new();
        let mut after: Option<Position> = None;
        let mut pages = 0;
        loop {
            let page = store.query(&q, after.as_ref(), now).await.unwrap();
            assert!(page.agents.len() <= q.limit);
            seen.extend(page.agents.iter().map(|agent| agent.agent_id().to_owned()));
            pages += 1;
            assert!(pages <= 300, "pagination does not end");
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(
            seen, expected,
            "{} store, {text}: pages must list every match once, in order",
            backend.name
        );
        let full_pages = expected.len().div_ceil(q.limit).max(1);
        if backend.name == "sqlite" {
            // SQLite reads until its page is full: never short, no empty trailing page.
            assert_eq!(pages, full_pages, "{text}: no empty trailing page");
        } else {
            // DynamoDB may stop a page short at its read budget (PROTOCOL.md
            // §4), about 190 items; never more pages than that allows.
            let most = expected.len().div_ceil(q.limit.min(190)).max(1) + 1;
            assert!(
                (full_pages..=most).contains(&pages),
                "{text}: {pages} pages for {} matches",
                expected.len()
            );
        }
    }
}

pub async fn retention_pruning(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    let deadlines = Deadlines {
        grace_multiplier: 3,
        retention_s: 60,
    };
    let heartbeat = |id: &str| Heartbeat::parse(heartbeat(id, 1).to_string().as_bytes()).unwrap();
    let old = StoredAgent::accept(heartbeat("old"), now - 200_000, deadlines);
    let young = StoredAgent::accept(heartbeat("young"), now - 10_000, deadlines);
    assert!(old.is_expired(now) && !young.is_expired(now));
    store.upsert(old).await.unwrap();
    store.upsert(young).await.unwrap();

    // Past expires_at a record is gone for every read, deleted or not.
    assert_eq!(store.get("old", now).await.unwrap(), None);
    assert_eq!(ids(store, "status=all", now).await, ["young"]);
    store.prune(now).await.unwrap();
    assert_eq!(store.get("old", now).await.unwrap(), None);
    assert!(store.get("young", now).await.unwrap().is_some());
    // An expired agent that comes back is new again, even with an older sent_at_ms.
    assert_eq!(
        store
            .upsert(StoredAgent::accept(heartbeat("old"), now, deadlines))
            .await
            .unwrap(),
        Upsert::Written
    );
    assert_eq!(ids(store, "", now).await, ["old", "young"]);
}

fn rollup(minute: u64, load: f64) -> rollcall::heartbeat::MinuteRollup {
    let spread = rollcall::heartbeat::Spread {
        min: load,
        avg: load,
        max: load,
    };
    rollcall::heartbeat::MinuteRollup {
        minute,
        load_1m: spread,
        memory_available_mb: spread,
        gpu_free_mb_min: vec![100, 200],
    }
}

pub async fn history_round_trip(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    let now_s = now.div_euclid(1000);
    let this_minute = (now / 60_000) as u64;
    // Twelve minutes in two writes that overlap by one minute: the later write wins it.
    let first: Vec<_> = (this_minute - 12..this_minute - 5)
        .map(|m| rollup(m, 1.0))
        .collect();
    let second: Vec<_> = (this_minute - 6..this_minute)
        .map(|m| rollup(m, 2.0))
        .collect();
    store
        .put_history("hist", first, now_s + 3600)
        .await
        .unwrap();
    store
        .put_history("hist", second, now_s + 3600)
        .await
        .unwrap();

    let recent = store.history("hist", this_minute - 10, now).await.unwrap();
    let minutes: Vec<u64> = recent.iter().map(|r| r.minute).collect();
    assert_eq!(
        minutes,
        (this_minute - 10..this_minute).collect::<Vec<_>>(),
        "{} store",
        backend.name
    );
    let loads: Vec<f64> = recent.iter().map(|r| r.load_1m.avg).collect();
    assert_eq!(
        loads,
        [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
        "{} store",
        backend.name
    );
    assert_eq!(recent[0].gpu_free_mb_min, [100, 200]);
    // Writing the same minutes again changes nothing (retries are harmless).
    store
        .put_history(
            "hist",
            (this_minute - 6..this_minute)
                .map(|m| rollup(m, 2.0))
                .collect(),
            now_s + 3600,
        )
        .await
        .unwrap();
    assert_eq!(
        store.history("hist", this_minute - 10, now).await.unwrap(),
        recent
    );

    assert!(
        store
            .history("nobody", this_minute - 10, now)
            .await
            .unwrap()
            .is_empty()
    );
    store
        .put_history("expired", vec![rollup(this_minute - 1, 1.0)], now_s - 1)
        .await
        .unwrap();
    assert!(
        store
            .history("expired", this_minute - 10, now)
            .await
            .unwrap()
            .is_empty(),
        "{} store",
        backend.name
    );
    // History is not an agent.
    assert!(
        ids(store, "status=all", now).await.is_empty(),
        "{} store",
        backend.name
    );
}

/// An agent with these GPUs' free MiB (each 80 GiB in total), in `pool`.
fn gpu_host(id: &str, pool: &str, free_mb: &[u64], now: i64) -> StoredAgent {
    let body = crate::gpu_heartbeat(id, 1, pool, free_mb);
    agent_at(id, 1, now, |b| *b = body)
}

fn claim_body(body: serde_json::Value) -> ClaimRequest {
    ClaimRequest::parse(body.to_string().as_bytes()).expect("valid claim body")
}

fn by_name(agent: &str, gpus: &[u32], ttl_s: u64) -> ClaimRequest {
    claim_body(json!({"agent_id": agent, "gpus": gpus, "ttl_s": ttl_s, "holder": "job-1"}))
}

fn by_filters(filters: serde_json::Value, ttl_s: u64) -> ClaimRequest {
    let mut body = filters;
    body["ttl_s"] = json!(ttl_s);
    body["holder"] = json!("job-2");
    claim_body(body)
}

fn indices(claim: &Claim) -> Vec<u32> {
    claim.gpus.iter().map(|gpu| gpu.index).collect()
}

/// PROTOCOL.md §4: a claim by name holds exactly its GPUs, all or none; a
/// GPU held cannot be claimed again; records show each GPU's claim.
pub async fn claim_by_name_all_or_nothing(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    store
        .upsert(gpu_host("quad", "default", &[40_000; 4], now))
        .await
        .unwrap();
    let first = claims::claim(store, &by_name("quad", &[1, 0], 60), None, now)
        .await
        .expect("free GPUs are claimed");
    assert_eq!(indices(&first), [0, 1]);
    assert_eq!(first.view().cuda_visible_devices, "GPU-quad-0,GPU-quad-1");
    match claims::claim(store, &by_name("quad", &[1, 2], 60), None, now + 1).await {
        Err(Refusal::Claimed { index: 1, .. }) => {}
        other => panic!("{}: GPU 1 is held, got {other:?}", backend.name),
    }
    // The refused claim took nothing: GPU 2 is still free.
    let second = claims::claim(store, &by_name("quad", &[2], 60), None, now + 2)
        .await
        .expect("GPU 2 was left free by the refused claim");
    let agent = store
        .get("quad", now + 3)
        .await
        .unwrap()
        .expect("on record");
    let view = agent.view(now + 3);
    let held: Vec<Option<String>> = view
        .gpus
        .iter()
        .map(|gpu| gpu.claim.as_ref().map(|claim| claim.claim_id.clone()))
        .collect();
    let (a, b) = (first.claim_id.to_string(), second.claim_id.to_string());
    assert_eq!(
        held,
        [Some(a.clone()), Some(a), Some(b), None],
        "{}",
        backend.name
    );
    assert_eq!(view.gpus[0].claim.as_ref().unwrap().holder, "job-1");
    let read = claims::get(store, &first.claim_id, None, now + 3)
        .await
        .unwrap();
    assert_eq!(read.as_ref().map(indices), Some(vec![0, 1]));
}

/// A claim by filters takes the first agent in answer order with enough
/// unclaimed GPUs; queries leave claimed GPUs out unless asked.
pub async fn claim_by_filters_in_answer_order(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    store
        .upsert(gpu_host("large", "default", &[80_000], now))
        .await
        .unwrap();
    store
        .upsert(gpu_host("medium", "default", &[40_000, 2_000], now))
        .await
        .unwrap();
    store
        .upsert(gpu_host("small", "default", &[8_000], now))
        .await
        .unwrap();
    let filters = json!({"min_gpu_vram_gb": 30});
    let first = claims::claim(store, &by_filters(filters.clone(), 60), None, now)
        .await
        .unwrap();
    assert_eq!(first.claim_id.agent_id(), "large", "{}", backend.name);
    assert_eq!(ids(store, "min_gpu_vram_gb=30", now).await, ["medium"]);
    let second = claims::claim(store, &by_filters(filters.clone(), 60), None, now)
        .await
        .unwrap();
    assert_eq!(
        (second.claim_id.agent_id(), indices(&second)),
        ("medium", vec![0])
    );
    match claims::claim(store, &by_filters(filters, 60), None, now).await {
        Err(Refusal::NoCapacity { searched_all: true }) => {}
        other => panic!(
            "{}: every matching GPU is held, got {other:?}",
            backend.name
        ),
    }
    assert!(ids(store, "min_gpu_vram_gb=30", now).await.is_empty());
    assert_eq!(
        ids(store, "min_gpu_vram_gb=30&include_claimed=true", now).await,
        ["large", "medium"]
    );
    // Without GPU filters nothing is left out: a claim holds GPUs, not hosts.
    assert_eq!(ids(store, "", now).await, ["large", "medium", "small"]);
    let two = claims::claim(store, &by_filters(json!({"min_gpus": 2}), 60), None, now).await;
    assert!(
        matches!(two, Err(Refusal::NoCapacity { searched_all: true })),
        "{two:?}"
    );
}

/// Claims expire at their TTL with nothing left that blocks a GPU; an
/// extension moves a live claim only; a release is idempotent.
pub async fn claims_expire_extend_and_release(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    store
        .upsert(gpu_host("one", "default", &[40_000], now))
        .await
        .unwrap();
    let claim = claims::claim(store, &by_name("one", &[0], 5), None, now)
        .await
        .unwrap();
    assert_eq!(claim.expires_at_ms, now + 5_000);
    let extended = claims::extend(store, &claim.claim_id, 10, None, now + 4_000)
        .await
        .unwrap()
        .expect("a live claim is extended");
    assert_eq!(extended.expires_at_ms, now + 14_000);
    assert!(
        store
            .claims("one", now + 13_999)
            .await
            .unwrap()
            .holder_of(0)
            .is_some()
    );
    // Past its expiry: gone for every read, and the GPU is free again.
    let later = now + 14_000;
    assert!(
        claims::get(store, &claim.claim_id, None, later)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        claims::extend(store, &claim.claim_id, 60, None, later)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(ids(store, "min_gpu_vram_gb=30", later).await, ["one"]);
    let next = claims::claim(store, &by_name("one", &[0], 60), None, later)
        .await
        .expect("an expired claim blocks nothing");
    // Releasing the expired claim leaves the new one alone.
    assert!(
        claims::release(store, &claim.claim_id, None, later)
            .await
            .unwrap()
    );
    assert!(
        store
            .claims("one", later)
            .await
            .unwrap()
            .holder_of(0)
            .is_some()
    );
    assert!(
        claims::release(store, &next.claim_id, None, later)
            .await
            .unwrap()
    );
    assert!(
        claims::release(store, &next.claim_id, None, later)
            .await
            .unwrap(),
        "twice"
    );
    assert!(store.claims("one", later).await.unwrap().is_empty());
    assert!(
        claims::extend(store, &next.claim_id, 60, None, later)
            .await
            .unwrap()
            .is_none()
    );
    claims::claim(store, &by_name("one", &[0], 60), None, later)
        .await
        .expect("a released GPU is free");
}

/// A claim by name is refused on an agent that takes no new work, and
/// names what is unknown.
pub async fn claims_refused_on_unavailable_agents(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    store
        .upsert(gpu_host("up", "default", &[40_000], now))
        .await
        .unwrap();
    let mut draining = gpu_host("drain", "default", &[40_000], now);
    draining.heartbeat.state = AgentState::Draining;
    store.upsert(draining).await.unwrap();
    let leaving = agent_at("bye", 1, now, |b| b["state"] = json!("leaving"));
    store.upsert(leaving).await.unwrap();
    store
        .upsert(gpu_host("dead", "default", &[40_000], now - 200_000))
        .await
        .unwrap();
    for (agent, why) in [
        ("drain", "draining"),
        ("bye", "leaving"),
        ("dead", "offline"),
    ] {
        match claims::claim(store, &by_name(agent, &[0], 60), None, now).await {
            Err(Refusal::NotAvailable { why: said, .. }) => assert_eq!(said, why),
            other => panic!("{}: {agent} is {why}, got {other:?}", backend.name),
        }
    }
    assert!(matches!(
        claims::claim(store, &by_name("nobody", &[0], 60), None, now).await,
        Err(Refusal::UnknownAgent(_))
    ));
    assert!(matches!(
        claims::claim(store, &by_name("up", &[0, 3], 60), None, now).await,
        Err(Refusal::UnknownGpu { index: 3, .. })
    ));
    // By filters, only "up" qualifies: draining, leaving and offline never do.
    let claim = claims::claim(store, &by_filters(json!({"min_gpus": 1}), 60), None, now)
        .await
        .unwrap();
    assert_eq!(claim.claim_id.agent_id(), "up");
    assert!(
        store
            .claims("up", now)
            .await
            .unwrap()
            .holder_of(3)
            .is_none()
    );
}

/// PROTOCOL.md §4 "Scoped tokens": to a pool-limited caller another
/// pool's agents and claims do not exist.
pub async fn claims_stay_inside_their_pools(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    store
        .upsert(gpu_host("lab", "lab-a", &[10_000], now))
        .await
        .unwrap();
    store
        .upsert(gpu_host("farm", "render", &[80_000], now))
        .await
        .unwrap();
    let lab_a = vec!["lab-a".to_owned()];
    let pools = Some(lab_a.as_slice());
    assert!(matches!(
        claims::claim(store, &by_name("farm", &[0], 60), pools, now).await,
        Err(Refusal::UnknownAgent(_))
    ));
    let claim = claims::claim(store, &by_filters(json!({"min_gpus": 1}), 60), pools, now)
        .await
        .unwrap();
    assert_eq!(
        claim.claim_id.agent_id(),
        "lab",
        "the bigger GPU is in another pool"
    );
    let theirs = claims::claim(store, &by_name("farm", &[0], 60), None, now)
        .await
        .unwrap();
    assert!(
        claims::get(store, &theirs.claim_id, pools, now)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        claims::extend(store, &theirs.claim_id, 60, pools, now)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        !claims::release(store, &theirs.claim_id, pools, now)
            .await
            .unwrap()
    );
    assert!(
        store
            .claims("farm", now)
            .await
            .unwrap()
            .holder_of(0)
            .is_some(),
        "not released"
    );
    let mut query = query("status=all");
    query.pools = Some(lab_a.clone());
    let page = store.query(&query, None, now).await.unwrap();
    let seen: Vec<&str> = page.agents.iter().map(StoredAgent::agent_id).collect();
    assert_eq!(seen, ["lab"]);
}

/// 32 claimers at once against exactly 9 unclaimed matching GPUs: exactly
/// 9 claims, no GPU twice, none of the GPUs that were not free.
pub async fn racing_claimers_never_share_a_gpu(backend: &Backend) {
    let store = Arc::clone(&backend.store);
    let now = base_ms();
    store
        .upsert(gpu_host("r1", "default", &[40_000; 4], now))
        .await
        .unwrap();
    store
        .upsert(gpu_host("r2", "default", &[40_000; 4], now))
        .await
        .unwrap();
    store
        .upsert(gpu_host(
            "r3",
            "default",
            &[40_000, 40_000, 4_000, 4_000],
            now,
        ))
        .await
        .unwrap();
    claims::claim(&*store, &by_name("r1", &[2], 600), None, now)
        .await
        .unwrap();
    let mut claimers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let store = Arc::clone(&store);
        claimers.spawn(async move {
            claims::claim(
                &*store,
                &by_filters(json!({"min_gpu_vram_gb": 30}), 600),
                None,
                now,
            )
            .await
        });
    }
    let mut taken = std::collections::BTreeSet::new();
    let mut refused = 0;
    while let Some(joined) = claimers.join_next().await {
        match joined.expect("claimer task") {
            Ok(claim) => {
                for index in indices(&claim) {
                    let gpu = (claim.claim_id.agent_id().to_owned(), index);
                    assert!(
                        taken.insert(gpu.clone()),
                        "{}: {gpu:?} claimed twice",
                        backend.name
                    );
                }
            }
            Err(Refusal::NoCapacity { .. }) => refused += 1,
            Err(other) => panic!("{}: {other:?}", backend.name),
        }
    }
    assert_eq!(
        (taken.len(), refused),
        (9, 23),
        "{}: {taken:?}",
        backend.name
    );
    assert!(!taken.contains(&("r1".to_owned(), 2)));
    assert!(
        !taken
            .iter()
            .any(|(agent, index)| agent == "r3" && *index >= 2)
    );
}

/// PROTOCOL.md §4 "GPU processes": the newest snapshot is kept apart from
/// the record, an older one never replaces it, and it expires.
pub async fn gpu_processes_newest_snapshot(backend: &Backend) {
    let store = &*backend.store;
    let now = base_ms();
    let snapshot = |sent_at_ms: u64, pid: u32| GpuProcesses {
        sent_at_ms,
        gpus: [
            (
                0,
                vec![GpuProcess {
                    pid,
                    used_mb: 30_000,
                    name: Some("python3".into()),
                    user: Some("alice".into()),
                }],
            ),
            (1, vec![]),
        ]
        .into_iter()
        .collect(),
    };
    let expires_at_s = now.div_euclid(1000) + 60;
    assert_eq!(store.processes("busy", now).await.unwrap(), None);
    store
        .put_processes("busy", &snapshot(2_000, 7), expires_at_s)
        .await
        .unwrap();
    store
        .put_processes("busy", &snapshot(1_000, 8), expires_at_s)
        .await
        .unwrap();
    assert_eq!(
        store.processes("busy", now).await.unwrap(),
        Some(snapshot(2_000, 7)),
        "{}",
        backend.name
    );
    store
        .put_processes("busy", &snapshot(3_000, 9), expires_at_s)
        .await
        .unwrap();
    assert_eq!(
        store.processes("busy", now).await.unwrap(),
        Some(snapshot(3_000, 9))
    );
    assert_eq!(
        store.processes("busy", expires_at_s * 1000).await.unwrap(),
        None,
        "expired"
    );
    // Never an agent: the processes item is not listed.
    assert!(ids(store, "status=all", now).await.is_empty());
}

/// Releases and extensions racing on one agent's claims item each change
/// only their own GPUs' slots.
pub async fn releases_and_extensions_racing_on_one_agent(backend: &Backend) {
    let store = Arc::clone(&backend.store);
    let now = base_ms();
    store
        .upsert(gpu_host("eight", "default", &[40_000; 8], now))
        .await
        .unwrap();
    let mut held = Vec::new();
    for index in 0..8 {
        let claim = claims::claim(&*store, &by_name("eight", &[index], 60), None, now)
            .await
            .unwrap();
        held.push(claim.claim_id);
    }
    let mut racers = tokio::task::JoinSet::new();
    for (index, claim_id) in held.into_iter().enumerate() {
        let store = Arc::clone(&store);
        racers.spawn(async move {
            if index < 4 {
                claims::release(&*store, &claim_id, None, now)
                    .await
                    .map(|_| ())
            } else {
                claims::extend(&*store, &claim_id, 600, None, now)
                    .await
                    .map(|extended| {
                        assert!(extended.is_some(), "claim of GPU {index} extended");
                    })
            }
        });
    }
    while let Some(joined) = racers.join_next().await {
        joined.expect("racer task").expect("store answers");
    }
    let left = store.claims("eight", now).await.unwrap();
    for index in 0..8 {
        let slot = left.holder_of(index);
        if index < 4 {
            assert!(slot.is_none(), "{}: GPU {index} released", backend.name);
        } else {
            assert_eq!(
                slot.map(|s| s.expires_at_ms),
                Some(now + 600_000),
                "{}: GPU {index}",
                backend.name
            );
        }
    }
}

/// Snapshots of GPU processes written at once keep the newest.
pub async fn concurrent_processes_snapshots_keep_the_newest(backend: &Backend) {
    let store = Arc::clone(&backend.store);
    let now = base_ms();
    let mut writers = tokio::task::JoinSet::new();
    for sent_at_ms in 1..=20u64 {
        let store = Arc::clone(&store);
        writers.spawn(async move {
            let snapshot = GpuProcesses {
                sent_at_ms,
                gpus: [(
                    0,
                    vec![GpuProcess {
                        pid: sent_at_ms as u32,
                        used_mb: 1,
                        name: None,
                        user: None,
                    }],
                )]
                .into_iter()
                .collect(),
            };
            store
                .put_processes("racy", &snapshot, now.div_euclid(1000) + 60)
                .await
        });
    }
    while let Some(joined) = writers.join_next().await {
        joined.expect("writer task").expect("write");
    }
    let stored = store
        .processes("racy", now)
        .await
        .unwrap()
        .expect("a snapshot");
    assert_eq!(stored.sent_at_ms, 20, "{}", backend.name);
}

/// PROTOCOL.md §4 "State changes": each transition recorded once with the
/// time it happened (an `offline` at the deadline, by the sweep, before any
/// request), paged oldest first; `uptime_30d` and `min_uptime` follow.
pub async fn state_changes_at_their_times(backend: &Backend) {
    use rollcall::changes::{EventKind, OfflineReason};
    let store = &*backend.store;
    let now = base_ms();
    let t0 = now - 400_000;
    let beat = |at: i64, state: &str, gpus: &[&str], uptime_s: u64| {
        let gpus: Vec<serde_json::Value> = gpus
            .iter()
            .enumerate()
            .map(|(index, uuid)| {
                json!({"index": index, "vendor": "nvidia", "uuid": uuid,
                                       "memory_total_mb": 81920, "memory_free_mb": 80000})
            })
            .collect();
        agent_at("sc", at as u64, at, |body| {
            body["state"] = json!(state);
            body["gpus"] = json!(gpus);
            body["host"] = json!({"uptime_s": uptime_s});
        })
    };
    for agent in [
        beat(t0, "up", &["GPU-a", "GPU-b"], 1_000),
        beat(t0 + 30_000, "draining", &["GPU-a", "GPU-b"], 1_030),
        beat(t0 + 60_000, "up", &["GPU-a", "GPU-b"], 1_060),
        beat(t0 + 90_000, "up", &["GPU-a"], 1_090),
    ] {
        assert_eq!(store.upsert(agent).await.unwrap(), Upsert::Written);
        backend.settle().await;
    }
    // Its deadline (t0 + 180 s) passes; the sweep notices without a request.
    let sweep = store.sweep(t0 + 300_000).await.unwrap();
    assert_eq!(sweep.marked, 1, "{}: {sweep:?}", backend.name);
    backend.settle().await;
    assert_eq!(store.sweep(t0 + 301_000).await.unwrap().marked, 0);
    // Back after a reboot.
    store
        .upsert(beat(t0 + 350_000, "up", &["GPU-a"], 20))
        .await
        .unwrap();
    backend.settle().await;
    backend.settle().await;

    let events = store.events("sc", None, 100, now).await.unwrap();
    let seen: Vec<(EventKind, i64)> = events.iter().map(|e| (e.kind, e.at_ms - t0)).collect();
    assert_eq!(
        seen,
        [
            (EventKind::Online, 0),
            (EventKind::Draining, 30_000),
            (EventKind::Undrained, 60_000),
            (EventKind::GpusChanged, 90_000),
            (EventKind::Offline, 180_000),
            (EventKind::Online, 350_000),
            (EventKind::Rebooted, 350_000),
        ],
        "{}",
        backend.name
    );
    assert_eq!(events[3].gpus_removed, ["GPU-b"]);
    assert_eq!(events[4].reason, Some(OfflineReason::Deadline));
    let after_third = events[2].key();
    let page = store
        .events("sc", Some(&after_third), 2, now)
        .await
        .unwrap();
    assert_eq!(page, events[3..5]);

    // Down while draining (30 s) and offline (170 s) of 400 s.
    let agent = store.get("sc", now).await.unwrap().unwrap();
    assert_eq!(agent.uptime_30d(now), 0.5, "{}", backend.name);
    assert_eq!(ids(store, "min_uptime=0.5", now).await, ["sc"]);
    assert!(ids(store, "min_uptime=0.51", now).await.is_empty());
}

/// A sweep racing heartbeats: an agent whose heartbeat lands while the
/// sweep marks it is never left marked offline, so an online query still
/// finds it (on DynamoDB the mark and the heartbeat both write the item's
/// index part; the later one must win only if it is the heartbeat).
pub async fn a_sweep_racing_heartbeats_never_hides_a_live_agent(backend: &Backend) {
    let store = Arc::clone(&backend.store);
    let now = base_ms();
    let long_ago = now - 600_000;
    let racers: Vec<String> = (0..24).map(|n| format!("racer-{n:02}")).collect();
    for id in &racers {
        store
            .upsert(agent_at(id, long_ago as u64, long_ago, |_| {}))
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for id in racers.clone() {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .upsert(agent_at(&id, now as u64, now, |_| {}))
                .await
                .unwrap()
        }));
    }
    for _ in 0..3 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store.sweep(now).await.unwrap();
            Upsert::Written
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), Upsert::Written);
    }
    let mut online = ids(&*store, "limit=100", now + 1).await;
    online.sort();
    assert_eq!(online, racers, "{}", backend.name);
    // A sweep after them all marks none of them.
    assert_eq!(store.sweep(now + 1).await.unwrap().marked, 0);
}

/// Every case, by name, for the macro in `tests/tests/contract/store_conformance.rs`.
/// `store_conformance.rs` checks that this list names every case function
/// of this file, so that none can be left out silently.
#[macro_export]
macro_rules! conformance_cases {
    (@each $metas:tt $backend:expr; $($case:ident),*) => {
        /// The cases this module runs.
        pub const CASES: &[&str] = &[$(stringify!($case)),*];
        $( $crate::conformance_cases!(@case $metas $backend; $case); )*
    };
    (@case [$($meta:tt)*] $backend:expr; $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $($meta)*
        async fn $case() {
            let backend = $backend.await;
            $crate::conformance::$case(&backend).await;
        }
    };
    (#[ignore = $reason:literal] $backend:expr) => {
        $crate::conformance_cases!(@list [#[ignore = $reason]] $backend);
    };
    (@list $metas:tt $backend:expr) => {
        $crate::conformance_cases!(@each $metas $backend;
            upsert_then_get, unknown_agent, newer_only, concurrent_writers_keep_the_newest,
            status_at_the_deadline, leaving_is_offline_at_once,
            draining_is_online_but_listed_only_when_asked, every_filter,
            pagination_over_260_agents, retention_pruning, history_round_trip,
            claim_by_name_all_or_nothing, claim_by_filters_in_answer_order,
            claims_expire_extend_and_release, claims_refused_on_unavailable_agents,
            claims_stay_inside_their_pools, racing_claimers_never_share_a_gpu,
            gpu_processes_newest_snapshot, releases_and_extensions_racing_on_one_agent,
            concurrent_processes_snapshots_keep_the_newest, state_changes_at_their_times,
            a_sweep_racing_heartbeats_never_hides_a_live_agent);
    };
    ($backend:expr) => {
        $crate::conformance_cases!(@list [] $backend);
    };
}
