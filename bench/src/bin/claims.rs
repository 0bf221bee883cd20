//! What claims cost (PROTOCOL.md §4 "Claims"): the latency of a claim by
//! name, a claim by filters and a release, one at a time and with racing
//! claimers, on either store; on DynamoDB also the claims item's size (its
//! write units) and what claims add to a capacity query's reads.
//!
//!   rollcall-claims-bench --store sqlite
//!   AWS_ENDPOINT_URL=http://127.0.0.1:4566 rollcall-claims-bench --store dynamodb
//!
//! Loopback emulators only for DynamoDB. Prints its figures; BENCHMARKS.md
//! has those of the last run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, ValueEnum};
use rollcall::capacity::CapacityQuery;
use rollcall::claims::{self, ClaimRequest};
use rollcall::heartbeat::Heartbeat;
use rollcall::record::{Deadlines, StoredAgent};
use rollcall::store::Store;
use rollcall::store::dynamodb::DynamoStore;
use rollcall::time::now_ms;
use serde_json::json;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backend {
    Sqlite,
    Dynamodb,
}

/// Claim latency and cost on one store.
#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_enum)]
    store: Backend,
    /// Agents in the fleet, each with --gpus GPUs.
    #[arg(long, default_value_t = 200)]
    agents: usize,
    #[arg(long, default_value_t = 8)]
    gpus: usize,
    /// Claims timed one after another, of each kind.
    #[arg(long, default_value_t = 200)]
    claims: usize,
    /// Claimers racing for the same GPUs in the concurrent round.
    #[arg(long, default_value_t = 32)]
    racers: usize,
}

fn host(id: &str, gpus: usize, now: i64) -> anyhow::Result<StoredAgent> {
    let gpus: Vec<_> = (0..gpus)
        .map(|index| {
            json!({"index": index, "vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3",
                   "uuid": format!("GPU-{:08x}-0000-4000-8000-{:012x}", index, fastrand::u64(..) >> 16),
                   "memory_total_mb": 81_559, "memory_free_mb": 40_000 + fastrand::u64(..40_000)})
        })
        .collect();
    let body = json!({
        "v": 1, "agent_id": id, "sent_at_ms": now, "interval_s": 30,
        "cpu": {"cores_physical": 64, "cores_logical": 128, "cores_available": 60,
                "load_1m": 4.0, "load_5m": 4.0, "load_15m": 4.0},
        "memory": {"total_mb": 1_031_000, "available_mb": 900_000},
        "gpus": gpus
    });
    let heartbeat = Heartbeat::parse(body.to_string().as_bytes())
        .map_err(|error| anyhow::anyhow!("bench heartbeat: {error}"))?;
    Ok(StoredAgent::accept(heartbeat, now, Deadlines::default()))
}

fn request(body: serde_json::Value) -> anyhow::Result<ClaimRequest> {
    ClaimRequest::parse(body.to_string().as_bytes()).map_err(anyhow::Error::msg)
}

fn percentiles(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |share: f64| {
        samples
            .get(((samples.len() as f64 * share) as usize).min(samples.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{label:<34} n={:<5} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        samples.len(),
        at(0.50),
        at(0.99),
        samples.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    );
}

async fn open(
    backend: Backend,
) -> anyhow::Result<(Arc<dyn Store>, Option<DynamoStore>, Box<dyn std::any::Any>)> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir()?;
            let store = rollcall::store::SqliteStore::open(
                &dir.path().join("claims.db"),
                rollcall::store::Durability::Full,
            )?;
            Ok((Arc::new(store), None, Box::new(dir)))
        }
        Backend::Dynamodb => {
            rollcall_bench::loopback_endpoint()?;
            let client = DynamoStore::client_from_env().await;
            let table = format!("rollcall-claims-bench-{}", std::process::id());
            let store = DynamoStore::new(client, table, 8);
            store.create_table().await?;
            Ok((Arc::new(store.clone()), Some(store), Box::new(())))
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (store, dynamo, _guard) = open(args.store).await?;
    let now = now_ms();
    let ids: Vec<String> = (0..args.agents).map(|i| format!("bench-{i:05}")).collect();
    for id in &ids {
        store.upsert(host(id, args.gpus, now)?).await?;
    }
    println!(
        "{:?}: {} agents with {} GPUs each",
        args.store, args.agents, args.gpus
    );

    // What a query reads before any claim exists.
    let query = CapacityQuery::from_query_string("min_gpu_vram_gb=30&limit=100")?;
    if let Some(dynamo) = &dynamo {
        let (page, cost) = dynamo.query_measured(&query, None, now_ms()).await?;
        println!(
            "query of 100 before claims: {} answers, {:.1} read units ({} items read)",
            page.agents.len(),
            cost.units,
            cost.items_read
        );
    }

    if let Some(dynamo) = &dynamo {
        let mut candidates = CapacityQuery::from_query_string("min_gpu_vram_gb=30&min_gpus=2")?;
        candidates.limit = claims::CANDIDATE_PAGE;
        let (page, cost) = dynamo.query_measured(&candidates, None, now_ms()).await?;
        println!(
            "a claim by filters' candidate page ({}) before claims: {} candidates, {:.1} read units",
            claims::CANDIDATE_PAGE,
            page.agents.len(),
            cost.units
        );
    }

    // By name, one at a time: each agent's GPU 0, then released.
    let mut made = Vec::new();
    let mut by_name = Vec::new();
    for id in ids.iter().cycle().take(args.claims) {
        let started = Instant::now();
        let claim = claims::claim(
            &*store,
            &request(json!({"agent_id": id, "gpus": [0], "ttl_s": 600, "holder": "bench"}))?,
            None,
            now_ms(),
        )
        .await;
        by_name.push(started.elapsed());
        if let Ok(claim) = claim {
            made.push(claim.claim_id);
        }
        if made.len() == args.agents {
            break;
        }
    }
    percentiles("claim by name (1 GPU)", by_name);
    let mut releases = Vec::new();
    for id in made.drain(..) {
        let started = Instant::now();
        claims::release(&*store, &id, None, now_ms()).await?;
        releases.push(started.elapsed());
    }
    percentiles("release", releases);

    // By filters, one at a time: two GPUs with 30 GB free each.
    let wanted = request(
        json!({"min_gpu_vram_gb": 30, "min_gpus": 2, "ttl_s": 600, "holder": "bench-job-0123456789"}),
    )?;
    let mut by_filters = Vec::new();
    for _ in 0..args.claims {
        let started = Instant::now();
        let claim = claims::claim(&*store, &wanted, None, now_ms()).await;
        by_filters.push(started.elapsed());
        if let Ok(claim) = claim {
            made.push(claim.claim_id);
        }
    }
    percentiles("claim by filters (2 GPUs)", by_filters);

    if let Some(dynamo) = &dynamo {
        let mut candidates = CapacityQuery::from_query_string("min_gpu_vram_gb=30&min_gpus=2")?;
        candidates.limit = claims::CANDIDATE_PAGE;
        let (page, cost) = dynamo.query_measured(&candidates, None, now_ms()).await?;
        println!(
            "a claim by filters' first candidate page ({}): {} candidates, {:.1} read units",
            claims::CANDIDATE_PAGE,
            page.agents.len(),
            cost.units
        );
        let (page, cost) = dynamo.query_measured(&query, None, now_ms()).await?;
        println!(
            "query of 100 with {} claims held: {} answers, {:.1} read units ({} items read)",
            made.len(),
            page.agents.len(),
            cost.units,
            cost.items_read
        );
        let included =
            CapacityQuery::from_query_string("min_gpu_vram_gb=30&limit=100&include_claimed=true")?;
        let (page, cost) = dynamo.query_measured(&included, None, now_ms()).await?;
        println!(
            "query of 100, include_claimed: {} answers, {:.1} read units ({} items read)",
            page.agents.len(),
            cost.units,
            cost.items_read
        );
        for (gpus, holder) in [
            (1usize, 8usize),
            (2, 8),
            (4, 8),
            (8, 8),
            (16, 8),
            (4, 128),
            (8, 128),
        ] {
            let id = format!("size-{gpus}-{holder}");
            dynamo.upsert(host(&id, gpus, now_ms())?).await?;
            let all: Vec<usize> = (0..gpus).collect();
            let body =
                json!({"agent_id": id, "gpus": all, "ttl_s": 600, "holder": "h".repeat(holder)});
            claims::claim(&*store, &request(body)?, None, now_ms()).await?;
            let size = dynamo.claims_item_size(&id).await?;
            println!(
                "claims item, {gpus:>2} GPUs claimed, {holder:>3}-character holder: {size:>5} bytes = {} write unit(s) per claim write",
                size.div_ceil(1024).max(1)
            );
        }
    }

    // Racing: `racers` claimers at once for one GPU each on a fresh agent
    // with `gpus` GPUs: exactly that many win.
    let race_id = "bench-race";
    store.upsert(host(race_id, args.gpus, now_ms())?).await?;
    let mut racers = tokio::task::JoinSet::new();
    let racing = request(
        json!({"min_gpu_vram_gb": 0, "min_gpus": 1, "ttl_s": 600, "holder": "racer",
                                "labels": {}}),
    )?;
    for id in made.drain(..) {
        claims::release(&*store, &id, None, now_ms()).await?;
    }
    // Every other agent's GPUs are held, so all racers want the race agent's.
    for id in &ids {
        let all: Vec<usize> = (0..args.gpus).collect();
        let body = json!({"agent_id": id, "gpus": all, "ttl_s": 600, "holder": "filler"});
        claims::claim(&*store, &request(body)?, None, now_ms()).await?;
    }
    let started = Instant::now();
    for _ in 0..args.racers {
        let store = Arc::clone(&store);
        let racing = racing.clone();
        racers.spawn(async move {
            let started = Instant::now();
            let outcome = claims::claim(&*store, &racing, None, now_ms()).await;
            (started.elapsed(), outcome.is_ok())
        });
    }
    let mut latencies = Vec::new();
    let mut won = 0;
    while let Some(joined) = racers.join_next().await {
        let (latency, ok) = joined?;
        latencies.push(latency);
        won += usize::from(ok);
    }
    percentiles(
        &format!("{} racers for {} GPUs", args.racers, args.gpus),
        latencies,
    );
    println!(
        "racers: {won} claims made (of {} GPUs), all answered in {:.1} ms",
        args.gpus,
        started.elapsed().as_secs_f64() * 1000.0
    );
    if won != args.gpus.min(args.racers) {
        bail!("racers made {won} claims for {} GPUs", args.gpus);
    }
    Ok(())
}
