//! The README's first command, `scripts/up`, stopped the way a terminal
//! stops it: Ctrl-C sends SIGINT to the whole foreground process group at
//! once. The collector's `leaving` heartbeat must still reach ingest, so the
//! agent is offline at once, not at its deadline.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rollcall::heartbeat::AgentState;
use rollcall::store::{Durability, SqliteStore, Store};
use rollcall_tests::{now_ms, wait_until};

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}
const SIGINT: i32 = 2;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("an ephemeral port")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs scripts/up, which invokes cargo itself; scripts/test runs ignored tests"]
async fn ctrl_c_in_a_terminal_leaves_the_agent_offline_at_once() {
    let data = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut up = Command::new(root.join("scripts/up"))
        .current_dir(&root)
        .env("ROLLCALL_DATA", data.path())
        .env("ROLLCALL_PROFILE", "dev")
        .env("ROLLCALL_INTERVAL_S", "5")
        .env(
            "ROLLCALL_INGEST_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "ROLLCALL_QUERY_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env_remove("ROLLCALL_FAKE_GPUS")
        // Its own process group, as a shell gives a foreground job.
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start scripts/up");
    let db = data.path().join("rollcall.db");
    let online = wait_until(Duration::from_secs(300), || {
        db.exists()
            && SqliteStore::open(&db, Durability::Full).is_ok_and(|store| {
                block_on(store.query(&Default::default(), None, now_ms() as i64))
                    .is_ok_and(|page| page.agents.len() == 1)
            })
    });
    if online.is_none() {
        // SAFETY: kill(2) on the process group this test created.
        unsafe { libc_kill(-(up.id() as i32), 9) };
        panic!("scripts/up did not bring this host online within 300 s");
    }
    // SAFETY: as above; SIGINT to every process of the group, as Ctrl-C does.
    unsafe { libc_kill(-(up.id() as i32), SIGINT) };
    let status = up.wait().expect("scripts/up exits");
    let store = SqliteStore::open(&db, Durability::Full).unwrap();
    let agents = store
        .query(&Default::default(), None, now_ms() as i64)
        .await
        .unwrap();
    assert!(
        agents.agents.is_empty(),
        "still online after Ctrl-C: {agents:?} (scripts/up exited {status})"
    );
    let everyone = rollcall::capacity::CapacityQuery {
        status: rollcall::capacity::StatusFilter::All,
        ..Default::default()
    };
    let page = store.query(&everyone, None, now_ms() as i64).await.unwrap();
    assert_eq!(page.agents.len(), 1);
    assert_eq!(
        page.agents[0].heartbeat.state,
        AgentState::Leaving,
        "the leaving heartbeat did not arrive"
    );
}

/// Runs a store future to completion from the synchronous polling closure
/// (the test runs on a multi-threaded runtime, so this thread may block).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}
