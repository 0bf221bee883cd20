//! Simulated GPUs, for tests. Compiled only into test builds (the
//! `fake-gpus` feature, which release builds and packages never enable), and
//! even there never chosen unless `ROLLCALL_FAKE_GPUS` is set:
//!
//! - `hang`: a driver that never answers (every read blocks forever);
//! - `vendor:total_mb:free_mb[,...]`: fixed GPUs, e.g. `nvidia:24564:20110`.
//!
//! `ROLLCALL_FAKE_GPU_PROCESSES=gpu:pid:used_mb[,...]` puts processes on
//! them, named from this host's `/proc` as real ones are (so a test can use
//! the pid of a process it started).

use rollcall::heartbeat::{Gpu, Vendor};

use super::GpuSource;
use super::processes::ProcessNames;

pub const ENV: &str = "ROLLCALL_FAKE_GPUS";
pub const PROCESSES_ENV: &str = "ROLLCALL_FAKE_GPU_PROCESSES";

pub enum FakeGpus {
    Hang,
    Fixed(Vec<Gpu>, Vec<(u32, u32, u64)>, ProcessNames),
}

impl FakeGpus {
    pub fn from_env() -> Option<Self> {
        let text = std::env::var(ENV).ok()?;
        match Self::parse(&text) {
            Ok(fake) => Some(fake),
            Err(error) => {
                tracing::error!(%error, "ignoring {ENV}");
                None
            }
        }
    }

    /// Whether its processes go out with names and users, as
    /// `--no-process-names` says for real ones.
    pub fn with_process_names(self, send: bool) -> Self {
        match self {
            FakeGpus::Fixed(gpus, processes, _) => {
                FakeGpus::Fixed(gpus, processes, ProcessNames::new(send))
            }
            hang => hang,
        }
    }

    pub fn hanging() -> Self {
        FakeGpus::Hang
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim() == "hang" {
            return Ok(FakeGpus::Hang);
        }
        let gpus = text
            .split(',')
            .enumerate()
            .map(|(index, spec)| {
                let parts: Vec<&str> = spec.trim().split(':').collect();
                let [vendor, total, free] = parts[..] else {
                    return Err(format!("{spec:?} is not vendor:total_mb:free_mb"));
                };
                let vendor =
                    Vendor::parse(vendor).ok_or_else(|| format!("unknown vendor {vendor:?}"))?;
                let total: u64 = total
                    .parse()
                    .map_err(|_| format!("bad total_mb {total:?}"))?;
                let free: u64 = free.parse().map_err(|_| format!("bad free_mb {free:?}"))?;
                Ok(Gpu {
                    processes: None,
                    index: index as u32,
                    vendor,
                    name: Some(format!("Simulated {} GPU", vendor.as_str())),
                    uuid: Some(format!("GPU-fake-{index}")),
                    memory_total_mb: total,
                    memory_free_mb: free.min(total),
                    utilization_percent: Some(0.0),
                    temperature_c: None,
                    power_w: None,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let processes = match std::env::var(PROCESSES_ENV) {
            Ok(text) => parse_processes(&text)?,
            Err(_) => Vec::new(),
        };
        Ok(FakeGpus::Fixed(gpus, processes, ProcessNames::new(true)))
    }
}

impl GpuSource for FakeGpus {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn read(&mut self) -> Result<Vec<Gpu>, String> {
        match self {
            FakeGpus::Hang => loop {
                std::thread::park();
            },
            FakeGpus::Fixed(gpus, processes, names) => {
                let mut gpus = gpus.clone();
                if !processes.is_empty() {
                    for gpu in &mut gpus {
                        let on_it = processes
                            .iter()
                            .filter(|(index, _, _)| *index == gpu.index)
                            .map(|(_, pid, used)| (*pid, *used));
                        gpu.processes = Some(names.describe(on_it));
                    }
                }
                Ok(gpus)
            }
        }
    }
}

/// `gpu:pid:used_mb[,...]`.
fn parse_processes(text: &str) -> Result<Vec<(u32, u32, u64)>, String> {
    text.split(',')
        .filter(|spec| !spec.trim().is_empty())
        .map(|spec| {
            let parts: Vec<&str> = spec.trim().split(':').collect();
            let [gpu, pid, used] = parts[..] else {
                return Err(format!("{spec:?} is not gpu:pid:used_mb"));
            };
            let number = |text: &str| {
                text.parse::<u64>()
                    .map_err(|_| format!("bad number {text:?} in {spec:?}"))
            };
            Ok((number(gpu)? as u32, number(pid)? as u32, number(used)?))
        })
        .collect()
}
