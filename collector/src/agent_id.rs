//! The agent id: configured, or generated once as `<hostname>-<8 hex>` and
//! kept in a state file so that a restarted collector is the same agent.

use std::io::Write;
use std::path::{Path, PathBuf};

use rollcall::signing::{MAX_AGENT_ID_LEN, is_id_char, is_valid_agent_id};

use crate::files::{self, FileError, Privacy};

const FILE_NAME: &str = "agent-id";

#[derive(Debug, thiserror::Error)]
pub enum AgentIdError {
    #[error(transparent)]
    Read(#[from] FileError),
    /// What the file holds is not repeated: it may be anything a link or a
    /// mistake put there.
    #[error("{path} does not hold a valid agent id (1-64 of A-Z a-z 0-9 . _ -); fix or delete it")]
    Invalid { path: PathBuf },
    #[error(
        "cannot keep the generated agent id in {path}: {source} (set --state-dir to a writable folder, or --agent-id)"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads the kept id from `state_dir`, or generates, writes and returns a new one.
pub fn load_or_create(state_dir: &Path, hostname: &str) -> Result<String, AgentIdError> {
    let path = state_dir.join(FILE_NAME);
    if let Some(text) = files::read_guarded_if_present(&path, Privacy::Public)? {
        let id = text.trim();
        if is_valid_agent_id(id) {
            return Ok(id.to_owned());
        }
        return Err(AgentIdError::Invalid { path });
    }
    let id = generate(hostname);
    write_atomically(&path, &id).map_err(|source| AgentIdError::Write {
        path: path.clone(),
        source,
    })?;
    tracing::info!(agent_id = %id, path = %path.display(), "generated a new agent id");
    Ok(id)
}

/// `<hostname>-<8 hex>`, the hostname folded into the id alphabet.
pub fn generate(hostname: &str) -> String {
    let mut base: String = hostname
        .chars()
        .map(|c| if is_id_char(c) { c } else { '-' })
        .collect();
    base.truncate(MAX_AGENT_ID_LEN - 9);
    if base.is_empty() {
        base.push_str("host");
    }
    let mut random = [0u8; 4];
    if getrandom::fill(&mut random).is_err() {
        random = fastrand::u32(..).to_le_bytes();
    }
    format!("{base}-{}", hex::encode(random))
}

/// Writes through a temporary file created afresh (never one that exists,
/// never through a symlink someone planted), then renames it into place.
fn write_atomically(path: &Path, id: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension("tmp");
    // A leftover from a crash, or a planted link: removes the entry itself.
    match std::fs::remove_file(&temporary) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temporary)?;
    file.write_all(format!("{id}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), "gpu box.example.org").unwrap();
        assert!(first.starts_with("gpu-box.example.org-"), "{first}");
        assert!(is_valid_agent_id(&first));
        assert_eq!(load_or_create(dir.path(), "other").unwrap(), first);
    }

    #[test]
    fn long_or_odd_hostnames_still_give_valid_ids() {
        for host in ["", "é", &"x".repeat(200)] {
            let id = generate(host);
            assert!(is_valid_agent_id(&id), "{id}");
        }
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me\n").unwrap();
        let temporary = dir.path().join(FILE_NAME).with_extension("tmp");
        std::os::unix::fs::symlink(&victim, &temporary).unwrap();
        let id = load_or_create(dir.path(), "gpu-01").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me\n");
        assert_eq!(load_or_create(dir.path(), "gpu-01").unwrap(), id);
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "not/valid\n").unwrap();
        let error = load_or_create(dir.path(), "h").unwrap_err();
        assert!(matches!(error, AgentIdError::Invalid { .. }));
        assert!(!error.to_string().contains("not/valid"), "{error}");
    }

    #[test]
    fn an_agent_id_file_planted_as_a_link_is_not_read_or_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("shadow");
        std::fs::write(&secret, "root:$6$secret-hash\n").unwrap();
        std::os::unix::fs::symlink(&secret, dir.path().join(FILE_NAME)).unwrap();
        let error = load_or_create(dir.path(), "h").unwrap_err();
        assert!(
            matches!(error, AgentIdError::Read(FileError::Link { .. })),
            "{error}"
        );
        assert!(!error.to_string().contains("secret-hash"), "{error}");
    }
}
