use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use rollcall::capacity::CursorSealer;
use rollcall::secrets::{Secret, SecretsFromEnv};
use rollcall::store::StoreArgs;
use rollcall_query::{QueryApi, Tokens, router};

/// rollcall query: the capacity API a scheduler calls to pick a machine.
///
/// Bearer tokens are read from the environment only (never from flags, which
/// `ps` shows): ROLLCALL_QUERY_TOKENS="token[,token2]". A token reads every
/// pool; `token:read+claim` may also claim GPUs, and
/// `token:read+claim:lab-a+lab-b` sees and claims only those pools. Pagination cursors are
/// sealed with ROLLCALL_CURSOR_KEY if set, else with a random key of the process's
/// own (never derived from the tokens).
/// In AWS, set ROLLCALL_QUERY_TOKENS_SECRET_ID (and ROLLCALL_CURSOR_KEY_SECRET_ID)
/// to Secrets Manager secrets holding the same text instead: they are read at
/// start and again once older than ROLLCALL_SECRETS_MAX_AGE_S (default 300).
///
/// Inside AWS Lambda (AWS_LAMBDA_RUNTIME_API set) it serves the Runtime API
/// and ignores --listen.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Address to serve plain HTTP on.
    #[arg(long, env = "ROLLCALL_QUERY_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    #[command(flatten)]
    store: StoreArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rollcall::logging::init();
    let args = Args::parse();
    let secrets = SecretsFromEnv::default();
    let tokens = secrets
        .load("ROLLCALL_QUERY_TOKENS", |text| {
            Tokens::parse(text).map_err(|error| error.to_string())
        })
        .await?
        .context("neither ROLLCALL_QUERY_TOKENS (token[,token2]; generate one with `openssl rand -hex 24`) nor ROLLCALL_QUERY_TOKENS_SECRET_ID is set")?;
    let cursor_key = match secrets
        .load("ROLLCALL_CURSOR_KEY", CursorSealer::parse_key)
        .await?
    {
        Some(key) => key,
        None => {
            tracing::info!(
                "no ROLLCALL_CURSOR_KEY: paging cursors are sealed with a key of this process's own and stop working when it restarts"
            );
            let mut key = vec![0u8; 32];
            getrandom::fill(&mut key).map_err(|error| {
                anyhow::anyhow!("no system randomness for the cursor key: {error}")
            })?;
            Secret::fixed(key)
        }
    };
    let store_config = args.store.config();
    let store = store_config
        .open()
        .await
        .with_context(|| format!("opening {}", store_config.describe()))?;
    let api = QueryApi::new(tokens, cursor_key, store);
    tracing::info!(store = %store_config.describe(), "query starting");
    rollcall::api::serve(router(Arc::new(api)), args.listen, "query").await?;
    Ok(())
}
