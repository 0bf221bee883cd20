//! A real Prometheus (Debian's `prometheus` package) scrapes the query
//! function's `/metrics` with the bearer token, as README's scrape config
//! says, and every PromQL expression of the shipped Grafana dashboard
//! (`infra/grafana/rollcall-fleet.json`) returns data from it.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rollcall_tests::{Stack, heartbeat, now_ms, request, wait_until};
use serde_json::Value;

/// Prometheus, stopped when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _data: tempfile::TempDir,
}

impl Prometheus {
    fn start(config: &str) -> Prometheus {
        let data = tempfile::tempdir().unwrap();
        let file = data.path().join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prometheus (Debian's prometheus package; scripts/test installs it)");
        Prometheus {
            child,
            port,
            _data: data,
        }
    }

    fn get(&self, path: &str) -> Option<Value> {
        let address = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let answer = rollcall_tests::try_raw_request(
            address,
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(10),
        )
        .ok()?;
        (answer.status == 200).then(|| answer.json())
    }

    /// The result vector of an instant query.
    fn query(&self, promql: &str) -> Vec<Value> {
        let answer = self
            .get(&format!(
                "/api/v1/query?query={}",
                form_urlencoded::byte_serialize(promql.as_bytes()).collect::<String>()
            ))
            .unwrap_or_else(|| panic!("Prometheus refused {promql:?}"));
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn version(&self) -> String {
        self.get("/api/v1/status/buildinfo")
            .and_then(|info| info["data"]["version"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Processes killed when the test ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every `expr` in the dashboard, with its template variables given the
/// values "All" selects.
fn dashboard_expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            found.push((
                panel["title"].as_str().unwrap_or_default().to_owned(),
                expr.replace("$pool", ".*"),
            ));
        }
    }
    found
}

#[test]
#[ignore = "needs Debian's prometheus package; scripts/test installs it and runs ignored tests"]
fn prometheus_scrapes_with_the_token_and_every_dashboard_panel_has_data() {
    let stack = Stack::start();
    let _collectors = Children(
        [("prom-a", "default"), ("prom-b", "render")]
            .iter()
            .map(|(agent, pool)| {
                stack
                    .collector(agent)
                    .args(["run", "--interval", "5", "--pool", pool])
                    .env(
                        "ROLLCALL_FAKE_GPUS",
                        "nvidia:24564:20110,nvidia:81920:60000",
                    )
                    .stderr(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    // One agent that has left, so that the fleet has an offline series too.
    let mut gone = heartbeat("prom-gone", now_ms());
    gone["state"] = "leaving".into();
    assert_eq!(stack.post_heartbeat(&gone).status, 202);

    let target = stack.query.addr.to_string();
    let token = &stack.token;
    let prometheus = Prometheus::start(&format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
         scrape_configs:\n\
         \x20 - job_name: rollcall\n\
         \x20   authorization: {{ credentials: {token} }}\n\
         \x20   static_configs: [{{ targets: [\"{target}\"] }}]\n\
         \x20 - job_name: rollcall-agents\n\
         \x20   authorization: {{ credentials: {token} }}\n\
         \x20   params: {{ status: [all], limit: [\"1000\"] }}\n\
         \x20   static_configs: [{{ targets: [\"{target}\"] }}]\n"
    ));
    let ready = wait_until(Duration::from_secs(60), || {
        prometheus.get("/api/v1/status/buildinfo").is_some()
    });
    assert!(ready.is_some(), "Prometheus did not start");
    let scraped = wait_until(Duration::from_secs(30), || {
        prometheus.query("up == 1").len() == 2
    });
    assert!(
        scraped.is_some(),
        "Prometheus never scraped both jobs successfully: {:?}\n{}",
        prometheus.query("up"),
        stack.query.log()
    );
    println!("Prometheus {}: both jobs up", prometheus.version());
    // Two collector intervals, so that every range in the dashboard holds
    // more than one sample of a moving figure.
    std::thread::sleep(Duration::from_secs(11));

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/grafana/rollcall-fleet.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let expressions = dashboard_expressions(&dashboard);
    assert!(expressions.len() >= 10, "{expressions:?}");
    let mut empty = Vec::new();
    for (panel, expr) in &expressions {
        let series = prometheus.query(expr);
        println!("  {panel}: {expr} -> {} series", series.len());
        if series.is_empty() {
            empty.push(format!("{panel}: {expr}"));
        }
    }
    assert!(empty.is_empty(), "panels without data: {empty:#?}");

    // The pool variable's own query: label_values(rollcall_agents, pool).
    let pools = prometheus
        .get("/api/v1/label/pool/values?match[]=rollcall_agents")
        .expect("label values");
    let pools: Vec<&str> = pools["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(pools, ["default", "render"]);
    // The counts are the fleet's, though two jobs scrape the same aggregates.
    let stat = |title: &str| {
        let (_, expr) = expressions
            .iter()
            .find(|(panel, _)| panel == title)
            .unwrap();
        prometheus.query(expr)[0]["value"][1]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(stat("Online agents"), "2");
    assert_eq!(stat("Offline agents"), "1");
    // The token is what let Prometheus in: without it the same scrape is refused.
    assert_eq!(
        request(stack.query.addr, "GET", "/metrics", &[], b"").status,
        401
    );
}
