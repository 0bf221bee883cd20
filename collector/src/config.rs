//! Collector settings: defaults < TOML file < `ROLLCALL_*` environment < flags.
//!
//! The file is `--config PATH` if given, else the first of
//! `/etc/rollcall/collector.toml` and `~/.config/rollcall/collector.toml`
//! that exists. The agent key is a secret, so it comes from the environment
//! (`ROLLCALL_AGENT_KEY`) or a file (`agent_key_file`), never from a flag.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::files::{self, FileError, Privacy};

use rollcall::heartbeat::{DEFAULT_POOL, MAX_LABELS, MAX_POOL_LEN};
use rollcall::signing::{
    AGENT_ID_RULE, AgentKey, MAX_KEY_ID_LEN, id_rule, is_valid_agent_id, is_valid_id,
};
use serde::Deserialize;

pub const SYSTEM_CONFIG: &str = "/etc/rollcall/collector.toml";
pub const DEFAULT_INTERVAL_S: u32 = 30;
pub const DEFAULT_GPU_TIMEOUT_S: f64 = 5.0;
pub const DEFAULT_HISTORY_WINDOW_MINUTES: u64 = rollcall::history::WINDOW_MINUTES;

/// Every setting but the agent key: one type that serde fills from the TOML
/// file and clap from `ROLLCALL_*` and the flags (`rollcall-collector
/// <command> --help` shows these docs), merged by [`Options::or`]. A field
/// is `None` where its layer is silent; [`Settings::resolve`] applies the
/// defaults and checks.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Ingest's base URL, e.g. https://abc.lambda-url.eu-west-1.on.aws
    #[arg(long, env = "ROLLCALL_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Id of the fleet secret this agent's key was derived from.
    #[arg(long, env = "ROLLCALL_KEY_ID")]
    pub key_id: Option<String>,
    /// File holding the agent key (hex); the key itself is only ever read from ROLLCALL_AGENT_KEY.
    #[arg(long, env = "ROLLCALL_AGENT_KEY_FILE")]
    pub agent_key_file: Option<PathBuf>,
    /// Agent id [default: <hostname>-<8 hex>, generated once and kept in the state folder]
    #[arg(long, env = "ROLLCALL_AGENT_ID")]
    pub agent_id: Option<String>,
    /// Pool this machine belongs to [default: default]
    #[arg(long, env = "ROLLCALL_POOL")]
    pub pool: Option<String>,
    /// A label key=value; repeat for more (ROLLCALL_LABELS takes a comma-separated list).
    #[arg(long = "label", env = "ROLLCALL_LABELS", value_delimiter = ',')]
    #[serde(default, deserialize_with = "labels_table")]
    pub labels: Option<Vec<String>>,
    /// Seconds between heartbeats [default: 30]
    #[arg(long = "interval", env = "ROLLCALL_INTERVAL_S")]
    pub interval_s: Option<u32>,
    /// Seconds one GPU read may take before it is abandoned [default: 5]
    #[arg(long = "gpu-timeout", env = "ROLLCALL_GPU_TIMEOUT_S")]
    pub gpu_timeout_s: Option<f64>,
    /// Minutes of per-minute history sent together [default: 5]
    #[arg(long = "history-window", env = "ROLLCALL_HISTORY_WINDOW_MINUTES")]
    pub history_window_minutes: Option<u64>,
    /// Path whose file system is reported as the disk [default: /]
    #[arg(long, env = "ROLLCALL_DISK_PATH")]
    pub disk_path: Option<PathBuf>,
    /// Where the generated agent id is kept [default: /var/lib/rollcall as root, else ~/.local/state/rollcall]
    #[arg(long, env = "ROLLCALL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Send GPU processes as pids and memory only, without command names and users.
    #[arg(
        long = "no-process-names",
        env = "ROLLCALL_NO_PROCESS_NAMES",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_process_names: Option<bool>,
}

impl Options {
    /// Each setting from `self` where it has one, else from `lower`: flags
    /// and environment over the file.
    pub fn or(self, lower: Options) -> Options {
        Options {
            endpoint: self.endpoint.or(lower.endpoint),
            key_id: self.key_id.or(lower.key_id),
            agent_key_file: self.agent_key_file.or(lower.agent_key_file),
            agent_id: self.agent_id.or(lower.agent_id),
            pool: self.pool.or(lower.pool),
            labels: self.labels.or(lower.labels),
            interval_s: self.interval_s.or(lower.interval_s),
            gpu_timeout_s: self.gpu_timeout_s.or(lower.gpu_timeout_s),
            history_window_minutes: self.history_window_minutes.or(lower.history_window_minutes),
            disk_path: self.disk_path.or(lower.disk_path),
            state_dir: self.state_dir.or(lower.state_dir),
            no_process_names: self.no_process_names.or(lower.no_process_names),
        }
    }
}

/// The file's `labels = { site = "b2" }` as the flags give them, `site=b2`.
fn labels_table<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<String>>, D::Error> {
    let table = Option::<BTreeMap<String, String>>::deserialize(deserializer)?;
    Ok(table.map(|table| {
        table
            .into_iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect()
    }))
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoint: Option<String>,
    pub key_id: Option<String>,
    pub agent_key: Option<AgentKey>,
    pub agent_id: Option<String>,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub interval_s: u32,
    pub gpu_timeout: Duration,
    /// History is sent once per window of this many minutes.
    pub history_window_minutes: u64,
    pub disk_path: PathBuf,
    pub state_dir: PathBuf,
    /// Whether the state folder was named (flag, environment, config file
    /// or systemd), rather than guessed from who runs the collector.
    pub state_dir_named: bool,
    /// Whether GPU processes go out with their names and users.
    pub process_names: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Finds the config file: the one given, else the first default that exists.
pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_owned());
    }
    let user = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".config/rollcall/collector.toml"));
    [Some(PathBuf::from(SYSTEM_CONFIG)), user]
        .into_iter()
        .flatten()
        .find(|path| path.is_file())
}

pub fn read_file(path: &Path) -> Result<Options, ConfigError> {
    // `--config /dev/null`: the usual way to say "no config file".
    if path == Path::new("/dev/null") {
        return Ok(Options::default());
    }
    // It names the endpoint and the key file: nobody but its owner may change it.
    let text = files::read_guarded(path, Privacy::Public)?;
    toml::from_str(&text).map_err(|error| ConfigError::Parse {
        path: path.to_owned(),
        message: describe_toml_error(&text, &error),
    })
}

/// Where a config file is wrong, without echoing what it holds: the TOML
/// error's own text quotes the offending line, and an `agent_key = ...` put
/// there by mistake would land in the journal. Quoted values are elided too.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let mut message = String::new();
    let mut in_quotes = false;
    for c in error.message().chars() {
        if c == '"' {
            in_quotes = !in_quotes;
            if in_quotes {
                message.push_str("\"…\"");
            }
        } else if !in_quotes {
            message.push(c);
        }
    }
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

impl Settings {
    /// `options` (all layers merged) with defaults applied and every value
    /// checked; `agent_key` is `ROLLCALL_AGENT_KEY`, which only the
    /// environment may carry.
    pub fn resolve(options: Options, agent_key: Option<String>) -> Result<Self, ConfigError> {
        let endpoint = optional(
            options.endpoint,
            |url| url.starts_with("http://") || url.starts_with("https://"),
            |url| format!("endpoint {url:?} must start with http:// or https://"),
        )?;
        let key_id = optional(
            options.key_id,
            |id| is_valid_id(id, MAX_KEY_ID_LEN),
            |id| format!("key id {id:?} {}", id_rule(MAX_KEY_ID_LEN)),
        )?;
        let agent_key = read_agent_key(agent_key, options.agent_key_file)?;
        let agent_id = optional(
            options.agent_id,
            |id| is_valid_agent_id(id),
            |id| format!("agent id {id:?} {AGENT_ID_RULE}"),
        )?;
        let pool = checked(
            options.pool.unwrap_or_else(|| DEFAULT_POOL.to_owned()),
            |pool| is_valid_id(pool, MAX_POOL_LEN),
            |pool| format!("pool {pool:?} {}", id_rule(MAX_POOL_LEN)),
        )?;
        let labels = checked(
            parse_labels(&options.labels.unwrap_or_default())?,
            |labels| labels.len() <= MAX_LABELS,
            |_| format!("at most {MAX_LABELS} labels"),
        )?;
        let interval_s = checked(
            options.interval_s.unwrap_or(DEFAULT_INTERVAL_S),
            |s| (1..=3600).contains(s),
            |s| format!("interval {s}s must be 1-3600 seconds"),
        )?;
        let gpu_timeout_s = checked(
            options.gpu_timeout_s.unwrap_or(DEFAULT_GPU_TIMEOUT_S),
            |s| s.is_finite() && *s > 0.0 && *s <= 60.0,
            |s| format!("GPU timeout {s}s must be more than 0 and at most 60 seconds"),
        )?;
        let history_window_minutes = checked(
            options
                .history_window_minutes
                .unwrap_or(DEFAULT_HISTORY_WINDOW_MINUTES),
            |minutes| (1..=30).contains(minutes),
            |minutes| format!("history window {minutes} min must be 1-30 minutes"),
        )?;
        Ok(Settings {
            history_window_minutes,
            endpoint,
            key_id,
            agent_key,
            agent_id,
            pool,
            labels,
            interval_s,
            gpu_timeout: Duration::from_secs_f64(gpu_timeout_s),
            disk_path: options.disk_path.unwrap_or_else(|| PathBuf::from("/")),
            state_dir_named: options.state_dir.is_some()
                || std::env::var_os("STATE_DIRECTORY").is_some(),
            state_dir: options.state_dir.unwrap_or_else(default_state_dir),
            process_names: !options.no_process_names.unwrap_or(false),
        })
    }
}

/// `value` if `valid` says so, else the error `message` describes.
fn checked<T>(
    value: T,
    valid: impl FnOnce(&T) -> bool,
    message: impl FnOnce(&T) -> String,
) -> Result<T, ConfigError> {
    if valid(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Invalid(message(&value)))
    }
}

/// [`checked`] for a setting that may be absent.
fn optional<T>(
    value: Option<T>,
    valid: impl FnOnce(&T) -> bool,
    message: impl FnOnce(&T) -> String,
) -> Result<Option<T>, ConfigError> {
    value
        .map(|value| checked(value, valid, message))
        .transpose()
}

/// The agent key from `ROLLCALL_AGENT_KEY`, else from its file.
fn read_agent_key(
    from_env: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<AgentKey>, ConfigError> {
    let text = match (from_env, file) {
        (Some(key), _) => key,
        (None, Some(path)) => files::read_guarded(&path, Privacy::Secret)?,
        (None, None) => return Ok(None),
    };
    AgentKey::from_hex(&text)
        .map(Some)
        .map_err(|error| ConfigError::Invalid(format!("agent key: {error}")))
}

/// `key=value` pairs from `--label` or `ROLLCALL_LABELS`.
pub fn parse_labels(pairs: &[String]) -> Result<BTreeMap<String, String>, ConfigError> {
    pairs
        .iter()
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| ConfigError::Invalid(format!("label {pair:?} must be key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            // The rule ingest holds heartbeats to, so that a collector never
            // starts with labels every heartbeat would carry into a 400.
            if let Err(why) = rollcall::names::check_label(key, value) {
                // The key is named only when it is valid: it may hold
                // what a terminal would act on, like a value.
                let which = if rollcall::names::is_valid_id(key, rollcall::names::MAX_LABEL_KEY_LEN)
                {
                    format!("label {key:?}")
                } else {
                    "a label".to_owned()
                };
                return Err(ConfigError::Invalid(format!("{which}: {why}")));
            }
            Ok((key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Where the packaged service keeps its state (`StateDirectory=rollcall`).
pub const SERVICE_STATE_DIR: &str = "/var/lib/rollcall";

/// The folder systemd made for the service (`StateDirectory=`), else
/// `/var/lib/rollcall` for root, else the XDG state folder.
pub fn default_state_dir() -> PathBuf {
    if let Some(first) = std::env::var_os("STATE_DIRECTORY")
        .and_then(|dirs| {
            dirs.to_str()
                .and_then(|d| d.split(':').next())
                .map(PathBuf::from)
        })
        .filter(|dir| dir.is_absolute())
    {
        return first;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from(SERVICE_STATE_DIR);
    }
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|value| !value.is_empty()) {
        return PathBuf::from(state).join("rollcall");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/rollcall"),
        None => PathBuf::from(".rollcall"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Options {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn precedence_is_defaults_then_file_then_environment_and_flags() {
        let file = parse("pool = \"render\"\ninterval_s = 10\nlabels = { site = \"b2\" }\n");
        let flags = Options {
            interval_s: Some(15),
            ..Default::default()
        };
        let settings = Settings::resolve(flags.or(file), None).unwrap();
        assert_eq!(settings.pool, "render");
        assert_eq!(settings.interval_s, 15);
        assert_eq!(settings.labels.get("site").map(String::as_str), Some("b2"));
        assert_eq!(settings.gpu_timeout, Duration::from_secs(5));
        assert_eq!(settings.disk_path, PathBuf::from("/"));
    }

    #[test]
    fn flags_fill_the_same_type_as_the_file() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            options: Options,
        }
        let cli = Cli::parse_from([
            "rollcall-collector",
            "--label",
            "site=b2",
            "--label",
            "rack=4",
            "--interval",
            "7",
        ]);
        let file = parse("interval_s = 10\nlabels = { room = \"3\" }\n");
        let settings = Settings::resolve(cli.options.or(file), None).unwrap();
        assert_eq!(settings.interval_s, 7);
        // A list of labels replaces the file's, as any other setting does.
        assert_eq!(settings.labels.keys().collect::<Vec<_>>(), ["rack", "site"]);
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let file = parse(include_str!("../dist/collector.toml"));
        let settings = Settings::resolve(file, None).unwrap();
        assert_eq!(settings.key_id.as_deref(), Some("k1"));
        assert_eq!(settings.history_window_minutes, 5);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_a_reason() {
        assert!(toml::from_str::<Options>("intervall_s = 3").is_err());
        let bad_key = Settings::resolve(parse("labels = { \"a b\" = \"x\" }"), None);
        assert!(bad_key.unwrap_err().to_string().contains("label key"));
        // Values by ingest's own rule: a collector that would carry them into
        // a 400 on every heartbeat does not start.
        let long = format!("labels = {{ site = \"{}\" }}", "x".repeat(257));
        let error = Settings::resolve(parse(&long), None)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("at most 256") && !error.contains("xxx"),
            "{error}"
        );
        let control = parse_labels(&["site=b\u{1b}[2J".to_owned()]).unwrap_err();
        assert!(control.to_string().contains("control"), "{control}");
        assert!(parse_labels(&[format!("site={}", "x".repeat(256))]).is_ok());
    }

    #[test]
    fn a_config_error_says_where_without_echoing_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "5f1c0ffee0ddba11deadbeefcafe0123456789abcdef0123456789abcdef0123";
        for text in [
            format!("pool = \"render\"\nagent_key = \"{secret}\"\n"),
            format!("pool = \"render\"\nagent_key_file = {secret}\n"),
            format!("pool = \"render\"\nendpoint = [\"{secret}\"]\n"),
        ] {
            let path = dir.path().join("collector.toml");
            std::fs::write(&path, &text).unwrap();
            let error = read_file(&path).unwrap_err().to_string();
            assert!(!error.contains(&secret[..16]), "{error}");
            assert!(error.contains("line 2"), "{error}");
        }
        let bad = |options: Options| Settings::resolve(options, None).unwrap_err().to_string();
        assert!(
            bad(Options {
                interval_s: Some(0),
                ..Default::default()
            })
            .contains("interval")
        );
        assert!(
            bad(Options {
                endpoint: Some("ftp://x".into()),
                ..Default::default()
            })
            .contains("endpoint")
        );
        let bad_key = Settings::resolve(Options::default(), Some("abc".into()));
        assert!(bad_key.unwrap_err().to_string().contains("agent key"));
        assert!(
            bad(Options {
                labels: Some(vec!["novalue".into()]),
                ..Default::default()
            })
            .contains("label")
        );
        assert!(
            bad(Options {
                gpu_timeout_s: Some(f64::NAN),
                ..Default::default()
            })
            .contains("GPU timeout")
        );
    }
}
