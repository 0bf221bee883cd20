//! Per-minute history: the five-minute windows it is stored in, and the
//! bounds every crate applies to it.

use crate::heartbeat::MinuteRollup;

/// Minutes per window: the collector sends a window's minutes together,
/// and the DynamoDB store keeps each window in one item.
pub const WINDOW_MINUTES: u64 = 5;

/// Windows one heartbeat's history may touch. Its 30 minutes span at most 7
/// when contiguous, as a collector's backlog is; minutes spread wider are
/// written newest first up to this bound, so that one heartbeat never costs
/// more than a few writes (the rest is reported not stored, and sent again).
pub const MAX_WINDOWS_PER_HEARTBEAT: usize = 7;

/// Most minutes one heartbeat may carry: a backlog after a short outage.
pub const MAX_MINUTES_PER_HEARTBEAT: usize = 30;

/// Most minutes one read of an agent's history returns (`?minutes=`): a day.
pub const MAX_READ_MINUTES: u64 = 1440;

/// How long history is kept unless configured: what one read can return.
pub const DEFAULT_RETENTION_S: i64 = 24 * 3600;

/// The longest history retention ingest accepts: no longer than one read
/// reaches back, so that what a deployment keeps it can also read.
pub const MAX_RETENTION_S: i64 = MAX_READ_MINUTES as i64 * 60;

/// The window a minute belongs to.
pub const fn window_of(minute: u64) -> u64 {
    minute / WINDOW_MINUTES
}

/// The minutes of the newest `max_windows` windows, and whether any were
/// left out.
pub fn newest_windows(
    mut minutes: Vec<MinuteRollup>,
    max_windows: usize,
) -> (Vec<MinuteRollup>, bool) {
    let mut windows: Vec<u64> = minutes
        .iter()
        .map(|rollup| window_of(rollup.minute))
        .collect();
    windows.sort_unstable_by(|a, b| b.cmp(a));
    windows.dedup();
    if windows.len() <= max_windows {
        return (minutes, false);
    }
    let oldest_kept = windows[max_windows.saturating_sub(1)];
    minutes.retain(|rollup| window_of(rollup.minute) >= oldest_kept);
    (minutes, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::Spread;

    fn minute(minute: u64) -> MinuteRollup {
        let spread = Spread {
            min: 1.0,
            avg: 1.0,
            max: 1.0,
        };
        MinuteRollup {
            minute,
            load_1m: spread,
            memory_available_mb: spread,
            gpu_free_mb_min: Vec::new(),
        }
    }

    #[test]
    fn a_contiguous_backlog_is_kept_whole_and_a_spread_one_is_cut_to_the_newest_windows() {
        let backlog: Vec<_> = (1_000..1_030).map(minute).collect();
        assert_eq!(
            newest_windows(backlog.clone(), MAX_WINDOWS_PER_HEARTBEAT),
            (backlog, false)
        );
        // 30 minutes an hour apart: 30 windows.
        let spread: Vec<_> = (0..30).map(|n| minute(1_000 + 60 * n)).collect();
        let (kept, cut) = newest_windows(spread, MAX_WINDOWS_PER_HEARTBEAT);
        assert!(cut);
        assert_eq!(
            kept.iter().map(|rollup| rollup.minute).collect::<Vec<_>>(),
            (23..30).map(|n| 1_000 + 60 * n).collect::<Vec<_>>()
        );
        assert_eq!(newest_windows(Vec::new(), 7), (Vec::new(), false));
    }
}
