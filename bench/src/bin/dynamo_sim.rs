//! rollcall-dynamo-sim: what DynamoDB bills for a fleet whose free VRAM moves
//! the way real machines' does.
//!
//! `model` runs the churn model for a long simulated time in memory and
//! applies the unit model (`rollcall::store::dynamodb::units`) to every
//! heartbeat under each index design weighed in docs/dynamodb.md.
//! `emulator` writes a fleet through the real store to a DynamoDB emulator,
//! a few intervals of churn, then times capacity queries that match 5 %.
//!
//! The churn model, per agent:
//! - GPUs: 45 % have 24 GB cards, 30 % 48 GB, 25 % 80 GB; 70 % have one GPU,
//!   20 % two, 10 % four. An idle GPU's free memory is its total less a
//!   per-machine driver reservation of 250–700 MiB, and it does not move:
//!   nothing allocates on an idle headless GPU.
//! - Jobs: a machine is busy about 35 % of the time. A job's length is
//!   log-normal (median 2 h, σ 1.2): heavy-tailed, as in published GPU
//!   cluster traces, most short and a few running for days. A job takes
//!   30–95 % of each GPU's memory when it starts; PyTorch's caching allocator
//!   then holds that footprint flat, so it moves (±200 MiB) in only 2 % of
//!   intervals.
//! - 5 % are desktops whose first GPU drives a display: its free memory
//!   wanders by tens of MiB every interval.
//!
//! Loopback emulators only: the endpoint comes from AWS_ENDPOINT_URL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use aws_sdk_dynamodb::types::AttributeValue;
use clap::{Parser, Subcommand};
use rollcall::capacity::CapacityQuery;
use rollcall::fleet::Share;
use rollcall::heartbeat::Heartbeat;
use rollcall::record::{Deadlines, StoredAgent};
use rollcall::store::dynamodb::fleet::{Change, FleetTable, StreamBatch, Tally};
use rollcall::store::dynamodb::units::{
    IndexShape, Projection, WriteUnits, read_units, write_units,
};
use rollcall::store::dynamodb::{
    CAPACITY_INDEX, DynamoStore, FV_SLACK_MB, IndexedVram, Item, ReadCost, TABLE_KEY, encode,
    item_size, modelled_write, set_index_figure, shard_of,
};
use serde_json::json;

/// DynamoDB write and read units for a simulated fleet with realistic churn.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// The unit model over a long run, in memory, for every index design.
    Model {
        #[arg(long, default_value_t = 2000)]
        agents: usize,
        /// Simulated hours at a 30 s interval.
        #[arg(long, default_value_t = 24.0)]
        hours: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// The real store on an emulator at AWS_ENDPOINT_URL: writes, then queries.
    Emulator {
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// Intervals of churn written after the first heartbeat of each agent.
        #[arg(long, default_value_t = 2)]
        intervals: u32,
        /// Capacity queries timed per kind.
        #[arg(long, default_value_t = 20)]
        queries: usize,
        #[arg(long, default_value_t = rollcall::store::DEFAULT_SHARDS)]
        shards: u32,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write each agent's first item straight into the table with
        /// BatchWriteItem instead of through the store (no write figures, no
        /// churn): the way to reach 1,000,000 agents on an emulator in minutes.
        #[arg(long, conflicts_with = "intervals")]
        direct: bool,
    },
}

const INTERVAL_MS: u64 = 30_000;
const STEPS_PER_HOUR: f64 = 120.0;

struct Job {
    steps_left: u64,
    used_mb: Vec<u64>,
}

struct SimAgent {
    id: String,
    totals_mb: Vec<u64>,
    reserved_mb: u64,
    display: Option<u64>,
    job: Option<Job>,
}

impl SimAgent {
    fn free_mb(&self) -> Vec<u64> {
        self.totals_mb
            .iter()
            .enumerate()
            .map(|(gpu, total)| {
                let used = self.job.as_ref().map_or(0, |job| job.used_mb[gpu]);
                let display = if gpu == 0 {
                    self.display.unwrap_or(0)
                } else {
                    0
                };
                total.saturating_sub(self.reserved_mb + used + display)
            })
            .collect()
    }
}

struct Fleet {
    agents: Vec<SimAgent>,
    rng: fastrand::Rng,
}

/// Mean idle time that makes a machine busy 35 % of the time, given the job
/// length's mean (log-normal: median × e^(σ²/2)).
fn job_start_probability() -> f64 {
    let mean_job_steps = 2.0 * STEPS_PER_HOUR * (1.2f64 * 1.2 / 2.0).exp();
    let mean_idle_steps = mean_job_steps * 0.65 / 0.35;
    1.0 / mean_idle_steps
}

impl Fleet {
    fn new(count: usize, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let agents = (0..count)
            .map(|n| {
                let total = match rng.f64() {
                    x if x < 0.45 => 24_564,
                    x if x < 0.75 => 49_140,
                    _ => 81_559,
                };
                // Desktops and small servers, and the 8- and 16-GPU hosts
                // whose items are the largest.
                let gpus = match rng.f64() {
                    x if x < 0.65 => 1,
                    x if x < 0.85 => 2,
                    x if x < 0.93 => 4,
                    x if x < 0.98 => 8,
                    _ => 16,
                };
                SimAgent {
                    id: format!("sim-{n:07}"),
                    totals_mb: vec![total; gpus],
                    reserved_mb: rng.u64(250..=700),
                    display: (rng.f64() < 0.05).then(|| rng.u64(300..1500)),
                    job: None,
                }
            })
            .collect();
        let mut fleet = Self { agents, rng };
        // Start in the steady state: about 35 % busy, mid-job.
        for index in 0..fleet.agents.len() {
            if fleet.rng.f64() < 0.35 {
                let job = fleet.new_job(index);
                fleet.agents[index].job = Some(job);
            }
        }
        fleet
    }

    fn new_job(&mut self, index: usize) -> Job {
        let normal = self.standard_normal();
        let steps = (2.0 * STEPS_PER_HOUR * (1.2 * normal).exp()).max(1.0) as u64;
        let used_mb = self.agents[index]
            .totals_mb
            .iter()
            .map(|total| (*total as f64 * (0.30 + 0.65 * self.rng.f64())) as u64)
            .collect();
        Job {
            steps_left: steps,
            used_mb,
        }
    }

    fn standard_normal(&mut self) -> f64 {
        // Box–Muller: fastrand has no normal distribution.
        let u = self.rng.f64().max(f64::MIN_POSITIVE);
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.rng.f64()).cos()
    }

    /// One interval passes for every agent.
    fn step(&mut self) {
        let start = job_start_probability();
        for index in 0..self.agents.len() {
            if let Some(level) = self.agents[index].display {
                let drift = (self.standard_normal() * 40.0) as i64;
                self.agents[index].display = Some((level as i64 + drift).clamp(150, 3000) as u64);
            }
            let agent = &mut self.agents[index];
            match &mut agent.job {
                Some(job) if job.steps_left <= 1 => agent.job = None,
                Some(job) => {
                    job.steps_left -= 1;
                    if self.rng.f64() < 0.02 {
                        for used in &mut job.used_mb {
                            *used = used.saturating_add_signed(self.rng.i64(-200..=200));
                        }
                    }
                }
                None if self.rng.f64() < start => {
                    let job = self.new_job(index);
                    self.agents[index].job = Some(job);
                }
                None => {}
            }
        }
    }

    fn heartbeat(&self, index: usize, sent_at_ms: u64) -> anyhow::Result<StoredAgent> {
        let agent = &self.agents[index];
        let gpus: Vec<_> = agent
            .free_mb()
            .iter()
            .zip(&agent.totals_mb)
            .enumerate()
            .map(|(gpu, (free, total))| {
                json!({"index": gpu, "vendor": "nvidia", "name": "NVIDIA RTX 6000 Ada Generation",
                       "uuid": gpu_uuid(index, gpu),
                       "memory_total_mb": total, "memory_free_mb": free,
                       "utilization_percent": if agent.job.is_some() { 97.0 } else { 0.0 },
                       "temperature_c": 41.0, "power_w": 31.5})
            })
            .collect();
        let body = json!({
            "v": 1, "agent_id": agent.id, "sent_at_ms": sent_at_ms, "interval_s": 30,
            "pool": POOLS[index % POOLS.len()], "labels": {"site": "b2", "rack": format!("r{}", index % 40)},
            "host": {"hostname": format!("{}.lab.example.org", agent.id), "os": "Linux (Ubuntu 24.04.1 LTS)", "uptime_s": 864_000},
            "cpu": cpu(index),
            "memory": {"total_mb": 128_000, "available_mb": 64_000 + (sent_at_ms / 1000) % 4096},
            "disk": {"path": "/", "total_gb": 931.51, "free_gb": 402.27},
            "gpus": gpus,
        });
        let heartbeat = Heartbeat::parse(body.to_string().as_bytes())
            .map_err(|e| anyhow::anyhow!("simulated heartbeat rejected: {e}"))?;
        Ok(StoredAgent::accept(
            heartbeat,
            sent_at_ms as i64,
            Deadlines::default(),
        ))
    }
}

/// A GPU's UUID as NVML gives it: 128 random-looking bits, which no
/// dictionary compresses (a made-up pattern would flatter the item size).
fn gpu_uuid(agent: usize, gpu: usize) -> String {
    let mut state = (agent as u64) << 8 | gpu as u64;
    let mut half = || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (high, low) = (half(), half());
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xffff,
        low >> 48,
        low & 0xffff_ffff_ffff
    )
}

/// The pools the simulated fleet is spread over, evenly.
const POOLS: [&str; 4] = ["render", "train", "infer", "dev"];

/// One agent in a thousand is a 64-core machine with 96 cores free, so that
/// `min_cpu_cores=64`, a filter the index does not carry, matches 0.1 %.
fn cpu(index: usize) -> serde_json::Value {
    let (physical, available) = if index % 1000 == 999 {
        (64, 96)
    } else {
        (16, 12 + index % 20)
    };
    json!({"cores_physical": physical, "cores_logical": physical * 2, "cores_available": available,
           "load_1m": 1.5, "load_5m": 1.2, "load_15m": 0.8, "usage_percent": 23.5})
}

/// How a design turns a heartbeat into the item it writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// Ranked by the exact figure, rewritten whenever it moves.
    ExactRank,
    /// A coarse bucket as the sort key, with the exact figure beside it.
    Bucket,
    /// Ranked by a figure kept while within the slack, read before each
    /// write (the store before bounded pages).
    SlackRankRead,
    /// Ranked by a bound kept while it places the agent, written by an
    /// update that keeps the entry, falling back to a put (the store's own).
    UpdateFirst,
}

/// Width of the buckets the bucket designs were weighed with.
const BUCKET_MB: u64 = 4096;

/// The index designs weighed in docs/dynamodb.md, as the unit model sees them.
fn designs() -> Vec<(&'static str, IndexShape, Encoding)> {
    let shape = |range, projection| IndexShape {
        hash: "shard",
        range: Some(range),
        projection,
    };
    vec![
        (
            "exact rank, all attributes projected (before)",
            shape("rank", Projection::All),
            Encoding::ExactRank,
        ),
        (
            "exact rank, keys only",
            shape("rank", Projection::KeysOnly),
            Encoding::ExactRank,
        ),
        (
            "4 GiB bucket, keys only",
            shape("bucket", Projection::KeysOnly),
            Encoding::Bucket,
        ),
        (
            "4 GiB bucket + exact figure",
            shape("bucket", Projection::Include(&["fv", "pool"])),
            Encoding::Bucket,
        ),
        (
            "rank of a figure kept within 256 MiB, read before each write (before)",
            CAPACITY_INDEX,
            Encoding::SlackRankRead,
        ),
        (
            "rank of a bound kept while it places the agent, update first (chosen)",
            CAPACITY_INDEX,
            Encoding::UpdateFirst,
        ),
    ]
}

/// The item `encoding` writes, from the item with an exact figure (deflating
/// the record once per heartbeat, not once per design).
fn encode_as(
    encoding: Encoding,
    exact: &Item,
    stored: &StoredAgent,
    previous: Option<&Item>,
) -> Item {
    let free_mb = stored.heartbeat.max_gpu_free_mb();
    let agent_id = &stored.heartbeat.agent_id;
    let mut item = exact.clone();
    match encoding {
        Encoding::ExactRank => {}
        Encoding::Bucket => {
            item.remove("rank");
            let bucket = format!("{:06}#{agent_id}", 999_999 - free_mb / BUCKET_MB);
            item.insert("bucket".into(), AttributeValue::S(bucket));
            // The figure this design projects beside the bucket.
            item.insert("fv".into(), AttributeValue::N(free_mb.to_string()));
        }
        Encoding::SlackRankRead => {
            // The earlier rule: keep the stored figure while the new one is
            // within the slack of it, the rank at the figure plus the slack.
            let stored = previous.and_then(IndexedVram::of_item);
            let vram = match stored {
                Some(old) => {
                    let base = if old.exact {
                        old.upper_mb
                    } else {
                        old.upper_mb - FV_SLACK_MB
                    };
                    if base.abs_diff(free_mb) <= FV_SLACK_MB && base != free_mb {
                        IndexedVram {
                            upper_mb: base + FV_SLACK_MB,
                            exact: false,
                        }
                    } else if base == free_mb {
                        IndexedVram::exact(base)
                    } else {
                        IndexedVram::exact(free_mb)
                    }
                }
                None => IndexedVram::exact(free_mb),
            };
            set_index_figure(&mut item, agent_id, vram);
        }
        Encoding::UpdateFirst => unreachable!("written by modelled_write"),
    }
    item
}

fn run_model(agents: usize, hours: f64, seed: u64) -> anyhow::Result<()> {
    let mut fleet = Fleet::new(agents, seed);
    let steps = (hours * STEPS_PER_HOUR) as u64;
    let designs = designs();
    let mut totals = vec![WriteUnits::default(); designs.len()];
    let mut busiest_index_step = vec![0u64; designs.len()];
    let mut previous: Vec<Vec<Option<Item>>> = vec![vec![None; agents]; designs.len()];
    let mut last_free: Vec<Option<u64>> = vec![None; agents];
    let (mut moved, mut crossed, mut heartbeats) = (0u64, 0u64, 0u64);
    let mut sums = SumsModel::new(agents);
    let started = Instant::now();
    for step in 0..=steps {
        if step > 0 {
            fleet.step();
        }
        let mut step_index_units = vec![0u64; designs.len()];
        for index in 0..agents {
            let stored = fleet.heartbeat(index, 1_764_000_000_000 + step * INTERVAL_MS)?;
            sums.change(index, &stored);
            let free_mb = stored.heartbeat.max_gpu_free_mb();
            // Only steady-state heartbeats count: each agent's first is a one-off.
            if let Some(old_free) = last_free[index] {
                heartbeats += 1;
                moved += u64::from(old_free != free_mb);
                crossed += u64::from(old_free / BUCKET_MB != free_mb / BUCKET_MB);
            }
            last_free[index] = Some(free_mb);
            let exact = encode(&stored, rollcall::store::DEFAULT_SHARDS)?;
            for (design, (_, shape, encoding)) in designs.iter().enumerate() {
                let old = previous[design][index].take();
                let (new, units) = if *encoding == Encoding::UpdateFirst {
                    modelled_write(old.as_ref(), &stored, rollcall::store::DEFAULT_SHARDS)?
                } else {
                    let new = encode_as(*encoding, &exact, &stored, old.as_ref());
                    let units =
                        write_units(TABLE_KEY, old.as_ref(), &new, std::slice::from_ref(shape));
                    (new, units)
                };
                if old.is_some() {
                    totals[design].table += units.table;
                    totals[design].indexes += units.indexes;
                    step_index_units[design] += units.indexes;
                }
                previous[design][index] = Some(new);
            }
        }
        for (design, units) in step_index_units.into_iter().enumerate() {
            busiest_index_step[design] = busiest_index_step[design].max(units);
        }
    }
    println!(
        "churn model: {agents} agents, {hours} h at 30 s ({heartbeats} steady-state heartbeats, seed {seed}, {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "largest free VRAM moved in {:.2} % of heartbeats; crossed a {} GiB bucket in {:.3} %",
        100.0 * moved as f64 / heartbeats as f64,
        BUCKET_MB / 1024,
        100.0 * crossed as f64 / heartbeats as f64
    );
    println!();
    let names: Vec<&str> = designs.iter().map(|(name, _, _)| *name).collect();
    print_designs(&names, &totals, &busiest_index_step, agents, heartbeats);
    sums.print();
    print_tally_cost(&fleet)
}

/// What the fleet function spends per change on this machine: both images
/// decoded and tallied, as `FleetTable::apply` does before it writes.
fn print_tally_cost(fleet: &Fleet) -> anyhow::Result<()> {
    let count = fleet.agents.len().min(2000);
    let changes: Vec<Change> = (0..count)
        .map(|index| {
            let item = encode(&fleet.heartbeat(index, 1_764_000_000_000)?, 8)?;
            Ok(Change {
                old: Some(item.clone()),
                new: Some(item),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let rounds = 20;
    for _ in 0..rounds {
        std::hint::black_box(Tally::of(&changes, None));
    }
    let per_change = started.elapsed().as_secs_f64() / (rounds * count) as f64;
    println!(
        "fleet function: {:.1} µs of CPU per change (two images decoded and tallied, release build, one core of this machine)",
        per_change * 1e6
    );
    Ok(())
}

/// The fleet function's writes under the same churn: agents' heartbeats
/// spread evenly over each interval, the stream cut into 10 s batches (the
/// template's batching window), each batch's buckets counted as it would
/// write them.
struct SumsModel {
    agents: usize,
    last: Vec<Option<Share>>,
    batch: Vec<(Option<Share>, Option<Share>)>,
    batch_window: Option<i64>,
    batches: u64,
    changes: u64,
    buckets: u64,
}

const BATCH_WINDOW_MS: i64 = 10_000;

impl SumsModel {
    fn new(agents: usize) -> Self {
        Self {
            agents,
            last: vec![None; agents],
            batch: Vec::new(),
            batch_window: None,
            batches: 0,
            changes: 0,
            buckets: 0,
        }
    }

    /// Agent `index`'s heartbeat, moved to its place in the interval.
    fn change(&mut self, index: usize, stored: &StoredAgent) {
        let offset_ms = (index as u64 * INTERVAL_MS / self.agents as u64) as i64;
        let mut share = Share::of(stored);
        share.received_at_ms += offset_ms;
        share.online_until_ms += offset_ms;
        share.expires_at_s += offset_ms / 1000;
        let window = share.received_at_ms.div_euclid(BATCH_WINDOW_MS);
        if self.batch_window.is_some_and(|open| open != window) {
            self.flush();
        }
        self.batch_window = Some(window);
        let old = self.last[index].replace(share.clone());
        // Each agent's first heartbeat is a one-off, as in the units above.
        if old.is_some() {
            self.batch.push((old, Some(share)));
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let as_of_s = self
            .batch_window
            .map(|window| (window + 1) * BATCH_WINDOW_MS / 1000 - 60);
        self.buckets += Tally::of_shares(&self.batch, as_of_s).buckets() as u64;
        self.changes += self.batch.len() as u64;
        self.batches += 1;
        self.batch.clear();
    }

    fn print(mut self) {
        self.flush();
        let per_batch = self.buckets as f64 / self.batches.max(1) as f64;
        println!();
        println!(
            "fleet sums: {} batches of 10 s ({:.0} changes each, {} pools): {per_batch:.2} buckets written per batch, {:.4} write units per heartbeat at this fleet size (2 per bucket, transactional)",
            self.batches,
            self.changes as f64 / self.batches.max(1) as f64,
            POOLS.len(),
            2.0 * self.buckets as f64 / self.changes.max(1) as f64,
        );
    }
}

/// The model's table: units per steady-state heartbeat under each design.
fn print_designs(
    names: &[&str],
    totals: &[WriteUnits],
    busiest_index_step: &[u64],
    agents: usize,
    heartbeats: u64,
) {
    println!(
        "| index design | table units | index units | write units per heartbeat | busiest interval, index units per heartbeat |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let per = |units: u64| units as f64 / heartbeats as f64;
    for ((name, total), busiest) in names.iter().zip(totals).zip(busiest_index_step) {
        println!(
            "| {name} | {:.4} | {:.4} | {:.4} | {:.4} |",
            per(total.table),
            per(total.indexes),
            per(total.total()),
            *busiest as f64 / agents as f64
        );
    }
    println!(
        "\n(the design before also read the item before writing it: 0.5 read units, priced like a tenth of a write unit; the chosen one reads nothing, and its table units include the failed conditions)"
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run_emulator(
    agents: usize,
    intervals: u32,
    queries: usize,
    shards: u32,
    concurrency: usize,
    seed: u64,
    direct: bool,
) -> anyhow::Result<()> {
    let (store, client) = emulator_store(shards, seed).await?;
    store.create_table().await?;
    let sums = FleetTable::new(client.clone(), format!("{}-fleet", store.table()));
    sums.create().await?;
    let store = Arc::new(store.with_fleet(sums.clone()));
    let mut fleet = Fleet::new(agents, seed);
    let intervals = if direct { 0 } else { intervals };
    let start_ms = u64::try_from(rollcall::time::now_ms())? - u64::from(intervals) * INTERVAL_MS;
    if direct {
        write_direct(&client, &store, &sums, &fleet, start_ms, concurrency).await?;
    } else {
        write_intervals(&store, &sums, &mut fleet, start_ms, intervals, concurrency).await?;
    }
    let now_ms = (start_ms + u64::from(intervals) * INTERVAL_MS) as i64 + 1000;
    measure_queries(&store, &fleet, shards, now_ms, queries).await?;
    measure_paging(&store, agents, now_ms).await?;
    measure_metrics(agents, &sums, now_ms, queries).await
}

/// The real store on a fresh table of the emulator `AWS_ENDPOINT_URL` names,
/// which must be on this machine.
async fn emulator_store(
    shards: u32,
    seed: u64,
) -> anyhow::Result<(DynamoStore, aws_sdk_dynamodb::Client)> {
    rollcall_bench::loopback_endpoint()?;
    // The emulator answers a Query over 100,000 items far slower than
    // DynamoDB; the functions' 8 s budget would cut the measurement short.
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_timeout(std::time::Duration::from_secs(300))
                .operation_attempt_timeout(std::time::Duration::from_secs(300))
                .build(),
        )
        .load()
        .await;
    let client = aws_sdk_dynamodb::Client::new(&config);
    let table = format!("rollcall-sim-{}-{}", std::process::id(), seed);
    Ok((DynamoStore::new(client.clone(), table, shards), client))
}

/// Writes every agent's heartbeat once per interval through the store, the
/// fleet moving in between; prints the write units of each interval and of
/// all but the first (each agent's first heartbeat is a one-off).
async fn write_intervals(
    store: &Arc<DynamoStore>,
    sums: &FleetTable,
    fleet: &mut Fleet,
    start_ms: u64,
    intervals: u32,
    concurrency: usize,
) -> anyhow::Result<()> {
    let agents = fleet.agents.len();
    let mut computed = WriteUnits::default();
    let (mut steady, mut disagreements, mut failures_total) = (0u64, 0u64, 0.0);
    let started = Instant::now();
    let mut previous: Option<Arc<Vec<StoredAgent>>> = None;
    for interval in 0..=intervals {
        if interval > 0 {
            fleet.step();
        }
        let sent_ms = start_ms + u64::from(interval) * INTERVAL_MS;
        let heartbeats: Arc<Vec<StoredAgent>> = Arc::new(
            (0..agents)
                .map(|index| fleet.heartbeat(index, sent_ms))
                .collect::<anyhow::Result<_>>()?,
        );
        let (units, reads, disagree) =
            write_interval(store, Arc::clone(&heartbeats), concurrency).await?;
        tally_interval(
            sums,
            previous.as_deref(),
            &heartbeats,
            store.index_shards(),
            &format!("interval {interval}"),
        )
        .await?;
        previous = Some(heartbeats);
        if interval > 0 {
            // The first interval after the first heartbeats also marks every
            // wandering display's entry inexact, once.
            println!(
                "interval {interval}: {:.4} write units per heartbeat",
                units.total() as f64 / agents as f64
            );
            computed.table += units.table;
            computed.indexes += units.indexes;
            steady += agents as u64;
            failures_total += reads;
            disagreements += disagree;
        }
        eprintln!(
            "interval {interval}: {agents} heartbeats written ({:.0} s so far)",
            started.elapsed().as_secs_f64()
        );
    }
    let per = |units: u64| units as f64 / steady.max(1) as f64;
    println!(
        "{agents} agents on the emulator, {} shards: {steady} steady-state heartbeats written through the store: {:.4} table + {:.4} index = {:.4} write units per heartbeat (computed from each write's old item, failed conditions included), {:.2} % of heartbeats needed the fallback put, no reads; the emulator's table figure disagreed with the model {disagreements} times",
        store.index_shards(),
        per(computed.table),
        per(computed.indexes),
        per(computed.total()),
        100.0 * failures_total / steady.max(1) as f64
    );
    Ok(())
}

/// One interval's heartbeats written by `concurrency` writers: the write
/// units computed, how many writes failed their condition, and how often the emulator's own table
/// figure disagreed with the computed one.
async fn write_interval(
    store: &Arc<DynamoStore>,
    heartbeats: Arc<Vec<StoredAgent>>,
    concurrency: usize,
) -> anyhow::Result<(WriteUnits, f64, u64)> {
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (store, heartbeats) = (Arc::clone(store), Arc::clone(&heartbeats));
        workers.spawn(async move {
            let (mut units, mut failures, mut disagreements) = (WriteUnits::default(), 0.0, 0u64);
            for agent in heartbeats.iter().skip(worker).step_by(concurrency) {
                let (_, cost) = store.upsert_measured(agent).await?;
                units.table += cost.computed.table;
                units.indexes += cost.computed.indexes;
                failures += f64::from(cost.conditional_failures);
                // The emulator reports the last write's table alone, never
                // the failed condition before it.
                let last_write = cost.computed.table - u64::from(cost.conditional_failures);
                disagreements += u64::from(
                    cost.reported_table
                        .is_some_and(|reported| reported != last_write as f64),
                );
            }
            anyhow::Ok((units, failures, disagreements))
        });
    }
    let (mut total, mut reads, mut disagreements) = (WriteUnits::default(), 0.0, 0u64);
    while let Some(done) = workers.join_next().await {
        let (units, read_units, disagree) = done??;
        total.table += units.table;
        total.indexes += units.indexes;
        reads += read_units;
        disagreements += disagree;
    }
    Ok((total, reads, disagreements))
}

/// Each agent's first item, written straight into the table in batches of
/// 25 by `concurrency` writers, and added to the fleet sums.
async fn write_direct(
    client: &aws_sdk_dynamodb::Client,
    store: &DynamoStore,
    sums: &FleetTable,
    fleet: &Fleet,
    sent_ms: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
    let agents = fleet.agents.len();
    let started = Instant::now();
    let chunk = 25 * concurrency * 20;
    for first in (0..agents).step_by(chunk) {
        let heartbeats: Vec<StoredAgent> = (first..(first + chunk).min(agents))
            .map(|index| fleet.heartbeat(index, sent_ms))
            .collect::<anyhow::Result<_>>()?;
        let mut writers = tokio::task::JoinSet::new();
        let batches: Vec<Vec<WriteRequest>> = heartbeats
            .chunks(25)
            .map(|agents| {
                agents
                    .iter()
                    .map(|agent| {
                        let put = PutRequest::builder()
                            .set_item(Some(encode(agent, store.index_shards())?))
                            .build()?;
                        Ok(WriteRequest::builder().put_request(put).build())
                    })
                    .collect::<anyhow::Result<_>>()
            })
            .collect::<anyhow::Result<_>>()?;
        let batches = Arc::new(std::sync::Mutex::new(batches));
        for _ in 0..concurrency {
            let (client, table, batches) = (
                client.clone(),
                store.table().to_owned(),
                Arc::clone(&batches),
            );
            writers.spawn(async move {
                loop {
                    let Some(mut pending) = batches
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .pop()
                    else {
                        return anyhow::Ok(());
                    };
                    while !pending.is_empty() {
                        let output = client
                            .batch_write_item()
                            .request_items(&table, pending)
                            .send()
                            .await?;
                        pending = output
                            .unprocessed_items()
                            .and_then(|items| items.get(&table))
                            .cloned()
                            .unwrap_or_default();
                    }
                }
            });
        }
        while let Some(done) = writers.join_next().await {
            done??;
        }
        tally_interval(
            sums,
            None,
            &heartbeats,
            store.index_shards(),
            &format!("direct {first}"),
        )
        .await?;
        eprintln!(
            "{} of {agents} agents written directly ({:.0} s so far)",
            (first + chunk).min(agents),
            started.elapsed().as_secs_f64()
        );
    }
    println!("{agents} agents written straight into the table (BatchWriteItem; no write figures)");
    Ok(())
}

/// What the stream hands the fleet function for one interval's writes (each
/// agent's item before and after), in batches of 1,000 as the template's
/// event source mapping delivers them, added to the fleet sums.
async fn tally_interval(
    sums: &FleetTable,
    previous: Option<&Vec<StoredAgent>>,
    heartbeats: &[StoredAgent],
    shards: u32,
    label: &str,
) -> anyhow::Result<()> {
    for (number, chunk) in heartbeats.chunks(1000).enumerate() {
        let changes = chunk
            .iter()
            .enumerate()
            .map(|(offset, agent)| {
                let old = previous
                    .map(|agents| encode(&agents[number * 1000 + offset], shards))
                    .transpose()?;
                Ok(Change {
                    old,
                    new: Some(encode(agent, shards)?),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let batch = StreamBatch {
            changes,
            id: format!("{}|{label}|{number}", sums.name()),
            newest_s: None,
        };
        sums.apply(&batch).await?;
    }
    Ok(())
}

/// The first page of 100 of a query matching 5 % of the fleet and of one
/// with no filter, `queries` times each: reads and latency, beside what the
/// earlier exact-rank index read for the same page.
async fn measure_queries(
    store: &DynamoStore,
    fleet: &Fleet,
    shards: u32,
    now_ms: i64,
    queries: usize,
) -> anyhow::Result<()> {
    let agents = fleet.agents.len();
    let (bound_mb, matching) = top_five_percent(fleet);
    let bound_gb = (bound_mb as f64 / 1024.0 * 1e6).floor() / 1e6;
    let last_sizes: HashMap<String, usize> = (0..agents)
        .map(|index| {
            let stored = fleet.heartbeat(index, now_ms as u64)?;
            let item = encode(&stored, shards)?;
            Ok((stored.heartbeat.agent_id.clone(), item_size(&item)))
        })
        .collect::<anyhow::Result<_>>()?;
    for (label, text, bound) in [
        (
            format!("5 % match ({matching} agents with ≥ {bound_gb} GiB free)"),
            format!("min_gpu_vram_gb={bound_gb}&limit=100"),
            Some(bound_mb),
        ),
        ("no filter".to_owned(), "limit=100".to_owned(), None),
        (
            "a filter the index does not carry (min_cpu_cores=64, 0.1 % match)".to_owned(),
            "min_cpu_cores=64&limit=100".to_owned(),
            None,
        ),
        ("limit=1".to_owned(), "limit=1".to_owned(), None),
    ] {
        // The earlier index read pages of VRAM order only; beside a filter
        // it did not carry its figure would say nothing.
        let comparable = !text.starts_with("min_cpu_cores");
        let query = CapacityQuery::from_query_string(&text)
            .map_err(|e| anyhow::anyhow!("query {text}: {e:?}"))?;
        let (mut latencies, mut cost, mut answers) = (Vec::new(), ReadCost::default(), 0);
        for _ in 0..queries {
            let started = Instant::now();
            let (page, page_cost) = store.query_measured(&query, None, now_ms).await?;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            cost = page_cost;
            answers = page.agents.len();
        }
        latencies.sort_by(f64::total_cmp);
        let before = if comparable {
            let units = earlier_design_page_units(fleet, &last_sizes, bound, query.limit);
            format!(" (the earlier exact-rank index, 4 shards: {units:.1})")
        } else {
            String::new()
        };
        println!(
            "{agents} agents, {label}, first page of {}: {answers} answers; {} index entries and {} items read in {} requests = {:.1} read units{before}; p50 {:.1} ms, p99 {:.1} ms on the emulator",
            query.limit,
            cost.index_entries,
            cost.items_read,
            cost.requests,
            cost.units,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
        );
    }
    Ok(())
}

/// The 10th page of 100 of the default query, reached by following cursors.
async fn measure_paging(store: &DynamoStore, agents: usize, now_ms: i64) -> anyhow::Result<()> {
    let query = CapacityQuery::from_query_string("limit=100")
        .map_err(|e| anyhow::anyhow!("query: {e:?}"))?;
    let (mut after, mut total, mut answers) = (None, ReadCost::default(), 0);
    for page in 1..=10 {
        let started = Instant::now();
        let (found, cost) = store.query_measured(&query, after.as_ref(), now_ms).await?;
        answers += found.agents.len();
        total.requests += cost.requests;
        total.units += cost.units;
        if page == 10 {
            println!(
                "{} agents, no filter, 10th page of 100 (after following 9 cursors): {} answers; {} index entries and {} items read in {} requests = {:.1} read units, {:.0} ms on the emulator; pages 1-10: {answers} answers, {:.1} read units in {} requests",
                agents,
                found.agents.len(),
                cost.index_entries,
                cost.items_read,
                cost.requests,
                cost.units,
                started.elapsed().as_secs_f64() * 1000.0,
                total.units,
                total.requests,
            );
        }
        match found.next {
            Some(next) => after = Some(next),
            None => bail!("the fleet ended before the 10th page"),
        }
    }
    Ok(())
}

/// A plain `/metrics` scrape's read: the fleet sums, `queries` times.
async fn measure_metrics(
    agents: usize,
    sums: &FleetTable,
    now_ms: i64,
    queries: usize,
) -> anyhow::Result<()> {
    let mut latencies = Vec::new();
    let mut last = None;
    for _ in 0..queries {
        let started = Instant::now();
        last = Some(sums.read_measured(now_ms).await?);
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let Some((totals, cost)) = last else {
        return Ok(());
    };
    let online: i64 = totals.pools.values().map(|pool| pool.online.agents).sum();
    let on_record: i64 = totals.pools.values().map(|pool| pool.on_record).sum();
    println!(
        "{} agents, /metrics plain scrape: {} pools, {online} online of {on_record} on record; {} buckets read in {} requests = {:.1} read units; p50 {:.1} ms on the emulator",
        agents,
        totals.pools.len(),
        cost.index_entries,
        cost.requests,
        cost.units,
        percentile(&latencies, 0.5),
    );
    Ok(())
}

/// The free VRAM (MiB) that 5 % of the fleet have on one GPU at least, and
/// how many agents have that much.
fn top_five_percent(fleet: &Fleet) -> (u64, usize) {
    let agents = fleet.agents.len();
    let mut free: Vec<u64> = (0..agents)
        .map(|index| fleet.agents[index].free_mb().into_iter().max().unwrap_or(0))
        .collect();
    free.sort_unstable_by(|a, b| b.cmp(a));
    let bound_mb = free[(agents / 20).max(1) - 1];
    (bound_mb, free.iter().filter(|mb| **mb >= bound_mb).count())
}

/// What the earlier design read for the same first page: per shard (it had
/// 4), one Query of up to limit + 1 items from the top of the VRAM range,
/// billed by their summed size.
fn earlier_design_page_units(
    fleet: &Fleet,
    sizes: &HashMap<String, usize>,
    bound_mb: Option<u64>,
    limit: usize,
) -> f64 {
    let mut shards: Vec<Vec<(u64, &str)>> = vec![Vec::new(); 4];
    for agent in &fleet.agents {
        let free = agent.free_mb().into_iter().max().unwrap_or(0);
        if bound_mb.is_none_or(|bound| free >= bound) {
            shards[shard_of(&agent.id, 4) as usize].push((free, &agent.id));
        }
    }
    shards
        .iter_mut()
        .map(|shard| {
            shard.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
            let bytes: usize = shard.iter().take(limit + 1).map(|(_, id)| sizes[*id]).sum();
            read_units(bytes, false)
        })
        .sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().mode {
        Mode::Model {
            agents,
            hours,
            seed,
        } => run_model(agents, hours, seed),
        Mode::Emulator {
            agents,
            intervals,
            queries,
            shards,
            concurrency,
            seed,
            direct,
        } => {
            run_emulator(
                agents,
                intervals,
                queries,
                shards,
                concurrency,
                seed,
                direct,
            )
            .await
        }
    }
}
