//! CPU: core counts, load averages, usage, and the cores free for new work.

use std::sync::OnceLock;

use rollcall::heartbeat::Cpu;
use sysinfo::{CpuRefreshKind, MINIMUM_CPU_UPDATE_INTERVAL, System};

use super::cgroup;

pub struct CpuSource {
    system: System,
    /// Whether `system` holds an earlier usage reading to measure against.
    primed: bool,
}

impl CpuSource {
    pub fn new() -> Self {
        let mut system = System::new();
        system.refresh_cpu_list(CpuRefreshKind::nothing());
        Self {
            system,
            primed: false,
        }
    }

    pub async fn sample(&mut self, measure_usage: bool) -> Cpu {
        let usage_percent = if measure_usage {
            if !self.primed {
                self.system.refresh_cpu_usage();
                tokio::time::sleep(MINIMUM_CPU_UPDATE_INTERVAL).await;
            }
            self.system.refresh_cpu_usage();
            self.primed = true;
            Some(f64::from(self.system.global_cpu_usage()).clamp(0.0, 100.0))
        } else {
            None
        };
        let cores_logical = u32::try_from(self.system.cpus().len())
            .unwrap_or(u32::MAX)
            .max(1);
        let cores_physical = physical_cores().unwrap_or(cores_logical).min(cores_logical);
        let load = System::load_average();
        let quota = cgroup::cpu_quota_cores();
        Cpu {
            cores_physical,
            cores_logical,
            cores_available: cores_available(cores_physical, quota, load.one),
            load_1m: finite(load.one),
            load_5m: finite(load.five),
            load_15m: finite(load.fifteen),
            usage_percent,
        }
    }
}

impl Default for CpuSource {
    fn default() -> Self {
        Self::new()
    }
}

/// `max(0, floor(cores − load_1m))`, where cores is the cgroup quota when one
/// is set and lower than the physical count.
pub fn cores_available(cores_physical: u32, quota_cores: Option<f64>, load_1m: f64) -> u32 {
    let cores = quota_cores.map_or(f64::from(cores_physical), |quota| {
        quota.min(f64::from(cores_physical))
    });
    (cores - finite(load_1m)).floor().max(0.0) as u32
}

fn physical_cores() -> Option<u32> {
    // The count cannot change while we run; /proc/cpuinfo is not cheap to parse.
    static PHYSICAL: OnceLock<Option<u32>> = OnceLock::new();
    *PHYSICAL
        .get_or_init(|| System::physical_core_count().and_then(|count| u32::try_from(count).ok()))
}

fn finite(value: f64) -> f64 {
    if value.is_finite() && value >= 0.0 {
        value
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_cores_follow_the_protocol_formula() {
        assert_eq!(cores_available(8, None, 1.9), 6);
        assert_eq!(cores_available(8, None, 12.0), 0);
        assert_eq!(cores_available(8, Some(2.0), 0.5), 1);
        assert_eq!(cores_available(8, Some(64.0), 0.0), 8);
        assert_eq!(cores_available(4, None, f64::NAN), 4);
    }

    #[tokio::test]
    async fn a_sample_is_self_consistent() {
        let cpu = CpuSource::new().sample(false).await;
        assert!(cpu.cores_logical >= 1);
        assert!(cpu.cores_physical <= cpu.cores_logical);
        assert!(cpu.cores_available <= cpu.cores_physical);
        assert!(cpu.usage_percent.is_none());
    }
}
