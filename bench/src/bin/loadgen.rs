//! rollcall-loadgen: a simulated fleet. N agents with distinct ids and derived
//! keys send correctly signed heartbeats on their own interval (with ±10 %
//! jitter) over a bounded number of keep-alive connections. At the end it
//! reports accepted heartbeats per second, latency percentiles and every
//! non-202 by status, then checks through the query API that each agent's
//! stored `sent_at_ms` is its last acknowledged one.
//!
//! Loopback targets only; every run is bounded by `--duration-s`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use rollcall::signing::{
    AgentKey, FleetSecret, HEADER_AGENT, HEADER_KEY_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

/// Simulate a fleet of collectors against a local ingest (loopback only).
///
/// The fleet secret is read from ROLLCALL_FLEET_SECRET, the query token (for
/// the loss check) from ROLLCALL_QUERY_TOKEN.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Ingest base URL (or Pushgateway's, with --target pushgateway).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    ingest: String,
    /// Query base URL for the loss check; skipped when absent.
    #[arg(long)]
    query: Option<String>,
    /// Number of simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Each agent's interval in seconds; 0 sends back to back (closed loop).
    #[arg(long, default_value_t = 30.0)]
    interval_s: f64,
    /// Instead of intervals, send at this total rate (heartbeats per second).
    #[arg(long)]
    rate: Option<f64>,
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    #[arg(long, default_value = "k1")]
    key_id: String,
    /// Agent ids are <prefix>-<n>.
    #[arg(long, default_value = "sim")]
    prefix: String,
    #[arg(long, value_enum, default_value_t = Target::Rollcall)]
    target: Target,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    /// rollcall ingest: signed heartbeats.
    Rollcall,
    /// Prometheus Pushgateway: one group per agent, for comparison.
    Pushgateway,
}

struct Agent {
    id: String,
    key: AgentKey,
    last_sent: AtomicU64,
    last_acknowledged: AtomicU64,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
}

impl Tally {
    fn merge(&mut self, part: Tally) {
        self.latencies_us.extend(part.latencies_us);
        for (status, count) in part.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        self.errors += part.errors;
    }

    /// Answers whose status satisfies `which`.
    fn count(&self, which: impl Fn(u16) -> bool) -> u64 {
        self.statuses
            .iter()
            .filter(|(status, _)| which(**status))
            .map(|(_, count)| count)
            .sum()
    }
}

fn loopback(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// targets (loopback) are supported")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.replace("localhost", "127.0.0.1");
    let addr: SocketAddr = authority
        .parse()
        .with_context(|| format!("{url}: expected http://IP:PORT"))?;
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address; rollcall-loadgen only targets this machine");
    }
    Ok(addr)
}

fn now_ms() -> u64 {
    u64::try_from(rollcall::time::now_ms()).unwrap_or(0)
}

fn body(agent: &str, sent_at_ms: u64, seed: u64) -> String {
    let free = 8192 + (seed % 16) * 1024;
    format!(
        concat!(
            r#"{{"v":1,"agent_id":"{agent}","sent_at_ms":{sent},"interval_s":30,"pool":"default","labels":{{"site":"sim"}},"#,
            r#""host":{{"hostname":"{agent}","os":"Linux (simulated)","uptime_s":86400}},"#,
            r#""cpu":{{"cores_physical":16,"cores_logical":32,"cores_available":{cores},"load_1m":{load},"load_5m":1.5,"load_15m":1.2,"usage_percent":12.5}},"#,
            r#""memory":{{"total_mb":65536,"available_mb":{mem},"swap_total_mb":0,"swap_used_mb":0}},"#,
            r#""disk":{{"path":"/","total_gb":931.5,"free_gb":402.2}},"#,
            r#""gpus":[{{"index":0,"vendor":"nvidia","name":"NVIDIA RTX 4090","uuid":"GPU-{agent}","memory_total_mb":24564,"memory_free_mb":{free}}}]}}"#
        ),
        agent = agent,
        sent = sent_at_ms,
        cores = seed % 16,
        load = (seed % 8) as f64 / 2.0,
        mem = 20_000 + seed % 30_000,
        free = free.min(24_564),
    )
}

fn pushgateway_body(seed: u64) -> String {
    format!(
        "rollcall_cpu_cores_available {}\nrollcall_memory_available_mb {}\nrollcall_gpu_memory_free_mb{{gpu=\"0\"}} {}\n",
        seed % 16,
        20_000 + seed % 30_000,
        8192 + (seed % 16) * 1024
    )
}

/// One request on a keep-alive connection; returns the status.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buffer: &mut Vec<u8>,
) -> std::io::Result<u16> {
    stream.write_all(request).await?;
    buffer.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head =
        std::str::from_utf8(&buffer[..head_end]).map_err(|_| std::io::Error::other("bad head"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status"))?;
    let length: usize = head
        .lines()
        .find_map(|line| {
            line.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.trim())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    Ok(status)
}

fn request_for(args: &Args, agent: &Agent, addr: SocketAddr, seed: u64) -> (Vec<u8>, u64) {
    let now = now_ms();
    let sent = loop {
        let last = agent.last_sent.load(Ordering::Relaxed);
        let next = now.max(last + 1);
        if agent
            .last_sent
            .compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            break next;
        }
    };
    match args.target {
        Target::Rollcall => {
            let body = body(&agent.id, sent, seed);
            let timestamp = (now / 1000) as i64;
            let signature =
                agent
                    .key
                    .signature_header(&args.key_id, &agent.id, timestamp, body.as_bytes());
            let head = format!(
                "POST /v1/heartbeats HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 {HEADER_AGENT}: {}\r\n{HEADER_KEY_ID}: {}\r\n{HEADER_TIMESTAMP}: {timestamp}\r\n{HEADER_SIGNATURE}: {signature}\r\n\r\n",
                body.len(),
                agent.id,
                args.key_id
            );
            ([head.into_bytes(), body.into_bytes()].concat(), sent)
        }
        Target::Pushgateway => {
            let body = pushgateway_body(seed);
            let head = format!(
                "PUT /metrics/job/rollcall/instance/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
                agent.id,
                body.len()
            );
            ([head.into_bytes(), body.into_bytes()].concat(), sent)
        }
    }
}

async fn worker(
    args: Arc<Args>,
    addr: SocketAddr,
    agents: Arc<Vec<Agent>>,
    work: Option<Arc<Mutex<mpsc::Receiver<usize>>>>,
    next_agent: Arc<AtomicUsize>,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut stream: Option<TcpStream> = None;
    let mut buffer = Vec::with_capacity(8192);
    loop {
        let index = match &work {
            Some(queue) => match queue.lock().await.recv().await {
                Some(index) => index,
                None => break,
            },
            None => {
                if Instant::now() >= deadline {
                    break;
                }
                next_agent.fetch_add(1, Ordering::Relaxed) % agents.len()
            }
        };
        let agent = &agents[index];
        let (request, sent) = request_for(&args, agent, addr, index as u64);
        if stream.is_none() {
            match TcpStream::connect(addr).await {
                Ok(connected) => {
                    let _ = connected.set_nodelay(true);
                    stream = Some(connected);
                }
                Err(_) => {
                    tally.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let started = Instant::now();
        let result = exchange(stream.as_mut().expect("connected"), &request, &mut buffer).await;
        match result {
            Ok(status) => {
                tally
                    .latencies_us
                    .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                *tally.statuses.entry(status).or_default() += 1;
                if status == 202 || (args.target == Target::Pushgateway && status == 200) {
                    agent.last_acknowledged.fetch_max(sent, Ordering::Relaxed);
                }
            }
            Err(_) => {
                tally.errors += 1;
                stream = None;
            }
        }
    }
    tally
}

/// Feeds agent indexes to the workers when each is due.
async fn schedule(
    args: Arc<Args>,
    agents: usize,
    queue: mpsc::Sender<usize>,
    deadline: Instant,
) -> u64 {
    let mut late = 0u64;
    if let Some(rate) = args.rate {
        let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut next = 0usize;
        while Instant::now() < deadline {
            ticker.tick().await;
            if queue.send(next % agents).await.is_err() {
                break;
            }
            next += 1;
        }
        return 0;
    }
    let interval = Duration::from_secs_f64(args.interval_s);
    let start = tokio::time::Instant::now();
    // First heartbeats spread over one interval, as a fleet started at random would be.
    let mut due: BinaryHeap<Reverse<(tokio::time::Instant, usize)>> = (0..agents)
        .map(|agent| Reverse((start + interval.mul_f64(fastrand::f64()), agent)))
        .collect();
    let end = tokio::time::Instant::from_std(deadline);
    while let Some(Reverse((at, agent))) = due.pop() {
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at).await;
        if tokio::time::Instant::now() - at > Duration::from_millis(100) {
            late += 1;
        }
        if queue.send(agent).await.is_err() {
            break;
        }
        due.push(Reverse((
            at + interval.mul_f64(0.9 + 0.2 * fastrand::f64()),
            agent,
        )));
    }
    late
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[index]) / 1000.0
}

/// Pages through the query API and compares each agent's stored
/// `sent_at_ms` with its last acknowledged one.
async fn check_losses(query: &str, agents: &[Agent]) -> anyhow::Result<(usize, usize)> {
    let addr = loopback(query)?;
    let token = std::env::var("ROLLCALL_QUERY_TOKEN")
        .context("ROLLCALL_QUERY_TOKEN is needed for the loss check")?;
    let mut stored: HashMap<String, u64> = HashMap::new();
    let mut cursor: Option<String> = None;
    let mut stream = TcpStream::connect(addr).await?;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/v1/agents?status=all&limit=1000&cursor={cursor}"),
            None => "/v1/agents?status=all&limit=1000".to_owned(),
        };
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n");
        let mut buffer = Vec::new();
        let status = exchange(&mut stream, request.as_bytes(), &mut buffer).await?;
        let split = buffer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(0)
            + 4;
        let page: serde_json::Value = serde_json::from_slice(&buffer[split..])?;
        if status != 200 {
            bail!("query answered {status}: {page}");
        }
        for agent in page["agents"].as_array().into_iter().flatten() {
            if let (Some(id), Some(sent)) =
                (agent["agent_id"].as_str(), agent["sent_at_ms"].as_u64())
            {
                stored.insert(id.to_owned(), sent);
            }
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut checked = 0;
    let mut lost = 0;
    for agent in agents {
        let acknowledged = agent.last_acknowledged.load(Ordering::Relaxed);
        if acknowledged == 0 {
            continue;
        }
        checked += 1;
        if stored.get(&agent.id).copied() != Some(acknowledged) {
            lost += 1;
        }
    }
    Ok((checked, lost))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let addr = loopback(&args.ingest)?;
    if args.agents == 0
        || args.connections == 0
        || !(args.duration_s > 0.0 && args.duration_s <= 3600.0)
    {
        bail!("--agents and --connections must be at least 1, --duration-s between 0 and 3600");
    }
    let secret = match args.target {
        Target::Rollcall => FleetSecret::from_hex(
            &std::env::var("ROLLCALL_FLEET_SECRET").context("ROLLCALL_FLEET_SECRET is not set")?,
        )?,
        Target::Pushgateway => FleetSecret::from_bytes(vec![0; 32])?,
    };
    let agents = Arc::new(fleet(&args, &secret));
    let run = drive(Arc::clone(&args), addr, Arc::clone(&agents)).await?;
    let (checked, lost) = match &args.query {
        Some(query) if args.target == Target::Rollcall => check_losses(query, &agents).await?,
        _ => (0, 0),
    };
    let server_errors = run.tally.count(|status| status >= 500);
    report(&args, &run, checked, lost);
    if lost > 0 || server_errors > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// The simulated agents, each with the key its id derives.
fn fleet(args: &Args, secret: &FleetSecret) -> Vec<Agent> {
    (0..args.agents)
        .map(|n| {
            let id = format!("{}-{n:06}", args.prefix);
            Agent {
                key: secret.derive_agent_key(&id),
                id,
                last_sent: AtomicU64::new(0),
                last_acknowledged: AtomicU64::new(0),
            }
        })
        .collect()
}

/// What one load run did.
struct Run {
    tally: Tally,
    seconds: f64,
    /// Sends the scheduler made more than 100 ms late.
    late: u64,
}

/// Runs the load: on a schedule (`--rate` / `--interval-s`), or as fast as
/// the connections go (closed loop); returns everything the workers counted.
async fn drive(args: Arc<Args>, addr: SocketAddr, agents: Arc<Vec<Agent>>) -> anyhow::Result<Run> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration_s);
    let closed_loop = args.rate.is_none() && args.interval_s <= 0.0;
    let (queue, work) = mpsc::channel::<usize>(args.connections * 4);
    let work = Arc::new(Mutex::new(work));
    let scheduler = (!closed_loop)
        .then(|| tokio::spawn(schedule(Arc::clone(&args), args.agents, queue, deadline)));
    let next_agent = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..args.connections)
        .map(|_| {
            tokio::spawn(worker(
                Arc::clone(&args),
                addr,
                Arc::clone(&agents),
                (!closed_loop).then(|| Arc::clone(&work)),
                Arc::clone(&next_agent),
                deadline,
            ))
        })
        .collect();
    let late = match scheduler {
        Some(handle) => handle.await?,
        None => 0,
    };
    let mut tally = Tally::default();
    for worker in workers {
        tally.merge(worker.await?);
    }
    tally.latencies_us.sort_unstable();
    Ok(Run {
        tally,
        seconds: started.elapsed().as_secs_f64(),
        late,
    })
}

/// Prints the run's figures: one JSON object with `--json`, else sentences.
fn report(args: &Args, run: &Run, checked: usize, lost: usize) {
    let Run {
        tally,
        seconds,
        late,
    } = run;
    let accepted = tally.count(|status| matches!(status, 200 | 202));
    let latency = |q: f64| percentile(&tally.latencies_us, q);
    if args.json {
        let summary = serde_json::json!({
            "target": format!("{:?}", args.target).to_lowercase(),
            "agents": args.agents,
            "connections": args.connections,
            "seconds": seconds,
            "requests": tally.latencies_us.len(),
            "accepted": accepted,
            "accepted_per_s": accepted as f64 / seconds,
            "latency_ms": {"p50": latency(0.50), "p99": latency(0.99), "max": latency(1.0)},
            "statuses": tally.statuses.iter().map(|(s, c)| (s.to_string(), *c)).collect::<BTreeMap<_, _>>(),
            "server_errors": tally.count(|status| status >= 500),
            "connection_errors": tally.errors,
            "late_sends": late,
            "loss_check": {"agents_checked": checked, "lost": lost},
        });
        println!("{summary}");
        return;
    }
    println!(
        "{} agents over {} connections for {seconds:.1} s: {accepted} accepted ({:.0}/s), latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.agents,
        args.connections,
        accepted as f64 / seconds,
        latency(0.5),
        latency(0.99),
        latency(1.0)
    );
    println!(
        "statuses: {:?}; connection errors: {}; sends more than 100 ms late: {late}",
        tally.statuses, tally.errors
    );
    if args.query.is_some() {
        println!(
            "loss check: {checked} agents checked, {lost} with a stored sent_at_ms other than their last acknowledged one"
        );
    }
}
