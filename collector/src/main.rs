use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use rollcall::heartbeat::Heartbeat;
use rollcall::signing::{AGENT_ID_RULE, FleetSecret, is_valid_agent_id};
use rollcall_collector::config::{self, Options, Settings};
use rollcall_collector::drain;
use rollcall_collector::sample::{GpuReaders, Identity, Sampler};
use rollcall_collector::send::{self, Sender};
use rollcall_collector::{agent_id, service};

/// rollcall collector: reports this machine's free CPU, memory, disk and GPU
/// VRAM to rollcall ingest as signed heartbeats.
///
/// Settings come from defaults < a TOML file (--config, else
/// /etc/rollcall/collector.toml, else ~/.config/rollcall/collector.toml) <
/// ROLLCALL_* environment variables < flags. The agent key is secret and is
/// read from ROLLCALL_AGENT_KEY or agent_key_file, never from a flag.
#[derive(Parser, Debug)]
#[command(name = "rollcall-collector", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run as a service: a heartbeat every interval until SIGTERM/SIGINT,
    /// then a final "leaving" heartbeat that marks this agent offline at once.
    Run(Common),
    /// Send one heartbeat (for cron). Exits 0 when ingest accepts it,
    /// non-zero with a one-line reason otherwise.
    Once {
        #[command(flatten)]
        common: Common,
        /// Do not measure CPU usage (saves its 200 ms sampling window).
        #[arg(long)]
        skip_cpu_usage: bool,
        /// Say so on success too, and log at info (by default `once` is silent
        /// on success, for cron, and logs warnings and errors only).
        #[arg(long, short)]
        verbose: bool,
    },
    /// Ask schedulers to place no new work on this machine (PROTOCOL.md §3).
    /// It stays online; the running collector reports it at its next
    /// heartbeat, and it lasts across restarts until `undrain`.
    Drain(Common),
    /// Take this machine out of draining, at the next heartbeat.
    Undrain(Common),
    /// Print the heartbeat body this machine would send, and send nothing.
    Print {
        #[command(flatten)]
        common: Common,
        /// Do not measure CPU usage (saves its 200 ms sampling window).
        #[arg(long)]
        skip_cpu_usage: bool,
    },
    /// Derive an agent's key from a fleet secret (for operators). The secret is
    /// read from ROLLCALL_FLEET_SECRET, else from the first line of stdin.
    Keygen {
        /// The agent id the key is for.
        #[arg(long)]
        agent_id: String,
    },
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Config file (TOML).
    #[arg(long, env = "ROLLCALL_CONFIG")]
    config: Option<PathBuf>,
    /// Allow a plain http:// endpoint on another host. Anyone on the path then reads this
    /// machine's details and can hold heartbeats back or replay them; use https://.
    /// (http:// to loopback is always allowed.)
    #[arg(long, env = "ROLLCALL_INSECURE_PLAIN_HTTP")]
    insecure_plain_http: bool,
    #[command(flatten)]
    options: Options,
}

impl Common {
    /// Flags and environment (clap) over the config file over the defaults.
    fn settings(&self) -> anyhow::Result<Settings> {
        let file = match config::locate(self.config.as_deref()) {
            Some(path) => {
                tracing::debug!(path = %path.display(), "reading config file");
                config::read_file(&path)?
            }
            None => Options::default(),
        };
        let agent_key = std::env::var("ROLLCALL_AGENT_KEY")
            .ok()
            .filter(|key| !key.is_empty());
        Ok(Settings::resolve(self.options.clone().or(file), agent_key)?)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Cron mails whatever `once` prints: warnings and errors only, unless asked.
    let once_for_cron = matches!(cli.command, Command::Once { verbose: false, .. });
    rollcall::logging::init_with_default(if once_for_cron {
        tracing::Level::WARN
    } else {
        tracing::Level::INFO
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("rollcall-collector: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, for cron mail and service logs alike.
            eprintln!(
                "rollcall-collector: {}",
                format!("{error:#}").replace('\n', " ")
            );
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Keygen { agent_id } => keygen(&agent_id),
        Command::Drain(common) => set_draining(&common, true),
        Command::Undrain(common) => set_draining(&common, false),
        Command::Print {
            common,
            skip_cpu_usage,
        } => {
            let settings = common.settings()?;
            let identity = identity(&settings, false)?;
            let heartbeat = sample_once(&settings, &identity, skip_cpu_usage, false).await;
            println!("{}", serde_json::to_string_pretty(&heartbeat)?);
            Ok(())
        }
        Command::Once {
            common,
            skip_cpu_usage,
            verbose,
        } => once(&common, skip_cpu_usage, verbose).await,
        Command::Run(common) => run(&common).await,
    }
}

/// `drain` and `undrain`: the marker the running collector reads at its next heartbeat.
fn set_draining(common: &Common, draining: bool) -> anyhow::Result<()> {
    let settings = common.settings()?;
    let state_dir = &settings.state_dir;
    let service_dir = std::path::Path::new(config::SERVICE_STATE_DIR);
    drain::check_target(state_dir, settings.state_dir_named, service_dir, draining)
        .map_err(anyhow::Error::msg)?;
    if draining {
        let marker = drain::drain(state_dir)?;
        println!(
            "draining ({}): schedulers are asked to place no new work here; the collector reports it at its next heartbeat (undo with `rollcall-collector undrain`)",
            marker.display()
        );
    } else {
        drain::undrain(state_dir)
            .with_context(|| format!("cannot write to {}", state_dir.display()))?;
        println!("not draining: the collector reports this machine as up at its next heartbeat");
    }
    Ok(())
}

/// `once`: one heartbeat, for cron; errors are the exit status.
async fn once(common: &Common, skip_cpu_usage: bool, verbose: bool) -> anyhow::Result<()> {
    let settings = common.settings()?;
    let identity = identity(&settings, true)?;
    let sender = sender(&settings, common.insecure_plain_http, send::REQUEST_TIMEOUT)?;
    let heartbeat = sample_once(&settings, &identity, skip_cpu_usage, true).await;
    let accepted = sender.send(&heartbeat).await?;
    if verbose {
        println!(
            "heartbeat accepted: agent {} online until {}",
            accepted.agent_id, accepted.online_until
        );
    }
    Ok(())
}

/// `run`: the service, until SIGTERM or SIGINT.
async fn run(common: &Common) -> anyhow::Result<()> {
    let settings = common.settings()?;
    let identity = identity(&settings, true)?;
    let interval = Duration::from_secs(u64::from(identity.interval_s));
    let sender = sender(
        &settings,
        common.insecure_plain_http,
        send::attempt_timeout(interval),
    )?;
    let shutdown = service::shutdown_on_signals().context("cannot listen for signals")?;
    tracing::info!(
        agent_id = %identity.agent_id,
        endpoint = %sender.url(),
        interval_s = identity.interval_s,
        pool = %identity.pool,
        "collector starting"
    );
    service::run(sampler(&settings, false), identity, sender, shutdown).await;
    Ok(())
}

/// The configured agent id, else the kept one. `print` does not insist on
/// keeping a generated id, since it sends nothing.
fn identity(settings: &Settings, must_keep_id: bool) -> anyhow::Result<Identity> {
    let hostname = sysinfo::System::host_name().unwrap_or_default();
    let agent_id = match &settings.agent_id {
        Some(id) => id.clone(),
        None => match agent_id::load_or_create(&settings.state_dir, &hostname) {
            Ok(id) => id,
            Err(error) if !must_keep_id => {
                tracing::warn!(%error, "using a temporary agent id");
                agent_id::generate(&hostname)
            }
            Err(error) => return Err(error.into()),
        },
    };
    Ok(Identity {
        agent_id,
        pool: settings.pool.clone(),
        labels: settings.labels.clone(),
        interval_s: settings.interval_s,
        history_window_minutes: settings.history_window_minutes,
        state_dir: settings.state_dir.clone(),
    })
}

fn sampler(settings: &Settings, once: bool) -> Sampler {
    Sampler::new(
        settings.disk_path.clone(),
        GpuReaders::detect(once, settings.process_names),
        settings.gpu_timeout,
    )
}

/// One sample for `print` and `once`, optionally without the CPU-usage window;
/// `once` for the `once` subcommand (run from cron), whose expected news is
/// logged at debug only.
async fn sample_once(
    settings: &Settings,
    identity: &Identity,
    skip_cpu_usage: bool,
    once: bool,
) -> Heartbeat {
    sampler(settings, once)
        .sample(
            identity,
            drain::current_state(&identity.state_dir),
            !skip_cpu_usage,
        )
        .await
}

fn sender(
    settings: &Settings,
    insecure_plain_http: bool,
    timeout: Duration,
) -> anyhow::Result<Sender> {
    let endpoint = settings.endpoint.as_deref().context(
        "no ingest endpoint: set --endpoint, ROLLCALL_ENDPOINT or endpoint in the config file",
    )?;
    let key_id = settings
        .key_id
        .clone()
        .context("no key id: set --key-id, ROLLCALL_KEY_ID or key_id in the config file")?;
    let agent_key = settings.agent_key.clone().context(
        "no agent key: set ROLLCALL_AGENT_KEY or agent_key_file (derive one with `rollcall-collector keygen --agent-id ID`)",
    )?;
    Ok(Sender::new(
        endpoint,
        key_id,
        agent_key,
        insecure_plain_http,
        timeout,
    )?)
}

fn keygen(agent_id: &str) -> anyhow::Result<()> {
    if !is_valid_agent_id(agent_id) {
        bail!("agent id {agent_id:?} {AGENT_ID_RULE}");
    }
    let secret_text = match std::env::var("ROLLCALL_FLEET_SECRET") {
        Ok(text) if !text.is_empty() => text,
        _ => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("fleet secret (hex), then Enter:");
            }
            let mut line = String::new();
            stdin
                .lock()
                .read_line(&mut line)
                .context("reading the fleet secret from stdin")?;
            line
        }
    };
    let secret = FleetSecret::from_hex(secret_text.trim()).context("fleet secret")?;
    println!("{}", secret.derive_agent_key(agent_id).to_hex());
    Ok(())
}
