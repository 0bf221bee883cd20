//! Faults on a real network. Each collector runs on a host of its own in the
//! network lab (`rollcall_tests::netlab`): a namespace with one veth link to
//! a bridge in the server's namespace, where ingest and query listen. The
//! lab's nftables rules lose a share of a host's packets, or all of them (a
//! partition); its delay proxy gives two hosts a slow link and a slow ingest.
//!
//! ```text
//! rcnf-srv   bridge rcnf-br 10.77.0.1/24: ingest, query, the delay proxy, the observer
//!   ├─ veth ─ rcnf-c00  10.77.0.10  collector nf-00   black-holed in the partition
//!   │   ...                                           (c00-c02 dropped, c03-c05 refused)
//!   ├─ veth ─ rcnf-c09  10.77.0.19  collector nf-09   never partitioned
//!   └─ veth ─ rcnf-c11  10.77.0.21  collector nf-11   c10, c11 through the delay proxy
//! ```
//!
//! The collectors are the shipped build (`target/collector/rollcall-collector`)
//! at a 5 s interval; ingest's deadline is three intervals after receipt. An
//! observer polls the query API every 100 ms and keeps every answer; the
//! assertions and the printed figures come from those answers and from the
//! collectors' own logs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rollcall::time::parse_rfc3339;
use rollcall_tests::netlab::{
    DelayProxy, Fault, Lab, SERVER_IP, SERVER_NS, enter_netns, host_ns, set_fault,
};
use rollcall_tests::{Stack, binary, now_ms, request, wait_until};
use serde_json::Value;

const COLLECTORS: usize = 12;
const INTERVAL: Duration = Duration::from_secs(5);
/// The collector's retry cap and its per-attempt timeout at this interval
/// (half the interval): once the network heals, the next attempt starts
/// within one step.
const BACKOFF_STEP: Duration = Duration::from_millis(2500);
/// The most attempts one sample may take: full-jitter backoff averages about
/// five in a 5 s interval; a retry storm makes thousands.
const MAX_ATTEMPTS_PER_SAMPLE: u32 = 15;
const LEAVING_TIMEOUT: Duration = Duration::from_secs(5);
const LOSS_PERCENT: u32 = 20;
const LOSS_PHASE: Duration = Duration::from_secs(60);
const LINK_DELAY: Duration = Duration::from_millis(300);
const SLOW_INGEST: Duration = Duration::from_millis(1000);
const BLACK_HOLED: [usize; 3] = [0, 1, 2];
const REFUSED: [usize; 3] = [3, 4, 5];
const SLOW: [usize; 2] = [10, 11];

#[test]
#[ignore = "needs root, iproute2 and nftables, and the shipped collector build; scripts/test runs it"]
fn collectors_on_their_own_hosts_ride_out_loss_partitions_and_slow_links() {
    // ROLLCALL_TEST_COLLECTOR runs another build instead: one with its
    // retries broken, to see this test fail.
    let collector = std::env::var_os("ROLLCALL_TEST_COLLECTOR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/collector/rollcall-collector")
        });
    assert!(
        collector.exists(),
        "{} is not built (cargo build --profile collector -p rollcall-collector)",
        collector.display()
    );
    // Built here, before this thread leaves the host's network.
    binary("rollcall-ingest");
    binary("rollcall-query");
    let lab = Lab::build(COLLECTORS);
    // Everything from here runs inside the server's namespace: the functions
    // it starts, the proxy and the observer inherit it.
    std::thread::spawn(move || {
        enter_netns(SERVER_NS);
        scenario(&collector);
    })
    .join()
    .map_err(|_| "the scenario failed (its panic is above)")
    .unwrap();
    drop(lab);
}

fn scenario(collector_binary: &Path) {
    let stack = Stack::start_listening_on(SERVER_IP);
    let proxy = DelayProxy::start(stack.ingest.addr, LINK_DELAY + SLOW_INGEST, LINK_DELAY);
    let observer = Observer::start(stack.query.addr, &stack.token);
    let mut collectors: Vec<Collector> = (0..COLLECTORS)
        .map(|i| {
            let endpoint = if SLOW.contains(&i) {
                proxy.addr
            } else {
                stack.ingest.addr
            };
            Collector::start(&stack, collector_binary, i, endpoint)
        })
        .collect();
    let everyone: Vec<usize> = (0..COLLECTORS).collect();
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || observer.all_online(&everyone)).is_some(),
        "not every collector came online within 20 s:\n{}",
        logs(&collectors)
    );
    println!(
        "network faults: {COLLECTORS} collectors online after {:?}",
        started.elapsed()
    );

    // Loss: every link loses 20 % of its packets each way.
    for i in 0..COLLECTORS {
        set_fault(i, Fault::Loss(LOSS_PERCENT));
    }
    let loss_started = Instant::now();
    std::thread::sleep(LOSS_PHASE);
    for i in 0..COLLECTORS {
        set_fault(i, Fault::Clear);
    }
    let loss_ended = Instant::now();

    // Partition: some hosts lose their link entirely, for longer than their deadline.
    let partitioned: Vec<usize> = BLACK_HOLED.iter().chain(&REFUSED).copied().collect();
    let partition_started = Instant::now();
    for &i in &BLACK_HOLED {
        set_fault(i, Fault::BlackHole);
    }
    for &i in &REFUSED {
        set_fault(i, Fault::Refused);
    }
    let all_offline = wait_until(Duration::from_secs(30), || {
        partitioned.iter().all(|&i| {
            observer
                .first(i, partition_started, |agent| !agent.online)
                .is_some()
        })
    });
    assert!(
        all_offline.is_some(),
        "a partitioned agent was never shown offline"
    );
    std::thread::sleep(Duration::from_secs(3));
    for &i in &partitioned {
        set_fault(i, Fault::Clear);
    }
    let healed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || observer
            .all_online(&partitioned))
        .is_some(),
        "a partitioned agent did not come back online within 15 s of the heal:\n{}",
        logs(&collectors)
    );
    // A few clean intervals for the slow hosts.
    std::thread::sleep(INTERVAL * 3);

    // Slow link: SIGTERM's leaving heartbeat still arrives...
    let (slow, cut_off) = (SLOW[0], SLOW[1]);
    let leaving_started = Instant::now();
    let took = collectors[slow].terminate();
    assert!(
        took <= LEAVING_TIMEOUT + Duration::from_secs(1),
        "took {took:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || observer
            .latest(slow)
            .is_some_and(|a| a.state == "leaving"))
        .is_some(),
        "the slow host's leaving heartbeat never arrived:\n{}",
        collectors[slow].log_since(leaving_started)
    );
    println!(
        "network faults: slow link, SIGTERM to exit with the leaving heartbeat delivered: {took:?}"
    );
    // ...or, with no link at all, the collector gives up within its timeout.
    set_fault(cut_off, Fault::BlackHole);
    let given_up_at = Instant::now();
    let gave_up = collectors[cut_off].terminate();
    assert!(
        gave_up <= LEAVING_TIMEOUT + Duration::from_secs(1),
        "took {gave_up:?}"
    );
    let cut_log = collectors[cut_off].log_since(given_up_at);
    assert!(
        cut_log.contains("leaving heartbeat"),
        "no word on the undelivered leaving heartbeat:\n{cut_log}"
    );
    println!("network faults: no link, SIGTERM to exit without the leaving heartbeat: {gave_up:?}");
    observer.stop();

    let report = Report {
        observer: &observer,
        collectors: &collectors,
    };
    report.no_false_offlines(&partitioned, partition_started, healed, leaving_started);
    report.partition_detected_and_healed(partition_started, healed);
    let direct: Vec<usize> = everyone
        .iter()
        .copied()
        .filter(|i| !SLOW.contains(i))
        .collect();
    report.latency("loss, 20 % each way", &direct, loss_started, loss_ended);
    report.latency("loss and the slow link", &SLOW, loss_started, loss_ended);
    let slow_after_loss = report.latency(
        "slow link (300 ms each way, ingest 1 s late)",
        &SLOW[..1],
        loss_ended,
        leaving_started,
    );
    assert!(
        slow_after_loss < INTERVAL,
        "a heartbeat on the slow link took {slow_after_loss:?}, past its interval"
    );
    report.attempts("loss", loss_started, loss_ended);
    report.attempts("partition and heal", partition_started, leaving_started);
    report.one_line_each_for_outage_and_recovery(&partitioned, partition_started);
    report.refused_attempts_are_retried(partition_started, healed);
    for collector in &mut collectors {
        collector.terminate();
    }
}

fn agent_id(i: usize) -> String {
    format!("nf-{i:02}")
}

/// One collector process on its own host, its log lines timestamped as read.
struct Collector {
    child: Child,
    agent_id: String,
    log: Arc<Mutex<Vec<(Instant, String)>>>,
    running: bool,
    _state: tempfile::TempDir,
}

impl Collector {
    fn start(stack: &Stack, binary: &Path, i: usize, endpoint: SocketAddr) -> Collector {
        let agent_id = agent_id(i);
        let state = tempfile::tempdir().expect("state dir");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &host_ns(i)])
            .arg(binary)
            .args(["run", "--insecure-plain-http", "--interval"])
            .arg(INTERVAL.as_secs().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in stack.collector_env(&agent_id) {
            command.env(key, value);
        }
        command
            .env("ROLLCALL_ENDPOINT", format!("http://{endpoint}"))
            .env("ROLLCALL_STATE_DIR", state.path())
            .env("ROLLCALL_CONFIG", "/dev/null")
            // Debug: each sample's outcome with its attempts.
            .env("RUST_LOG", "debug");
        let mut child = command.spawn().expect("start a collector");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Collector {
            child,
            agent_id,
            log,
            running: true,
            _state: state,
        }
    }

    /// SIGTERM, then how long the collector took to exit (it must exit).
    fn terminate(&mut self) -> Duration {
        if !self.running {
            return Duration::ZERO;
        }
        self.running = false;
        let started = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "{} exited {status}:\n{}",
                    self.agent_id,
                    self.log_since(started)
                );
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{} ignored SIGTERM for 15 s",
                self.agent_id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn lines_since(&self, since: Instant) -> Vec<String> {
        self.lines_between(since, Instant::now() + Duration::from_secs(3600))
    }

    fn lines_between(&self, from: Instant, to: Instant) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, line)| line.clone())
            .collect()
    }

    fn log_since(&self, since: Instant) -> String {
        self.lines_since(since).join("\n")
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn logs(collectors: &[Collector]) -> String {
    let start = Instant::now() - Duration::from_secs(3600);
    collectors
        .iter()
        .map(|c| format!("--- {}\n{}", c.agent_id, c.log_since(start)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What the query API said about one agent at one moment.
#[derive(Clone)]
struct Seen {
    online: bool,
    state: String,
    online_until_ms: i64,
    received_ms: i64,
    sent_at_ms: i64,
}

struct Observation {
    at: Instant,
    /// The wall clock when the answer was in hand: an agent read offline was
    /// offline by then at the latest.
    at_ms: i64,
    agents: std::collections::HashMap<String, Seen>,
}

/// Polls `GET /v1/agents?status=all` every 100 ms and keeps every answer.
struct Observer {
    seen: Arc<Mutex<Vec<Observation>>>,
    stop: Arc<AtomicBool>,
}

impl Observer {
    fn start(query: SocketAddr, token: &str) -> Observer {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, stopped) = (Arc::clone(&seen), Arc::clone(&stop));
        let auth = format!("Bearer {token}");
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                let response = request(
                    query,
                    "GET",
                    "/v1/agents?status=all&limit=100",
                    &[("Authorization", &auth)],
                    b"",
                );
                let at_ms = now_ms() as i64;
                assert_eq!(response.status, 200, "{}", response.text());
                let agents = response.json()["agents"]
                    .as_array()
                    .expect("agents")
                    .iter()
                    .map(|agent| {
                        (
                            agent["agent_id"].as_str().unwrap_or_default().to_owned(),
                            seen_from(agent),
                        )
                    })
                    .collect();
                sink.lock().unwrap().push(Observation {
                    at: Instant::now(),
                    at_ms,
                    agents,
                });
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Observer { seen, stop }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
    }

    fn latest(&self, i: usize) -> Option<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.last()
            .and_then(|o| o.agents.get(&agent_id(i)).cloned())
    }

    fn all_online(&self, hosts: &[usize]) -> bool {
        hosts
            .iter()
            .all(|&i| self.latest(i).is_some_and(|agent| agent.online))
    }

    /// The first observation at or after `since` where host `i` satisfies `check`.
    fn first(
        &self,
        i: usize,
        since: Instant,
        check: impl Fn(&Seen) -> bool,
    ) -> Option<(Instant, i64, Seen)> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|o| o.at >= since).find_map(|o| {
            o.agents
                .get(&agent_id(i))
                .filter(|agent| check(agent))
                .map(|agent| (o.at, o.at_ms, agent.clone()))
        })
    }
}

fn seen_from(agent: &Value) -> Seen {
    let time = |field: &str| {
        agent[field]
            .as_str()
            .and_then(parse_rfc3339)
            .unwrap_or_else(|| panic!("{field} in {agent}"))
    };
    Seen {
        online: agent["status"] == "online",
        state: agent["state"].as_str().unwrap_or_default().to_owned(),
        online_until_ms: time("online_until"),
        received_ms: time("last_heartbeat_at"),
        sent_at_ms: agent["sent_at_ms"].as_i64().expect("sent_at_ms"),
    }
}

/// The assertions over the whole run, each printing the figures it checks.
struct Report<'a> {
    observer: &'a Observer,
    collectors: &'a [Collector],
}

impl Report<'_> {
    /// No agent read offline while its collector ran and its link was up:
    /// the partitioned ones are excused from the cut until they are back.
    fn no_false_offlines(
        &self,
        partitioned: &[usize],
        cut: Instant,
        healed: Instant,
        leaving: Instant,
    ) {
        let backs: Vec<Option<Instant>> = (0..COLLECTORS)
            .map(|i| {
                partitioned.contains(&i).then(|| {
                    self.observer
                        .first(i, healed, |agent| agent.online)
                        .map(|(at, ..)| at)
                        .expect("back online")
                })
            })
            .collect();
        let seen = self.observer.seen.lock().unwrap();
        let mut reads = 0u64;
        let mut false_offlines = Vec::new();
        for (i, back) in backs.into_iter().enumerate() {
            let mut came_online = false;
            for observation in seen.iter().filter(|o| o.at < leaving) {
                let Some(agent) = observation.agents.get(&agent_id(i)) else {
                    continue;
                };
                came_online |= agent.online;
                let excused =
                    back.is_some_and(|back| observation.at >= cut && observation.at < back);
                if !came_online || excused {
                    continue;
                }
                reads += 1;
                if !agent.online {
                    false_offlines.push(format!(
                        "{} at +{}ms",
                        agent_id(i),
                        observation.at_ms - agent.online_until_ms
                    ));
                }
            }
        }
        println!(
            "network faults: false offlines: {} in {reads} reads of a running, connected agent",
            false_offlines.len()
        );
        assert!(
            false_offlines.is_empty(),
            "false offlines: {false_offlines:?}"
        );
    }

    /// Each cut-off agent read offline within 1 s of its deadline, and online
    /// again within one backoff step of the heal (plus, for a black hole,
    /// the attempt that was stuck in it timing out).
    fn partition_detected_and_healed(&self, cut: Instant, healed: Instant) {
        for (group, hosts, allowed) in [
            (
                "refused",
                &REFUSED[..],
                BACKOFF_STEP + Duration::from_secs(1),
            ),
            (
                "black hole",
                &BLACK_HOLED[..],
                BACKOFF_STEP * 2 + Duration::from_secs(1),
            ),
        ] {
            let mut detection = Vec::new();
            let mut recovery = Vec::new();
            for &i in hosts {
                let (_, read_at_ms, agent) = self
                    .observer
                    .first(i, cut, |a| !a.online)
                    .expect("read offline");
                let late = read_at_ms - agent.online_until_ms;
                assert!(
                    late <= 1000,
                    "{} read offline {late} ms after its online_until",
                    agent_id(i)
                );
                detection.push(late);
                let (back_at, ..) = self
                    .observer
                    .first(i, healed, |a| a.online)
                    .expect("back online");
                let took = back_at - healed;
                assert!(
                    took <= allowed,
                    "{} took {took:?} after the heal (allowed {allowed:?})",
                    agent_id(i)
                );
                recovery.push(took.as_millis());
            }
            println!(
                "network faults: partition ({group}): read offline {detection:?} ms after online_until; online again {recovery:?} ms after the heal (allowed {} ms)",
                allowed.as_millis()
            );
        }
    }

    /// End-to-end latency (received_at − sent_at) of each distinct heartbeat
    /// from `hosts` stored in the window; prints the distribution, returns
    /// the largest.
    fn latency(&self, label: &str, hosts: &[usize], from: Instant, to: Instant) -> Duration {
        let seen = self.observer.seen.lock().unwrap();
        let mut heartbeats = std::collections::BTreeSet::new();
        for observation in seen.iter().filter(|o| o.at >= from && o.at < to) {
            for &i in hosts {
                if let Some(agent) = observation.agents.get(&agent_id(i))
                    && agent.state != "leaving"
                {
                    heartbeats.insert((i, agent.sent_at_ms, agent.received_ms - agent.sent_at_ms));
                }
            }
        }
        let mut latencies: Vec<i64> = heartbeats.iter().map(|(.., latency)| *latency).collect();
        latencies.sort_unstable();
        assert!(!latencies.is_empty(), "no heartbeats stored during {label}");
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
        println!(
            "network faults: heartbeat latency, {label}: {} heartbeats, p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            latencies.len(),
            at(0.5),
            at(0.9),
            at(0.99),
            at(1.0)
        );
        Duration::from_millis(at(1.0).max(0) as u64)
    }

    /// Attempts per sample, from each collector's debug line for each
    /// sample's outcome: bounded, never a storm.
    fn attempts(&self, label: &str, from: Instant, to: Instant) {
        let mut counts = std::collections::BTreeMap::<u32, u32>::new();
        for collector in self.collectors {
            for (_, line) in collector
                .log
                .lock()
                .unwrap()
                .iter()
                .filter(|(at, _)| *at >= from && *at < to)
            {
                let outcome = line.contains("heartbeat accepted")
                    || line.contains("not delivered within its interval");
                if let Some(attempts) = outcome.then(|| field(line, "attempts")).flatten() {
                    *counts.entry(attempts).or_default() += 1;
                }
            }
        }
        let samples: u32 = counts.values().sum();
        let most = counts.keys().last().copied().unwrap_or(0);
        println!(
            "network faults: attempts per sample, {label}: {counts:?} (attempts: samples) over {samples} samples"
        );
        assert!(samples > 0, "no sample outcomes logged during {label}");
        assert!(
            most <= MAX_ATTEMPTS_PER_SAMPLE,
            "a sample took {most} attempts during {label}: a retry storm"
        );
    }

    /// Where the network refuses at once, a collector retries within the
    /// interval rather than waiting for its next sample: each refused host
    /// logged a sample that took more than one attempt while it was cut off.
    fn refused_attempts_are_retried(&self, cut: Instant, healed: Instant) {
        for &i in &REFUSED {
            let most = self.collectors[i]
                .lines_between(cut, healed)
                .iter()
                .filter(|line| line.contains("not delivered within its interval"))
                .filter_map(|line| field(line, "attempts"))
                .max();
            assert!(
                most.is_some_and(|most| most >= 2),
                "{} never retried a refused heartbeat within its interval (most attempts: {most:?})",
                agent_id(i)
            );
        }
    }

    /// A partitioned collector says once that it lost ingest and once that
    /// it is back: no line per retry.
    fn one_line_each_for_outage_and_recovery(&self, partitioned: &[usize], cut: Instant) {
        for &i in partitioned {
            let lines = self.collectors[i].lines_since(cut);
            let info_or_worse = |text: &str| {
                lines
                    .iter()
                    .filter(|line| line.contains(text) && !line.contains("DEBUG"))
                    .count()
            };
            let outage = info_or_worse("not delivered within its interval");
            let recovery = info_or_worse("heartbeats delivered again");
            assert_eq!(
                (outage, recovery),
                (1, 1),
                "{}:\n{}",
                agent_id(i),
                lines.join("\n")
            );
        }
    }
}

/// `name=value` from a log line, as tracing's text format writes fields.
fn field(line: &str, name: &str) -> Option<u32> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
