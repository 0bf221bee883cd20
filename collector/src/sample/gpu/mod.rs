//! GPUs, one module per vendor behind one small trait.
//!
//! Each source runs on a thread of its own and every read is bounded in time:
//! a hung driver costs the heartbeat that source's GPUs, never the heartbeat.
//! While a source is still stuck in an earlier read it is skipped, so hung
//! reads never pile up.

pub mod amd;
// Simulated GPUs exist in test builds only: a release collector cannot be
// told to invent GPUs.
#[cfg(any(test, feature = "fake-gpus"))]
pub mod fake;
pub mod nvidia;
pub mod processes;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rollcall::heartbeat::Gpu;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A vendor's GPUs. `read` may block; callers bound it.
pub trait GpuSource: Send + 'static {
    fn name(&self) -> &'static str;
    /// This source's GPUs now. `Ok(vec![])` means none present, which is not an error.
    fn read(&mut self) -> Result<Vec<Gpu>, String>;
}

type Reply = oneshot::Sender<Result<Vec<Gpu>, String>>;

struct BoundedSource {
    name: &'static str,
    requests: std::sync::mpsc::Sender<Reply>,
    busy: Arc<AtomicBool>,
}

impl BoundedSource {
    fn spawn(mut source: Box<dyn GpuSource>) -> std::io::Result<Self> {
        let name = source.name();
        let (requests, incoming) = std::sync::mpsc::channel::<Reply>();
        let busy = Arc::new(AtomicBool::new(false));
        let worker_busy = Arc::clone(&busy);
        std::thread::Builder::new()
            .name(format!("gpu-{name}"))
            .spawn(move || {
                for reply in incoming {
                    let result = source.read();
                    worker_busy.store(false, Ordering::Release);
                    let _ = reply.send(result);
                }
            })?;
        Ok(Self {
            name,
            requests,
            busy,
        })
    }

    /// Sends a read request; `None` if this source is skipped this time.
    fn start(&self) -> Option<oneshot::Receiver<Result<Vec<Gpu>, String>>> {
        if self.busy.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                source = self.name,
                "GPU source still stuck in an earlier read; sending without its GPUs"
            );
            return None;
        }
        let (reply, answer) = oneshot::channel();
        if self.requests.send(reply).is_err() {
            tracing::warn!(
                source = self.name,
                "GPU source thread has stopped; sending without its GPUs"
            );
            return None;
        }
        Some(answer)
    }

    async fn finish(
        &self,
        answer: oneshot::Receiver<Result<Vec<Gpu>, String>>,
        deadline: Instant,
        timeout: Duration,
    ) -> Vec<Gpu> {
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Ok(gpus))) => gpus,
            Ok(Ok(Err(error))) => {
                tracing::warn!(source = self.name, %error, "GPU read failed; sending without its GPUs");
                Vec::new()
            }
            Ok(Err(_)) => Vec::new(),
            Err(_) => {
                tracing::warn!(
                    source = self.name,
                    timeout_ms = timeout.as_millis() as u64,
                    "GPU read timed out (driver hung?); sending without its GPUs"
                );
                Vec::new()
            }
        }
    }
}

/// All GPU sources of this host, read concurrently.
pub struct GpuReaders {
    sources: Vec<BoundedSource>,
}

impl GpuReaders {
    pub fn new(sources: Vec<Box<dyn GpuSource>>) -> Self {
        let sources = sources
            .into_iter()
            .filter_map(|source| {
                let name = source.name();
                BoundedSource::spawn(source)
                    .inspect_err(|error| tracing::warn!(source = name, %error, "cannot start GPU reader thread"))
                    .ok()
            })
            .collect();
        Self { sources }
    }

    /// The real sources of this host: NVIDIA through NVML and AMD through
    /// sysfs. In builds with the `fake-gpus` feature (tests only),
    /// `ROLLCALL_FAKE_GPUS` replaces them. `once`: the `once` subcommand (run
    /// from cron), which quiets what would otherwise be reported every minute.
    /// `process_names`: whether GPU processes go out with names and users.
    pub fn detect(once: bool, process_names: bool) -> Self {
        #[cfg(feature = "fake-gpus")]
        if let Some(fake) = fake::FakeGpus::from_env() {
            tracing::warn!("ROLLCALL_FAKE_GPUS is set: reporting simulated GPUs, not this host's");
            return Self::new(vec![Box::new(fake.with_process_names(process_names))]);
        }
        Self::new(vec![
            Box::new(nvidia::NvmlSource::new(once, process_names)),
            Box::new(amd::SysfsSource::default()),
        ])
    }

    /// Every source's GPUs, all read at once and bounded together by `timeout`.
    pub async fn read_all(&self, timeout: Duration) -> Vec<Gpu> {
        let deadline = Instant::now() + timeout;
        let pending: Vec<_> = self
            .sources
            .iter()
            .map(|source| (source, source.start()))
            .collect();
        let mut gpus = Vec::new();
        for (source, answer) in pending {
            if let Some(answer) = answer {
                gpus.extend(source.finish(answer, deadline, timeout).await);
            }
        }
        gpus.truncate(rollcall::heartbeat::MAX_GPUS);
        // Indexes stay unique across vendors: the body refuses duplicates.
        if has_duplicate_index(&gpus) {
            for (index, gpu) in gpus.iter_mut().enumerate() {
                gpu.index = index as u32;
            }
        }
        gpus
    }
}

fn has_duplicate_index(gpus: &[Gpu]) -> bool {
    gpus.iter().enumerate().any(|(position, gpu)| {
        gpus[..position]
            .iter()
            .any(|other| other.index == gpu.index)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hung_source_costs_only_its_own_gpus_and_only_the_timeout() {
        let readers = GpuReaders::new(vec![
            Box::new(fake::FakeGpus::hanging()),
            Box::new(fake::FakeGpus::parse("nvidia:24564:20110").unwrap()),
        ]);
        let started = Instant::now();
        let gpus = readers.read_all(Duration::from_millis(300)).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].memory_free_mb, 20110);

        // The hung source is skipped at once next time instead of stacking reads.
        let started = Instant::now();
        let gpus = readers.read_all(Duration::from_millis(300)).await;
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(gpus.len(), 1);
    }
}
