//! The `rollcall` CLI against a running query function: tables, JSON, and
//! exit codes a script can rely on (0 found, 1 none, 2 error).

use std::process::{Command, Output};

use rollcall_tests::{Stack, binary, heartbeat, now_ms};
use serde_json::json;

fn cli(stack: &Stack, args: &[&str]) -> Output {
    Command::new(binary("rollcall"))
        .args(args)
        .env("ROLLCALL_URL", stack.query.url())
        .env("ROLLCALL_TOKEN", &stack.token)
        .env(
            "ROLLCALL_CLI_CONFIG",
            stack.dir.path().join("no-such-cli.toml"),
        )
        .output()
        .expect("run rollcall")
}

fn seeded() -> Stack {
    let stack = Stack::start();
    for (id, free_mb) in [("big-gpu", 80_000u64), ("small-gpu", 8_000)] {
        let mut body = heartbeat(id, now_ms());
        body["gpus"] = json!([{"index": 0, "vendor": "nvidia", "memory_total_mb": 81_920, "memory_free_mb": free_mb}]);
        assert_eq!(stack.post_heartbeat(&body).status, 202);
    }
    stack
}

#[test]
fn agents_prints_an_aligned_table_and_exits_0() {
    let stack = seeded();
    let output = cli(&stack, &["agents", "--min-gpu-vram", "16"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("AGENT") && lines[0].contains("LAST SEEN"),
        "{text}"
    );
    assert!(lines[1].starts_with("big-gpu "), "{text}");
    assert!(
        lines[1].contains("online")
            && lines[1].contains(" s ago")
            && lines[1].contains("78.1/80.0"),
        "{text}"
    );
    // Columns line up: each header starts where its values start.
    let column = lines[0].find("STATUS").unwrap();
    assert_eq!(&lines[1][column..column + 6], "online");
}

#[test]
fn json_output_and_no_match_exit_codes() {
    let stack = seeded();
    let output = cli(&stack, &["agents", "--json", "--status", "all"]);
    assert_eq!(output.status.code(), Some(0));
    let agents: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(agents.as_array().unwrap().len(), 2);
    assert_eq!(agents[0]["agent_id"], "big-gpu");

    let none = cli(&stack, &["agents", "--min-gpu-vram", "100"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(none.stdout.is_empty());
}

#[test]
fn one_agent_and_errors() {
    let stack = seeded();
    let found = cli(&stack, &["agent", "small-gpu"]);
    assert_eq!(found.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&found.stdout).contains("small-gpu"));
    assert_eq!(cli(&stack, &["agent", "nobody"]).status.code(), Some(1));
    // Its state changes: online since its first heartbeat.
    let events = cli(&stack, &["events", "small-gpu"]);
    assert_eq!(events.status.code(), Some(0));
    let text = String::from_utf8_lossy(&events.stdout);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("  online"), "{text}");
    assert_eq!(cli(&stack, &["events", "nobody"]).status.code(), Some(1));
    let uptime = cli(&stack, &["agents", "--min-uptime", "1.5"]);
    assert_eq!(uptime.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&uptime.stderr).contains("min_uptime"));

    let refused = cli(&stack, &["agents", "--gpu-vendor", "3dfx"]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(
            "rollcall: parameter gpu_vendor: must be one of nvidia, amd, intel, other"
        ),
        "{stderr}"
    );

    let unreachable = Command::new(binary("rollcall"))
        .args(["agents", "--url", "http://127.0.0.1:9"])
        .env("ROLLCALL_TOKEN", "x")
        .env("ROLLCALL_CLI_CONFIG", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach"));

    let wrong_token = Command::new(binary("rollcall"))
        .args(["agents"])
        .env("ROLLCALL_URL", stack.query.url())
        .env("ROLLCALL_TOKEN", "not-the-token-at-all")
        .env("ROLLCALL_CLI_CONFIG", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(wrong_token.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&wrong_token.stderr).contains("401"));
}

/// Hardening (issue 25 item 5): the token never rides on the command line,
/// and never crosses the network over plain http unless asked.
#[test]
fn the_token_comes_from_a_file_never_a_flag_and_stays_off_plain_http_to_other_hosts() {
    let stack = seeded();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(binary("rollcall"));
        command
            .args(args)
            .env_remove("ROLLCALL_TOKEN")
            .env_remove("ROLLCALL_URL")
            .env("ROLLCALL_CLI_CONFIG", "/nonexistent");
        for (name, value) in env {
            command.env(name, value);
        }
        command.output().unwrap()
    };
    let url = stack.query.url();
    let token_file = stack.dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n", stack.token)).unwrap();
    let from_file = run(
        &[
            "agents",
            "--url",
            &url,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(
        from_file.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&from_file.stderr)
    );

    let flag = run(&["agents", "--url", &url, "--token", &stack.token], &[]);
    assert_eq!(flag.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&flag.stderr);
    assert!(
        stderr.contains("ROLLCALL_TOKEN") && !stderr.contains(&stack.token),
        "{stderr}"
    );

    // 192.0.2.0/24 is documentation space: refused before anything is sent.
    let remote = run(
        &["agents", "--url", "http://192.0.2.7:8081"],
        &[("ROLLCALL_TOKEN", "x")],
    );
    assert_eq!(remote.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&remote.stderr);
    assert!(
        stderr.contains("--insecure-plain-http") && !stderr.contains("cannot reach"),
        "{stderr}"
    );
}

#[test]
fn url_and_token_can_come_from_a_config_file() {
    let stack = seeded();
    let config = stack.dir.path().join("cli.toml");
    std::fs::write(
        &config,
        format!(
            "url = \"{}\"\ntoken = \"{}\"\n",
            stack.query.url(),
            stack.token
        ),
    )
    .unwrap();
    let output = Command::new(binary("rollcall"))
        .args(["agents"])
        .env_remove("ROLLCALL_URL")
        .env_remove("ROLLCALL_TOKEN")
        .env("ROLLCALL_CLI_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn wait_returns_when_a_matching_agent_appears_and_times_out_with_1() {
    let stack = seeded();
    let waiting = Command::new(binary("rollcall"))
        .args([
            "wait",
            "--min-gpu-vram",
            "100",
            "--timeout",
            "60s",
            "--every",
            "2",
            "--json",
        ])
        .env("ROLLCALL_URL", stack.query.url())
        .env("ROLLCALL_TOKEN", &stack.token)
        .env(
            "ROLLCALL_CLI_CONFIG",
            stack.dir.path().join("no-such-cli.toml"),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Nothing has 100 GB free yet; a machine with it reports a few seconds later.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let mut body = heartbeat("h200", now_ms());
    body["gpus"] = json!([{"index": 0, "vendor": "nvidia", "memory_total_mb": 143_771, "memory_free_mb": 143_155}]);
    assert_eq!(stack.post_heartbeat(&body).status, 202);
    let started = std::time::Instant::now();
    let output = waiting.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "it did not notice in time"
    );
    let agents: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(agents[0]["agent_id"], "h200", "{agents}");

    let timed_out = cli(
        &stack,
        &[
            "wait",
            "--min-gpu-vram",
            "500",
            "--timeout",
            "3s",
            "--every",
            "2",
        ],
    );
    assert_eq!(timed_out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&timed_out.stderr).contains("no agent matched within 3s"));
    let bad = cli(&stack, &["wait", "--timeout", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
}

fn cli_with_token(stack: &Stack, token: &str, args: &[&str]) -> Output {
    Command::new(binary("rollcall"))
        .args(args)
        .env("ROLLCALL_URL", stack.query.url())
        .env("ROLLCALL_TOKEN", token)
        .env(
            "ROLLCALL_CLI_CONFIG",
            stack.dir.path().join("no-such-cli.toml"),
        )
        .output()
        .expect("run rollcall")
}

/// `rollcall claim` prints the claim and CUDA_VISIBLE_DEVICES (or `export`
/// lines for `eval`); `agents` marks the GPU with its holder; `extend` and
/// `release` act on the id; a second claim of the same GPU exits 1.
#[test]
fn claim_extend_and_release_from_the_shell() {
    use rollcall_tests::CLAIM_TOKEN;
    let stack = seeded();
    let claim = |args: &[&str]| cli_with_token(&stack, CLAIM_TOKEN, args);
    let made = claim(&[
        "claim",
        "--min-gpu-vram",
        "40",
        "--ttl",
        "15m",
        "--holder",
        "job-42",
        "--export",
    ]);
    let stdout = String::from_utf8_lossy(&made.stdout).into_owned();
    assert_eq!(
        made.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let claim_id = lines[0]
        .strip_prefix("export ROLLCALL_CLAIM_ID=")
        .expect("the claim id first");
    assert_eq!(
        lines[1], "export CUDA_VISIBLE_DEVICES=0",
        "no UUID: the index"
    );

    let table =
        String::from_utf8_lossy(&cli(&stack, &["agents", "--include-claimed"]).stdout).into_owned();
    assert!(table.contains("78.1/80.0[job-42]"), "{table}");
    let again = claim(&[
        "claim", "--agent", "big-gpu", "--gpu", "0", "--holder", "job-43",
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("held by another claim"));
    let nothing = claim(&["claim", "--min-gpu-vram", "40", "--holder", "job-44"]);
    assert_eq!(nothing.status.code(), Some(1));

    let extended = claim(&["extend", claim_id, "--ttl", "2h"]);
    assert_eq!(
        extended.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&extended.stderr)
    );
    assert!(String::from_utf8_lossy(&extended.stdout).contains("CUDA_VISIBLE_DEVICES=0"));
    assert_eq!(claim(&["release", claim_id]).status.code(), Some(0));
    assert_eq!(
        claim(&["release", claim_id]).status.code(),
        Some(0),
        "twice"
    );
    assert_eq!(
        claim(&["extend", claim_id, "--ttl", "1m"]).status.code(),
        Some(1)
    );

    // The read-only token is told what it lacks (exit 2).
    let refused = cli(
        &stack,
        &["claim", "--agent", "big-gpu", "--gpu", "0", "--holder", "x"],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("claim scope"));
    let no_holder = claim(&["claim", "--min-gpu-vram", "1"]);
    assert_eq!(no_holder.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_holder.stderr).contains("--holder"));
}

/// `rollcall wait --claim` polls until a claim succeeds: here the GPU is
/// held, then released while it waits.
#[test]
fn wait_claim_holds_the_gpu_once_it_is_free() {
    use rollcall_tests::CLAIM_TOKEN;
    let stack = seeded();
    let first = cli_with_token(
        &stack,
        CLAIM_TOKEN,
        &[
            "claim", "--agent", "big-gpu", "--gpu", "0", "--holder", "first", "--json",
        ],
    );
    assert_eq!(first.status.code(), Some(0));
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).expect("JSON claim");
    let claim_id = first["claim_id"].as_str().expect("claim_id").to_owned();
    let mut waiter = Command::new(binary("rollcall"))
        .args([
            "wait",
            "--claim",
            "--min-gpu-vram",
            "40",
            "--holder",
            "second",
            "--every",
            "2",
            "--timeout",
            "60s",
        ])
        .env("ROLLCALL_URL", stack.query.url())
        .env("ROLLCALL_TOKEN", CLAIM_TOKEN)
        .env(
            "ROLLCALL_CLI_CONFIG",
            stack.dir.path().join("no-such-cli.toml"),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start rollcall wait");
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        waiter.try_wait().expect("poll").is_none(),
        "still waiting while the GPU is held"
    );
    let released = cli_with_token(&stack, CLAIM_TOKEN, &["release", &claim_id]);
    assert_eq!(released.status.code(), Some(0));
    let output = waiter.wait_with_output().expect("wait ends");
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("holder second") && stdout.contains("CUDA_VISIBLE_DEVICES=0"),
        "{stdout}"
    );
}

/// `rollcall agent` lists each GPU's processes, largest first.
#[test]
fn agent_shows_the_processes_on_each_gpu() {
    let stack = Stack::start();
    let mut body = heartbeat("busy-gpu", now_ms());
    body["gpus"] = json!([{"index": 0, "vendor": "nvidia", "memory_total_mb": 81_920, "memory_free_mb": 40_000,
        "processes": [{"pid": 4242, "used_mb": 38_000, "name": "python3", "user": "alice"},
                      {"pid": 77, "used_mb": 900}]}]);
    assert_eq!(stack.post_heartbeat(&body).status, 202);
    let output = cli(&stack, &["agent", "busy-gpu"]);
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().filter(|line| line.contains("pid ")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("4242")
            && lines[0].contains("38000 MiB")
            && lines[0].contains("python3")
            && lines[0].contains("alice"),
        "{text}"
    );
    assert!(
        lines[1].contains("77") && lines[1].contains("-  -"),
        "{text}"
    );
}
