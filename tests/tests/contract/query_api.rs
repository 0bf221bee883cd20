//! The capacity API of PROTOCOL.md §2 through the running query binary.

/// Claims and scoped tokens (PROTOCOL.md §4).
mod claims;

/// State changes (PROTOCOL.md §4).
mod events;

use rollcall_tests::{Stack, heartbeat, now_ms, request};
use serde_json::{Value, json};

fn ids(answer: &Value) -> Vec<String> {
    answer["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap().to_owned())
        .collect()
}

fn seed(stack: &Stack) {
    let machines = [
        (
            "big",
            6,
            200_000u64,
            json!([{"index": 0, "vendor": "nvidia", "memory_total_mb": 81920, "memory_free_mb": 80000}]),
        ),
        (
            "twin12",
            2,
            30_000,
            json!([
            {"index": 0, "vendor": "nvidia", "memory_total_mb": 16384, "memory_free_mb": 12288},
            {"index": 1, "vendor": "nvidia", "memory_total_mb": 16384, "memory_free_mb": 12288}]),
        ),
        (
            "radeon",
            12,
            60_000,
            json!([{"index": 0, "vendor": "amd", "memory_total_mb": 24576, "memory_free_mb": 20480}]),
        ),
        ("cpuonly", 30, 100_000, json!([])),
    ];
    for (id, cores, memory_mb, gpus) in machines {
        let mut body = heartbeat(id, now_ms());
        body["cpu"] = json!({"cores_physical": 32, "cores_logical": 64, "cores_available": cores, "load_1m": 1.0, "load_5m": 1.0, "load_15m": 1.0});
        body["memory"] = json!({"total_mb": 262144, "available_mb": memory_mb});
        body["gpus"] = gpus;
        body["labels"] = json!({"rack": if id == "radeon" { "r2" } else { "r1" }});
        assert_eq!(stack.post_heartbeat(&body).status, 202);
    }
}

#[test]
fn filters_and_order() {
    let stack = Stack::in_process();
    seed(&stack);
    let q = |query: &str| ids(&stack.get(&format!("/v1/agents?{query}")).json());
    assert_eq!(q(""), ["big", "radeon", "twin12", "cpuonly"]);
    assert_eq!(q("min_gpu_vram_gb=16"), ["big", "radeon"]);
    assert_eq!(q("min_gpu_vram_gb=24"), ["big"]);
    assert_eq!(q("min_gpu_vram_gb=12&min_gpus=2"), ["twin12"]);
    assert_eq!(q("min_gpus=1"), ["big", "radeon", "twin12"]);
    assert_eq!(q("min_cpu_cores=10"), ["radeon", "cpuonly"]);
    assert_eq!(q("min_memory_gb=100"), ["big"]);
    assert_eq!(q("min_memory_gb=97"), ["big", "cpuonly"]);
    assert_eq!(q("gpu_vendor=amd"), ["radeon"]);
    assert_eq!(q("gpu_vendor=nvidia&min_gpu_vram_gb=16"), ["big"]);
    assert_eq!(q("gpu_vendor=intel"), Vec::<String>::new());
    assert_eq!(q("label=rack%3Dr2"), ["radeon"]);
    assert_eq!(q("label=rack=r1&min_cpu_cores=20"), ["cpuonly"]);
    assert_eq!(q("pool=default&min_gpu_vram_gb=70"), ["big"]);
    assert_eq!(q("pool=other"), Vec::<String>::new());
    assert_eq!(q("status=offline"), Vec::<String>::new());
    assert_eq!(q("status=all").len(), 4);

    let answer = stack.get("/v1/agents?min_gpu_vram_gb=70").json();
    assert!(answer["as_of"].as_str().unwrap().ends_with('Z'));
    assert_eq!(answer["next_cursor"], Value::Null);
    let big = &answer["agents"][0];
    for field in [
        "agent_id",
        "status",
        "pool",
        "labels",
        "last_heartbeat_at",
        "online_until",
        "cpu_cores_physical",
        "cpu_cores_available",
        "cpu_load_1min",
        "cpu_load_5min",
        "cpu_load_15min",
        "memory_available_gb",
        "memory_percent",
        "gpu_type",
        "gpu_count",
        "gpu_vram_total_gb",
        "gpu_vram_available_gb",
        "gpu_vram_available_max_gb",
        "gpus",
    ] {
        assert!(big.get(field).is_some(), "agent record lacks {field}");
    }
    assert_eq!(big["gpu_vram_available_max_gb"], 78.125);
    assert_eq!(big["gpus"][0]["memory_free_gb"], 78.125);
    assert_eq!(stack.get("/v1/agents/cpuonly").json()["gpu_type"], "none");
}

#[test]
fn pages_cover_every_match_once() {
    let stack = Stack::in_process();
    for i in 0..25u64 {
        let mut body = heartbeat(&format!("node-{i:02}"), now_ms());
        // Ties on purpose: paging must still be stable.
        body["gpus"][0]["memory_free_mb"] = json!(1000 * (i % 5));
        assert_eq!(stack.post_heartbeat(&body).status, 202);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/v1/agents?limit=10&cursor={c}"),
            None => "/v1/agents?limit=10".into(),
        };
        let page = stack.get(&path).json();
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 25);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 25, "an agent was repeated across pages");
}

#[test]
fn bad_parameters_answer_400_naming_them() {
    let stack = Stack::in_process();
    seed(&stack);
    for (query, param) in [
        ("min_gpu_vram_gb=-1", "min_gpu_vram_gb"),
        ("min_gpu_vram_gb=abc", "min_gpu_vram_gb"),
        ("min_gpu_vram_gb=inf", "min_gpu_vram_gb"),
        ("min_gpu_vram_gb=NaN", "min_gpu_vram_gb"),
        ("min_gpus=-1", "min_gpus"),
        ("min_gpus=1.5", "min_gpus"),
        ("min_cpu_cores=-2", "min_cpu_cores"),
        ("min_cpu_cores=1e309", "min_cpu_cores"),
        ("min_memory_gb=lots", "min_memory_gb"),
        ("gpu_vendor=3dfx", "gpu_vendor"),
        ("status=sleeping", "status"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("label=rack", "label"),
        ("pool=a%2Fb", "pool"),
        ("cursor=forged", "cursor"),
        ("cursor=00000000000000000000000000000000313a6269", "cursor"),
        ("min_cpu_cores=1&min_cpu_cores=2", "min_cpu_cores"),
        ("min_gpu_vram=40", "min_gpu_vram"),
    ] {
        let response = stack.get(&format!("/v1/agents?{query}"));
        assert_eq!(response.status, 400, "{query}: {}", response.text());
        assert!(
            response.error().starts_with(&format!("parameter {param}:")),
            "{query}: {}",
            response.error()
        );
    }
}

#[test]
fn authentication_and_single_agents() {
    let stack = Stack::in_process();
    seed(&stack);
    let addr = stack.query.addr;
    let no_token = request(addr, "GET", "/v1/agents", &[], b"");
    assert_eq!(no_token.status, 401);
    assert!(no_token.error().contains("Bearer"));
    let wrong = request(
        addr,
        "GET",
        "/v1/agents/big",
        &[("Authorization", "Bearer not-the-right-token-at-all")],
        b"",
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.error(), "unknown bearer token");
    let basic = request(
        addr,
        "GET",
        "/v1/agents",
        &[("Authorization", "Basic dXNlcjpwYXNz")],
        b"",
    );
    assert_eq!(basic.status, 401);

    let health = request(addr, "GET", "/healthz", &[], b"");
    assert_eq!((health.status, health.json()), (200, json!({"ok": true})));
    let ingest_health = request(stack.ingest.addr, "GET", "/healthz", &[], b"");
    assert_eq!(
        (ingest_health.status, ingest_health.json()),
        (200, json!({"ok": true}))
    );

    assert_eq!(stack.agent("big").unwrap()["agent_id"], "big");
    let unknown = stack.get("/v1/agents/nobody");
    assert_eq!(unknown.status, 404);
    assert!(unknown.error().contains("nobody"));
    for bad in ["..", "a%2Fb", &"x".repeat(65)] {
        let response = stack.get(&format!("/v1/agents/{bad}"));
        assert!(
            response.status == 400 || response.status == 404,
            "{bad}: {}",
            response.status
        );
        assert!(!response.error().is_empty());
    }
    let post = stack.get("/v1/nothing-here");
    assert_eq!(post.status, 404);
    assert!(post.error().contains("no such endpoint"));
}

#[test]
fn metrics_expose_the_fleet_to_prometheus_behind_the_token() {
    let stack = Stack::in_process();
    seed(&stack);
    let addr = stack.query.addr;
    assert_eq!(request(addr, "GET", "/metrics", &[], b"").status, 401);
    let response = stack.get("/metrics");
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let has = |text: &str, line: &str| text.lines().any(|l| l == line);
    // A plain scrape: fleet aggregates only, so its size does not grow with the fleet.
    assert!(
        has(
            &text,
            "rollcall_agents{status=\"online\",pool=\"default\"} 4"
        ),
        "{text}"
    );
    assert!(
        text.contains("rollcall_pool_cores_available{pool=\"default\"}"),
        "{text}"
    );
    assert!(
        !text.contains("agent_id="),
        "per-agent series without a selection:\n{text}"
    );
    // A selection adds its agents' own series.
    let text = stack.get("/metrics?status=all&limit=1000").text();
    for line in [
        "rollcall_agents{status=\"online\",pool=\"default\"} 4",
        "rollcall_agent_online{agent_id=\"big\",pool=\"default\"} 1",
        "rollcall_agent_cores_available{agent_id=\"radeon\",pool=\"default\"} 12",
        "rollcall_gpu_memory_free_bytes{agent_id=\"big\",gpu=\"0\",vendor=\"nvidia\"} 83886080000.0",
        "rollcall_gpu_memory_total_bytes{agent_id=\"twin12\",gpu=\"1\",vendor=\"nvidia\"} 17179869184.0",
    ] {
        assert!(has(&text, line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.contains("# TYPE rollcall_agent_since_heartbeat_seconds gauge"),
        "{text}"
    );
    // The selection is one bounded page; a cursor or a bad parameter is a 400.
    assert_eq!(stack.get("/metrics?cursor=abc").status, 400);
    assert_eq!(stack.get("/metrics?limit=1001").status, 400);
}

#[test]
fn history_comes_back_per_minute_and_stays_out_of_the_record() {
    let stack = Stack::in_process();
    let now = now_ms();
    let minute = now / 60_000;
    let spread = json!({"min": 0.5, "avg": 1.0, "max": 1.5});
    let mut body = heartbeat("hist", now);
    body["history"] = json!((1..=5u64).rev().map(|back| json!({
        "minute": minute - back, "load_1m": spread, "memory_available_mb": spread, "gpu_free_mb_min": [20_000]
    })).collect::<Vec<_>>());
    assert_eq!(stack.post_heartbeat(&body).status, 202);

    let answer = stack.get("/v1/agents/hist/history?minutes=3").json();
    let minutes: Vec<u64> = answer["minutes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["minute"].as_u64().unwrap())
        .collect();
    assert_eq!(minutes, [minute - 2, minute - 1]);
    assert_eq!(
        stack.get("/v1/agents/hist/history").json()["minutes"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    assert!(stack.agent("hist").unwrap().get("history").is_none());

    for (query, param) in [
        ("minutes=0", "minutes"),
        ("minutes=1441", "minutes"),
        ("minutes=5&minutes=6", "minutes"),
        ("since=1", "since"),
    ] {
        let response = stack.get(&format!("/v1/agents/hist/history?{query}"));
        assert_eq!(response.status, 400, "{query}");
        assert!(
            response.error().starts_with(&format!("parameter {param}")),
            "{query}: {}",
            response.error()
        );
    }
    assert_eq!(stack.get("/v1/agents/nobody/history").status, 404);
    assert_eq!(
        request(stack.query.addr, "GET", "/v1/agents/hist/history", &[], b"").status,
        401
    );
}

#[test]
fn every_answer_forbids_sniffing_and_caching_and_the_page_allows_only_its_own_script() {
    let stack = Stack::in_process();
    let auth = format!("Bearer {}", stack.token);
    for (server, path, headers) in [
        (
            stack.query.addr,
            "/v1/agents",
            vec![("Authorization", auth.as_str())],
        ),
        (stack.query.addr, "/v1/agents", vec![]),
        (stack.query.addr, "/no-such-path", vec![]),
        (stack.query.addr, "/", vec![]),
        (stack.ingest.addr, "/healthz", vec![]),
        (stack.ingest.addr, "/v1/heartbeats", vec![]),
    ] {
        let answer = request(server, "GET", path, &headers, b"");
        assert_eq!(
            answer.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(answer.header("cache-control"), Some("no-store"), "{path}");
    }
    let page = request(stack.query.addr, "GET", "/", &[], b"");
    let policy = page.header("content-security-policy").unwrap().to_owned();
    let script_src = policy
        .split(';')
        .map(str::trim)
        .find(|directive| directive.starts_with("script-src"))
        .unwrap();
    assert!(!script_src.contains("unsafe-inline"), "{policy}");
    assert!(script_src.starts_with("script-src 'sha256-"), "{policy}");
    assert_eq!(policy, rollcall_query::fleet_page_policy());
}
