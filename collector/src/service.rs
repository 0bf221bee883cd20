//! The `run` loop: one heartbeat per interval (±10 % jitter so a fleet
//! started together does not pulse), retries with backoff until the next
//! sample is due, and a final `leaving` heartbeat on SIGTERM/SIGINT.
//!
//! Timing at interval `T`: each attempt gives up after `T/2` (at most 10 s,
//! [`crate::send::attempt_timeout`]); the wait before a retry is drawn from
//! `[0, min(1 s × 2^n, T/2, 30 s))`, so once a network heals the next attempt
//! starts within one backoff step, `T/2` (2.5 s at the 5 s minimum); the
//! `leaving` heartbeat gets at most 5 s.
//!
//! Heartbeats are state, not events: a sample that could not be delivered
//! before the next one is due is dropped for the newer one, so nothing queues.

use std::time::Duration;

use rollcall::heartbeat::{AgentState, Heartbeat};
use rollcall::wire::{EXTENSION_HISTORY, EXTENSION_PROCESSES};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};

use crate::sample::history::History;
use crate::sample::{Identity, Sampler};
use crate::send::{SendError, Sender, backoff};

const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(30);
const LEAVING_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs until `shutdown` turns true, then sends the `leaving` heartbeat.
pub async fn run(
    mut sampler: Sampler,
    identity: Identity,
    sender: Sender,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = Duration::from_secs(u64::from(identity.interval_s));
    // Retries stop well before the next sample so that it goes out on time.
    let retry_cap = RETRY_CAP.min(interval / 2);
    let mut outage = Outage::default();
    let mut history = History::new(identity.history_window_minutes);
    let mut processes = ProcessReports::default();
    let mut next_due = Instant::now();
    let mut reported_state = AgentState::Up;
    loop {
        tokio::select! {
            _ = sleep_until(next_due) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        let state = crate::drain::current_state(&identity.state_dir);
        if state != reported_state {
            tracing::info!(
                ?state,
                "reporting a new state (rollcall-collector drain / undrain)"
            );
            reported_state = state;
        }
        let mut heartbeat = sampler.sample(&identity, state, true).await;
        history.record(&heartbeat);
        heartbeat.history = history.due(heartbeat.sent_at_ms / 60_000);
        processes.thin(&mut heartbeat);
        next_due = Instant::now() + interval.mul_f64(0.9 + 0.2 * fastrand::f64());
        let attempts = Attempts {
            sender: &sender,
            next_due,
            retry_cap,
        };
        if let Delivery::ShuttingDown = attempts
            .deliver(
                &heartbeat,
                &mut outage,
                (&mut history, &mut processes),
                &mut shutdown,
            )
            .await
        {
            break;
        }
    }
    send_leaving(&mut sampler, &identity, &sender, &mut history).await;
}

/// GPU processes go out when they changed since the last snapshot ingest
/// stored, and at least every [`PROCESSES_REFRESH`]: a steady job costs the
/// heartbeat nothing, and a snapshot lost on the way is sent again.
#[derive(Default)]
struct ProcessReports {
    delivered: Option<(ProcessesSeen, Instant)>,
}

/// How long a snapshot is left unsent while nothing changed.
const PROCESSES_REFRESH: Duration = Duration::from_secs(300);
/// Used memory that moves by less than this is no change.
const PROCESSES_GRAIN_MB: u64 = 256;

/// What counts as a change: per GPU, the pids, names and used memory to
/// the grain.
type ProcessesSeen = Vec<(u32, Option<Vec<(u32, u64, Option<String>)>>)>;

fn seen(heartbeat: &Heartbeat) -> ProcessesSeen {
    heartbeat
        .gpus
        .iter()
        .map(|gpu| {
            let processes = gpu.processes.as_ref().map(|processes| {
                processes
                    .iter()
                    .map(|p| (p.pid, p.used_mb / PROCESSES_GRAIN_MB, p.name.clone()))
                    .collect()
            });
            (gpu.index, processes)
        })
        .collect()
}

impl ProcessReports {
    /// Leaves the processes out when ingest already holds the same.
    fn thin(&self, heartbeat: &mut Heartbeat) {
        let unchanged = self
            .delivered
            .as_ref()
            .is_some_and(|(last, at)| at.elapsed() < PROCESSES_REFRESH && *last == seen(heartbeat));
        if unchanged {
            for gpu in &mut heartbeat.gpus {
                gpu.processes = None;
            }
        }
    }

    /// Ingest stored what `heartbeat` carried (if it carried processes).
    fn delivered(&mut self, heartbeat: &Heartbeat) {
        if heartbeat.gpus.iter().any(|gpu| gpu.processes.is_some()) {
            self.delivered = Some((seen(heartbeat), Instant::now()));
        }
    }
}

/// Why [`Attempts::deliver`] returned.
enum Delivery {
    /// Delivered, refused for good, or given up for the next sample.
    Done,
    ShuttingDown,
}

/// How one sample is delivered: to whom, and until when a retry may start.
struct Attempts<'a> {
    sender: &'a Sender,
    next_due: Instant,
    retry_cap: Duration,
}

impl Attempts<'_> {
    /// Sends `heartbeat`, retrying with backoff while a retry can still
    /// start before the next sample is due.
    async fn deliver(
        &self,
        heartbeat: &Heartbeat,
        outage: &mut Outage,
        (history, processes): (&mut History, &mut ProcessReports),
        shutdown: &mut watch::Receiver<bool>,
    ) -> Delivery {
        let mut attempt = 0;
        loop {
            let result = tokio::select! {
                result = self.sender.send(heartbeat) => result,
                _ = shutdown.wait_for(|stop| *stop) => return Delivery::ShuttingDown,
            };
            let error = match result {
                Ok(accepted) => {
                    // History is optional on ingest's side (PROTOCOL.md §3):
                    // what it could not store now rides along again.
                    if accepted.stored(EXTENSION_HISTORY) {
                        history.acknowledge(&heartbeat.history);
                    } else if !heartbeat.history.is_empty() {
                        tracing::debug!(
                            minutes = heartbeat.history.len(),
                            "ingest did not store the history this time; it goes out again"
                        );
                    }
                    if accepted.stored(EXTENSION_PROCESSES) {
                        processes.delivered(heartbeat);
                    }
                    outage.recovered();
                    tracing::debug!(attempts = attempt + 1, online_until = %accepted.online_until, "heartbeat accepted");
                    return Delivery::Done;
                }
                Err(error) => error,
            };
            if error.is_stale() {
                // A stale heartbeat stores nothing, history included: it goes out again.
                tracing::debug!(%error, "a newer heartbeat is already stored");
                return Delivery::Done;
            }
            if error.is_clock_skew() {
                outage.clock_skew(&error);
                return Delivery::Done;
            }
            if !error.is_retryable() {
                tracing::error!(%error, "heartbeat refused; fix the configuration (this sample is dropped)");
                return Delivery::Done;
            }
            let wait = backoff(attempt, RETRY_BASE, self.retry_cap);
            if Instant::now() + wait >= self.next_due {
                outage.failed(&error, attempt + 1, None);
                return Delivery::Done;
            }
            outage.failed(&error, attempt + 1, Some(wait));
            attempt += 1;
            tokio::select! {
                _ = sleep(wait) => {}
                _ = shutdown.wait_for(|stop| *stop) => return Delivery::ShuttingDown,
            }
        }
    }
}

async fn send_leaving(
    sampler: &mut Sampler,
    identity: &Identity,
    sender: &Sender,
    history: &mut History,
) {
    let mut heartbeat = sampler.sample(identity, AgentState::Leaving, false).await;
    history.record(&heartbeat);
    // Whatever is rolled up so far goes out with the last heartbeat.
    heartbeat.history = history.due(heartbeat.sent_at_ms / 60_000 + history.window_minutes());
    match tokio::time::timeout(LEAVING_TIMEOUT, sender.send(&heartbeat)).await {
        Ok(Ok(_)) => tracing::info!("sent the leaving heartbeat; this agent is now offline"),
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not send the leaving heartbeat; the agent goes offline at its deadline")
        }
        Err(_) => {
            tracing::warn!("leaving heartbeat timed out; the agent goes offline at its deadline")
        }
    }
}

/// Keeps the log to one line when an outage begins and one when it ends,
/// rather than one per retry: an attempt that fails and is retried in time
/// is not news (it is at debug), a sample that missed its interval is. Each
/// sample's outcome is logged at debug with its `attempts`, so that a
/// fleet's retry rate can be read from its logs.
#[derive(Default)]
struct Outage {
    /// Attempts that failed since the last delivery.
    failures: u64,
    /// When the first of them failed.
    since: Option<Instant>,
    /// The outage's warning is out (a sample missed its interval).
    announced: bool,
    skew_reported: bool,
}

impl Outage {
    fn failed(&mut self, error: &SendError, attempts: u32, retry_in: Option<Duration>) {
        self.failures += 1;
        self.since.get_or_insert_with(Instant::now);
        match retry_in {
            Some(wait) => {
                tracing::debug!(%error, attempts, retry_in_ms = wait.as_millis() as u64, "heartbeat attempt failed; retrying")
            }
            None if !self.announced => {
                self.announced = true;
                tracing::warn!(%error, attempts, "heartbeat not delivered within its interval; retrying with backoff (one line when delivered again)")
            }
            None => {
                tracing::debug!(%error, attempts, "heartbeat not delivered within its interval; dropping it for the newer one")
            }
        }
    }

    fn clock_skew(&mut self, error: &SendError) {
        if !self.skew_reported {
            tracing::error!(%error, "this host's clock is off by more than ingest allows; heartbeats are refused until it is fixed (NTP?)");
            self.skew_reported = true;
        }
    }

    fn recovered(&mut self) {
        let outage_ms = self
            .since
            .map_or(0, |since| since.elapsed().as_millis() as u64);
        if self.announced || self.skew_reported {
            tracing::info!(
                failed_attempts = self.failures,
                outage_ms,
                "heartbeats delivered again"
            );
        }
        *self = Outage::default();
    }
}

/// A channel that turns true on SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> std::io::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (notify, receiver) = watch::channel(false);
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!("{name} received; sending a leaving heartbeat and stopping");
        let _ = notify.send(true);
    });
    Ok(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollcall::heartbeat::GpuProcess;

    fn heartbeat(processes: &[(u32, u64)]) -> Heartbeat {
        let mut heartbeat: Heartbeat = serde_json::from_value(serde_json::json!({
            "v": 1, "agent_id": "a", "sent_at_ms": 1, "interval_s": 30,
            "cpu": {"cores_physical": 1, "cores_logical": 1, "cores_available": 1,
                    "load_1m": 0.0, "load_5m": 0.0, "load_15m": 0.0},
            "memory": {"total_mb": 1, "available_mb": 1},
            "gpus": [{"index": 0, "vendor": "nvidia", "memory_total_mb": 81920, "memory_free_mb": 1}]
        }))
        .unwrap();
        heartbeat.gpus[0].processes = Some(
            processes
                .iter()
                .map(|(pid, used_mb)| GpuProcess {
                    pid: *pid,
                    used_mb: *used_mb,
                    name: None,
                    user: None,
                })
                .collect(),
        );
        heartbeat
    }

    #[test]
    fn processes_go_out_when_they_change_and_until_ingest_stored_them() {
        let mut reports = ProcessReports::default();
        let mut first = heartbeat(&[(10, 30_000)]);
        reports.thin(&mut first);
        assert!(first.gpus[0].processes.is_some(), "nothing delivered yet");
        // Not acknowledged (a failed send, or not stored): it goes out again.
        let mut again = heartbeat(&[(10, 30_000)]);
        reports.thin(&mut again);
        assert!(again.gpus[0].processes.is_some());
        reports.delivered(&again);
        // Unchanged, or moved by less than the grain: left out.
        let mut same = heartbeat(&[(10, 30_100)]);
        reports.thin(&mut same);
        assert!(same.gpus[0].processes.is_none());
        // A process appears, or one vanishes: it goes out.
        for changed in [&[(10, 30_000), (11, 5)][..], &[][..], &[(10, 31_000)][..]] {
            let mut heartbeat = heartbeat(changed);
            reports.thin(&mut heartbeat);
            assert!(heartbeat.gpus[0].processes.is_some(), "{changed:?}");
        }
        // A thinned heartbeat that is acknowledged changes nothing.
        reports.delivered(&same);
        let mut still = heartbeat(&[(10, 30_000)]);
        reports.thin(&mut still);
        assert!(still.gpus[0].processes.is_none());
    }
}
