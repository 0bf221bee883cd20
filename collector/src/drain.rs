//! Draining (PROTOCOL.md §3): the machine's owner or operator asks
//! schedulers to place no new work here, without stopping the collector.
//!
//! `rollcall-collector drain` leaves a marker file in the state folder and
//! `undrain` removes it; every heartbeat looks for it, so a running
//! collector reports the change at its next heartbeat, and the state
//! survives restarts.

use std::path::{Path, PathBuf};

use rollcall::heartbeat::AgentState;

use crate::files::{self, FileError};

const MARKER: &str = "draining";

fn marker(state_dir: &Path) -> PathBuf {
    state_dir.join(MARKER)
}

/// What the next heartbeat reports: draining while the marker is there
/// (a link by that name is not the marker, and is not followed).
pub fn current_state(state_dir: &Path) -> AgentState {
    match std::fs::symlink_metadata(marker(state_dir)) {
        Ok(metadata) if metadata.is_file() => AgentState::Draining,
        _ => AgentState::Up,
    }
}

/// Puts this machine into draining (idempotent). Run as root, it never
/// writes through a link someone planted in the state folder.
pub fn drain(state_dir: &Path) -> Result<PathBuf, FileError> {
    let path = marker(state_dir);
    std::fs::create_dir_all(state_dir).map_err(|source| FileError::Write {
        path: state_dir.to_owned(),
        source,
    })?;
    files::write_no_follow(
        &path,
        "draining: schedulers are asked to place no new work here\n",
        0o644,
    )?;
    Ok(path)
}

/// Refuses a marker in a folder the service never reads: a user who runs
/// `drain` without naming the folder gets their own folder by default,
/// while the packaged service keeps its state in `service_dir`.
pub fn check_target(
    state_dir: &Path,
    named: bool,
    service_dir: &Path,
    draining: bool,
) -> Result<(), String> {
    if named || state_dir == service_dir || !service_dir.exists() {
        return Ok(());
    }
    Err(format!(
        "the service keeps its state in {}, but this user's would be {}: run `sudo rollcall-collector {}`, or name the folder with --state-dir",
        service_dir.display(),
        state_dir.display(),
        if draining { "drain" } else { "undrain" }
    ))
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
    fn a_link_planted_as_the_marker_is_neither_followed_nor_taken_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, marker(dir.path())).unwrap();
        assert_eq!(current_state(dir.path()), AgentState::Up);
        let error = drain(dir.path()).unwrap_err();
        assert!(matches!(error, FileError::Link { .. }), "{error}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    }

    #[test]
    fn a_user_folder_guessed_beside_the_services_is_refused() {
        let service = tempfile::tempdir().unwrap();
        let own = Path::new("/home/someone/.local/state/rollcall");
        let refused = check_target(own, false, service.path(), true).unwrap_err();
        assert!(
            refused.contains("sudo rollcall-collector drain") && refused.contains("--state-dir"),
            "{refused}"
        );
        assert!(
            check_target(own, true, service.path(), true).is_ok(),
            "named: the operator knows"
        );
        assert!(check_target(service.path(), false, service.path(), true).is_ok());
        assert!(
            check_target(own, false, Path::new("/nonexistent/rollcall"), true).is_ok(),
            "no service here"
        );
    }

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
