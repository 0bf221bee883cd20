//! Claims and scoped tokens (PROTOCOL.md §4) through the query function's
//! HTTP API. The store-level rules (atomicity, expiry, races) are in the
//! conformance suite; these hold the routes, scopes, pools and answers.

use rollcall_tests::{CLAIM_TOKEN, LAB_TOKEN, Stack, gpu_heartbeat, heartbeat, now_ms};
use serde_json::{Value, json};

fn host(stack: &Stack, id: &str, pool: &str, free_mb: &[u64], state: &str) {
    let mut body = gpu_heartbeat(id, now_ms(), pool, free_mb);
    body["state"] = json!(state);
    assert_eq!(stack.post_heartbeat(&body).status, 202);
}

fn seeded() -> Stack {
    let stack = Stack::in_process();
    host(&stack, "big", "default", &[80_000, 80_000], "up");
    host(&stack, "small", "default", &[8_000], "up");
    host(&stack, "gaming", "default", &[80_000], "draining");
    host(&stack, "lab", "lab-a", &[30_000], "up");
    stack
}

fn ids(answer: &Value) -> Vec<&str> {
    answer["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|agent| agent["agent_id"].as_str().expect("agent_id"))
        .collect()
}

/// Every GPU's claim on an agent, as the record shows it.
fn gpu_claims(stack: &Stack, agent: &str) -> Vec<Value> {
    let record = stack
        .call("GET", &format!("/v1/agents/{agent}"), CLAIM_TOKEN, None)
        .json();
    record["gpus"]
        .as_array()
        .expect("gpus")
        .iter()
        .map(|gpu| gpu["claim"].clone())
        .collect()
}

#[test]
fn a_claim_is_made_read_extended_and_released() {
    let stack = seeded();
    let made = stack.call(
        "POST",
        "/v1/claims",
        CLAIM_TOKEN,
        Some(&json!({"min_gpu_vram_gb": 40, "min_gpus": 2, "ttl_s": 900, "holder": "job-42"})),
    );
    assert_eq!(made.status, 201, "{}", made.text());
    let claim = made.json();
    assert_eq!(claim["agent_id"], "big");
    assert_eq!(claim["holder"], "job-42");
    assert_eq!(claim["cuda_visible_devices"], "GPU-big-0,GPU-big-1");
    assert_eq!(
        claim["gpus"],
        json!([{"index": 0, "uuid": "GPU-big-0"}, {"index": 1, "uuid": "GPU-big-1"}])
    );
    let id = claim["claim_id"].as_str().expect("claim_id").to_owned();
    let path = format!("/v1/claims/{id}");

    // The v1 token reads claims too.
    let read = stack.get(&path);
    assert_eq!((read.status, read.json()), (200, claim.clone()));
    let shown = gpu_claims(&stack, "big");
    assert_eq!(shown[0]["claim_id"], id.as_str());
    assert_eq!(shown[1]["holder"], "job-42");
    assert_eq!(shown[0]["expires_at"], claim["expires_at"]);
    assert!(ids(&stack.get("/v1/agents?min_gpu_vram_gb=40").json()).is_empty());
    assert_eq!(
        ids(&stack
            .get("/v1/agents?min_gpu_vram_gb=40&include_claimed=true")
            .json()),
        ["big"]
    );

    // A refused extension changes nothing.
    for body in [
        json!({"ttl_s": 86_401}),
        json!({"ttl_s": 0}),
        json!({"ttl": 60}),
        json!({"ttl_s": null}),
    ] {
        let refused = stack.call("PUT", &path, CLAIM_TOKEN, Some(&body));
        assert_eq!(refused.status, 400, "{body}: {}", refused.text());
    }
    assert_eq!(stack.get(&path).json()["expires_at"], claim["expires_at"]);

    let extended = stack.call("PUT", &path, CLAIM_TOKEN, Some(&json!({"ttl_s": 3600})));
    assert_eq!(extended.status, 200, "{}", extended.text());
    assert!(extended.json()["expires_at"].as_str() > claim["expires_at"].as_str());

    assert_eq!(stack.call("DELETE", &path, CLAIM_TOKEN, None).status, 204);
    assert_eq!(
        stack.call("DELETE", &path, CLAIM_TOKEN, None).status,
        204,
        "twice"
    );
    assert_eq!(stack.get(&path).status, 404);
    let late = stack.call("PUT", &path, CLAIM_TOKEN, Some(&json!({"ttl_s": 60})));
    assert_eq!(late.status, 404, "{}", late.text());
    assert_eq!(gpu_claims(&stack, "big"), [Value::Null, Value::Null]);
    assert_eq!(
        ids(&stack.get("/v1/agents?min_gpu_vram_gb=40").json()),
        ["big"]
    );
}

#[test]
fn refusals_carry_their_codes() {
    let stack = seeded();
    let claim = |body: Value| stack.call("POST", "/v1/claims", CLAIM_TOKEN, Some(&body));
    assert_eq!(
        claim(json!({"agent_id": "big", "gpus": [1], "ttl_s": 60, "holder": "a"})).status,
        201
    );
    for (body, status, code) in [
        (
            json!({"agent_id": "big", "gpus": [0, 1], "ttl_s": 60, "holder": "b"}),
            409,
            "claimed",
        ),
        (
            json!({"agent_id": "gaming", "gpus": [0], "ttl_s": 60, "holder": "b"}),
            409,
            "not_available",
        ),
        (
            json!({"min_gpu_vram_gb": 40, "min_gpus": 2, "ttl_s": 60, "holder": "b"}),
            409,
            "no_capacity",
        ),
        (
            json!({"agent_id": "nobody", "gpus": [0], "ttl_s": 60, "holder": "b"}),
            404,
            "not_found",
        ),
        (
            json!({"agent_id": "small", "gpus": [5], "ttl_s": 60, "holder": "b"}),
            404,
            "not_found",
        ),
    ] {
        let answer = claim(body.clone());
        assert_eq!(answer.status, status, "{body}: {}", answer.text());
        assert_eq!(answer.json()["code"], code, "{body}");
        assert!(!answer.error().is_empty());
    }
    // GPU 0 stayed free through the refused claim by name.
    assert_eq!(gpu_claims(&stack, "big")[0], Value::Null);
    for path in [
        "/v1/claims/nonsense",
        &format!("/v1/claims/{}.00", "0".repeat(32)),
    ] {
        assert_eq!(stack.get(path).status, 404, "{path}");
        assert_eq!(
            stack.call("DELETE", path, CLAIM_TOKEN, None).status,
            404,
            "{path}"
        );
    }
}

#[test]
fn hostile_bodies_are_refused_and_change_nothing() {
    let stack = seeded();
    let name = |extra: Value| {
        let mut body = json!({"agent_id": "big", "gpus": [0], "ttl_s": 60, "holder": "job"});
        for (key, value) in extra.as_object().expect("object") {
            body[key] = value.clone();
        }
        body
    };
    for body in [
        name(json!({"ttl_s": 1e30})),
        name(json!({"ttl_s": 86_401})),
        name(json!({"ttl_s": -5})),
        name(json!({"holder": "job\u{1b}[31m"})),
        name(json!({"holder": ""})),
        name(json!({"gpus": (0..10_000).collect::<Vec<u32>>()})),
        name(json!({"min_gpu_vram_gb": 40})),
        name(json!({"surprise": true})),
        json!({"ttl_s": 60, "holder": "job", "labels": {"bad key": "v"}}),
        json!([1, 2]),
    ] {
        let answer = stack.call("POST", "/v1/claims", CLAIM_TOKEN, Some(&body));
        assert_eq!(answer.status, 400, "{body}: {}", answer.text());
        assert_eq!(answer.json()["code"], "bad_request");
    }
    let auth = format!("Bearer {CLAIM_TOKEN}");
    let not_json = rollcall_tests::request(
        stack.query.addr,
        "POST",
        "/v1/claims",
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        b"agent_id=big",
    );
    assert_eq!(not_json.status, 415);
    assert_eq!(gpu_claims(&stack, "big"), [Value::Null, Value::Null]);
}

#[test]
fn scopes_and_pools_bound_every_token() {
    let stack = seeded();
    // The v1 token reads but cannot claim.
    let refused = stack.call(
        "POST",
        "/v1/claims",
        &stack.token,
        Some(&json!({"agent_id": "big", "gpus": [0], "ttl_s": 60, "holder": "job"})),
    );
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(refused.json()["code"], "forbidden");
    assert!(
        refused.error().contains("claim scope"),
        "{}",
        refused.error()
    );
    assert_eq!(gpu_claims(&stack, "big"), [Value::Null, Value::Null]);

    // To the lab-a token, no other pool's agent exists.
    let lab = |path: &str| stack.call("GET", path, LAB_TOKEN, None);
    assert_eq!(
        ids(&lab("/v1/agents?status=all&include_draining=true").json()),
        ["lab"]
    );
    assert_eq!(lab("/v1/agents/big").status, 404);
    assert_eq!(lab("/v1/agents/big/history").status, 404);
    assert_eq!(lab("/v1/agents/lab").status, 200);
    let metrics = lab("/metrics").text();
    assert!(metrics.contains("pool=\"lab-a\""), "{metrics}");
    assert!(!metrics.contains("pool=\"default\""), "{metrics}");
    let scoped = lab("/metrics?status=all").text();
    assert!(!scoped.contains("agent_id=\"big\""), "{scoped}");
    let theirs = stack.call(
        "POST",
        "/v1/claims",
        LAB_TOKEN,
        Some(&json!({"agent_id": "big", "gpus": [0], "ttl_s": 60, "holder": "job"})),
    );
    assert_eq!(theirs.status, 404, "{}", theirs.text());
    let ours = stack.call(
        "POST",
        "/v1/claims",
        LAB_TOKEN,
        Some(&json!({"min_gpus": 1, "ttl_s": 60, "holder": "job"})),
    );
    assert_eq!(ours.status, 201, "{}", ours.text());
    assert_eq!(
        ours.json()["agent_id"],
        "lab",
        "big has more free VRAM but another pool"
    );

    // A claim in another pool is unknown to it, and stays held.
    let other = stack
        .call(
            "POST",
            "/v1/claims",
            CLAIM_TOKEN,
            Some(&json!({"agent_id": "big", "gpus": [0], "ttl_s": 60, "holder": "job"})),
        )
        .json();
    let path = format!("/v1/claims/{}", other["claim_id"].as_str().expect("id"));
    assert_eq!(lab(&path).status, 404);
    assert_eq!(stack.call("DELETE", &path, LAB_TOKEN, None).status, 404);
    assert_eq!(stack.call("GET", &path, CLAIM_TOKEN, None).status, 200);
}

/// A `/metrics` selection shows which GPUs are claimed, and the memory
/// each GPU's processes hold by name: the three largest names, the rest
/// (and unnamed ones) as `other`.
#[test]
fn metrics_show_claims_and_process_memory() {
    let stack = seeded();
    let mut body = heartbeat("busy", now_ms());
    let process = |pid: u32, used_mb: u64, name: Option<&str>| {
        let mut process = json!({"pid": pid, "used_mb": used_mb});
        if let Some(name) = name {
            process["name"] = json!(name);
        }
        process
    };
    body["gpus"] = json!([{"index": 0, "vendor": "nvidia", "memory_total_mb": 81920, "memory_free_mb": 10_000,
        "processes": [process(1, 30_000, Some("python3")), process(2, 20_000, Some("python3")),
                      process(3, 10_000, Some("blender")), process(4, 5_000, Some("Xorg")),
                      process(5, 1_000, Some("cupy-bench")), process(6, 24, None)]}]);
    assert_eq!(stack.post_heartbeat(&body).status, 202);
    let made = stack.call(
        "POST",
        "/v1/claims",
        CLAIM_TOKEN,
        Some(&json!({"agent_id": "big", "gpus": [1], "ttl_s": 60, "holder": "job"})),
    );
    assert_eq!(made.status, 201);
    let text = stack.get("/metrics?status=all&limit=1000").text();
    let has = |line: &str| text.lines().any(|l| l == line);
    const MIB: u64 = 1 << 20;
    for line in [
        "rollcall_gpu_claimed{agent_id=\"big\",gpu=\"0\",vendor=\"nvidia\"} 0".to_owned(),
        "rollcall_gpu_claimed{agent_id=\"big\",gpu=\"1\",vendor=\"nvidia\"} 1".to_owned(),
        format!(
            "rollcall_gpu_process_memory_used_bytes{{agent_id=\"busy\",gpu=\"0\",process=\"python3\"}} {}.0",
            50_000 * MIB
        ),
        format!(
            "rollcall_gpu_process_memory_used_bytes{{agent_id=\"busy\",gpu=\"0\",process=\"blender\"}} {}.0",
            10_000 * MIB
        ),
        format!(
            "rollcall_gpu_process_memory_used_bytes{{agent_id=\"busy\",gpu=\"0\",process=\"Xorg\"}} {}.0",
            5_000 * MIB
        ),
        format!(
            "rollcall_gpu_process_memory_used_bytes{{agent_id=\"busy\",gpu=\"0\",process=\"other\"}} {}.0",
            1_024 * MIB
        ),
    ] {
        assert!(has(&line), "missing {line:?} in\n{text}");
    }
    assert!(
        !text.contains("cupy-bench"),
        "beyond the three largest names: {text}"
    );
}
