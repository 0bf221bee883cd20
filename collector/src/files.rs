//! Files the collector reads or writes as root, in folders others may reach:
//! opened without following a planted symbolic link, checked for who may
//! change them, and never quoted back in an error.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The most a key, an id or a config file may hold.
const MAX_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is a symbolic link; rollcall does not follow links there (replace it with the file itself)"
    )]
    Link { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} can be changed by other users (mode {mode:04o}); `chmod go-w {path}` it")]
    WritableByOthers { path: PathBuf, mode: u32 },
    #[error("{path} is over {MAX_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path} is not UTF-8 text")]
    NotText { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Who may read the file besides its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privacy {
    /// A secret: readable by group or others earns a warning.
    Secret,
    /// Not secret (a config, an id): anyone may read it.
    Public,
}

/// Reads a small text file that others must not be able to change: not
/// through a link, only a regular file, not group- or world-writable.
pub fn read_guarded(path: &Path, privacy: Privacy) -> Result<String, FileError> {
    let file = open_no_follow(path)?;
    let metadata = file.metadata().map_err(|source| FileError::Open {
        path: path.to_owned(),
        source,
    })?;
    if !metadata.is_file() {
        return Err(FileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(FileError::WritableByOthers {
            path: path.to_owned(),
            mode,
        });
    }
    if privacy == Privacy::Secret && mode & 0o044 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:04o}"), "a secret file other users can read; `chmod 600` it");
    }
    let mut text = String::new();
    file.take(MAX_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|_| FileError::NotText {
            path: path.to_owned(),
        })?;
    if text.len() as u64 > MAX_BYTES {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(text)
}

/// `None` when the file does not exist.
pub fn read_guarded_if_present(path: &Path, privacy: Privacy) -> Result<Option<String>, FileError> {
    match read_guarded(path, privacy) {
        Err(FileError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        other => other.map(Some),
    }
}

/// Creates or replaces `path` with `text`, never through a link planted
/// there: a link is refused, not followed.
pub fn write_no_follow(path: &Path, text: &str, mode: u32) -> Result<(), FileError> {
    let write_error = |source| FileError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| link_or(path, source, write_error))?;
    file.write_all(text.as_bytes()).map_err(write_error)
}

fn open_no_follow(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| {
            link_or(path, source, |source| FileError::Open {
                path: path.to_owned(),
                source,
            })
        })
}

/// `O_NOFOLLOW` on a link fails with `ELOOP`: say what happened.
fn link_or(
    path: &Path,
    source: std::io::Error,
    other: impl FnOnce(std::io::Error) -> FileError,
) -> FileError {
    if source.raw_os_error() == Some(libc::ELOOP) {
        FileError::Link {
            path: path.to_owned(),
        }
    } else {
        other(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_mode(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_key_file_others_can_change_or_a_link_is_refused_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "00112233445566778899aabbccddeeff";
        let private = file_with_mode(dir.path(), "private", secret, 0o600);
        assert_eq!(read_guarded(&private, Privacy::Secret).unwrap(), secret);
        // Readable by others: read, with a warning.
        let readable = file_with_mode(dir.path(), "readable", secret, 0o644);
        assert_eq!(read_guarded(&readable, Privacy::Secret).unwrap(), secret);
        for mode in [0o666, 0o620, 0o602] {
            let writable = file_with_mode(dir.path(), "writable", secret, mode);
            let error = read_guarded(&writable, Privacy::Secret).unwrap_err();
            assert!(
                matches!(error, FileError::WritableByOthers { .. }),
                "{mode:o}: {error}"
            );
            assert!(!error.to_string().contains(secret));
        }
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        let error = read_guarded(&link, Privacy::Secret).unwrap_err();
        assert!(matches!(error, FileError::Link { .. }), "{error}");
        assert!(!error.to_string().contains(secret));
        assert!(matches!(
            read_guarded(dir.path(), Privacy::Public),
            Err(FileError::NotAFile { .. })
        ));
        assert_eq!(
            read_guarded_if_present(&dir.path().join("absent"), Privacy::Public).unwrap(),
            None
        );
    }

    #[test]
    fn a_write_refuses_a_planted_link_and_leaves_its_target_alone() {
        let dir = tempfile::tempdir().unwrap();
        let victim = file_with_mode(dir.path(), "victim", "precious", 0o600);
        let link = dir.path().join("marker");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(matches!(
            write_no_follow(&link, "x", 0o644),
            Err(FileError::Link { .. })
        ));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let plain = dir.path().join("plain");
        write_no_follow(&plain, "one", 0o644).unwrap();
        write_no_follow(&plain, "two", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&plain).unwrap(), "two");
    }
}
