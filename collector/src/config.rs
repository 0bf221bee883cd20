//! Collector settings: defaults < TOML file < `ROLLCALL_*` environment < flags.
//!
//! The file is `--config PATH` if given, else the first of
//! `/etc/rollcall/collector.toml` and `~/.config/rollcall/collector.toml`
//! that exists. The agent key is a secret, so it comes from the environment
//! (`ROLLCALL_AGENT_KEY`) or a file (`agent_key_file`), never from a flag.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollcall::heartbeat::{DEFAULT_POOL, MAX_LABELS, MAX_POOL_LEN};
use rollcall::signing::{AGENT_ID_RULE, AgentKey, MAX_KEY_ID_LEN, is_valid_agent_id, is_valid_id};
use serde::Deserialize;

pub const SYSTEM_CONFIG: &str = "/etc/rollcall/collector.toml";
pub const DEFAULT_INTERVAL_S: u32 = 30;
pub const DEFAULT_GPU_TIMEOUT_S: f64 = 5.0;
pub const DEFAULT_HISTORY_WINDOW_MINUTES: u64 = 5;

/// The TOML file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub endpoint: Option<String>,
    pub key_id: Option<String>,
    pub agent_key_file: Option<PathBuf>,
    pub agent_id: Option<String>,
    pub pool: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub interval_s: Option<u32>,
    pub gpu_timeout_s: Option<f64>,
    pub history_window_minutes: Option<u64>,
    pub disk_path: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
}

/// What the environment and flags said; `None` where they were silent.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub endpoint: Option<String>,
    pub key_id: Option<String>,
    pub agent_key: Option<String>,
    pub agent_key_file: Option<PathBuf>,
    pub agent_id: Option<String>,
    pub pool: Option<String>,
    pub labels: Option<Vec<String>>,
    pub interval_s: Option<u32>,
    pub gpu_timeout_s: Option<f64>,
    pub history_window_minutes: Option<u64>,
    pub disk_path: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
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
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
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

pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
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
    pub fn resolve(file: FileConfig, overrides: Overrides) -> Result<Self, ConfigError> {
        let endpoint = optional(
            overrides.endpoint.or(file.endpoint),
            |url| url.starts_with("http://") || url.starts_with("https://"),
            |url| format!("endpoint {url:?} must start with http:// or https://"),
        )?;
        let key_id = optional(
            overrides.key_id.or(file.key_id),
            |id| is_valid_id(id, MAX_KEY_ID_LEN),
            |id| format!("key id {id:?} must be 1-32 characters of A-Z a-z 0-9 . _ -"),
        )?;
        let agent_key = read_agent_key(
            overrides.agent_key,
            overrides.agent_key_file.or(file.agent_key_file),
        )?;
        let agent_id = optional(
            overrides.agent_id.or(file.agent_id),
            |id| is_valid_agent_id(id),
            |id| format!("agent id {id:?} {AGENT_ID_RULE}"),
        )?;
        let pool = checked(
            overrides
                .pool
                .or(file.pool)
                .unwrap_or_else(|| DEFAULT_POOL.to_owned()),
            |pool| is_valid_id(pool, MAX_POOL_LEN),
            |pool| format!("pool {pool:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"),
        )?;
        let labels = match overrides.labels {
            Some(pairs) => parse_labels(&pairs)?,
            None => file.labels.unwrap_or_default(),
        };
        let labels = checked(
            labels,
            |labels| labels.len() <= MAX_LABELS,
            |_| format!("at most {MAX_LABELS} labels"),
        )?;
        let interval_s = checked(
            overrides
                .interval_s
                .or(file.interval_s)
                .unwrap_or(DEFAULT_INTERVAL_S),
            |s| (1..=3600).contains(s),
            |s| format!("interval {s}s must be 1-3600 seconds"),
        )?;
        let gpu_timeout_s = checked(
            overrides
                .gpu_timeout_s
                .or(file.gpu_timeout_s)
                .unwrap_or(DEFAULT_GPU_TIMEOUT_S),
            |s| s.is_finite() && *s > 0.0 && *s <= 60.0,
            |s| format!("GPU timeout {s}s must be more than 0 and at most 60 seconds"),
        )?;
        let history_window_minutes = checked(
            overrides
                .history_window_minutes
                .or(file.history_window_minutes)
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
            disk_path: overrides
                .disk_path
                .or(file.disk_path)
                .unwrap_or_else(|| PathBuf::from("/")),
            state_dir: overrides
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(default_state_dir),
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
        (None, Some(path)) => {
            std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path, source })?
        }
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
            if !is_valid_id(key.trim(), 64) {
                return Err(ConfigError::Invalid(format!(
                    "label key {key:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
                )));
            }
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

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
        return PathBuf::from("/var/lib/rollcall");
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

    #[test]
    fn precedence_is_defaults_then_file_then_overrides() {
        let file: FileConfig =
            toml::from_str("pool = \"render\"\ninterval_s = 10\nlabels = { site = \"b2\" }\n")
                .unwrap();
        let settings = Settings::resolve(
            file,
            Overrides {
                interval_s: Some(15),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(settings.pool, "render");
        assert_eq!(settings.interval_s, 15);
        assert_eq!(settings.labels.get("site").map(String::as_str), Some("b2"));
        assert_eq!(settings.gpu_timeout, Duration::from_secs(5));
        assert_eq!(settings.disk_path, PathBuf::from("/"));
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let file: FileConfig = toml::from_str(include_str!("../dist/collector.toml")).unwrap();
        let settings = Settings::resolve(file, Overrides::default()).unwrap();
        assert_eq!(settings.key_id.as_deref(), Some("k1"));
        assert_eq!(settings.history_window_minutes, 5);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_a_reason() {
        assert!(toml::from_str::<FileConfig>("intervall_s = 3").is_err());
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
        let bad = |overrides: Overrides| {
            Settings::resolve(FileConfig::default(), overrides)
                .unwrap_err()
                .to_string()
        };
        assert!(
            bad(Overrides {
                interval_s: Some(0),
                ..Default::default()
            })
            .contains("interval")
        );
        assert!(
            bad(Overrides {
                endpoint: Some("ftp://x".into()),
                ..Default::default()
            })
            .contains("endpoint")
        );
        assert!(
            bad(Overrides {
                agent_key: Some("abc".into()),
                ..Default::default()
            })
            .contains("agent key")
        );
        assert!(
            bad(Overrides {
                labels: Some(vec!["novalue".into()]),
                ..Default::default()
            })
            .contains("label")
        );
        assert!(
            bad(Overrides {
                gpu_timeout_s: Some(f64::NAN),
                ..Default::default()
            })
            .contains("GPU timeout")
        );
    }
}
