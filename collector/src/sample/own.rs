//! The collector's own cost on this machine: resident memory and CPU time,
//! read from /proc/self, so an operator sees the agent's overhead across the
//! fleet. Absent (and logged at debug) where /proc cannot be read.

use rollcall::heartbeat::CollectorCost;

pub fn sample() -> Option<CollectorCost> {
    let rss_mb = resident_mb();
    let cpu_s = cpu_seconds();
    if rss_mb.is_none() && cpu_s.is_none() {
        tracing::debug!("cannot read /proc/self; the heartbeat carries no collector cost");
        return None;
    }
    Some(CollectorCost { rss_mb, cpu_s })
}

/// Resident pages (the second field of /proc/self/statm) in MiB.
fn resident_mb() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page_bytes > 0).then(|| round3(pages * page_bytes as f64 / (1024.0 * 1024.0)))
}

/// User plus system CPU time since start (fields 14 and 15 of /proc/self/stat).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; the fields after it are fixed.
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| round3((utime + stime) / ticks as f64))
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_costs_something() {
        let cost = super::sample().expect("/proc/self is readable on Linux");
        assert!(
            cost.rss_mb.is_some_and(|mb| mb > 0.5 && mb < 4096.0),
            "{cost:?}"
        );
        assert!(cost.cpu_s.is_some_and(|s| s >= 0.0), "{cost:?}");
    }
}
