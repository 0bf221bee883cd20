//! Recent history, rolled up at the edge: the collector keeps its own last
//! minutes of samples and, once a five-minute window has closed, sends that
//! window as per-minute roll-ups (min/avg/max of load and available memory,
//! least free VRAM per GPU) in the next heartbeat. One roll-up per five
//! minutes keeps the extra writes per agent small; until ingest acknowledges
//! a window, it rides along again.

use rollcall::heartbeat::{Heartbeat, MinuteRollup, Spread};
use rollcall::history::MAX_MINUTES_PER_HEARTBEAT;

/// Minutes per roll-up window by default; ingest's DynamoDB store keeps one
/// item per five minutes, so that is also the cheapest window to send.
pub use rollcall::history::WINDOW_MINUTES;

struct Sample {
    minute: u64,
    load_1m: f64,
    memory_available_mb: f64,
    gpu_free_mb: Vec<u64>,
}

pub struct History {
    window_minutes: u64,
    samples: Vec<Sample>,
    pending: Vec<MinuteRollup>,
}

impl Default for History {
    fn default() -> Self {
        Self::new(WINDOW_MINUTES)
    }
}

impl History {
    pub fn new(window_minutes: u64) -> Self {
        Self {
            window_minutes: window_minutes.max(1),
            samples: Vec::new(),
            pending: Vec::new(),
        }
    }

    pub fn window_minutes(&self) -> u64 {
        self.window_minutes
    }

    pub fn record(&mut self, heartbeat: &Heartbeat) {
        self.samples.push(Sample {
            minute: heartbeat.sent_at_ms / 60_000,
            load_1m: heartbeat.cpu.load_1m,
            memory_available_mb: heartbeat.memory.available_mb as f64,
            gpu_free_mb: heartbeat
                .gpus
                .iter()
                .map(|gpu| gpu.memory_free_mb)
                .collect(),
        });
    }

    /// Roll-ups to send now: every closed window not yet acknowledged.
    pub fn due(&mut self, now_minute: u64) -> Vec<MinuteRollup> {
        let window = self.window_minutes;
        let open_window = now_minute / window;
        let (closed, open): (Vec<Sample>, Vec<Sample>) = std::mem::take(&mut self.samples)
            .into_iter()
            .partition(|sample| sample.minute / window < open_window);
        self.samples = open;
        let mut minutes: Vec<u64> = closed.iter().map(|sample| sample.minute).collect();
        minutes.dedup();
        for minute in minutes {
            let in_minute: Vec<&Sample> = closed
                .iter()
                .filter(|sample| sample.minute == minute)
                .collect();
            self.pending.push(rollup(minute, &in_minute));
        }
        // After a long outage, keep the newest minutes only.
        let excess = self.pending.len().saturating_sub(MAX_MINUTES_PER_HEARTBEAT);
        self.pending.drain(..excess);
        self.pending.clone()
    }

    /// Ingest has these minutes; stop sending them.
    pub fn acknowledge(&mut self, sent: &[MinuteRollup]) {
        self.pending
            .retain(|pending| !sent.iter().any(|done| done.minute == pending.minute));
    }
}

fn rollup(minute: u64, samples: &[&Sample]) -> MinuteRollup {
    let spread = |values: Vec<f64>| Spread {
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        avg: values.iter().sum::<f64>() / values.len() as f64,
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    };
    let gpus = samples
        .iter()
        .map(|sample| sample.gpu_free_mb.len())
        .min()
        .unwrap_or(0);
    MinuteRollup {
        minute,
        load_1m: spread(samples.iter().map(|sample| sample.load_1m).collect()),
        memory_available_mb: spread(
            samples
                .iter()
                .map(|sample| sample.memory_available_mb)
                .collect(),
        ),
        gpu_free_mb_min: (0..gpus)
            .map(|gpu| {
                samples
                    .iter()
                    .map(|sample| sample.gpu_free_mb[gpu])
                    .min()
                    .unwrap_or(0)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(minute: u64, second: u64, load: f64, gpu_free: u64) -> Heartbeat {
        let body = serde_json::json!({
            "v": 1, "agent_id": "h", "sent_at_ms": minute * 60_000 + second * 1000, "interval_s": 30,
            "cpu": {"cores_physical": 4, "cores_logical": 8, "cores_available": 2, "load_1m": load, "load_5m": 1, "load_15m": 1},
            "memory": {"total_mb": 1000, "available_mb": 500},
            "gpus": [{"index": 0, "vendor": "nvidia", "memory_total_mb": 24000, "memory_free_mb": gpu_free}]
        });
        Heartbeat::parse(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn windows_are_sent_once_closed_and_until_acknowledged() {
        let mut history = History::default();
        let start = 1_000_000 * WINDOW_MINUTES; // a window boundary
        for minute in start..start + WINDOW_MINUTES {
            history.record(&heartbeat(minute, 0, 1.0, 20_000));
            history.record(&heartbeat(minute, 30, 3.0, 19_000));
            assert!(history.due(minute).is_empty(), "the window is still open");
        }
        history.record(&heartbeat(start + WINDOW_MINUTES, 0, 9.0, 1));
        let due = history.due(start + WINDOW_MINUTES);
        assert_eq!(due.len(), 5);
        assert_eq!(due[0].minute, start);
        assert_eq!(
            due[0].load_1m,
            Spread {
                min: 1.0,
                avg: 2.0,
                max: 3.0
            }
        );
        assert_eq!(due[0].gpu_free_mb_min, [19_000]);
        // Not acknowledged: sent again; acknowledged: gone.
        assert_eq!(history.due(start + WINDOW_MINUTES).len(), 5);
        history.acknowledge(&due);
        assert!(history.due(start + WINDOW_MINUTES).is_empty());
    }

    #[test]
    fn a_long_outage_keeps_only_the_newest_minutes() {
        let mut history = History::default();
        let start = 29_000_000;
        for minute in start..start + 100 {
            history.record(&heartbeat(minute, 0, 1.0, 1));
        }
        let due = history.due(start + 100);
        assert_eq!(due.len(), MAX_MINUTES_PER_HEARTBEAT);
        assert_eq!(due.last().unwrap().minute, start + 99);
    }
}
