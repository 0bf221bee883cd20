//! Secrets the functions hold: fleet secrets, query tokens, the cursor key.
//!
//! Locally they come from the environment and never change. In AWS they are
//! read from Secrets Manager at cold start, so that the Lambda configuration
//! holds only the secrets' names (a `lambda:GetFunctionConfiguration` reader
//! learns nothing secret), and they are fetched again once older than
//! `max_age`, so that a rotated secret is picked up without a redeploy. A
//! caller that meets something unknown (a new key id) may ask for an early
//! refresh; that is granted at most once per `min_refresh`, so a flood of
//! made-up key ids costs at most one fetch per window, never one per request.

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

struct Remote<T> {
    client: Client,
    secret_id: String,
    parse: Parse<T>,
    max_age: Duration,
    min_refresh: Duration,
    /// When the last fetch was attempted (succeeded or not).
    attempted: std::sync::Mutex<Instant>,
    /// When the value in hand was fetched.
    fetched: std::sync::Mutex<Instant>,
    /// One fetch at a time: concurrent requests share its result.
    fetching: tokio::sync::Mutex<()>,
}

/// A secret's parsed value, fixed or kept fresh from Secrets Manager.
pub struct Secret<T> {
    value: RwLock<Arc<T>>,
    remote: Option<Remote<T>>,
}

impl<T: Send + Sync + 'static> Secret<T> {
    /// A value that never changes (local runs, tests).
    pub fn fixed(value: T) -> Self {
        Self {
            value: RwLock::new(Arc::new(value)),
            remote: None,
        }
    }

    /// Fetches `secret_id` now (a function must not start without it).
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
            value: RwLock::new(Arc::new(value)),
            remote: Some(Remote {
                client,
                secret_id,
                parse,
                max_age,
                min_refresh: min_refresh.min(max_age),
                attempted: std::sync::Mutex::new(now),
                fetched: std::sync::Mutex::new(now),
                fetching: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The value to use now, refreshed first if it is older than `max_age`.
    pub async fn current(&self) -> Arc<T> {
        if let Some(remote) = &self.remote {
            let fetched = *lock(&remote.fetched);
            let attempted = *lock(&remote.attempted);
            // After a failed fetch, wait min_refresh before the next try.
            if fetched.elapsed() >= remote.max_age && attempted.elapsed() >= remote.min_refresh {
                self.refresh(remote).await;
            }
        }
        self.snapshot()
    }

    /// Refreshes now unless a fetch was attempted within `min_refresh`;
    /// true when a new value was fetched.
    pub async fn refresh_early(&self) -> bool {
        match &self.remote {
            Some(remote) if lock(&remote.attempted).elapsed() >= remote.min_refresh => {
                self.refresh(remote).await
            }
            _ => false,
        }
    }

    fn snapshot(&self) -> Arc<T> {
        Arc::clone(&self.value.read().unwrap_or_else(|e| e.into_inner()))
    }

    async fn refresh(&self, remote: &Remote<T>) -> bool {
        let attempted_before = *lock(&remote.attempted);
        let _one_at_a_time = remote.fetching.lock().await;
        if *lock(&remote.attempted) != attempted_before {
            // Another request fetched while this one waited.
            return false;
        }
        *lock(&remote.attempted) = Instant::now();
        match fetch_parsed(&remote.client, &remote.secret_id, remote.parse).await {
            Ok(value) => {
                *self.value.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
                *lock(&remote.fetched) = Instant::now();
                tracing::info!(secret_id = remote.secret_id, "secret refreshed");
                true
            }
            Err(error) => {
                // Keep serving with the value in hand; say why it is stale.
                tracing::warn!(%error, "secret not refreshed; keeping the previous value");
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
    Client::new(&crate::aws::sdk_config().await)
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
    /// A source whose Secrets Manager client is given (tests record its calls).
    pub fn with_client(client: Client) -> Self {
        Self {
            client: tokio::sync::OnceCell::new_with(Some(client)),
        }
    }

    /// `None` when neither variable is set.
    pub async fn load<T: Send + Sync + 'static>(
        &self,
        variable: &str,
        parse: Parse<T>,
    ) -> Result<Option<Secret<T>>, SecretError> {
        if let Ok(secret_id) = std::env::var(format!("{variable}_SECRET_ID")) {
            let client = self.client.get_or_init(client_from_env).await.clone();
            let secret = Secret::fetch(
                client,
                secret_id,
                parse,
                env_seconds("ROLLCALL_SECRETS_MAX_AGE_S", DEFAULT_MAX_AGE),
                env_seconds("ROLLCALL_SECRETS_MIN_REFRESH_S", DEFAULT_MIN_REFRESH),
            )
            .await?;
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

fn env_seconds(name: &str, default: Duration) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .map_or(default, Duration::from_secs)
}
