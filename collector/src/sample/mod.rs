//! One sample of this host, as a v1 heartbeat body.

pub mod cgroup;
pub mod cpu;
pub mod disk;
pub mod gpu;
pub mod history;
pub mod host;
pub mod memory;
pub mod own;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rollcall::heartbeat::{AgentState, Heartbeat, PROTOCOL_VERSION};

pub use gpu::GpuReaders;

/// What a heartbeat says about its agent besides the host's figures.
#[derive(Debug, Clone)]
pub struct Identity {
    pub agent_id: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub interval_s: u32,
    /// Minutes of history sent together.
    pub history_window_minutes: u64,
    /// Where the agent id and the draining marker are kept.
    pub state_dir: PathBuf,
}

pub struct Sampler {
    cpu: cpu::CpuSource,
    memory: memory::MemorySource,
    disk_path: PathBuf,
    gpus: GpuReaders,
    gpu_timeout: Duration,
    last_sent_at_ms: u64,
}

impl Sampler {
    pub fn new(disk_path: PathBuf, gpus: GpuReaders, gpu_timeout: Duration) -> Self {
        Self {
            cpu: cpu::CpuSource::new(),
            memory: memory::MemorySource::new(),
            disk_path,
            gpus,
            gpu_timeout,
            last_sent_at_ms: 0,
        }
    }

    /// Samples the host. With `measure_cpu_usage`, a first sample waits
    /// sysinfo's minimum window (200 ms) so that usage is meaningful; later
    /// samples report usage since the previous one and do not wait.
    pub async fn sample(
        &mut self,
        identity: &Identity,
        state: AgentState,
        measure_cpu_usage: bool,
    ) -> Heartbeat {
        let gpus = self.gpus.read_all(self.gpu_timeout);
        let cpu = self.cpu.sample(measure_cpu_usage);
        let (gpus, cpu) = tokio::join!(gpus, cpu);
        Heartbeat {
            v: PROTOCOL_VERSION,
            agent_id: identity.agent_id.clone(),
            sent_at_ms: self.next_sent_at_ms(),
            interval_s: identity.interval_s,
            state,
            pool: identity.pool.clone(),
            labels: identity.labels.clone(),
            host: Some(host::sample()),
            cpu,
            memory: self.memory.sample(),
            disk: disk::sample(&self.disk_path),
            gpus,
            history: Vec::new(),
            collector: own::sample(),
        }
    }

    /// Strictly increasing even if the wall clock steps back, because ingest
    /// refuses anything not newer than what it holds.
    fn next_sent_at_ms(&mut self) -> u64 {
        let now = u64::try_from(rollcall::time::now_ms()).unwrap_or(0);
        self.last_sent_at_ms = now.max(self.last_sent_at_ms + 1);
        self.last_sent_at_ms
    }
}
