//! CPU time one collector heartbeat costs: sample, serialise, sign. The CPU
//! usage window is primed first, as in service mode, so it is not counted.

use std::path::PathBuf;
use std::time::Duration;

use rollcall::heartbeat::AgentState;
use rollcall::signing::FleetSecret;
use rollcall_collector::sample::{GpuReaders, Identity, Sampler};

fn process_cpu() -> Duration {
    let mut spec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut spec) };
    Duration::new(spec.tv_sec as u64, spec.tv_nsec as u32)
}

fn main() {
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let key = FleetSecret::from_bytes(vec![1; 32])
        .expect("secret")
        .derive_agent_key("bench");
    let identity = Identity {
        agent_id: "bench".into(),
        pool: "default".into(),
        labels: Default::default(),
        interval_s: 30,
        history_window_minutes: 5,
        // No draining marker there: the bench reports "up".
        state_dir: std::env::temp_dir().join("rollcall-collector-cost"),
    };
    let mut sampler = Sampler::new(
        PathBuf::from("/"),
        GpuReaders::detect(false, true),
        Duration::from_secs(5),
    );
    let mut bytes = 0;
    runtime.block_on(async {
        for _ in 0..10 {
            sampler.sample(&identity, AgentState::Up, true).await;
        }
        let started = process_cpu();
        for _ in 0..iterations {
            let heartbeat = sampler.sample(&identity, AgentState::Up, true).await;
            let body = serde_json::to_vec(&heartbeat).expect("serialise");
            let signature = key.signature_header("k1", "bench", 1_764_132_000, &body);
            bytes = body.len() + signature.len();
        }
        let per = (process_cpu() - started) / iterations;
        println!("{{\"cpu_us_per_heartbeat\": {:.1}, \"iterations\": {iterations}, \"body_bytes\": {bytes}}}", per.as_secs_f64() * 1e6);
    });
}
