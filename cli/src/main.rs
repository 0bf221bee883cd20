//! `rollcall`: the capacity API from a shell.
//!
//! Exit codes are for scripts: 0 when something matched, 1 when nothing did
//! (or the agent is unknown, or `wait` timed out), 2 on any error, with a
//! one-line reason on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use rollcall::heartbeat::AgentState;
use rollcall::record::AgentView;
use rollcall::time::parse_rfc3339;
use rollcall::wire::{AgentPage, ErrorBody};
use serde::Deserialize;

/// Ask rollcall which machines are online and what they have free.
///
/// The API's URL comes from --url, else ROLLCALL_URL, else
/// ~/.config/rollcall/cli.toml (`url = "..."`). The token comes from
/// ROLLCALL_TOKEN, --token-file, or `token = "..."` in that file; never from
/// a flag, which every user sees in `ps`. Plain http:// is used only to this
/// machine unless --insecure-plain-http says otherwise: the token would
/// cross the network readable.
///
/// Exit codes: 0 found, 1 nothing matched (unknown agent, `wait` timed out), 2 error.
#[derive(Parser, Debug)]
#[command(name = "rollcall", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Connection {
    /// The query API's base URL, e.g. http://127.0.0.1:8081
    #[arg(long, global = true, env = "ROLLCALL_URL")]
    url: Option<String>,
    /// Bearer token for the query API, from the environment only.
    #[arg(
        long = "token-from-env",
        hide = true,
        global = true,
        env = "ROLLCALL_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// A file that holds the bearer token (its first line).
    #[arg(long, global = true, env = "ROLLCALL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Refused with advice: a token on the command line shows in `ps`.
    #[arg(long = "token", hide = true, global = true)]
    token_flag: Option<String>,
    /// Allow a plain http:// URL on another host. The bearer token then
    /// crosses the network readable; use https://.
    #[arg(long, global = true, env = "ROLLCALL_INSECURE_PLAIN_HTTP")]
    insecure_plain_http: bool,
    /// Config file [default: ~/.config/rollcall/cli.toml]
    #[arg(long, global = true, env = "ROLLCALL_CLI_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List agents that match, most free single-GPU VRAM first.
    Agents(Filters),
    /// Wait until at least one agent matches, then print the matches (exit 0);
    /// exit 1 if none did before --timeout. Polls with backoff and jitter,
    /// never more often than every 2 s.
    Wait {
        #[command(flatten)]
        filters: Filters,
        /// Give up after this long: 90s, 10m, 2h, or plain seconds.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
        /// First wait between polls, in seconds (at least 2); it grows to 60.
        #[arg(long, default_value_t = 5.0, value_parser = parse_poll)]
        every: f64,
    },
    /// Show one agent, in any status.
    Agent {
        agent_id: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct Filters {
    /// At least --min-gpus GPUs with this much free VRAM (GB) each.
    #[arg(long, value_name = "GB")]
    min_gpu_vram: Option<f64>,
    /// How many such GPUs [default: 1 with --min-gpu-vram]
    #[arg(long, value_name = "N")]
    min_gpus: Option<u32>,
    /// Free CPU cores at least.
    #[arg(long, value_name = "N")]
    min_cores: Option<f64>,
    /// Available memory at least (GB).
    #[arg(long, value_name = "GB")]
    min_memory: Option<f64>,
    /// Count only GPUs of this vendor: nvidia, amd, intel or other.
    #[arg(long)]
    gpu_vendor: Option<String>,
    #[arg(long)]
    pool: Option<String>,
    /// key=value; repeat for more (all must match).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// online, offline or all.
    #[arg(long, default_value = "online")]
    status: String,
    /// Also list agents whose operator asked for no new work (draining).
    #[arg(long)]
    include_draining: bool,
    /// Stop after this many agents [default: all]
    #[arg(long)]
    limit: Option<usize>,
    /// Print the agents as a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Deserialize, Default)]
struct FileConfig {
    url: Option<String>,
    token: Option<String>,
}

struct Api {
    client: reqwest::Client,
    url: String,
    token: String,
}

/// The token file's first line; its contents never appear in an error.
fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    text.lines()
        .next()
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .map(str::to_owned)
        .with_context(|| format!("the token file {} is empty", path.display()))
}

impl Api {
    fn new(connection: &Connection) -> anyhow::Result<Api> {
        let path = connection.config.clone().or_else(|| {
            std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".config/rollcall/cli.toml"))
        });
        let file: FileConfig = match path.filter(|path| path.is_file()) {
            Some(path) => toml::from_str(
                &std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("{} is not valid TOML with url and token", path.display()))?,
            None => FileConfig::default(),
        };
        if connection.token_flag.is_some() {
            anyhow::bail!(
                "--token is not accepted: a token on the command line shows in `ps` to every user; set ROLLCALL_TOKEN, --token-file, or token in the config file"
            );
        }
        let url = connection
            .url
            .clone()
            .or(file.url)
            .context("no API URL: set --url, ROLLCALL_URL or url in the config file")?;
        rollcall::transport::check(
            &url,
            connection.insecure_plain_http,
            "read the bearer token",
        )
        .map_err(|error| anyhow::anyhow!("API URL {error}"))?;
        let from_file = match &connection.token_file {
            Some(path) => Some(read_token_file(path)?),
            None => None,
        };
        let token = connection
            .token
            .clone()
            .or(from_file)
            .or(file.token)
            .context("no token: set ROLLCALL_TOKEN, --token-file, or token in the config file")?;
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("rollcall-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Api {
            client,
            url: url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// GET a path; `Ok(None)` on 404.
    async fn get(&self, path_and_query: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let url = format!("{}{path_and_query}", self.url);
        let response = self
            .client
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.url))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let body: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        if status == reqwest::StatusCode::NOT_FOUND && path_and_query.starts_with("/v1/agents/") {
            return Ok(None);
        }
        if !status.is_success() {
            let reason = serde_json::from_str::<ErrorBody>(&text)
                .map(|body| body.error)
                .unwrap_or_else(|_| "no reason given".to_owned());
            bail!("the API answered {}: {reason}", status.as_u16());
        }
        Ok(Some(body))
    }
}

fn query_string(filters: &Filters) -> String {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut add = |name: &str, value: String| pairs.push((name.to_owned(), value));
    if let Some(gb) = filters.min_gpu_vram {
        add("min_gpu_vram_gb", gb.to_string());
    }
    if let Some(count) = filters.min_gpus {
        add("min_gpus", count.to_string());
    }
    if let Some(cores) = filters.min_cores {
        add("min_cpu_cores", cores.to_string());
    }
    if let Some(gb) = filters.min_memory {
        add("min_memory_gb", gb.to_string());
    }
    if let Some(vendor) = &filters.gpu_vendor {
        add("gpu_vendor", vendor.clone());
    }
    if let Some(pool) = &filters.pool {
        add("pool", pool.clone());
    }
    for label in &filters.labels {
        add("label", label.clone());
    }
    add("status", filters.status.clone());
    if filters.include_draining {
        add("include_draining", "true".to_owned());
    }
    add("limit", filters.limit.unwrap_or(1000).min(1000).to_string());
    pairs
        .iter()
        .map(|(name, value)| format!("{name}={}", encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Every match, following pages up to `--limit`, and the answer's `as_of`.
async fn fetch(api: &Api, filters: &Filters) -> anyhow::Result<(Vec<AgentView>, String)> {
    let query = query_string(filters);
    let wanted = filters.limit.unwrap_or(usize::MAX);
    let mut agents = Vec::new();
    let mut cursor: Option<String> = None;
    let mut as_of;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/v1/agents?{query}&cursor={}", encode(cursor)),
            None => format!("/v1/agents?{query}"),
        };
        let page: AgentPage = serde_json::from_value(api.get(&path).await?.unwrap_or_default())
            .context("the API answered something that is not a page of agents")?;
        as_of = page.as_of;
        agents.extend(page.agents);
        match page.next_cursor {
            Some(next) if agents.len() < wanted => cursor = Some(next),
            _ => break,
        }
    }
    agents.truncate(wanted);
    Ok((agents, as_of))
}

fn print_agents(agents: Vec<AgentView>, as_of: &str, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&agents)?);
    } else if !agents.is_empty() {
        print!("{}", table(&agents, parse_rfc3339(as_of)));
    }
    Ok(())
}

async fn list(api: &Api, filters: &Filters) -> anyhow::Result<bool> {
    let (agents, as_of) = fetch(api, filters).await?;
    let found = !agents.is_empty();
    print_agents(agents, &as_of, filters.json)?;
    if !found {
        eprintln!("rollcall: no agent matches");
    }
    Ok(found)
}

/// The longest wait between two polls.
const MAX_POLL: Duration = Duration::from_secs(60);

/// Polls until something matches or `timeout` passes. The wait between polls
/// starts at `every`, grows by half each time up to a minute, and is jittered
/// by ±20 % so that many waiting schedulers do not poll in step.
async fn wait(api: &Api, filters: &Filters, timeout: Duration, every: f64) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_secs_f64(every);
    loop {
        let (agents, as_of) = fetch(api, filters).await?;
        if !agents.is_empty() {
            print_agents(agents, &as_of, filters.json)?;
            return Ok(true);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            eprintln!("rollcall: no agent matched within {}s", timeout.as_secs());
            return Ok(false);
        }
        let jittered = pause
            .mul_f64(0.8 + 0.4 * fastrand::f64())
            .max(Duration::from_secs(2));
        tokio::time::sleep(jittered.min(deadline - now)).await;
        pause = pause.mul_f64(1.5).min(MAX_POLL);
    }
}

/// `90s`, `10m`, `2h` or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let seconds_per = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{text:?}: use s, m or h, as in 90s, 10m, 2h")),
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0 && *n * seconds_per <= 7.0 * 86400.0)
        .map(|n| Duration::from_secs_f64(n * seconds_per))
        .ok_or_else(|| format!("{text:?} is not a duration of at most a week, as in 90s, 10m, 2h"))
}

fn parse_poll(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|seconds| (2.0..=60.0).contains(seconds))
        .ok_or_else(|| format!("{text:?}: poll every 2 to 60 seconds"))
}

/// `online`, `offline`, or `online (draining)` when the operator asked for
/// no new work.
fn status_cell(agent: &AgentView) -> String {
    let status = format!("{:?}", agent.status).to_lowercase();
    match agent.state {
        AgentState::Draining => format!("{status} (draining)"),
        _ => status,
    }
}

fn table(agents: &[AgentView], now_ms: Option<i64>) -> String {
    let mut rows = vec![
        [
            "AGENT",
            "STATUS",
            "LAST SEEN",
            "CORES FREE",
            "MEM FREE",
            "GPUS (FREE/TOTAL GB)",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for agent in agents {
        let seen = match (now_ms, parse_rfc3339(&agent.last_heartbeat_at)) {
            (Some(now), Some(then)) => ago((now - then).max(0) / 1000),
            _ => agent.last_heartbeat_at.clone(),
        };
        let gpus = if agent.gpus.is_empty() {
            "-".to_owned()
        } else {
            agent
                .gpus
                .iter()
                .map(|gpu| format!("{:.1}/{:.1}", gpu.memory_free_gb, gpu.memory_total_gb))
                .collect::<Vec<_>>()
                .join(" ")
        };
        rows.push(vec![
            agent.agent_id.clone(),
            status_cell(agent),
            seen,
            format!("{}/{}", agent.cpu_cores_available, agent.cpu_cores_physical),
            format!("{:.1} GB", agent.memory_available_gb),
            gpus,
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            format!("{}\n", cells.join("  ").trim_end())
        })
        .collect()
}

/// "12 s ago", "4 min ago", "3 h ago", "2 d ago".
fn ago(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86_400),
    }
}

async fn show(api: &Api, agent_id: &str, json: bool) -> anyhow::Result<bool> {
    let Some(agent) = api.get(&format!("/v1/agents/{}", encode(agent_id))).await? else {
        eprintln!("rollcall: no agent {agent_id:?}");
        return Ok(false);
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&agent)?);
        return Ok(true);
    }
    let view: AgentView = serde_json::from_value(agent)
        .context("the API answered an agent record this CLI cannot read")?;
    let now = rollcall::time::now_ms();
    print!("{}", table(std::slice::from_ref(&view), Some(now)));
    println!(
        "\npool {}  labels {:?}  state {:?}  online until {}",
        view.pool, view.labels, view.state, view.online_until
    );
    for gpu in &view.gpus {
        println!(
            "gpu {}: {} {}  {:.1} of {:.1} GB free  {}",
            gpu.index,
            gpu.vendor.as_str(),
            gpu.name.as_deref().unwrap_or("(unnamed)"),
            gpu.memory_free_gb,
            gpu.memory_total_gb,
            gpu.utilization_percent
                .map(|u| format!("{u:.0}% busy"))
                .unwrap_or_default()
        );
    }
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("rollcall: {error}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        let api = Api::new(&cli.connection)?;
        match &cli.command {
            Command::Agents(filters) => list(&api, filters).await,
            Command::Wait {
                filters,
                timeout,
                every,
            } => wait(&api, filters, *timeout, *every).await,
            Command::Agent { agent_id, json } => show(&api, agent_id, *json).await,
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("rollcall: {}", format!("{error:#}").replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "10x", "-5s", "1e9h", "NaNs"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_poll("1").is_err());
        assert_eq!(parse_poll("2"), Ok(2.0));
    }
}
