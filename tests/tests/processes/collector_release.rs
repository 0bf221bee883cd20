//! The collector as it ships (`--profile collector`, no test features)
//! cannot be told to invent GPUs: `ROLLCALL_FAKE_GPUS` does nothing there.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

#[test]
#[ignore = "needs the shipped collector build (cargo build --profile collector -p rollcall-collector); scripts/test builds it"]
fn the_shipped_collector_ignores_fake_gpus() {
    let binary =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/collector/rollcall-collector");
    assert!(binary.exists(), "{} is not built", binary.display());
    let state = tempfile::tempdir().unwrap();
    let output = Command::new(&binary)
        .args(["print", "--skip-cpu-usage", "--config", "/dev/null"])
        .arg("--state-dir")
        .arg(state.path())
        .env(
            "ROLLCALL_FAKE_GPUS",
            "nvidia:24564:20110,nvidia:81920:80000",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let heartbeat: Value = serde_json::from_slice(&output.stdout).unwrap();
    let invented = heartbeat["gpus"].as_array().unwrap().iter().any(|gpu| {
        gpu["uuid"]
            .as_str()
            .is_some_and(|uuid| uuid.starts_with("GPU-fake"))
    });
    assert!(
        !invented,
        "the shipped collector reported simulated GPUs: {heartbeat}"
    );
    assert!(!stderr.contains("simulated GPUs"), "{stderr}");
}
