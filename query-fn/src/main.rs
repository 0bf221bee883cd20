use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use rollcall::store::StoreArgs;
use rollcall_query::{QueryApi, router};

/// rollcall query: the capacity API a scheduler calls to pick a machine.
///
/// Bearer tokens are read from the environment only (never from flags, which
/// `ps` shows): ROLLCALL_QUERY_TOKENS="token[,token2]". Pagination cursors are
/// sealed with ROLLCALL_CURSOR_KEY if set, else with a key derived from the tokens.
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
    let tokens = std::env::var("ROLLCALL_QUERY_TOKENS")
        .context("ROLLCALL_QUERY_TOKENS is not set (expected token[,token2]; generate one with `openssl rand -hex 24`)")?;
    let cursor_key = std::env::var("ROLLCALL_CURSOR_KEY").ok();
    let store_config = args.store.config();
    let store = store_config
        .open()
        .await
        .with_context(|| format!("opening {}", store_config.describe()))?;
    let api = QueryApi::new(&tokens, cursor_key.as_deref().map(str::as_bytes), store)
        .context("ROLLCALL_QUERY_TOKENS")?;
    tracing::info!(store = %store_config.describe(), "query starting");
    rollcall::api::serve(router(Arc::new(api)), args.listen, "query").await?;
    Ok(())
}
