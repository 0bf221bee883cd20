//! Draining (PROTOCOL.md §3): the machine's owner or operator asks
//! schedulers to place no new work here, without stopping the collector.
//!
//! `rollcall-collector drain` leaves a marker file in the state folder and
//! `undrain` removes it; every heartbeat looks for it, so a running
//! collector reports the change at its next heartbeat, and the state
//! survives restarts.

use std::path::{Path, PathBuf};

use rollcall::heartbeat::AgentState;

const MARKER: &str = "draining";

fn marker(state_dir: &Path) -> PathBuf {
    state_dir.join(MARKER)
}

/// What the next heartbeat reports: draining while the marker exists.
pub fn current_state(state_dir: &Path) -> AgentState {
    if marker(state_dir).exists() {
        AgentState::Draining
    } else {
        AgentState::Up
    }
}

/// Puts this machine into draining (idempotent).
pub fn drain(state_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    std::fs::write(
        marker(state_dir),
        "draining: schedulers are asked to place no new work here\n",
    )
}

/// Takes this machine out of draining (idempotent).
pub fn undrain(state_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(marker(state_dir)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_and_undrain_are_idempotent_and_kept_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(current_state(dir.path()), AgentState::Up);
        drain(dir.path()).unwrap();
        drain(dir.path()).unwrap();
        assert_eq!(current_state(dir.path()), AgentState::Draining);
        undrain(dir.path()).unwrap();
        undrain(dir.path()).unwrap();
        assert_eq!(current_state(dir.path()), AgentState::Up);
    }
}
