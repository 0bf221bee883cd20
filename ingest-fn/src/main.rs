use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use rollcall::record::{DEFAULT_GRACE_MULTIPLIER, DEFAULT_RETENTION_S, Deadlines};
use rollcall::secrets::SecretsFromEnv;
use rollcall::store::{DEFAULT_HISTORY_RETENTION_S, StoreArgs};
use rollcall::verify::Keyring;
use rollcall_ingest::keys::KeySource;
use rollcall_ingest::{Ingest, SWEEP_EVERY, router, sweep_forever};

/// rollcall ingest: accepts signed heartbeats and records each agent's deadline.
///
/// Fleet secrets are read from the environment only (never from flags, which
/// `ps` shows): ROLLCALL_FLEET_SECRETS="kid=hex[,kid2=hex]". Two key ids at
/// once let a fleet rotate secrets without downtime. In AWS, set
/// ROLLCALL_FLEET_SECRETS_SECRET_ID to a Secrets Manager secret holding that
/// text instead: it is read at start and again once older than
/// ROLLCALL_SECRETS_MAX_AGE_S (default 300; an unknown key id triggers an
/// early refresh at most once per ROLLCALL_SECRETS_MIN_REFRESH_S, default 30).
///
/// Serving plain HTTP, it also marks agents offline at their deadline every
/// 5 s, recording each one's `offline` (GET /v1/agents/{id}/events); on AWS
/// the fleet function does that on a schedule. With --webhook-url it POSTs
/// each state change to those URLs, signed the Standard Webhooks way with
/// ROLLCALL_WEBHOOK_SECRET (whsec_ and base64; from the environment only),
/// in order per agent, retried with backoff for up to 24 h (from the
/// embedded store; on AWS the stack's webhook function sends them).
///
/// Inside AWS Lambda (AWS_LAMBDA_RUNTIME_API set) it serves the Runtime API
/// and ignores --listen.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Address to serve plain HTTP on.
    #[arg(long, env = "ROLLCALL_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    store: StoreArgs,
    /// An agent stays online for this many intervals after a heartbeat.
    #[arg(long, env = "ROLLCALL_GRACE_MULTIPLIER", default_value_t = DEFAULT_GRACE_MULTIPLIER, value_parser = clap::value_parser!(u32).range(1..=100))]
    grace_multiplier: u32,
    /// Seconds an offline agent stays on record before it is removed.
    #[arg(long, env = "ROLLCALL_RETENTION_S", default_value_t = DEFAULT_RETENTION_S, value_parser = clap::value_parser!(i64).range(0..=31_536_000))]
    retention_s: i64,
    /// Seconds per-minute history is kept (at most 86400: as far back as one
    /// read of GET /v1/agents/{id}/history reaches).
    #[arg(long, env = "ROLLCALL_HISTORY_RETENTION_S", default_value_t = DEFAULT_HISTORY_RETENTION_S, value_parser = clap::value_parser!(i64).range(60..=rollcall::history::MAX_RETENTION_S))]
    history_retention_s: i64,
    /// Where to POST each state change: https://..., or plain http:// to this
    /// machine; prefix slack: for a Slack incoming webhook. Comma-separated.
    #[arg(
        long = "webhook-url",
        env = "ROLLCALL_WEBHOOK_URLS",
        value_name = "URL[,URL...]"
    )]
    webhook_urls: Option<String>,
    /// An offline followed by an online within this many seconds sends
    /// neither (a short network blip); offlines wait this long before they go.
    #[arg(long, env = "ROLLCALL_WEBHOOK_GRACE_S", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
    webhook_grace_s: u64,
}

/// The webhook dispatcher the flags ask for, checked before serving.
async fn webhooks(
    args: &Args,
    store: &dyn rollcall::store::Store,
) -> anyhow::Result<Option<rollcall::webhooks::Dispatcher>> {
    let Some(urls) = &args.webhook_urls else {
        return Ok(None);
    };
    let grace = std::time::Duration::from_secs(args.webhook_grace_s);
    let dispatcher = rollcall::webhooks::Dispatcher::configured(urls, grace)
        .await
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        dispatcher.is_none() || store.outbox().is_some(),
        "ingest sends webhooks from the embedded store only; on AWS the stack's webhook function sends them (WebhookUrls)"
    );
    Ok(dispatcher)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rollcall::logging::init();
    let args = Args::parse();
    let keyring = SecretsFromEnv::default()
        .load("ROLLCALL_FLEET_SECRETS", |text| {
            Keyring::parse(text).map_err(|error| error.to_string())
        })
        .await?
        .context("neither ROLLCALL_FLEET_SECRETS (kid=hex[,kid2=hex]; generate one with `openssl rand -hex 32`) nor ROLLCALL_FLEET_SECRETS_SECRET_ID is set")?;
    let keyring = KeySource::new(keyring);
    let store_config = args.store.config();
    let store = store_config
        .open()
        .await
        .with_context(|| format!("opening {}", store_config.describe()))?;
    let key_ids = keyring.key_ids().await;
    tracing::info!(store = %store_config.describe(), key_ids = ?key_ids, grace_multiplier = args.grace_multiplier, retention_s = args.retention_s, "ingest starting");
    if !rollcall::api::in_lambda() {
        tokio::spawn(sweep_forever(store.clone(), SWEEP_EVERY));
        if let Some(dispatcher) = webhooks(&args, &*store).await? {
            tokio::spawn(dispatcher.run(store.clone()));
        }
    }
    let ingest = Ingest {
        keyring,
        deadlines: Deadlines {
            grace_multiplier: args.grace_multiplier,
            retention_s: args.retention_s,
        },
        history_retention_s: args.history_retention_s,
        store,
    };
    rollcall::api::serve(router(Arc::new(ingest)), args.listen, "ingest").await?;
    Ok(())
}
