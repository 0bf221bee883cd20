//! The live fleet page in a real browser: Debian's Chromium, headless, driven
//! by playwright-core (tests/browser/fleet_page.mjs) against a local stack
//! with four agents, one offline and one draining. The screenshot lands in
//! target/test-output/fleet-page.png.
//!
//! It is marked ignored, so plain `cargo test` needs no browser; scripts/test
//! installs Chromium and playwright-core and runs it, and their absence fails it.

use std::path::Path;
use std::process::Command;

use rollcall_tests::{Stack, heartbeat, now_ms};
use serde_json::{Value, json};

fn seed(stack: &Stack) {
    let now = now_ms();
    let minute = now / 60_000;
    let mut alpha = heartbeat("alpha", now);
    alpha["gpus"] = json!([
        {"index": 0, "vendor": "nvidia", "name": "A100", "memory_total_mb": 81_920, "memory_free_mb": 40_960,
         "processes": [{"pid": 4242, "used_mb": 38_912, "name": "python3", "user": "alice"}]},
        {"index": 1, "vendor": "nvidia", "name": "A100", "memory_total_mb": 81_920, "memory_free_mb": 8_192}
    ]);
    alpha["history"] =
        json!((1..=20u64).rev().map(|back| {
        let load = 1.0 + (back % 5) as f64;
        let spread = json!({"min": load, "avg": load, "max": load});
        json!({"minute": minute - back, "load_1m": spread, "memory_available_mb": spread})
    }).collect::<Vec<_>>());
    alpha["collector"] = json!({"rss_mb": 4.5, "cpu_s": 1.25});
    assert_eq!(stack.post_heartbeat(&alpha).status, 202);
    assert_eq!(stack.post_heartbeat(&heartbeat("beta", now)).status, 202);
    let mut gamma = heartbeat("gamma", now);
    gamma["state"] = json!("leaving");
    assert_eq!(stack.post_heartbeat(&gamma).status, 202);
    let mut delta = heartbeat("delta", now);
    delta["state"] = json!("draining");
    assert_eq!(stack.post_heartbeat(&delta).status, 202);
    // A holder that looks like markup must show as text.
    let claim = json!({"agent_id": "alpha", "gpus": [1], "ttl_s": 3600, "holder": "job <b>7</b>"});
    let made = stack.call(
        "POST",
        "/v1/claims",
        rollcall_tests::CLAIM_TOKEN,
        Some(&claim),
    );
    assert_eq!(made.status, 201, "{}", made.text());
}

#[test]
#[ignore = "needs Chromium and playwright-core; scripts/test installs them"]
fn the_fleet_page_shows_agents_gpus_history_and_who_is_offline() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    let ready = Path::new("/usr/bin/chromium").exists()
        && browser_dir.join("node_modules/playwright-core").exists();
    assert!(
        ready,
        "Chromium or playwright-core is missing; scripts/test installs them"
    );
    let stack = Stack::start();
    seed(&stack);
    let output_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-output");
    std::fs::create_dir_all(&output_dir).unwrap();
    let screenshot = output_dir.join("fleet-page.png");
    let _ = std::fs::remove_file(&screenshot);

    let output = Command::new("node")
        .arg(browser_dir.join("fleet_page.mjs"))
        .args([&stack.query.url(), &stack.token])
        .arg(&screenshot)
        .output()
        .expect("run node");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(output.stdout.trim_ascii()).expect("one JSON line");
    println!("{seen}");

    let rows = seen["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{seen}");
    let row = |agent: &str| {
        rows.iter()
            .find(|row| row["agent"] == agent)
            .unwrap_or_else(|| panic!("no row for {agent}: {seen}"))
    };
    assert_eq!(row("alpha")["status"], "online");
    assert_eq!(row("gamma")["status"], "offline");
    assert_eq!(row("gamma")["className"], "offline");
    // Draining: online, with its own badge.
    assert_eq!(row("delta")["status"], "draining");
    assert_eq!(row("delta")["className"], "online");
    assert_ne!(
        row("gamma")["offlineColour"],
        row("alpha")["offlineColour"],
        "offline rows must look different"
    );
    assert_eq!(row("alpha")["bars"], 2);
    assert_eq!(row("alpha")["collector"], "4.5 MB · 1.3 s CPU");
    assert_eq!(row("beta")["collector"], "–");
    assert_eq!(row("alpha")["barWidths"], json!(["50%", "10%"]));
    // The claimed GPU carries its holder, as text.
    assert_eq!(row("alpha")["holders"], json!(["held by job <b>7</b>"]));
    assert_eq!(row("beta")["holders"], json!([]));
    // Hovering alpha's GPUs shows who holds their memory.
    assert_eq!(
        seen["processesTitle"], "pid 4242 python3 (alice): 38.0 GB",
        "{seen}"
    );
    assert!(
        row("alpha")["sparkPoints"].as_u64().unwrap() >= 2,
        "alpha has history: {seen}"
    );
    assert!(
        row("alpha")["lastSeen"]
            .as_str()
            .unwrap()
            .ends_with("s ago")
    );
    assert!(
        seen["summary"]
            .as_str()
            .unwrap()
            .starts_with("4 agents, 3 online, 1 offline, 1 draining"),
        "{seen}"
    );
    assert_eq!(seen["filtered"], json!(["alpha"]));
    // One refresh loop after Apply was pressed three times during a
    // refresh: a list every 10 s, history cached for a minute; nothing
    // while hidden; one refresh when shown again.
    let refresh = &seen["refresh"];
    assert_eq!(refresh["thirtySeconds"]["list"], 3, "{refresh}");
    assert_eq!(refresh["thirtySeconds"]["history"], 0, "{refresh}");
    assert_eq!(refresh["whileHidden"], 0, "{refresh}");
    assert_eq!(refresh["onShow"], 1, "{refresh}");
    assert_eq!(seen["token_kept"], true);
    assert_eq!(
        seen["injectedHandlerRan"], false,
        "an injected inline handler ran: {seen}"
    );
    assert!(
        !seen["cspViolations"].as_array().unwrap().is_empty(),
        "the browser did not report blocking the injected handler: {seen}"
    );
    assert_eq!(
        seen["outside"],
        json!([]),
        "the page fetched something from elsewhere"
    );
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 10_000,
        "screenshot missing or empty"
    );
}
