//! Store outages: ingest answers 503 with `Retry-After` and stays up, the
//! collector backs off, and once the store is back the agent is online again
//! within one interval, with no manual step.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rollcall_tests::{Stack, emulator_env, heartbeat, now_ms, request, wait_until};

/// A private emulator this test may stop and start, with state kept on disk
/// across restarts (as DynamoDB keeps it across an outage).
struct Emulator {
    port: u16,
    state: PathBuf,
    child: Option<Child>,
}

impl Emulator {
    fn binary() -> PathBuf {
        std::env::var_os("ROLLCALL_TEST_MINISTACK")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/ministack"))
    }

    fn start(state: &Path) -> Emulator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut emulator = Emulator {
            port,
            state: state.to_owned(),
            child: None,
        };
        emulator.resume();
        emulator
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn resume(&mut self) {
        let binary = Self::binary();
        assert!(
            binary.exists(),
            "{} is missing: scripts/test installs it",
            binary.display()
        );
        let child = Command::new(binary)
            .env("BIND_HOST", "127.0.0.1")
            .env("GATEWAY_PORT", self.port.to_string())
            .env("PERSIST_STATE", "1")
            .env("STATE_DIR", &self.state)
            .env("LOG_LEVEL", "WARNING")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start ministack");
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && rollcall_tests::try_raw_request(
                    ([127, 0, 0, 1], self.port).into(),
                    "GET /_ministack/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                        .as_bytes(),
                    Duration::from_secs(2),
                )
                .is_ok_and(|r| r.status == 200)
        });
        assert!(up.is_some(), "private emulator did not come up");
    }

    /// SIGTERM to its process group: it saves its state and exits.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { kill(-(child.id() as i32), 15) };
            let _ = child.wait();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { kill(-(child.id() as i32), 9) };
            let _ = child.wait();
        }
    }
}

unsafe extern "C" {
    fn kill(pid: i32, signal: i32) -> i32;
}

fn stored_sent(stack: &Stack, agent: &str) -> Option<u64> {
    let response = stack.get(&format!("/v1/agents/{agent}"));
    (response.status == 200).then(|| response.json()["sent_at_ms"].as_u64().unwrap())
}

#[test]
#[ignore = "starts a private AWS emulator from .venv (scripts/test installs it)"]
fn dynamodb_stops_and_comes_back() {
    let state = tempfile::tempdir().unwrap();
    let mut emulator = Emulator::start(state.path());
    let mut env = emulator_env();
    env.retain(|(key, _)| key != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL".into(), emulator.endpoint()));

    let table = rollcall_tests::unique_table("outage");
    let client = {
        use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
        aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new("us-east-1"))
                .endpoint_url(emulator.endpoint())
                .credentials_provider(Credentials::new("test", "test", None, None, "outage"))
                .build(),
        )
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(
            rollcall::store::dynamodb::DynamoStore::new(client, table.clone(), 4).create_table(),
        )
        .unwrap();
    let stack = Stack::start_dynamodb_table(&table, &env);

    let log = stack.dir.path().join("collector.log");
    let interval = Duration::from_secs(2);
    let mut collector = stack
        .collector("outage")
        .args(["run", "--interval", "2"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || stored_sent(&stack, "outage")
            .is_some())
        .is_some()
    );

    emulator.stop();
    let refused = stack.post_heartbeat(&heartbeat("direct", now_ms()));
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("5"));
    assert_eq!(stack.get("/v1/agents").status, 503);
    assert_eq!(
        request(stack.ingest.addr, "GET", "/healthz", &[], b"").status,
        200
    );
    assert_eq!(
        request(stack.query.addr, "GET", "/healthz", &[], b"").status,
        200
    );
    std::thread::sleep(interval * 2);

    emulator.resume();
    let back_at = Instant::now();
    let before = stored_sent(&stack, "outage").expect("state survived the restart");
    let recovered = wait_until(Duration::from_secs(10), || {
        stored_sent(&stack, "outage").is_some_and(|sent| sent > before)
    })
    .expect("the agent never reported again");
    assert_eq!(stack.agent("outage").unwrap()["status"], "online");
    unsafe { kill(collector.id() as i32, 15) };
    collector.wait().unwrap();

    let mut text = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    println!(
        "DynamoDB outage: the agent reported again {:?} after the store came back",
        back_at.elapsed().min(recovered)
    );
    // One interval, with its 10 % jitter, plus the request itself.
    assert!(
        recovered <= interval.mul_f64(1.1) + Duration::from_millis(800),
        "took {recovered:?}"
    );
    assert!(
        text.contains("retrying with backoff") || text.contains("before the next sample"),
        "{text}"
    );
    assert!(text.contains("heartbeats delivered again"), "{text}");
}

#[test]
#[ignore = "needs root and chattr on a file system that supports +i; scripts/test runs it"]
fn an_unwritable_sqlite_file_answers_503_and_recovers() {
    // Inside target/ so that it sits on the build's own file system, where
    // chattr works (it does not on tmpfs).
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tmp");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let db = dir.path().join("outage.db");
    let stack = Stack::start_with_db(&db);
    assert_eq!(
        stack.post_heartbeat(&heartbeat("disk", now_ms())).status,
        202
    );

    let files = [db.clone(), dir.path().join("outage.db-wal")];
    let chattr = |flag: &str| {
        Command::new("chattr")
            .arg(flag)
            .args(&files)
            .status()
            .map(|status| status.success())
            .unwrap_or(false)
    };
    assert!(
        chattr("+i"),
        "chattr +i failed: this test needs root and a file system that supports it"
    );
    let refused = stack.post_heartbeat(&heartbeat("disk", now_ms() + 1));
    let recovered_status = {
        assert!(chattr("-i"), "could not make the files writable again");
        stack
            .post_heartbeat(&heartbeat("disk", now_ms() + 2))
            .status
    };
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.header("retry-after").is_some());
    assert_eq!(
        request(stack.ingest.addr, "GET", "/healthz", &[], b"").status,
        200
    );
    assert_eq!(recovered_status, 202);
}
