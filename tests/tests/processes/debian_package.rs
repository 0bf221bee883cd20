//! The collector's Debian package, installed on this machine the way an
//! operator installs it: `dpkg -i`, a heartbeat from the installed binary run
//! as the package's user with the installed config and key file, an upgrade
//! that keeps the config and the generated agent id, `dpkg -r` that keeps the
//! state, `dpkg --purge` that removes it, and lintian without errors.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rollcall_tests::Stack;

const PACKAGE: &str = "rollcall-collector";
const CONFIG: &str = "/etc/rollcall/collector.toml";
const KEY_FILE: &str = "/etc/rollcall/collector.env";
const STATE: &str = "/var/lib/rollcall";
const ENABLED: &str = "/etc/systemd/system/multi-user.target.wants/rollcall-collector.service";

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .current_dir(repository())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Builds the package at `version` and returns its path.
fn build(version: &str) -> String {
    let output = run("scripts/deb", &["--version", version]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .last()
        .expect("scripts/deb prints the package");
    let path = line.split('\t').next().unwrap_or_default();
    repository().join(path).display().to_string()
}

fn installed_version() -> Option<String> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", PACKAGE])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.starts_with("install ok installed")
        .then(|| text.rsplit(' ').next().unwrap_or_default().to_owned())
}

/// `once` as the package's user, with the installed config and the key from
/// the installed key file, as systemd would start it.
fn heartbeat_as_package_user() -> Output {
    let key_line = std::fs::read_to_string(KEY_FILE).expect("key file");
    let key = key_line
        .trim()
        .strip_prefix("ROLLCALL_AGENT_KEY=")
        .expect("ROLLCALL_AGENT_KEY=<hex> in the key file")
        .to_owned();
    Command::new("runuser")
        .args([
            "-u",
            "rollcall",
            "--",
            "/usr/bin/rollcall-collector",
            "once",
        ])
        .args(["--skip-cpu-usage", "--config", CONFIG])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("ROLLCALL_AGENT_KEY", key)
        .output()
        .expect("run the installed collector")
}

fn agent_id_file() -> String {
    std::fs::read_to_string(Path::new(STATE).join("agent-id"))
        .expect("the generated agent id is kept in the state folder")
}

#[test]
#[ignore = "installs the Debian package system-wide (needs root, dpkg, help2man and lintian): scripts/test runs it"]
fn the_package_installs_reports_upgrades_and_purges() {
    // A leftover from an interrupted run would make every check below lie.
    let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
    // Where the GPU drivers are installed a render group exists, and earlier
    // packages put the user in it; make sure this machine has one too.
    let _render = GroupForTheRun::ensure("render");
    let base = env!("CARGO_PKG_VERSION");
    let first = build(base);
    let second = build(&format!("{base}+1"));
    println!(
        "package: {first} ({} bytes)",
        std::fs::metadata(&first).unwrap().len()
    );

    let lintian = Command::new("lintian")
        .args(["--no-tag-display-limit", &first])
        .output()
        .expect("lintian is installed");
    let report = String::from_utf8_lossy(&lintian.stdout);
    println!("lintian:\n{report}");
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors: {errors:#?}");

    run("dpkg", &["-i", &first]);
    assert_eq!(installed_version().as_deref(), Some(base));
    assert!(Path::new("/usr/bin/rollcall-collector").exists());
    assert!(Path::new("/usr/lib/systemd/system/rollcall-collector.service").exists());
    assert!(Path::new("/usr/share/man/man1/rollcall-collector.1.gz").exists());
    // Enabled even where systemd is not running (as on a build machine), so
    // that it starts at the next boot.
    assert!(Path::new(ENABLED).exists(), "the service is enabled");
    let passwd = run("getent", &["passwd", "rollcall"]);
    assert!(String::from_utf8_lossy(&passwd.stdout).contains(STATE));
    // No supplementary group: NVML opens /dev/nvidia*, AMD's figures are
    // world-readable sysfs files, and render or video would open more.
    assert_eq!(groups_of_rollcall(), ["rollcall"]);
    let key_file = std::fs::metadata(KEY_FILE).expect("the key file exists");
    assert_eq!(key_file.permissions().mode() & 0o777, 0o600);
    assert_eq!(key_file.uid(), 0);
    let state = std::fs::metadata(STATE).expect("the state folder exists");
    assert_eq!(state.permissions().mode() & 0o777, 0o750);

    // Configure it as an operator does: the endpoint in the conffile, the
    // key (derived for the generated agent id) in the key file.
    let stack = Stack::start();
    let config = std::fs::read_to_string(CONFIG).unwrap();
    let endpoint_line = format!("endpoint = \"{}\"", stack.ingest.url());
    let configured: String = config
        .lines()
        .map(|line| {
            if line.starts_with("#endpoint = ") {
                endpoint_line.clone()
            } else if line.starts_with("#key_id = ") {
                format!("key_id = \"{}\"", rollcall_tests::KEY_ID)
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(
        configured, config,
        "the conffile has a commented endpoint line"
    );
    std::fs::write(CONFIG, format!("{configured}\n")).unwrap();
    let printed = Command::new("runuser")
        .args([
            "-u",
            "rollcall",
            "--",
            "/usr/bin/rollcall-collector",
            "print",
        ])
        .args(["--skip-cpu-usage", "--config", CONFIG])
        .output()
        .unwrap();
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let agent_id = agent_id_file();
    let agent_id = agent_id.trim();
    std::fs::write(
        KEY_FILE,
        format!(
            "ROLLCALL_AGENT_KEY={}\n",
            stack.agent_key(agent_id).to_hex()
        ),
    )
    .unwrap();

    let sent = heartbeat_as_package_user();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(sent.stdout.is_empty(), "once is silent on success");
    let first_seen = stack.agent(agent_id).expect("the heartbeat was recorded");

    // Earlier packages added the user to render (and before that video); an
    // upgrade takes both away.
    let earlier_groups: Vec<&str> = ["render", "video"]
        .into_iter()
        .filter(|group| has_group(group))
        .collect();
    for group in &earlier_groups {
        run("adduser", &["--quiet", "rollcall", group]);
    }
    assert_eq!(groups_of_rollcall().len(), 1 + earlier_groups.len());
    run("dpkg", &["-i", &second]);
    assert_eq!(installed_version(), Some(format!("{base}+1")));
    assert_eq!(groups_of_rollcall(), ["rollcall"]);
    assert_eq!(
        std::fs::read_to_string(CONFIG).unwrap(),
        format!("{configured}\n"),
        "the upgrade kept the edited conffile"
    );
    assert_eq!(
        agent_id_file().trim(),
        agent_id,
        "the upgrade kept the agent id"
    );
    assert!(
        std::fs::read_to_string(KEY_FILE)
            .unwrap()
            .contains(&stack.agent_key(agent_id).to_hex())
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let sent = heartbeat_as_package_user();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let second_seen = stack.agent(agent_id).expect("still recorded");
    assert_ne!(
        first_seen["last_heartbeat_at"], second_seen["last_heartbeat_at"],
        "the upgraded collector reported as the same agent"
    );

    run("dpkg", &["-r", PACKAGE]);
    assert!(!Path::new("/usr/bin/rollcall-collector").exists());
    assert_eq!(agent_id_file().trim(), agent_id, "remove keeps the state");
    assert!(Path::new(CONFIG).exists(), "remove keeps the conffile");

    run("dpkg", &["--purge", PACKAGE]);
    assert!(!Path::new(STATE).exists(), "purge removes the state");
    assert!(!Path::new(CONFIG).exists(), "purge removes the conffile");
    assert!(!Path::new(KEY_FILE).exists(), "purge removes the key");
    assert!(
        !Path::new(ENABLED).exists(),
        "purge removes the service's links"
    );

    // A person called rollcall is never made the service's account.
    let _ = Command::new("userdel").arg("rollcall").output();
    run(
        "useradd",
        &["--uid", "4242", "--no-create-home", "rollcall"],
    );
    let refused = Command::new("dpkg").args(["-i", &first]).output().unwrap();
    let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
    let _ = Command::new("userdel").arg("rollcall").output();
    assert!(
        !refused.status.success(),
        "installed over a person's account"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is not a system account"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// A system group that exists for the test: created if missing, and then
/// deleted again when dropped.
struct GroupForTheRun(Option<&'static str>);

impl GroupForTheRun {
    fn ensure(name: &'static str) -> Self {
        if has_group(name) {
            return Self(None);
        }
        run("groupadd", &["--system", name]);
        Self(Some(name))
    }
}

impl Drop for GroupForTheRun {
    fn drop(&mut self) {
        if let Some(name) = self.0 {
            let _ = Command::new("groupdel").arg(name).output();
        }
    }
}

fn groups_of_rollcall() -> Vec<String> {
    String::from_utf8_lossy(&run("id", &["-nG", "rollcall"]).stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn has_group(name: &str) -> bool {
    Command::new("getent")
        .args(["group", name])
        .output()
        .is_ok_and(|output| output.status.success())
}
