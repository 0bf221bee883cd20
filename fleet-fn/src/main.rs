//! rollcall fleet: what happens to the fleet over time, off the request
//! path (docs/dynamodb.md, "Fleet sums" and "State changes").
//!
//! - Fed by the agents table's DynamoDB stream, it keeps the fleet's sums
//!   that `/metrics` reads and records each agent's transitions (events and
//!   availability) from the old and new image of every change.
//! - Invoked by a schedule once a minute, it sweeps: agents whose deadline
//!   passed are marked offline, which the stream then records as their
//!   `offline` at the deadline.
//! - Fed by the events table's stream (as the stack's webhook function), it
//!   POSTs each event to the configured webhook URLs, in order; a batch that
//!   cannot all go yet fails, and Lambda delivers it again.
//!
//! It runs only inside AWS Lambda; the embedded SQLite store sums its
//! records when asked and sweeps inside the ingest process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use lambda_runtime::{LambdaEvent, service_fn};
use rollcall::store::dynamodb::DynamoStore;
use rollcall::store::dynamodb::changes::{ChangeRecorder, EventsTable, events_of};
use rollcall::store::dynamodb::fleet::{FleetTable, StreamBatch};
use rollcall::store::{DEFAULT_SHARDS, Store};
use rollcall::time::now_ms;
use rollcall::webhooks::Dispatcher;
use serde_json::{Value, json};

/// rollcall fleet: adds each change to the agents table (from its DynamoDB
/// stream) to the fleet's sums by pool, which `GET /metrics` reads instead
/// of reading every agent, and records the agents' state changes; on a
/// schedule, marks agents whose deadline passed offline.
///
/// Runs inside AWS Lambda only (AWS_LAMBDA_RUNTIME_API set), deployed by
/// infra/template.yaml.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// The table of fleet sums.
    #[arg(long, env = "ROLLCALL_FLEET_TABLE", default_value = "rollcall-fleet")]
    fleet_table: String,
    /// The agents table (swept for deadlines; its availability kept).
    #[arg(long, env = "ROLLCALL_TABLE", default_value = "rollcall-agents")]
    table: String,
    /// Shards of the agents table's indexes; as ingest and query have it.
    #[arg(long, env = "ROLLCALL_DYNAMODB_SHARDS", default_value_t = DEFAULT_SHARDS, value_parser = clap::value_parser!(u32).range(1..=64))]
    shards: u32,
    /// The table of the agents' state changes.
    #[arg(long, env = "ROLLCALL_EVENTS_TABLE", default_value = "rollcall-events")]
    events_table: String,
    /// Where to POST each state change (https://..., slack: prefix for
    /// Slack), comma-separated; none: no webhooks. The signing secret is
    /// ROLLCALL_WEBHOOK_SECRET_SECRET_ID's (or ROLLCALL_WEBHOOK_SECRET's).
    #[arg(
        long = "webhook-url",
        env = "ROLLCALL_WEBHOOK_URLS",
        default_value = ""
    )]
    webhook_urls: String,
    /// An offline followed by an online within this many seconds sends neither.
    #[arg(long, env = "ROLLCALL_WEBHOOK_GRACE_S", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
    webhook_grace_s: u64,
}

/// How long one scheduled sweep keeps going while agents are still due.
const SWEEP_BUDGET: Duration = Duration::from_secs(20);

#[derive(Clone)]
struct Fleet {
    sums: FleetTable,
    changes: ChangeRecorder,
    agents: DynamoStore,
    events: EventsTable,
    webhooks: Option<Arc<Dispatcher>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rollcall::logging::init();
    let args = Args::parse();
    if !rollcall::api::in_lambda() {
        anyhow::bail!(
            "rollcall-fleet runs inside AWS Lambda, fed by the agents table's stream and a schedule (infra/template.yaml); the embedded store needs no fleet function"
        );
    }
    // Built once: the client pools its connections across invocations.
    let client = DynamoStore::client_from_env().await;
    let events = EventsTable::new(client.clone(), &args.events_table);
    let fleet = Fleet {
        sums: FleetTable::new(client.clone(), &args.fleet_table),
        changes: ChangeRecorder::new(client.clone(), &args.table, events.clone()),
        agents: DynamoStore::new(client, &args.table, args.shards).with_events(events.clone()),
        events,
        webhooks: Dispatcher::configured(
            &args.webhook_urls,
            Duration::from_secs(args.webhook_grace_s),
        )
        .await
        .map_err(anyhow::Error::msg)?
        .map(Arc::new),
    };
    tracing::info!(
        fleet_table = fleet.sums.name(),
        table = args.table,
        events_table = args.events_table,
        "fleet starting"
    );
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| {
        let fleet = fleet.clone();
        async move {
            handle(&fleet, &event.payload)
                .await
                .map_err(|error| lambda_runtime::Error::from(format!("{error:#}")))
        }
    }))
    .await
    .map_err(|error| anyhow::anyhow!("the Lambda runtime stopped: {error}"))
}

/// The table whose stream a batch comes from.
fn source_table(event: &Value) -> Option<&str> {
    let arn = event["Records"].get(0)?["eventSourceARN"].as_str()?;
    arn.split_once(":table/")?.1.split('/').next()
}

async fn handle(fleet: &Fleet, event: &Value) -> anyhow::Result<Value> {
    if event.get("Records").is_some() {
        // Both tables' streams reach this function; the batch says whose.
        if source_table(event) == Some(fleet.events.name()) {
            deliver(fleet, event).await
        } else {
            stream_batch(fleet, event).await
        }
    } else if event.get("source").and_then(Value::as_str) == Some("aws.events") {
        sweep(&fleet.agents).await
    } else {
        anyhow::bail!("neither a DynamoDB stream batch nor an EventBridge scheduled event")
    }
}

/// One batch of the stream. An error makes Lambda deliver the same batch
/// again: the sums' transaction tokens keep it from counting twice, events
/// are keyed, and availability skips events it already holds.
async fn stream_batch(fleet: &Fleet, event: &Value) -> anyhow::Result<Value> {
    let batch = StreamBatch::from_event(event)
        .map_err(|why| anyhow::anyhow!("not a DynamoDB stream event: {why}"))?;
    let recorded = fleet
        .changes
        .record(&batch.changes)
        .await
        .with_context(|| {
            format!(
                "recording the state changes in {} changes",
                batch.changes.len()
            )
        })?;
    let buckets = fleet
        .sums
        .apply(&batch)
        .await
        .with_context(|| format!("adding {} changes to the fleet sums", batch.changes.len()))?;
    tracing::info!(
        changes = batch.changes.len(),
        buckets,
        events = recorded.events,
        agents_with_events = recorded.agents,
        "fleet sums and state changes updated"
    );
    Ok(json!({}))
}

/// One batch of the events table's stream, to every webhook URL in order.
/// An event that cannot go yet fails the batch: Lambda delivers it again
/// (until the record is a day old), so none is lost and none overtakes
/// another; what went before it may go twice, under the same webhook-id.
async fn deliver(fleet: &Fleet, event: &Value) -> anyhow::Result<Value> {
    let Some(dispatcher) = &fleet.webhooks else {
        return Ok(json!({}));
    };
    let batch = StreamBatch::from_event(event)
        .map_err(|why| anyhow::anyhow!("not a DynamoDB stream event: {why}"))?;
    let events = events_of(&batch.changes);
    let delivered = dispatcher
        .deliver_in_order(&events, &fleet.events)
        .await
        .map_err(|why| anyhow::anyhow!("webhooks: {why}; the batch will come again"))?;
    tracing::info!(delivered, "webhooks delivered");
    Ok(json!({ "delivered": delivered }))
}

/// Marks agents whose deadline passed, a bounded read at a time, while
/// more are due and the budget lasts.
async fn sweep(agents: &DynamoStore) -> anyhow::Result<Value> {
    let started = Instant::now();
    let mut marked = 0;
    loop {
        let sweep = agents
            .sweep(now_ms())
            .await
            .context("sweeping for deadlines")?;
        marked += sweep.marked;
        if !sweep.more || started.elapsed() >= SWEEP_BUDGET {
            if sweep.more {
                tracing::warn!(
                    marked,
                    "more agents are due than one sweep marks; the next sweep goes on"
                );
            }
            break;
        }
    }
    tracing::info!(marked, "deadline sweep done");
    Ok(json!({ "marked": marked }))
}
