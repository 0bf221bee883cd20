//! Size and free space of the file system holding one path.

use std::ffi::CString;
use std::path::Path;

use rollcall::heartbeat::Disk;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// `None` (and a warning) when the path cannot be measured: the heartbeat
/// goes out without disk figures rather than not at all.
pub fn sample(path: &Path) -> Option<Disk> {
    match statvfs(path) {
        Ok((total, free)) => Some(Disk {
            path: Some(path.display().to_string()),
            total_gb: Some(round2(total as f64 / GIB)),
            free_gb: Some(round2(free as f64 / GIB)),
        }),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot measure disk; sending the heartbeat without it");
            None
        }
    }
}

/// Total bytes and bytes available to unprivileged users (what `df` calls Avail).
fn statvfs(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })?;
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stats a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fragment = stats.f_frsize as u64;
    Ok((
        stats.f_blocks as u64 * fragment,
        stats.f_bavail as u64 * fragment,
    ))
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_a_size_and_a_missing_path_is_absent() {
        let disk = sample(Path::new("/")).unwrap();
        assert!(disk.total_gb.unwrap() > 0.0);
        assert!(disk.free_gb.unwrap() <= disk.total_gb.unwrap());
        assert!(sample(Path::new("/no/such/path/for/rollcall")).is_none());
    }
}
