//! Every rejection of PROTOCOL.md §1 through the running ingest binary: the
//! status, the error text, and that the stored record did not change.

use rollcall_tests::{KEY_ID, Response, Stack, heartbeat, now_ms, now_s, request};
use serde_json::{Value, json};

/// Turns a valid body into an invalid one.
type Edit = Box<dyn Fn(&mut Value)>;

struct Victim<'a> {
    stack: &'a Stack,
    stored_sent_at_ms: u64,
}

const AGENT: &str = "victim";

impl<'a> Victim<'a> {
    fn new(stack: &'a Stack) -> Self {
        let sent = now_ms() - 10_000;
        assert_eq!(stack.post_heartbeat(&heartbeat(AGENT, sent)).status, 202);
        Victim {
            stack,
            stored_sent_at_ms: sent,
        }
    }

    /// A newer, otherwise valid body: accepted it would replace the record.
    fn newer(&self) -> Value {
        heartbeat(AGENT, self.stored_sent_at_ms + 5_000)
    }

    fn assert_refused(&self, response: Response, status: u16, error_contains: &str) {
        assert_eq!(response.status, status, "{}", response.text());
        let error = response.error();
        assert!(
            error.contains(error_contains),
            "error {error:?} should mention {error_contains:?}"
        );
        let stored = self.stack.agent(AGENT).expect("victim still stored");
        assert_eq!(
            stored["sent_at_ms"].as_u64(),
            Some(self.stored_sent_at_ms),
            "record changed by a refused request"
        );
    }

    fn signed_headers(&self, agent: &str, body: &[u8], timestamp: i64) -> Vec<(String, String)> {
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-Rollcall-Agent".into(), agent.into()),
            ("X-Rollcall-Key-Id".into(), KEY_ID.into()),
            ("X-Rollcall-Timestamp".into(), timestamp.to_string()),
            (
                "X-Rollcall-Signature".into(),
                self.stack
                    .agent_key(agent)
                    .signature_header(KEY_ID, agent, timestamp, body),
            ),
        ]
    }

    fn send(&self, method: &str, headers: &[(String, String)], body: &[u8]) -> Response {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        request(
            self.stack.ingest.addr,
            method,
            "/v1/heartbeats",
            &headers,
            body,
        )
    }
}

#[test]
fn transport_checks_come_first() {
    let stack = Stack::in_process();
    let victim = Victim::new(&stack);
    let body = victim.newer().to_string();
    let headers = victim.signed_headers(AGENT, body.as_bytes(), now_s());

    victim.assert_refused(victim.send("GET", &headers, b""), 405, "method not allowed");
    victim.assert_refused(victim.send("PUT", &headers, body.as_bytes()), 405, "POST");

    let mut text_plain = headers.clone();
    text_plain[0].1 = "text/plain".into();
    victim.assert_refused(
        victim.send("POST", &text_plain, body.as_bytes()),
        415,
        "application/json",
    );
    let without_type: Vec<_> = headers[1..].to_vec();
    victim.assert_refused(
        victim.send("POST", &without_type, body.as_bytes()),
        415,
        "application/json",
    );

    // 64 KiB + 1 byte, validly signed: refused for size alone.
    let mut big = body.clone().into_bytes();
    big.resize(64 * 1024 + 1, b' ');
    let big_headers = victim.signed_headers(AGENT, &big, now_s());
    victim.assert_refused(
        victim.send("POST", &big_headers, &big),
        413,
        "larger than 65536 bytes",
    );

    // Exactly 64 KiB is fine.
    let mut exact = victim.newer().to_string().into_bytes();
    exact.resize(64 * 1024, b' ');
    let exact_headers = victim.signed_headers(AGENT, &exact, now_s());
    assert_eq!(victim.send("POST", &exact_headers, &exact).status, 202);
}

#[test]
fn header_and_signature_checks() {
    let stack = Stack::in_process();
    let victim = Victim::new(&stack);
    let body = victim.newer().to_string();
    let headers = victim.signed_headers(AGENT, body.as_bytes(), now_s());

    for (position, name) in [
        (1, "X-Rollcall-Agent"),
        (2, "X-Rollcall-Key-Id"),
        (3, "X-Rollcall-Timestamp"),
        (4, "X-Rollcall-Signature"),
    ] {
        let mut missing = headers.clone();
        missing.remove(position);
        victim.assert_refused(
            victim.send("POST", &missing, body.as_bytes()),
            401,
            &format!("missing header {name}"),
        );
    }
    for (position, value, name) in [
        (1, "a/b", "X-Rollcall-Agent"),
        (1, &*"a".repeat(65), "X-Rollcall-Agent"),
        (2, "", "X-Rollcall-Key-Id"),
        (3, "12ab", "X-Rollcall-Timestamp"),
        (3, "-5", "X-Rollcall-Timestamp"),
        (4, "v1=XYZ", "X-Rollcall-Signature"),
        (
            4,
            &*format!("v2={}", "a".repeat(64)),
            "X-Rollcall-Signature",
        ),
    ] {
        let mut malformed = headers.clone();
        malformed[position].1 = value.to_owned();
        victim.assert_refused(
            victim.send("POST", &malformed, body.as_bytes()),
            401,
            &format!("malformed header {name}"),
        );
    }

    let mut unknown_key = headers.clone();
    unknown_key[2].1 = "k9".into();
    victim.assert_refused(
        victim.send("POST", &unknown_key, body.as_bytes()),
        401,
        "unknown key id",
    );

    let mut forged = headers.clone();
    forged[4].1 = format!("v1={}", "0".repeat(64));
    victim.assert_refused(
        victim.send("POST", &forged, body.as_bytes()),
        401,
        "signature does not match",
    );

    // Signed by another agent's key for this agent's id.
    let mut other = victim.signed_headers("intruder", body.as_bytes(), now_s());
    other[1].1 = AGENT.into();
    victim.assert_refused(
        victim.send("POST", &other, body.as_bytes()),
        401,
        "signature does not match",
    );

    // Body changed after signing.
    let altered = body.replace("\"load_1m\":1.9", "\"load_1m\":0.1");
    victim.assert_refused(
        victim.send("POST", &headers, altered.as_bytes()),
        401,
        "signature does not match",
    );

    for skew in [-301, 301] {
        let skewed = victim.signed_headers(AGENT, body.as_bytes(), now_s() + skew);
        victim.assert_refused(
            victim.send("POST", &skewed, body.as_bytes()),
            401,
            "clock skew: X-Rollcall-Timestamp is 30",
        );
    }
}

#[test]
fn body_checks_name_the_field() {
    let stack = Stack::in_process();
    let victim = Victim::new(&stack);
    let post =
        |body: &[u8]| victim.send("POST", &victim.signed_headers(AGENT, body, now_s()), body);

    victim.assert_refused(post(b"{not json"), 400, "invalid body");
    victim.assert_refused(post(b""), 400, "invalid body");
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|b| {
                b.as_object_mut().unwrap().remove("cpu");
            }),
            "missing field `cpu`",
        ),
        (
            Box::new(|b| {
                b["memory"].as_object_mut().unwrap().remove("available_mb");
            }),
            "memory: missing field `available_mb`",
        ),
        (
            Box::new(|b| b["agent_id"] = json!("someone-else")),
            "agent_id: body says \"someone-else\"",
        ),
        (
            Box::new(|b| b["cpu"]["load_1m"] = json!(-0.5)),
            "cpu.load_1m",
        ),
        (
            Box::new(|b| b["cpu"]["cores_available"] = json!(-1)),
            "cpu.cores_available",
        ),
        (
            Box::new(|b| b["memory"]["available_mb"] = json!(64001)),
            "memory.available_mb",
        ),
        (
            Box::new(|b| b["gpus"][0]["memory_free_mb"] = json!(30000)),
            "gpus[0].memory_free_mb",
        ),
        (
            Box::new(|b| b["gpus"][0]["vendor"] = json!("voodoo")),
            "gpus[0].vendor",
        ),
        (
            Box::new(|b| b["gpus"] = json!(vec![b["gpus"][0].clone(); 17])),
            "at most 16 GPUs",
        ),
        (
            Box::new(|b| {
                b["labels"] =
                    Value::Object((0..33).map(|i| (format!("k{i}"), json!("v"))).collect())
            }),
            "at most 32 labels",
        ),
        (
            Box::new(|b| b["v"] = json!(2)),
            "unsupported protocol version",
        ),
        (Box::new(|b| b["state"] = json!("sleeping")), "state"),
        (
            Box::new(|b| b["sent_at_ms"] = json!(now_ms() + 3_600_000)),
            "sent_at_ms: ",
        ),
    ];
    for (edit, expected) in cases {
        let mut body = victim.newer();
        edit(&mut body);
        victim.assert_refused(post(body.to_string().as_bytes()), 400, expected);
    }
    let overflow = victim
        .newer()
        .to_string()
        .replace("\"load_5m\":1.2", "\"load_5m\":1e309");
    victim.assert_refused(post(overflow.as_bytes()), 400, "cpu.load_5m");
}

#[test]
fn replays_and_reordered_heartbeats_are_conflicts() {
    let stack = Stack::in_process();
    let victim = Victim::new(&stack);
    let same = heartbeat(AGENT, victim.stored_sent_at_ms);
    victim.assert_refused(
        stack.post_heartbeat(&same),
        409,
        "not newer than the stored one",
    );
    let older = heartbeat(AGENT, victim.stored_sent_at_ms - 1);
    victim.assert_refused(
        stack.post_heartbeat(&older),
        409,
        "not newer than the stored one",
    );

    // The exact bytes and signature replayed within the skew window.
    let body = victim.newer().to_string();
    let timestamp = now_s();
    assert_eq!(
        stack
            .post_heartbeat_at(AGENT, body.as_bytes(), timestamp)
            .status,
        202
    );
    let replay = stack.post_heartbeat_at(AGENT, body.as_bytes(), timestamp);
    assert_eq!(replay.status, 409, "{}", replay.text());
}

#[test]
fn accepted_heartbeats_answer_202_with_the_deadline() {
    let stack = Stack::in_process();
    let body = heartbeat("fresh", now_ms()).to_string();
    let timestamp = now_s().to_string();
    let signature = stack.agent_key("fresh").signature_header(
        KEY_ID,
        "fresh",
        timestamp.parse().unwrap(),
        body.as_bytes(),
    );
    let response = request(
        stack.ingest.addr,
        "POST",
        "/v1/heartbeats",
        &[
            ("Content-Type", "application/json; charset=utf-8"),
            ("X-Rollcall-Agent", "fresh"),
            ("X-Rollcall-Key-Id", KEY_ID),
            ("X-Rollcall-Timestamp", &timestamp),
            ("X-Rollcall-Signature", &signature),
        ],
        body.as_bytes(),
    );
    assert_eq!(response.status, 202, "{}", response.text());
    let answer = response.json();
    assert_eq!(answer["agent_id"], "fresh");
    let stored = stack.agent("fresh").unwrap();
    assert_eq!(answer["online_until"], stored["online_until"]);
}
