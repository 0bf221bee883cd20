//! Secrets the functions hold: fleet secrets, query tokens, the cursor key.
//!
//! Locally they come from the environment and never change. In AWS they are
//! read from Secrets Manager at cold start, so that the Lambda configuration
//! holds only the secrets' names (a `lambda:GetFunctionConfiguration` reader
//! learns nothing secret), and they are fetched again once older than
//! `max_age`, in the background, so that a rotated secret is picked up
//! without a redeploy. A caller that meets something unknown (a new key id)
//! may ask for an early refresh; that is granted at most once per
//! `min_refresh` (never less than 30 s when configured from the environment),
//! so a flood of made-up key ids costs at most one fetch per window, never
//! one per request, and it waits for it at most a second.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::DisplayErrorContext;
use tokio::time::Instant;

/// Default `max_age`: how stale a fetched secret may get.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// The most often an unknown value may trigger a refresh.
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret {secret_id:?} from Secrets Manager: {reason}")]
    Fetch { secret_id: String, reason: String },
    #[error("secret {secret_id:?} has no SecretString")]
    NotText { secret_id: String },
    #[error("secret {secret_id:?} is not valid: {reason}")]
    Invalid { secret_id: String, reason: String },
}

type Parse<T> = fn(&str) -> Result<T, String>;

/// The longest one fetch from Secrets Manager may take; a slower one is
/// given up and tried again later, the value in hand still served.
pub const FETCH_BUDGET: Duration = Duration::from_secs(2);
/// How long a request that asked for an early refresh waits for it; the
/// fetch goes on in the background past that.
pub const EARLY_WAIT: Duration = Duration::from_secs(1);

struct Remote<T> {
    client: Client,
    secret_id: String,
    parse: Parse<T>,
    max_age: Duration,
    min_refresh: Duration,
    /// When the last fetch was started (it may have failed).
    attempted: std::sync::Mutex<Instant>,
    /// When the value in hand was fetched.
    fetched: std::sync::Mutex<Instant>,
}

struct Shared<T> {
    value: RwLock<Arc<T>>,
    remote: Option<Remote<T>>,
}

/// A secret's parsed value, fixed or kept fresh from Secrets Manager.
///
/// A request never waits for Secrets Manager beyond [`EARLY_WAIT`]: a stale
/// value starts a refresh in the background and is served meanwhile, and
/// each fetch is given up after [`FETCH_BUDGET`], both well inside the
/// functions' timeouts, so a slow Secrets Manager cannot turn requests into
/// timeouts (which would reset the execution environment and lose the last
/// good value).
pub struct Secret<T> {
    shared: Arc<Shared<T>>,
}

impl<T: Send + Sync + 'static> Secret<T> {
    /// A value that never changes (local runs, tests).
    pub fn fixed(value: T) -> Self {
        Self {
            shared: Arc::new(Shared {
                value: RwLock::new(Arc::new(value)),
                remote: None,
            }),
        }
    }

    /// Fetches `secret_id` now (a function must not start without it).
    /// Stale values are fetched again after `max_age`; early refreshes come
    /// at most once per `min_refresh`.
    pub async fn fetch(
        client: Client,
        secret_id: impl Into<String>,
        parse: Parse<T>,
        max_age: Duration,
        min_refresh: Duration,
    ) -> Result<Self, SecretError> {
        let secret_id = secret_id.into();
        let value = fetch_parsed(&client, &secret_id, parse).await?;
        let now = Instant::now();
        Ok(Self {
            shared: Arc::new(Shared {
                value: RwLock::new(Arc::new(value)),
                remote: Some(Remote {
                    client,
                    secret_id,
                    parse,
                    max_age,
                    min_refresh,
                    attempted: std::sync::Mutex::new(now),
                    fetched: std::sync::Mutex::new(now),
                }),
            }),
        })
    }

    /// The value to use now. One older than `max_age` is served while a
    /// refresh runs in the background.
    pub async fn current(&self) -> Arc<T> {
        if let Some(remote) = &self.shared.remote {
            // After a failed fetch, the next waits as long again (at most min_refresh).
            let retry_after = remote.max_age.min(remote.min_refresh);
            if lock(&remote.fetched).elapsed() >= remote.max_age {
                let _in_background = self.start_refresh(retry_after);
            }
        }
        self.shared.snapshot()
    }

    /// Refreshes now unless a fetch was started within `min_refresh`,
    /// waiting at most [`EARLY_WAIT`]: true when a new value came in time.
    pub async fn refresh_early(&self) -> bool {
        let Some(remote) = &self.shared.remote else {
            return false;
        };
        match self.start_refresh(remote.min_refresh) {
            Some(refresh) => matches!(
                tokio::time::timeout(EARLY_WAIT, refresh).await,
                Ok(Ok(true))
            ),
            None => false,
        }
    }

    /// Starts one fetch unless one was started within `unless_within`.
    fn start_refresh(&self, unless_within: Duration) -> Option<tokio::task::JoinHandle<bool>> {
        let remote = self.shared.remote.as_ref()?;
        {
            let mut attempted = lock(&remote.attempted);
            if attempted.elapsed() < unless_within {
                return None;
            }
            *attempted = Instant::now();
        }
        let shared = Arc::clone(&self.shared);
        Some(tokio::spawn(async move { shared.refresh().await }))
    }
}

impl<T> Shared<T> {
    fn snapshot(&self) -> Arc<T> {
        Arc::clone(&self.value.read().unwrap_or_else(|e| e.into_inner()))
    }

    async fn refresh(&self) -> bool {
        let Some(remote) = &self.remote else {
            return false;
        };
        let fetch = fetch_parsed(&remote.client, &remote.secret_id, remote.parse);
        match tokio::time::timeout(FETCH_BUDGET, fetch).await {
            Ok(Ok(value)) => {
                *self.value.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
                *lock(&remote.fetched) = Instant::now();
                tracing::info!(secret_id = remote.secret_id, "secret refreshed");
                true
            }
            Ok(Err(error)) => {
                // Keep serving with the value in hand; say why it is stale.
                tracing::warn!(%error, "secret not refreshed; keeping the previous value");
                false
            }
            Err(_) => {
                tracing::warn!(
                    secret_id = remote.secret_id,
                    budget_ms = FETCH_BUDGET.as_millis() as u64,
                    "Secrets Manager did not answer in time; keeping the previous value"
                );
                false
            }
        }
    }
}

fn lock(mutex: &std::sync::Mutex<Instant>) -> std::sync::MutexGuard<'_, Instant> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn fetch_parsed<T>(
    client: &Client,
    secret_id: &str,
    parse: Parse<T>,
) -> Result<T, SecretError> {
    let output = client
        .get_secret_value()
        .secret_id(secret_id)
        .send()
        .await
        .map_err(|error| SecretError::Fetch {
            secret_id: secret_id.to_owned(),
            reason: DisplayErrorContext(&error).to_string(),
        })?;
    let text = output.secret_string().ok_or_else(|| SecretError::NotText {
        secret_id: secret_id.to_owned(),
    })?;
    // The parse error must not quote the secret: it says where, not what.
    parse(text).map_err(|reason| SecretError::Invalid {
        secret_id: secret_id.to_owned(),
        reason,
    })
}

/// A Secrets Manager client from the standard AWS configuration chain (it
/// honours `AWS_ENDPOINT_URL`, so emulators work). Build it once per process.
pub async fn client_from_env() -> Client {
    Client::new(crate::aws::sdk_config().await)
}

/// Where a function's secrets come from, given its environment: the text in
/// `<variable>` (local), or the Secrets Manager secret named in
/// `<variable>_SECRET_ID` (AWS). Refresh bounds come from
/// `ROLLCALL_SECRETS_MAX_AGE_S` and `ROLLCALL_SECRETS_MIN_REFRESH_S`.
#[derive(Default)]
pub struct SecretsFromEnv {
    /// Built on first use, then shared by every secret of the process.
    client: tokio::sync::OnceCell<Client>,
}

impl SecretsFromEnv {
    /// `None` when neither variable is set.
    pub async fn load<T: Send + Sync + 'static>(
        &self,
        variable: &str,
        parse: Parse<T>,
    ) -> Result<Option<Secret<T>>, SecretError> {
        if let Ok(secret_id) = std::env::var(format!("{variable}_SECRET_ID")) {
            let client = self.client.get_or_init(client_from_env).await.clone();
            let (max_age, min_refresh) = refresh_bounds(
                env_seconds("ROLLCALL_SECRETS_MAX_AGE_S"),
                env_seconds("ROLLCALL_SECRETS_MIN_REFRESH_S"),
            );
            let secret = Secret::fetch(client, secret_id, parse, max_age, min_refresh).await?;
            return Ok(Some(secret));
        }
        match std::env::var(variable) {
            Ok(text) => parse(&text)
                .map(|value| Some(Secret::fixed(value)))
                .map_err(|reason| SecretError::Invalid {
                    secret_id: variable.to_owned(),
                    reason,
                }),
            Err(_) => Ok(None),
        }
    }
}

fn env_seconds(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The refresh bounds a deployment asked for, held to the documented floor:
/// early refreshes at most once per [`DEFAULT_MIN_REFRESH`], however short
/// `max_age` is (a short max age only makes stale values refresh sooner).
pub fn refresh_bounds(
    max_age: Option<Duration>,
    min_refresh: Option<Duration>,
) -> (Duration, Duration) {
    let max_age = max_age
        .unwrap_or(DEFAULT_MAX_AGE)
        .max(Duration::from_secs(1));
    let min_refresh = min_refresh
        .unwrap_or(DEFAULT_MIN_REFRESH)
        .max(DEFAULT_MIN_REFRESH);
    (max_age, min_refresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_refreshes_never_come_more_often_than_the_floor() {
        let s = Duration::from_secs;
        assert_eq!(
            refresh_bounds(None, None),
            (DEFAULT_MAX_AGE, DEFAULT_MIN_REFRESH)
        );
        // SecretMaxAgeSeconds of 5 no longer lets a flood refresh every 5 s.
        assert_eq!(refresh_bounds(Some(s(5)), None), (s(5), s(30)));
        assert_eq!(refresh_bounds(Some(s(0)), Some(s(1))), (s(1), s(30)));
        assert_eq!(
            refresh_bounds(None, Some(s(120))),
            (DEFAULT_MAX_AGE, s(120))
        );
    }
}
