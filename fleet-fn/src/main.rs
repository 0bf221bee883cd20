//! rollcall fleet: keeps the fleet's sums that `/metrics` reads, from the
//! agents table's DynamoDB stream (docs/dynamodb.md, "Fleet sums").
//!
//! It runs only inside AWS Lambda, fed by the stream's event source
//! mapping; the embedded SQLite store sums its records when asked and needs
//! no such function.

use anyhow::Context;
use clap::Parser;
use lambda_runtime::{LambdaEvent, service_fn};
use rollcall::store::dynamodb::DynamoStore;
use rollcall::store::dynamodb::fleet::{FleetTable, StreamBatch};
use serde_json::{Value, json};

/// rollcall fleet: adds each change to the agents table (from its DynamoDB
/// stream) to the fleet's sums by pool, which `GET /metrics` reads instead
/// of reading every agent.
///
/// Runs inside AWS Lambda only (AWS_LAMBDA_RUNTIME_API set), deployed by
/// infra/template.yaml.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// The table of fleet sums.
    #[arg(long, env = "ROLLCALL_FLEET_TABLE", default_value = "rollcall-fleet")]
    fleet_table: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rollcall::logging::init();
    let args = Args::parse();
    if !rollcall::api::in_lambda() {
        anyhow::bail!(
            "rollcall-fleet runs inside AWS Lambda, fed by the agents table's stream (infra/template.yaml); the embedded store needs no fleet function"
        );
    }
    // Built once: the client pools its connections across invocations.
    let table = FleetTable::new(DynamoStore::client_from_env().await, args.fleet_table);
    tracing::info!(fleet_table = table.name(), "fleet starting");
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| {
        let table = table.clone();
        async move {
            tally(&table, &event.payload)
                .await
                .map_err(|error| lambda_runtime::Error::from(format!("{error:#}")))
        }
    }))
    .await
    .map_err(|error| anyhow::anyhow!("the Lambda runtime stopped: {error}"))
}

/// One batch of the stream. An error makes Lambda deliver the same batch
/// again, whose transactions' tokens then keep it from counting twice.
async fn tally(table: &FleetTable, event: &Value) -> anyhow::Result<Value> {
    let batch = StreamBatch::from_event(event)
        .map_err(|why| anyhow::anyhow!("not a DynamoDB stream event: {why}"))?;
    let buckets = table
        .apply(&batch)
        .await
        .with_context(|| format!("adding {} changes to the fleet sums", batch.changes.len()))?;
    tracing::info!(changes = batch.changes.len(), buckets, "fleet sums updated");
    Ok(json!({}))
}
