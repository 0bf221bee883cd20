//! State changes (PROTOCOL.md §4) through the functions: the events list,
//! its parameters, `uptime_30d` and `min_uptime`, and an offline recorded
//! at the deadline by the ingest binary's sweep.

use std::time::{Duration, Instant};

use rollcall_tests::{Stack, heartbeat, now_ms};
use serde_json::{Value, json};

fn kinds(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn events_uptime_and_their_parameters() {
    let stack = Stack::in_process();
    let mut body = heartbeat("ev", now_ms());
    assert_eq!(stack.post_heartbeat(&body).status, 202);
    body["state"] = json!("draining");
    body["sent_at_ms"] = json!(now_ms() + 1);
    assert_eq!(stack.post_heartbeat(&body).status, 202);

    let page = stack.get("/v1/agents/ev/events").json();
    assert_eq!(kinds(&page), ["online", "draining"]);
    let first = &page["events"][0];
    assert_eq!(first["agent_id"], "ev");
    assert!(first["id"].as_str().unwrap().starts_with("ev/"));
    // Paging: one at a time, then nothing after the last.
    let one = stack.get("/v1/agents/ev/events?limit=1").json();
    assert_eq!(kinds(&one), ["online"]);
    let cursor = one["next_cursor"].as_str().unwrap().to_owned();
    let rest = stack
        .get(&format!("/v1/agents/ev/events?cursor={cursor}"))
        .json();
    assert_eq!(kinds(&rest), ["draining"]);
    let last = rest["next_cursor"].as_str().unwrap().to_owned();
    let none = stack
        .get(&format!("/v1/agents/ev/events?cursor={last}"))
        .json();
    assert_eq!(kinds(&none), Vec::<String>::new());
    assert_eq!(none["next_cursor"], Value::Null);

    // Draining since a moment after its first heartbeat: well under 1.
    let record = stack.get("/v1/agents/ev").json();
    let uptime = record["uptime_30d"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&uptime), "{record}");
    let listed = stack
        .get("/v1/agents?include_draining=true&min_uptime=0")
        .json();
    assert_eq!(listed["agents"].as_array().unwrap().len(), 1);
    let strict = stack
        .get("/v1/agents?include_draining=true&min_uptime=1")
        .json();
    assert!(strict["agents"].as_array().unwrap().is_empty(), "{strict}");

    for (path, names) in [
        ("/v1/agents/ev/events?limit=0", "limit"),
        ("/v1/agents/ev/events?limit=501", "limit"),
        ("/v1/agents/ev/events?limit=1&limit=2", "limit"),
        ("/v1/agents/ev/events?cursor=abc", "cursor"),
        ("/v1/agents/ev/events?since=1", "since"),
        ("/v1/agents?min_uptime=1.5", "min_uptime"),
        ("/v1/agents?min_uptime=high", "min_uptime"),
    ] {
        let answer = stack.get(path);
        assert_eq!(answer.status, 400, "{path}: {}", answer.text());
        assert!(answer.text().contains(names), "{path}: {}", answer.text());
    }
    assert_eq!(stack.get("/v1/agents/nobody/events").status, 404);
}

/// The ingest binary sweeps every 5 s: an agent that stops reporting has
/// its `offline` recorded at its deadline, to the millisecond, with no
/// query in between.
#[test]
fn an_agent_that_stops_is_offline_at_its_deadline() {
    let stack = Stack::start();
    let mut body = heartbeat("quiet", now_ms());
    body["interval_s"] = json!(5);
    let answer = stack.post_heartbeat(&body);
    assert_eq!(answer.status, 202, "{}", answer.text());
    let deadline = answer.json()["online_until"].as_str().unwrap().to_owned();

    let started = Instant::now();
    let page = loop {
        let page = stack.get("/v1/agents/quiet/events").json();
        if kinds(&page).len() >= 2 || started.elapsed() > Duration::from_secs(40) {
            break page;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(kinds(&page), ["online", "offline"], "{page}");
    let offline = &page["events"][1];
    assert_eq!(offline["at"], deadline.as_str());
    assert_eq!(offline["reason"], "deadline");
    let record = stack.get("/v1/agents/quiet").json();
    assert_eq!(record["status"], "offline");
    assert!(record["uptime_30d"].as_f64().unwrap() < 1.0, "{record}");
}
