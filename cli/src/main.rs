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
use rollcall::capacity::{CapacityQuery, MAX_LIMIT};
use rollcall::changes::{Event, OfflineReason};
use rollcall::claims::ClaimView;
use rollcall::heartbeat::AgentState;
use rollcall::time::parse_rfc3339;
use rollcall::wire::{AgentPage, AgentView, ErrorBody, EventPage};
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
        /// Wait until a claim by these filters succeeds, then print it like
        /// `rollcall claim` (needs --holder).
        #[arg(long, requires = "holder")]
        claim: bool,
        #[command(flatten)]
        hold: Hold,
        /// With --claim: print shell `export` lines, for `eval`.
        #[arg(long, requires = "claim")]
        export: bool,
    },
    /// Hold GPUs so that no other job takes them: named ones (--agent and
    /// --gpu), or --gpus GPUs of the first agent in answer order that has
    /// that many unclaimed GPUs matching the filters. Prints the claim and
    /// CUDA_VISIBLE_DEVICES (exit 0), or why not (exit 1). Needs a token with
    /// the claim scope.
    Claim(ClaimArgs),
    /// Hold a live claim for --ttl from now (exit 1 once it is released or
    /// expired).
    Extend {
        claim_id: String,
        /// How long from now: 90s, 10m, 2h, or plain seconds (at most 24h).
        #[arg(long, value_parser = parse_ttl)]
        ttl: u64,
        #[arg(long)]
        json: bool,
    },
    /// Release a claim (also when it is already released or expired).
    Release { claim_id: String },
    /// Show one agent, in any status.
    Agent {
        agent_id: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show an agent's state changes of the last 30 days, oldest first:
    /// online, offline (at its deadline, or when it left), draining,
    /// undrained, gpus_changed, rebooted.
    Events {
        agent_id: String,
        /// Print the events as a JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// What a job needs of one machine: the filters a listing and a claim share.
#[derive(Args, Debug, Default)]
struct Capacity {
    /// At least --min-gpus GPUs with this much free VRAM (GB) each.
    #[arg(long, value_name = "GB")]
    min_gpu_vram: Option<f64>,
    /// How many such GPUs [default: 1 with --min-gpu-vram, and for a claim]
    #[arg(long, visible_alias = "gpus", value_name = "N")]
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
    /// Only agents available (online, not draining) at least this share of
    /// the last 30 days, 0 to 1: 0.98 is 98 %.
    #[arg(long, value_name = "SHARE")]
    min_uptime: Option<f64>,
}

#[derive(Args, Debug)]
struct Filters {
    #[command(flatten)]
    capacity: Capacity,
    /// Also count GPUs that claims hold.
    #[arg(long)]
    include_claimed: bool,
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

/// How long a claim is held and by whom.
#[derive(Args, Debug)]
struct Hold {
    /// How long to hold the GPUs: 90s, 10m, 2h, or plain seconds (at most 24h).
    #[arg(long, default_value = "15m", value_parser = parse_ttl)]
    ttl: u64,
    /// Who holds them, e.g. a job id (shown on the GPUs' records).
    #[arg(long)]
    holder: Option<String>,
}

#[derive(Args, Debug)]
struct ClaimArgs {
    /// Claim GPUs of this agent by index (with --gpu) instead of by filters.
    #[arg(long, requires = "gpu", conflicts_with_all = ["min_gpu_vram", "min_gpus", "min_cores", "min_memory", "gpu_vendor", "pool", "labels", "min_uptime"])]
    agent: Option<String>,
    /// A GPU index of --agent; repeat for more.
    #[arg(long, requires = "agent")]
    gpu: Vec<u32>,
    #[command(flatten)]
    capacity: Capacity,
    #[command(flatten)]
    hold: Hold,
    /// Print shell `export` lines (ROLLCALL_CLAIM_ID, CUDA_VISIBLE_DEVICES), for `eval`.
    #[arg(long, conflicts_with = "json")]
    export: bool,
    /// Print the API's JSON.
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
        if status == reqwest::StatusCode::NOT_FOUND && path_and_query.starts_with("/v1/agents/") {
            return Ok(None);
        }
        if !status.is_success() {
            let reason = serde_json::from_str::<ErrorBody>(&text)
                .map(|body| body.error)
                .unwrap_or_else(|_| "no reason given".to_owned());
            bail!("the API answered {}: {reason}", status.as_u16());
        }
        Ok(Some(
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        ))
    }
}

/// How the API answered a request that changes something.
enum Answer {
    Done(serde_json::Value),
    /// A 404 or 409: what did not happen, and why, for the user.
    Refused(String),
}

impl Api {
    /// `method path` with a JSON body; 404 and 409 are answers, not errors.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Answer> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.url))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let reason = || {
            serde_json::from_str::<ErrorBody>(&text)
                .map(|body| body.error)
                .unwrap_or_else(|_| "no reason given".to_owned())
        };
        match status.as_u16() {
            200..=299 => Ok(Answer::Done(
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
            )),
            404 | 409 => Ok(Answer::Refused(reason())),
            code => bail!("the API answered {code}: {}", reason()),
        }
    }
}

/// The `POST /v1/claims` body for these filters or names.
fn claim_body(
    capacity: &Capacity,
    named: Option<(&str, &[u32])>,
    hold: &Hold,
) -> anyhow::Result<serde_json::Value> {
    let holder = hold
        .holder
        .clone()
        .context("--holder is required: who holds the GPUs, e.g. a job id")?;
    let mut body = serde_json::json!({"ttl_s": hold.ttl, "holder": holder});
    if let Some((agent, gpus)) = named {
        body["agent_id"] = agent.into();
        body["gpus"] = gpus.into();
        return Ok(body);
    }
    if let Some(gb) = capacity.min_gpu_vram {
        body["min_gpu_vram_gb"] = gb.into();
    }
    if let Some(count) = capacity.min_gpus {
        body["min_gpus"] = count.into();
    }
    if let Some(cores) = capacity.min_cores {
        body["min_cpu_cores"] = cores.into();
    }
    if let Some(gb) = capacity.min_memory {
        body["min_memory_gb"] = gb.into();
    }
    if let Some(vendor) = &capacity.gpu_vendor {
        body["gpu_vendor"] = vendor.as_str().into();
    }
    if let Some(share) = capacity.min_uptime {
        body["min_uptime"] = share.into();
    }
    if let Some(pool) = &capacity.pool {
        body["pool"] = pool.as_str().into();
    }
    if !capacity.labels.is_empty() {
        let mut labels = serde_json::Map::new();
        for label in &capacity.labels {
            let (key, value) = label
                .split_once('=')
                .with_context(|| format!("--label {label:?}: must be key=value"))?;
            labels.insert(key.to_owned(), value.into());
        }
        body["labels"] = labels.into();
    }
    Ok(body)
}

fn print_claim(claim: &serde_json::Value, export: bool, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(claim)?);
        return Ok(());
    }
    let view: ClaimView = serde_json::from_value(claim.clone())
        .context("the API answered a claim this CLI cannot read")?;
    if export {
        println!("export ROLLCALL_CLAIM_ID={}", shell_quote(&view.claim_id));
        println!(
            "export CUDA_VISIBLE_DEVICES={}",
            shell_quote(&view.cuda_visible_devices)
        );
        return Ok(());
    }
    let gpus: Vec<String> = view.gpus.iter().map(|gpu| gpu.index.to_string()).collect();
    println!(
        "claim {}\nagent {}  gpus {}  holder {}  until {}",
        view.claim_id,
        view.agent_id,
        gpus.join(","),
        view.holder,
        view.expires_at
    );
    println!("CUDA_VISIBLE_DEVICES={}", view.cuda_visible_devices);
    Ok(())
}

/// A word for a POSIX shell, single-quoted unless it needs no quotes.
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.,:/".contains(&b))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

async fn claim(api: &Api, args: &ClaimArgs) -> anyhow::Result<bool> {
    let named = args
        .agent
        .as_deref()
        .map(|agent| (agent, args.gpu.as_slice()));
    let body = claim_body(&args.capacity, named, &args.hold)?;
    match api
        .send(reqwest::Method::POST, "/v1/claims", Some(&body))
        .await?
    {
        Answer::Done(claim) => {
            print_claim(&claim, args.export, args.json)?;
            Ok(true)
        }
        Answer::Refused(reason) => {
            eprintln!("rollcall: not claimed: {reason}");
            Ok(false)
        }
    }
}

async fn extend(api: &Api, claim_id: &str, ttl: u64, json: bool) -> anyhow::Result<bool> {
    let body = serde_json::json!({"ttl_s": ttl});
    let path = format!("/v1/claims/{}", encode(claim_id));
    match api.send(reqwest::Method::PUT, &path, Some(&body)).await? {
        Answer::Done(claim) => {
            print_claim(&claim, false, json)?;
            Ok(true)
        }
        Answer::Refused(reason) => {
            eprintln!("rollcall: not extended: {reason}");
            Ok(false)
        }
    }
}

async fn release(api: &Api, claim_id: &str) -> anyhow::Result<bool> {
    let path = format!("/v1/claims/{}", encode(claim_id));
    match api.send(reqwest::Method::DELETE, &path, None).await? {
        Answer::Done(_) => Ok(true),
        Answer::Refused(reason) => {
            eprintln!("rollcall: not released: {reason}");
            Ok(false)
        }
    }
}

/// The filters as the API's query, checked with the API's own rules
/// (`rollcall::capacity`), so that a mistyped value fails here, naming its
/// parameter, before any request.
fn capacity_query(filters: &Filters) -> anyhow::Result<CapacityQuery> {
    let mut query = CapacityQuery::default();
    let capacity = &filters.capacity;
    let mut settings: Vec<(&str, String)> = Vec::new();
    if let Some(gb) = capacity.min_gpu_vram {
        settings.push(("min_gpu_vram_gb", gb.to_string()));
    }
    if let Some(count) = capacity.min_gpus {
        settings.push(("min_gpus", count.to_string()));
    }
    if let Some(cores) = capacity.min_cores {
        settings.push(("min_cpu_cores", cores.to_string()));
    }
    if let Some(gb) = capacity.min_memory {
        settings.push(("min_memory_gb", gb.to_string()));
    }
    if let Some(vendor) = &capacity.gpu_vendor {
        settings.push(("gpu_vendor", vendor.clone()));
    }
    if let Some(pool) = &capacity.pool {
        settings.push(("pool", pool.clone()));
    }
    for label in &capacity.labels {
        settings.push(("label", label.clone()));
    }
    if let Some(share) = capacity.min_uptime {
        settings.push(("min_uptime", share.to_string()));
    }
    settings.push(("status", filters.status.clone()));
    settings.push((
        "limit",
        filters
            .limit
            .unwrap_or(MAX_LIMIT)
            .clamp(1, MAX_LIMIT)
            .to_string(),
    ));
    for (name, value) in settings {
        query
            .set(name, &value)
            .map_err(|error| anyhow::anyhow!("parameter {error}"))?;
    }
    query.include_draining = filters.include_draining;
    query.include_claimed = filters.include_claimed;
    Ok(query)
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
    let mut query = capacity_query(filters)?;
    let wanted = filters.limit.unwrap_or(usize::MAX);
    let mut agents = Vec::new();
    let mut cursor: Option<String> = None;
    let mut as_of;
    loop {
        query.cursor = cursor.take();
        let path = format!("/v1/agents?{}", query.to_query_string());
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
/// With `claim`, each poll tries to claim by the filters instead, and the
/// wait ends with a claim.
async fn wait(
    api: &Api,
    filters: &Filters,
    timeout: Duration,
    every: f64,
    claim: Option<(&Hold, bool)>,
) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_secs_f64(every);
    let body = match claim {
        Some((hold, _)) => Some(claim_body(&filters.capacity, None, hold)?),
        None => None,
    };
    loop {
        if let (Some(body), Some((_, export))) = (&body, claim) {
            match api
                .send(reqwest::Method::POST, "/v1/claims", Some(body))
                .await?
            {
                Answer::Done(made) => {
                    print_claim(&made, export, filters.json)?;
                    return Ok(true);
                }
                // No agent has the GPUs free yet (409 no_capacity): poll on.
                Answer::Refused(_) => {}
            }
        } else {
            let (agents, as_of) = fetch(api, filters).await?;
            if !agents.is_empty() {
                print_agents(agents, &as_of, filters.json)?;
                return Ok(true);
            }
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

/// A claim's `--ttl`: a duration of 1 s to 24 h, in whole seconds.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let seconds = parse_duration(text)?.as_secs();
    if (1..=rollcall::claims::MAX_TTL_S).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!("{text:?}: a claim is held 1s to 24h"))
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
                .map(|gpu| {
                    let held = gpu
                        .claim
                        .as_ref()
                        .map(|claim| format!("[{}]", claim.holder))
                        .unwrap_or_default();
                    format!("{:.1}/{:.1}{held}", gpu.memory_free_gb, gpu.memory_total_gb)
                })
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
        if let Some(claim) = &gpu.claim {
            println!(
                "       claimed by {} until {} ({})",
                claim.holder, claim.expires_at, claim.claim_id
            );
        }
        for process in gpu.processes.iter().flatten() {
            println!(
                "       pid {:<8} {:>9} MiB  {}  {}",
                process.pid,
                process.used_mb,
                process.name.as_deref().unwrap_or("-"),
                process.user.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(true)
}

/// Pages through an agent's events (at most 30 days of them).
async fn events(api: &Api, agent_id: &str, json: bool) -> anyhow::Result<bool> {
    let mut all: Vec<Event> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/agents/{}/events?limit=500", encode(agent_id));
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={}", encode(cursor)));
        }
        let Some(body) = api.get(&path).await? else {
            eprintln!("rollcall: no agent {agent_id:?}");
            return Ok(false);
        };
        let page: EventPage = serde_json::from_value(body)
            .context("the API answered an events page this CLI cannot read")?;
        if page.events.is_empty() {
            break;
        }
        all.extend(page.events);
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(true);
    }
    if all.is_empty() {
        println!("no state changes in the last 30 days");
    }
    for event in &all {
        let mut detail = Vec::new();
        if let Some(reason) = event.reason {
            detail.push(
                match reason {
                    OfflineReason::Deadline => "deadline passed",
                    OfflineReason::Leaving => "it left",
                }
                .to_owned(),
            );
        }
        if !event.gpus_added.is_empty() {
            detail.push(format!("added {}", event.gpus_added.join(", ")));
        }
        if !event.gpus_removed.is_empty() {
            detail.push(format!("removed {}", event.gpus_removed.join(", ")));
        }
        println!(
            "{}  {:<12}  {}",
            event.at,
            event.kind.as_str(),
            detail.join("; ")
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
                claim,
                hold,
                export,
            } => {
                let claim = claim.then_some((hold, *export));
                wait(&api, filters, *timeout, *every, claim).await
            }
            Command::Claim(args) => self::claim(&api, args).await,
            Command::Extend {
                claim_id,
                ttl,
                json,
            } => extend(&api, claim_id, *ttl, *json).await,
            Command::Release { claim_id } => release(&api, claim_id).await,
            Command::Agent { agent_id, json } => show(&api, agent_id, *json).await,
            Command::Events { agent_id, json } => events(&api, agent_id, *json).await,
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
