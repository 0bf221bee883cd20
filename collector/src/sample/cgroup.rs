//! The CPU quota of the cgroup this process runs in, if one is set.
//!
//! Inside a container the host's core count overstates what a job may use;
//! the quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`) is the real limit.

use std::path::Path;

const V2_CPU_MAX: &str = "/sys/fs/cgroup/cpu.max";
const V1_QUOTA: &str = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us";
const V1_PERIOD: &str = "/sys/fs/cgroup/cpu/cpu.cfs_period_us";

/// The quota in cores (2.5 = two and a half cores), or `None` when unlimited.
pub fn cpu_quota_cores() -> Option<f64> {
    if let Ok(text) = std::fs::read_to_string(V2_CPU_MAX) {
        return parse_v2(&text);
    }
    let quota = read_trimmed(Path::new(V1_QUOTA))?;
    let period = read_trimmed(Path::new(V1_PERIOD))?;
    parse_v1(&quota, &period)
}

/// `cpu.max` is `"<quota> <period>"` or `"max <period>"`.
pub fn parse_v2(text: &str) -> Option<f64> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period: f64 = fields.next().unwrap_or("100000").parse().ok()?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    (quota > 0.0).then(|| quota / period)
}

/// v1 writes `-1` for no quota.
pub fn parse_v1(quota: &str, period: &str) -> Option<f64> {
    let quota: f64 = quota.parse().ok()?;
    let period: f64 = period.parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_quota() {
        assert_eq!(parse_v2("max 100000\n"), None);
        assert_eq!(parse_v2("200000 100000\n"), Some(2.0));
        assert_eq!(parse_v2("50000 100000"), Some(0.5));
        assert_eq!(parse_v2("garbage"), None);
    }

    #[test]
    fn v1_quota() {
        assert_eq!(parse_v1("-1", "100000"), None);
        assert_eq!(parse_v1("150000", "100000"), Some(1.5));
    }
}
