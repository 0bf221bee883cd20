//! Who holds a GPU's memory (PROTOCOL.md §4 "GPU processes"): the vendor
//! source gives pids and used memory, `/proc` gives each one's command name
//! and user. Reads are small and local, on the GPU source's own thread, so
//! they are bounded with its read. A process that exited between the two
//! reads is left out. Where no pid is visible at all (the collector runs in
//! a container with a pid namespace of its own), pids and memory are sent
//! without names, and that is said once.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rollcall::heartbeat::{GpuProcess, MAX_GPU_PROCESSES, MAX_PROCESS_TEXT_LEN};

/// `/etc/passwd` larger than this is not read: users are then sent as uids.
const MAX_PASSWD_BYTES: u64 = 1 << 20;

/// Turns a source's (pid, used MiB) pairs into the heartbeat's processes.
pub struct ProcessNames {
    /// Whether names and users are sent (`--no-process-names` says no).
    send_names: bool,
    proc_root: PathBuf,
    passwd: PathBuf,
    users: Option<BTreeMap<u32, String>>,
    said_invisible: bool,
}

impl ProcessNames {
    pub fn new(send_names: bool) -> Self {
        Self::at(send_names, "/proc", "/etc/passwd")
    }

    fn at(send_names: bool, proc_root: impl Into<PathBuf>, passwd: impl Into<PathBuf>) -> Self {
        Self {
            send_names,
            proc_root: proc_root.into(),
            passwd: passwd.into(),
            users: None,
            said_invisible: false,
        }
    }

    /// At most 32 processes, largest first; one entry per pid (a process in
    /// both NVML's compute and graphics lists counts once, at its larger
    /// figure).
    pub fn describe(&mut self, raw: impl IntoIterator<Item = (u32, u64)>) -> Vec<GpuProcess> {
        let mut by_pid: BTreeMap<u32, u64> = BTreeMap::new();
        for (pid, used_mb) in raw {
            let used = by_pid.entry(pid).or_default();
            *used = (*used).max(used_mb);
        }
        let visible: Vec<bool> = by_pid
            .keys()
            .map(|pid| self.proc_root.join(pid.to_string()).is_dir())
            .collect();
        let none_visible = !by_pid.is_empty() && !visible.contains(&true);
        if none_visible && !self.said_invisible {
            self.said_invisible = true;
            tracing::info!(
                "GPU processes' pids are not visible here (a container with its own pid namespace?): sending pids and memory without names"
            );
        }
        let mut processes: Vec<GpuProcess> = by_pid
            .into_iter()
            .zip(visible)
            // Not visible while others are: it exited between the reads.
            .filter(|(_, visible)| *visible || none_visible)
            .map(|((pid, used_mb), visible)| {
                let (name, user) = if self.send_names && visible {
                    (self.command(pid), self.user(pid))
                } else {
                    (None, None)
                };
                GpuProcess {
                    pid,
                    used_mb,
                    name,
                    user,
                }
            })
            .collect();
        processes.sort_by(|a, b| b.used_mb.cmp(&a.used_mb).then(a.pid.cmp(&b.pid)));
        processes.truncate(MAX_GPU_PROCESSES);
        processes
    }

    fn command(&self, pid: u32) -> Option<String> {
        let comm = std::fs::read(self.proc_root.join(format!("{pid}/comm"))).ok()?;
        printable(&String::from_utf8_lossy(&comm))
    }

    fn user(&mut self, pid: u32) -> Option<String> {
        let status = std::fs::read_to_string(self.proc_root.join(format!("{pid}/status"))).ok()?;
        let uid: u32 = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let users = self.users.get_or_insert_with(|| read_passwd(&self.passwd));
        let name = users.get(&uid).cloned().unwrap_or_else(|| uid.to_string());
        printable(&name)
    }
}

/// The names of users by uid, from a passwd file (empty if unreadable).
fn read_passwd(path: &std::path::Path) -> BTreeMap<u32, String> {
    let fits = std::fs::metadata(path).is_ok_and(|meta| meta.len() <= MAX_PASSWD_BYTES);
    let text = if fits {
        std::fs::read_to_string(path).unwrap_or_default()
    } else {
        String::new()
    };
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?.parse().ok()?;
            Some((uid, name.to_owned()))
        })
        .collect()
}

/// Text as ingest accepts it: no control characters, at most 64
/// characters, not empty.
fn printable(text: &str) -> Option<String> {
    let clean: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_PROCESS_TEXT_LEN)
        .collect();
    let clean = clean.trim().to_owned();
    (!clean.is_empty()).then_some(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /proc: pid → (comm, uid).
    fn fake_proc(processes: &[(u32, &str, u32)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (pid, comm, uid) in processes {
            let folder = dir.path().join("proc").join(pid.to_string());
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join("comm"), comm).unwrap();
            std::fs::write(
                folder.join("status"),
                format!("Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
            )
            .unwrap();
        }
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .unwrap();
        dir
    }

    fn names(dir: &tempfile::TempDir, send_names: bool) -> ProcessNames {
        ProcessNames::at(
            send_names,
            dir.path().join("proc"),
            dir.path().join("passwd"),
        )
    }

    #[test]
    fn names_and_users_come_from_proc_and_the_largest_go_first() {
        let dir = fake_proc(&[
            (10, "python3\n", 1000),
            (20, "Xorg\n", 0),
            (30, "job", 4242),
        ]);
        let got = names(&dir, true).describe([(20, 300), (10, 30_000), (30, 5), (10, 29_000)]);
        let summary: Vec<_> = got
            .iter()
            .map(|p| (p.pid, p.used_mb, p.name.as_deref(), p.user.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [
                (10, 30_000, Some("python3"), Some("alice")),
                (20, 300, Some("Xorg"), Some("root")),
                (30, 5, Some("job"), Some("4242")),
            ]
        );
        let bare = names(&dir, false).describe([(10, 1)]);
        assert_eq!((bare[0].name.as_ref(), bare[0].user.as_ref()), (None, None));
    }

    #[test]
    fn a_process_that_exited_is_left_out_but_invisible_pids_are_kept() {
        let dir = fake_proc(&[(10, "python3", 1000)]);
        let got = names(&dir, true).describe([(10, 100), (99_999, 500)]);
        assert_eq!(got.iter().map(|p| p.pid).collect::<Vec<_>>(), [10]);
        // None visible: a pid namespace of its own. Pids and memory only.
        let empty = fake_proc(&[]);
        let got = names(&empty, true).describe([(7, 100), (8, 200)]);
        assert_eq!(
            got.iter()
                .map(|p| (p.pid, p.name.is_none()))
                .collect::<Vec<_>>(),
            [(8, true), (7, true)]
        );
    }

    #[test]
    fn hostile_names_are_made_printable_and_bounded() {
        let long = "x".repeat(200);
        let dir = fake_proc(&[
            (1, "evil\u{1b}[31m\u{7}name", 0),
            (2, &long, 0),
            (3, "\u{1}\u{2}", 0),
        ]);
        let got = names(&dir, true).describe([(1, 3), (2, 2), (3, 1)]);
        assert_eq!(got[0].name.as_deref(), Some("evil[31mname"));
        assert_eq!(
            got[1].name.as_ref().map(|n| n.chars().count()),
            Some(MAX_PROCESS_TEXT_LEN)
        );
        assert_eq!(got[2].name, None, "nothing printable is no name");
    }

    #[test]
    fn a_thousand_processes_become_the_32_largest() {
        let dir = fake_proc(&[]);
        let got = names(&dir, true).describe((1..=1000).map(|pid| (pid, u64::from(pid))));
        assert_eq!(got.len(), MAX_GPU_PROCESSES);
        assert_eq!(got[0].pid, 1000);
        assert_eq!(got[31].pid, 969);
    }
}
