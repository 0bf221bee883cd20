//! Harness for rollcall's end-to-end tests: starts the built binaries on
//! loopback with a throwaway data folder, speaks raw HTTP/1.1 to them, and
//! signs heartbeats the way any collector would.
//!
//! Binaries are found next to the test executable (`target/<profile>/`) and
//! built first if needed (see [`binary`]). Tests of what the functions answer
//! serve the routers in-process instead ([`Stack::in_process`],
//! [`Server::ingest_in_process`], [`inprocess`]): no build, no process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rollcall::signing::{AgentKey, FleetSecret};
use serde_json::{Value, json};

pub const KEY_ID: &str = "k1";

/// A built binary of this workspace: from `ROLLCALL_TEST_BIN_DIR` if set (to
/// measure release builds), else next to the test executable, built first
/// by `cargo build --workspace --bins` (once per test process; a no-op when
/// up to date), so that a fresh clone's `cargo test` never runs a missing or
/// stale binary.
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("ROLLCALL_TEST_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            // target/<profile>/deps/<test> -> target/<profile>/<name>
            let dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target folder")
                .to_owned();
            build_workspace_binaries(&dir);
            dir
        }
    };
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

fn build_workspace_binaries(profile_dir: &Path) {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .args(["build", "--workspace", "--bins", "--quiet"])
            // Simulated GPUs, for the tests that need them; never in a release.
            .args(["--features", "rollcall-collector/fake-gpus"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            command.arg("--release");
        }
        let status = command.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
}

/// A running server: a process whose log is captured for diagnostics, or a
/// router served inside this test process.
pub struct Server {
    running: Running,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

enum Running {
    Process(Child),
    /// A router served on a runtime of its own; no log of its own.
    InProcess {
        server: Option<inprocess::InProcess>,
        runtime: Option<tokio::runtime::Runtime>,
    },
}

impl Server {
    /// Starts `name` with `--listen 127.0.0.1:0` and waits for its address.
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_on(name, "127.0.0.1:0", args, env)
    }

    /// [`Server::start`] listening on `listen`.
    pub fn start_on(name: &str, listen: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(binary(name));
        command
            .args(["--listen", listen])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command.env_remove("AWS_LAMBDA_RUNTIME_API");
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (found, address) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = found.send(rest.trim().to_owned());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match address.recv_timeout(Duration::from_secs(20)) {
            Ok(text) => text.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "{name} did not start listening; log:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Server {
            running: Running::Process(child),
            addr,
            log,
        }
    }

    /// Ingest's router served inside this test process on an ephemeral
    /// loopback port, through the same `serve_http` as the binary, on the
    /// SQLite file `db`, with `secrets` as `ROLLCALL_FLEET_SECRETS` gives
    /// them (`kid=hex[,kid2=hex]`).
    pub fn ingest_in_process(db: &Path, secrets: &str) -> Server {
        Self::serve_in_process(inprocess::ingest_router(db, secrets))
    }

    /// Query's router in this process (see [`Server::ingest_in_process`]),
    /// with `tokens` as `ROLLCALL_QUERY_TOKENS` gives them.
    pub fn query_in_process(db: &Path, tokens: &str) -> Server {
        Self::serve_in_process(inprocess::query_router(db, tokens))
    }

    fn serve_in_process(router: axum::Router) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the router");
        let server = runtime.block_on(inprocess::InProcess::serve(router));
        Server {
            addr: server.addr,
            running: Running::InProcess {
                server: Some(server),
                runtime: Some(runtime),
            },
            log: Arc::default(),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL: no shutdown, no flush, as in a crash (in process: the
    /// serving task is aborted).
    pub fn kill(&mut self) {
        match &mut self.running {
            Running::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Running::InProcess { server, runtime } => {
                drop(server.take());
                if let Some(runtime) = runtime.take() {
                    runtime.shutdown_background();
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Ingest and query sharing one embedded store in a temporary folder.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub secret: FleetSecret,
    pub token: String,
    pub ingest: Server,
    pub query: Server,
}

/// The fleet secret and query token every test stack uses.
fn test_credentials() -> (FleetSecret, String) {
    let secret = FleetSecret::from_bytes(
        (0..32u8)
            .map(|i| i.wrapping_mul(7).wrapping_add(3))
            .collect(),
    )
    .unwrap();
    (secret, "test-token-0123456789abcdef".to_owned())
}

/// A token with both scopes on every pool (PROTOCOL.md §4), beside the
/// stack's v1 token, which reads only.
pub const CLAIM_TOKEN: &str = "claim-token-0123456789abcdef";
/// A token with both scopes, limited to pool `lab-a`.
pub const LAB_TOKEN: &str = "lab-token-0123456789abcdef";

/// `ROLLCALL_QUERY_TOKENS` for a test stack: its v1 token and the two
/// scoped ones.
pub fn query_tokens(v1_token: &str) -> String {
    format!("{v1_token},{CLAIM_TOKEN}:read+claim,{LAB_TOKEN}:read+claim:lab-a")
}

impl Stack {
    pub fn start() -> Stack {
        Self::start_with(&[])
    }

    /// Ingest's and query's routers served inside this test process on
    /// ephemeral loopback ports, through the same `serve_http` as the
    /// binaries (as mini-redis's tests start their server), on one embedded
    /// store: nothing to build first. For what the functions answer; tests of
    /// processes (signals, crashes, logs, flags) use [`Stack::start`].
    pub fn in_process() -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let (secret, token) = test_credentials();
        let db = dir.path().join("rollcall.db");
        let ingest = Server::ingest_in_process(&db, &format!("{KEY_ID}={}", secret.to_hex()));
        let query = Server::query_in_process(&db, &query_tokens(&token));
        Stack {
            dir,
            secret,
            token,
            ingest,
            query,
        }
    }

    /// Both functions on the SQLite file `db`.
    pub fn start_with_db(db: &Path) -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let store_args: Vec<String> = vec!["--db".into(), db.display().to_string()];
        Self::start_on(dir, &store_args, &[], &[])
    }

    /// [`Stack::start_with`], with `env` for both functions.
    pub fn start_with_env(ingest_args: &[&str], env: &[(String, String)]) -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("rollcall.db").display().to_string();
        let store_args: Vec<String> = vec!["--db".into(), db];
        Self::start_on(dir, &store_args, env, ingest_args)
    }

    pub fn start_with(ingest_args: &[&str]) -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("rollcall.db").display().to_string();
        let store_args: Vec<String> = vec!["--db".into(), db];
        Self::start_on(dir, &store_args, &[], ingest_args)
    }

    /// [`Stack::start`] with both functions listening on `ip` (ephemeral
    /// ports) instead of loopback: for hosts in other network namespaces.
    pub fn start_listening_on(ip: &str) -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("rollcall.db").display().to_string();
        let store_args: Vec<String> = vec!["--db".into(), db];
        Self::start_listening(dir, &format!("{ip}:0"), &store_args, &[], &[])
    }

    /// Both functions on a fresh DynamoDB table on the emulator.
    pub async fn start_dynamodb() -> Stack {
        let table = dynamodb_store(4).await.table().to_owned();
        Self::start_dynamodb_table(&table, &emulator_env())
    }

    /// Both functions on `table`, with `env` for the AWS SDK.
    pub fn start_dynamodb_table(table: &str, env: &[(String, String)]) -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let fleet_table = fleet_table_of(table);
        let store_args: Vec<String> = [
            "--store",
            "dynamodb",
            "--table",
            table,
            "--fleet-table",
            &fleet_table,
        ]
        .map(String::from)
        .to_vec();
        Self::start_on(dir, &store_args, env, &[])
    }

    fn start_on(
        dir: tempfile::TempDir,
        store_args: &[String],
        env: &[(String, String)],
        ingest_args: &[&str],
    ) -> Stack {
        Self::start_listening(dir, "127.0.0.1:0", store_args, env, ingest_args)
    }

    fn start_listening(
        dir: tempfile::TempDir,
        listen: &str,
        store_args: &[String],
        env: &[(String, String)],
        ingest_args: &[&str],
    ) -> Stack {
        let (secret, token) = test_credentials();
        let secrets = format!("{KEY_ID}={}", secret.to_hex());
        let mut args: Vec<&str> = store_args.iter().map(String::as_str).collect();
        args.extend_from_slice(ingest_args);
        let mut ingest_env: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut query_env = ingest_env.clone();
        ingest_env.push(("ROLLCALL_FLEET_SECRETS", &secrets));
        let tokens = query_tokens(&token);
        query_env.push(("ROLLCALL_QUERY_TOKENS", &tokens));
        let ingest = Server::start_on("rollcall-ingest", listen, &args, &ingest_env);
        let store_only: Vec<&str> = store_args.iter().map(String::as_str).collect();
        let query = Server::start_on("rollcall-query", listen, &store_only, &query_env);
        Stack {
            dir,
            secret,
            token,
            ingest,
            query,
        }
    }

    pub fn agent_key(&self, agent_id: &str) -> AgentKey {
        self.secret.derive_agent_key(agent_id)
    }

    /// Signs and posts `body` as `agent_id`, clock as given.
    pub fn post_heartbeat_at(&self, agent_id: &str, body: &[u8], timestamp: i64) -> Response {
        let signature = self
            .agent_key(agent_id)
            .signature_header(KEY_ID, agent_id, timestamp, body);
        let timestamp = timestamp.to_string();
        request(
            self.ingest.addr,
            "POST",
            "/v1/heartbeats",
            &[
                ("Content-Type", "application/json"),
                ("X-Rollcall-Agent", agent_id),
                ("X-Rollcall-Key-Id", KEY_ID),
                ("X-Rollcall-Timestamp", &timestamp),
                ("X-Rollcall-Signature", &signature),
            ],
            body,
        )
    }

    pub fn post_heartbeat(&self, body: &Value) -> Response {
        let agent_id = body["agent_id"].as_str().expect("agent_id").to_owned();
        self.post_heartbeat_at(&agent_id, body.to_string().as_bytes(), now_s())
    }

    /// `GET path` on the query function with the bearer token.
    pub fn get(&self, path: &str) -> Response {
        let auth = format!("Bearer {}", self.token);
        request(
            self.query.addr,
            "GET",
            path,
            &[("Authorization", &auth)],
            b"",
        )
    }

    /// `method path` on the query function with `token` and a JSON body
    /// (none when `body` is `None`).
    pub fn call(&self, method: &str, path: &str, token: &str, body: Option<&Value>) -> Response {
        let auth = format!("Bearer {token}");
        let text = body.map(Value::to_string).unwrap_or_default();
        let mut headers = vec![("Authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        request(self.query.addr, method, path, &headers, text.as_bytes())
    }

    /// The stored record of one agent, or `None` on 404.
    pub fn agent(&self, agent_id: &str) -> Option<Value> {
        let response = self.get(&format!("/v1/agents/{agent_id}"));
        match response.status {
            200 => Some(response.json()),
            404 => None,
            other => panic!("GET agent {agent_id}: {other} {}", response.text()),
        }
    }

    /// Environment for a collector pointed at this stack.
    pub fn collector_env(&self, agent_id: &str) -> Vec<(String, String)> {
        vec![
            ("ROLLCALL_ENDPOINT".into(), self.ingest.url()),
            ("ROLLCALL_KEY_ID".into(), KEY_ID.into()),
            (
                "ROLLCALL_AGENT_KEY".into(),
                self.agent_key(agent_id).to_hex(),
            ),
            ("ROLLCALL_AGENT_ID".into(), agent_id.into()),
            (
                "ROLLCALL_STATE_DIR".into(),
                self.dir.path().join("state").display().to_string(),
            ),
            // Keep a config file on the test machine from leaking in.
            (
                "ROLLCALL_CONFIG".into(),
                self.dir.path().join("collector.toml").display().to_string(),
            ),
        ]
    }

    /// A collector command for `agent_id`, with an empty config file.
    pub fn collector(&self, agent_id: &str) -> Command {
        let config = self.dir.path().join("collector.toml");
        if !config.exists() {
            std::fs::write(&config, "").expect("write empty config");
        }
        let mut command = Command::new(binary("rollcall-collector"));
        for (key, value) in self.collector_env(agent_id) {
            command.env(key, value);
        }
        command.env_remove("ROLLCALL_FAKE_GPUS");
        command
    }
}

/// `body` signed with `secret`'s key for its agent under `key_id`, as any
/// collector signs it: the headers and bytes of a `POST /v1/heartbeats`.
pub fn signed_heartbeat(
    secret: &FleetSecret,
    key_id: &str,
    body: &Value,
) -> (Vec<(String, String)>, Vec<u8>) {
    let agent_id = body["agent_id"].as_str().expect("agent_id");
    let bytes = body.to_string().into_bytes();
    let timestamp = now_s();
    let signature = secret
        .derive_agent_key(agent_id)
        .signature_header(key_id, agent_id, timestamp, &bytes);
    let headers = [
        ("Content-Type", "application/json".to_owned()),
        ("X-Rollcall-Agent", agent_id.to_owned()),
        ("X-Rollcall-Key-Id", key_id.to_owned()),
        ("X-Rollcall-Timestamp", timestamp.to_string()),
        ("X-Rollcall-Signature", signature),
    ];
    (
        headers
            .map(|(name, value)| (name.to_owned(), value))
            .to_vec(),
        bytes,
    )
}

/// A heartbeat body that passes every check.
pub fn heartbeat(agent_id: &str, sent_at_ms: u64) -> Value {
    json!({
        "v": 1, "agent_id": agent_id, "sent_at_ms": sent_at_ms, "interval_s": 30,
        "cpu": {"cores_physical": 8, "cores_logical": 16, "cores_available": 6,
                "load_1m": 1.9, "load_5m": 1.2, "load_15m": 0.8},
        "memory": {"total_mb": 64000, "available_mb": 41000},
        "gpus": [{"index": 0, "vendor": "nvidia", "memory_total_mb": 24564, "memory_free_mb": 20110}]
    })
}

/// [`heartbeat`] in `pool`, with NVIDIA GPUs of 80 GiB that have these
/// MiB free (UUIDs `GPU-<agent>-<index>`): what the claims tests hold.
pub fn gpu_heartbeat(agent_id: &str, sent_at_ms: u64, pool: &str, free_mb: &[u64]) -> Value {
    let mut body = heartbeat(agent_id, sent_at_ms);
    body["pool"] = json!(pool);
    body["gpus"] = free_mb
        .iter()
        .enumerate()
        .map(|(index, free)| {
            json!({"index": index, "vendor": "nvidia", "uuid": format!("GPU-{agent_id}-{index}"),
                   "memory_total_mb": 81920, "memory_free_mb": free})
        })
        .collect();
    body
}

/// `rollcall::time::now_ms` as the unsigned figure heartbeats carry.
pub fn now_ms() -> u64 {
    u64::try_from(rollcall::time::now_ms()).unwrap_or(0)
}

pub fn now_s() -> i64 {
    (now_ms() / 1000) as i64
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `error` of a JSON error answer; panics if the answer is not one.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {}", self.text()))
            .to_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over a fresh connection, written byte for byte as given.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    raw_request(addr, &raw)
}

/// Sends raw bytes and parses the answer.
pub fn raw_request(addr: SocketAddr, raw: &[u8]) -> Response {
    try_raw_request(addr, raw, Duration::from_secs(30))
        .unwrap_or_else(|error| panic!("no HTTP answer: {error}"))
}

/// Sends raw bytes, then waits up to `limit` for an answer; `Err` when the
/// server closed the connection without one (or never answered).
pub fn try_raw_request(addr: SocketAddr, raw: &[u8], limit: Duration) -> Result<Response, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(limit)).unwrap();
    // The server may refuse before reading everything; what it says still counts.
    let _ = stream.write_all(raw);
    let mut answer = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(e) if answer.is_empty() => return Err(format!("read: {e}")),
            Err(_) => break,
        }
    }
    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
        Ok(parse_response(&answer))
    } else {
        Err(format!(
            "connection closed after {} bytes and no response",
            answer.len()
        ))
    }
}

fn parse_response(answer: &[u8]) -> Response {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("complete response head");
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = answer[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
    out
}

/// Polls `check` until it holds or `limit` passes; returns when it held.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

pub mod conformance;
pub mod faults;
pub mod iam;
pub mod inprocess;
pub mod netlab;
pub mod runtime_api;

/// The AWS emulator the tests use: `ROLLCALL_TEST_AWS_ENDPOINT`, else ministack
/// on its default port. Tests must never leave this machine, so anything but a
/// loopback address is refused.
pub fn emulator_endpoint() -> String {
    let endpoint = std::env::var("ROLLCALL_TEST_AWS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:4566".into());
    let host = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let loopback =
        host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]");
    assert!(
        loopback,
        "ROLLCALL_TEST_AWS_ENDPOINT={endpoint} is not a loopback address; tests only talk to this machine"
    );
    endpoint
}

/// Environment for a process that talks to the emulator.
pub fn emulator_env() -> Vec<(String, String)> {
    vec![
        ("AWS_ENDPOINT_URL".into(), emulator_endpoint()),
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ]
}

/// A DynamoDB client for the emulator, with static test credentials.
pub fn dynamodb_client() -> aws_sdk_dynamodb::Client {
    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(emulator_endpoint())
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "rollcall-tests",
        ))
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// A table name no other test run or test uses.
pub fn unique_table(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        now_ms(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh DynamoDB store on the emulator, in a table of its own.
pub async fn dynamodb_store(shards: u32) -> rollcall::store::dynamodb::DynamoStore {
    let table = unique_table("rollcall-test");
    let fleet = rollcall::store::dynamodb::fleet::FleetTable::new(
        dynamodb_client(),
        fleet_table_of(&table),
    );
    let store = rollcall::store::dynamodb::DynamoStore::new(dynamodb_client(), table, shards);
    if let Err(error) = store.create_table().await {
        panic!(
            "cannot create a table on the AWS emulator at {} ({error}); scripts/test starts one, or set ROLLCALL_TEST_AWS_ENDPOINT",
            emulator_endpoint()
        );
    }
    fleet.create().await.expect("create the fleet table");
    let events = rollcall::store::dynamodb::changes::EventsTable::new(
        dynamodb_client(),
        events_table_of(store.table()),
    );
    events
        .create_table()
        .await
        .expect("create the events table");
    store.with_fleet(fleet).with_events(events)
}

/// The events table that goes with a test's agents table.
pub fn events_table_of(table: &str) -> String {
    format!("{table}-events")
}

/// Plays the agents table's stream for a test: each call scans the (small)
/// table, and every agent item that changed since the last call reaches
/// the stream consumer's `ChangeRecorder` as a change with its old and new
/// image, as DynamoDB Streams would deliver it. Only for tests that write
/// one change per item between calls (a stream would carry each).
pub struct StreamPump {
    table: String,
    recorder: rollcall::store::dynamodb::changes::ChangeRecorder,
    seen: tokio::sync::Mutex<std::collections::HashMap<String, rollcall::store::dynamodb::Item>>,
}

impl StreamPump {
    pub fn new(table: &str) -> Self {
        let events = rollcall::store::dynamodb::changes::EventsTable::new(
            dynamodb_client(),
            events_table_of(table),
        );
        Self {
            table: table.to_owned(),
            recorder: rollcall::store::dynamodb::changes::ChangeRecorder::new(
                dynamodb_client(),
                table,
                events,
            ),
            seen: Default::default(),
        }
    }

    /// Delivers what changed since the last call; the availability the
    /// recorder writes comes back as a change of its own, which it ignores.
    pub async fn pump(&self) {
        let mut seen = self.seen.lock().await;
        let mut changes = Vec::new();
        let mut start = None;
        loop {
            let output = dynamodb_client()
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .expect("scan the test table");
            for item in output.items() {
                let Some(id) = item.get("agent_id").and_then(|v| v.as_s().ok()) else {
                    continue;
                };
                if seen.get(id) != Some(item) {
                    changes.push(rollcall::store::dynamodb::fleet::Change {
                        old: seen.insert(id.clone(), item.clone()),
                        new: Some(item.clone()),
                    });
                }
            }
            start = output.last_evaluated_key().cloned();
            if start.is_none() {
                break;
            }
        }
        self.recorder
            .record(&changes)
            .await
            .expect("record the changes");
    }
}

/// The fleet-sums table that goes with a test's agents table.
pub fn fleet_table_of(table: &str) -> String {
    format!("{table}-fleet")
}

pub async fn sqlite_backend() -> conformance::Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = rollcall::store::SqliteStore::open(
        &dir.path().join("conformance.db"),
        rollcall::store::Durability::Full,
    )
    .expect("open sqlite");
    conformance::Backend::new("sqlite", Arc::new(store), dir)
}

pub async fn dynamodb_backend() -> conformance::Backend {
    let store = dynamodb_store(4).await;
    let pump = Arc::new(StreamPump::new(store.table()));
    conformance::Backend::new("dynamodb", Arc::new(store), ()).with_stream(pump)
}
