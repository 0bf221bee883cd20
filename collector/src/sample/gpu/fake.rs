//! Simulated GPUs, for tests. Compiled only into test builds (the
//! `fake-gpus` feature, which release builds and packages never enable), and
//! even there never chosen unless `ROLLCALL_FAKE_GPUS` is set:
//!
//! - `hang`: a driver that never answers (every read blocks forever);
//! - `vendor:total_mb:free_mb[,...]`: fixed GPUs, e.g. `nvidia:24564:20110`.

use rollcall::heartbeat::{Gpu, Vendor};

use super::GpuSource;

pub const ENV: &str = "ROLLCALL_FAKE_GPUS";

pub enum FakeGpus {
    Hang,
    Fixed(Vec<Gpu>),
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
        Ok(FakeGpus::Fixed(gpus))
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
            FakeGpus::Fixed(gpus) => Ok(gpus.clone()),
        }
    }
}
