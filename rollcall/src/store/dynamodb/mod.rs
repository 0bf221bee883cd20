//! The production store: one DynamoDB item per agent.
//!
//! - `item`: the item an agent becomes, the capacity index's keys, sizes.
//! - `query`: capacity queries, candidates from the index and answers from the table.
//! - `history`: per-minute history, one item per five-minute window.
//! - `claims`: claims on GPUs, one item per claimed agent.
//! - `processes`: the newest snapshot of an agent's GPU processes.
//! - [`fleet`]: the fleet's sums for `/metrics`, kept from the table's stream.
//! - [`changes`]: state changes: the deadline sweep, the events table, and
//!   the transitions the table's stream holds.
//! - [`units`]: DynamoDB's capacity units, computed from AWS's rules.
//!
//! A heartbeat is one conditional `PutItem`, one write unit when the item is
//! under 1 KB and its largest free VRAM did not move. DynamoDB's TTL deletes
//! expired items lazily, often days late, so every read checks `expires_at`
//! itself. `docs/dynamodb.md` covers the design, its costs and its limits.

pub mod changes;
mod claims;
pub mod fleet;
mod history;
mod item;
mod processes;
mod query;
pub use query::PageBudget;
pub mod units;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, ReturnConsumedCapacity, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TimeToLiveSpecification,
};

use super::{Page, Store, StoreError, Sweep, Upsert};
use crate::capacity::{CapacityQuery, Position};
use crate::changes::Event;
use crate::claims::{AgentClaims, Claim, ClaimId};
use crate::fleet::FleetTotals;
use crate::heartbeat::{GpuProcesses, MinuteRollup};
use crate::record::StoredAgent;
use changes::{A_DEADLINE, DEADLINE_INDEX, DEADLINE_INDEX_NAME, EventsTable};

pub use history::{encode_history, history_key};
use item::{
    A_AGENT, A_EXACT, A_LEGACY_CORES, A_LEGACY_FREE_VRAM, A_LEGACY_MEMORY, A_LEGACY_RECORD, A_POOL,
    A_RANK, A_RECORD, A_SENT, A_SHARD, A_UNTIL, decode, number, rank_prefix, rank_prefix_end,
};
pub use item::{
    CAPACITY_INDEX, FV_SLACK_MB, INDEX_NAME, IndexedVram, Item, TABLE_KEY, TTL_ATTRIBUTE, encode,
    encode_indexed, item_size, parse_rank, partition_key, rank_key, set_index_figure, shard_of,
};
use units::{WriteUnits, read_units, write_units};

#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    shards: u32,
    fleet: Option<fleet::FleetTable>,
    events: Option<EventsTable>,
}

/// Every index of the agents table, as the unit model sees them.
pub const INDEXES: &[units::IndexShape] = &[CAPACITY_INDEX, DEADLINE_INDEX];

/// What one heartbeat cost: the writes' units computed by the unit model
/// from the item before and after (a failed condition included), what
/// DynamoDB reported for the last write's table (emulators report the table
/// only, if at all), and how many writes failed their condition.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WriteCost {
    pub computed: WriteUnits,
    pub reported_table: Option<f64>,
    pub conditional_failures: u32,
}

/// What a capacity query read, by DynamoDB's billing rules: an index `Query`
/// by the bytes of the entries it returns, a `BatchGetItem` per item, each
/// rounded up to 4 KB, eventually consistent at half a unit per 4 KB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReadCost {
    pub requests: u32,
    /// Keys asked for by key (found or not), where that was counted.
    pub requested: u64,
    pub index_entries: u64,
    pub items_read: u64,
    pub units: f64,
    /// What DynamoDB reported, where it did (emulators often report a flat
    /// figure per request).
    pub reported_units: Option<f64>,
}

impl ReadCost {
    fn add_index_read(&mut self, entries: usize, units: f64, reported: Option<f64>) {
        self.requests += 1;
        self.index_entries += entries as u64;
        self.units += units;
        self.add_reported(reported);
    }

    fn add_table_read(&mut self, items: &[Item], reported: Option<f64>) {
        self.requests += 1;
        self.items_read += items.len() as u64;
        self.units += items
            .iter()
            .map(|item| read_units(item_size(item), false))
            .sum::<f64>();
        self.add_reported(reported);
    }

    fn merge(&mut self, other: &ReadCost) {
        self.requests += other.requests;
        self.requested += other.requested;
        self.index_entries += other.index_entries;
        self.items_read += other.items_read;
        self.units += other.units;
        if let Some(units) = other.reported_units {
            self.add_reported(Some(units));
        }
    }

    fn add_reported(&mut self, reported: Option<f64>) {
        if let Some(units) = reported {
            self.reported_units = Some(self.reported_units.unwrap_or(0.0) + units);
        }
    }
}

impl DynamoStore {
    /// `client` should be built once per process (it pools connections).
    pub fn new(client: Client, table: impl Into<String>, shards: u32) -> Self {
        Self {
            client,
            table: table.into(),
            shards: shards.max(1),
            fleet: None,
            events: None,
        }
    }

    /// Where the agents' state changes are read (`GET .../events`).
    pub fn with_events(mut self, events: EventsTable) -> Self {
        self.events = Some(events);
        self
    }

    /// Where `/metrics` reads the fleet's sums (`fleet`); without one it
    /// answers that the store cannot, rather than read every agent.
    pub fn with_fleet(mut self, fleet: fleet::FleetTable) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// A client from the standard AWS configuration chain. It honours
    /// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_DYNAMODB`, so the same binary talks to
    /// AWS, LocalStack or ministack.
    pub async fn client_from_env() -> Client {
        Client::new(crate::aws::sdk_config().await)
    }

    /// How many shards the capacity index is spread over.
    pub fn index_shards(&self) -> u32 {
        self.shards
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table, its index and its TTL, as `infra/template.yaml` does;
    /// for local runs and tests.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        self.client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute(A_AGENT)?)
            .attribute_definitions(attribute(A_SHARD)?)
            .attribute_definitions(attribute(A_RANK)?)
            .attribute_definitions(changes::deadline_attribute()?)
            .key_schema(key(A_AGENT, KeyType::Hash)?)
            .global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(INDEX_NAME)
                    .key_schema(key(A_SHARD, KeyType::Hash)?)
                    .key_schema(key(A_RANK, KeyType::Range)?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::Include)
                            .non_key_attributes(A_EXACT)
                            .non_key_attributes(A_POOL)
                            .build(),
                    )
                    .build()
                    .map_err(build_error)?,
            )
            .global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(DEADLINE_INDEX_NAME)
                    .key_schema(key(A_SHARD, KeyType::Hash)?)
                    .key_schema(key(A_DEADLINE, KeyType::Range)?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::KeysOnly)
                            .build(),
                    )
                    .build()
                    .map_err(build_error)?,
            )
            .send()
            .await
            .map_err(unavailable)?;
        enable_ttl(&self.client, &self.table).await
    }

    /// The write, with what it cost. Most heartbeats leave the agent's index
    /// entry as it is, so the write first asks for exactly that, with no read
    /// before it: an `UpdateItem` of everything but the entry, on condition
    /// that the stored entry still places the agent. When it does not (a job
    /// started or ended, the agent came back or left, or it is new), the
    /// failed condition hands back the stored item at no cost, and one
    /// `PutItem` writes the entry `IndexedVram::choose` picks from it.
    pub async fn upsert_measured(
        &self,
        agent: &StoredAgent,
    ) -> Result<(Upsert, WriteCost), StoreError> {
        let free_mb = agent.heartbeat.max_gpu_free_mb();
        // The entry the update keeps is the stored one; the figure written
        // here only stands in for it in the item that computes the units.
        let kept = encode_indexed(agent, self.shards, IndexedVram::exact(free_mb))?;
        let stored = match self.update_keeping_entry(agent, &kept).await {
            Ok(old) => {
                let mut new = kept;
                if let Some(vram) = old.as_ref().and_then(IndexedVram::of_item) {
                    set_index_figure(&mut new, agent.agent_id(), vram);
                }
                let cost = WriteCost {
                    computed: write_units(TABLE_KEY, old.as_ref(), &new, INDEXES),
                    ..WriteCost::default()
                };
                return Ok((Upsert::Written, cost));
            }
            Err(KeepFailed::Condition(stored)) => stored,
            Err(KeepFailed::Unavailable(error)) => return Err(error),
        };
        // A failed condition still bills the table write, and changes no index.
        let failed_units = write_units(TABLE_KEY, None, &kept, &[]).table;
        let newer_stored = stored.as_ref().is_some_and(|old| {
            let sent = old
                .get(A_SENT)
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse::<u64>().ok());
            let expires = old
                .get(TTL_ATTRIBUTE)
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse::<i64>().ok());
            sent.is_some_and(|sent| sent >= agent.heartbeat.sent_at_ms)
                && expires.is_some_and(|expires| expires > agent.received_at_ms.div_euclid(1000))
        });
        if newer_stored {
            let cost = WriteCost {
                conditional_failures: 1,
                computed: WriteUnits {
                    table: failed_units,
                    indexes: 0,
                },
                ..WriteCost::default()
            };
            return Ok((Upsert::Stale, cost));
        }
        let vram = IndexedVram::choose(free_mb, stored.as_ref().and_then(IndexedVram::of_item));
        let item = encode_indexed(agent, self.shards, vram)?;
        let (outcome, mut cost) = self.put_newer(agent, item).await?;
        cost.conditional_failures += 1;
        cost.computed.table += failed_units;
        Ok((outcome, cost))
    }

    /// The update that leaves the index entry alone; `Ok` with the old item,
    /// or the stored item (if any) when its entry, part or newness says no.
    async fn update_keeping_entry(
        &self,
        agent: &StoredAgent,
        new: &Item,
    ) -> Result<Option<Item>, KeepFailed> {
        let free_mb = agent.heartbeat.max_gpu_free_mb();
        let value = |name: &str| {
            new.get(name).cloned().ok_or_else(|| {
                KeepFailed::Unavailable(StoreError::Corrupt(format!("encoded item lacks {name}")))
            })
        };
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(A_AGENT, AttributeValue::S(agent.agent_id().to_owned()))
            .update_expression(if new.contains_key(A_DEADLINE) {
                "SET #sent = :sent, #until = :until, #expires = :expires, #pool = :pool, \
                 #rec = :rec, #dl = :dl REMOVE #legacy, #legacy_rec, #legacy_cores, #legacy_mem"
            } else {
                "SET #sent = :sent, #until = :until, #expires = :expires, #pool = :pool, \
                 #rec = :rec REMOVE #legacy, #legacy_rec, #legacy_cores, #legacy_mem, #dl"
            })
            .condition_expression(
                "(#sent < :sent OR #expires <= :now_s) AND #shard = :shard \
                 AND (#rank = :exact_rank OR (#fx = :inexact AND #rank BETWEEN :from AND :to))",
            )
            .expression_attribute_names("#legacy", A_LEGACY_FREE_VRAM)
            .expression_attribute_names("#legacy_rec", A_LEGACY_RECORD)
            .expression_attribute_names("#legacy_cores", A_LEGACY_CORES)
            .expression_attribute_names("#legacy_mem", A_LEGACY_MEMORY)
            .expression_attribute_names("#shard", A_SHARD)
            .expression_attribute_names("#rank", A_RANK)
            .expression_attribute_names("#fx", A_EXACT)
            .expression_attribute_values(":now_s", number(agent.received_at_ms.div_euclid(1000)))
            .expression_attribute_values(":shard", value(A_SHARD)?)
            .expression_attribute_values(
                ":exact_rank",
                AttributeValue::S(rank_key(IndexedVram::exact(free_mb), agent.agent_id())),
            )
            .expression_attribute_values(":inexact", AttributeValue::Bool(false))
            // Inexact entries that still hold the figure: upper bounds from
            // the figure to twice the slack above it.
            .expression_attribute_values(
                ":from",
                AttributeValue::S(rank_prefix(free_mb.saturating_add(2 * FV_SLACK_MB))),
            )
            .expression_attribute_values(":to", AttributeValue::S(rank_prefix_end(free_mb)))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        for (placeholder, name) in [
            ("sent", A_SENT),
            ("until", A_UNTIL),
            ("expires", TTL_ATTRIBUTE),
            ("pool", A_POOL),
            ("rec", A_RECORD),
            // A leaving agent has no deadline to watch; its part changes,
            // so this update's condition fails and the whole write follows.
            ("dl", A_DEADLINE),
        ] {
            if name == A_DEADLINE && !new.contains_key(A_DEADLINE) {
                update = update.expression_attribute_names("#dl", A_DEADLINE);
                continue;
            }
            update = update
                .expression_attribute_names(format!("#{placeholder}"), name)
                .expression_attribute_values(format!(":{placeholder}"), value(name)?);
        }
        match update.send().await {
            Ok(output) => Ok(output.attributes().cloned()),
            Err(error) => match error.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    Err(KeepFailed::Condition(failed.item().cloned()))
                }
                _ => Err(KeepFailed::Unavailable(unavailable(error))),
            },
        }
    }

    /// The whole record and entry, written unless the stored record is as
    /// new or newer. An `UpdateItem` of every attribute rather than a
    /// `PutItem`, so that what others keep on the item (the availability
    /// the stream consumer writes) survives it. The old item comes back with
    /// the write (`ALL_OLD` costs nothing extra), so the units are computed
    /// from exactly the two versions DynamoDB billed.
    async fn put_newer(
        &self,
        agent: &StoredAgent,
        item: Item,
    ) -> Result<(Upsert, WriteCost), StoreError> {
        let mut sets = Vec::new();
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(A_AGENT, AttributeValue::S(agent.agent_id().to_owned()));
        for (position, (name, value)) in
            item.iter().filter(|(name, _)| *name != A_AGENT).enumerate()
        {
            sets.push(format!("#a{position} = :a{position}"));
            update = update
                .expression_attribute_names(format!("#a{position}"), name)
                .expression_attribute_values(format!(":a{position}"), value.clone());
        }
        let mut removes = vec!["#legacy", "#legacy_rec", "#legacy_cores", "#legacy_mem"];
        if !item.contains_key(A_DEADLINE) {
            removes.push("#dl");
            update = update.expression_attribute_names("#dl", A_DEADLINE);
        }
        let result = update
            .update_expression(format!(
                "SET {} REMOVE {}",
                sets.join(", "),
                removes.join(", ")
            ))
            .expression_attribute_names("#legacy", A_LEGACY_FREE_VRAM)
            .expression_attribute_names("#legacy_rec", A_LEGACY_RECORD)
            .expression_attribute_names("#legacy_cores", A_LEGACY_CORES)
            .expression_attribute_names("#legacy_mem", A_LEGACY_MEMORY)
            // An expired item is gone (TTL deletes lazily), whatever its sent_at_ms.
            .condition_expression(
                "attribute_not_exists(#agent) OR #sent < :sent OR #expires <= :now_s",
            )
            .expression_attribute_names("#agent", A_AGENT)
            .expression_attribute_names("#sent", A_SENT)
            .expression_attribute_names("#expires", TTL_ATTRIBUTE)
            .expression_attribute_values(":sent", number(agent.heartbeat.sent_at_ms))
            .expression_attribute_values(":now_s", number(agent.received_at_ms.div_euclid(1000)))
            .return_values(ReturnValue::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
            .send()
            .await;
        match result {
            Ok(output) => {
                let cost = WriteCost {
                    computed: write_units(TABLE_KEY, output.attributes(), &item, INDEXES),
                    reported_table: output
                        .consumed_capacity()
                        .and_then(|c| c.table())
                        .and_then(|t| t.capacity_units())
                        .or_else(|| output.consumed_capacity().and_then(|c| c.capacity_units())),
                    conditional_failures: 0,
                };
                Ok((Upsert::Written, cost))
            }
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                let cost = WriteCost {
                    computed: write_units(TABLE_KEY, None, &item, &[]),
                    reported_table: None,
                    conditional_failures: 1,
                };
                Ok((Upsert::Stale, cost))
            }
            Err(error) => Err(unavailable(error)),
        }
    }
}

/// What the store's write does to an agent's item, by the unit model, for
/// simulators and tests: the item written and what it costs, given the item
/// before (the update that keeps the entry when it still places the agent,
/// else a failed condition and a whole put).
pub fn modelled_write(
    previous: Option<&Item>,
    agent: &StoredAgent,
    shards: u32,
) -> Result<(Item, WriteUnits), StoreError> {
    let free_mb = agent.heartbeat.max_gpu_free_mb();
    let stored = previous.and_then(IndexedVram::of_item);
    let mut item = encode_indexed(agent, shards, IndexedVram::exact(free_mb))?;
    let same_part = previous.and_then(|old| old.get(A_SHARD)) == item.get(A_SHARD);
    if let Some(vram) = stored.filter(|vram| same_part && vram.holds(free_mb)) {
        set_index_figure(&mut item, agent.agent_id(), vram);
        let units = write_units(TABLE_KEY, previous, &item, INDEXES);
        return Ok((item, units));
    }
    let failed = write_units(TABLE_KEY, None, &item, &[]).table;
    set_index_figure(
        &mut item,
        agent.agent_id(),
        IndexedVram::choose(free_mb, stored),
    );
    let mut units = write_units(TABLE_KEY, previous, &item, INDEXES);
    units.table += failed;
    Ok((item, units))
}

/// Why the update that keeps the entry did not happen.
enum KeepFailed {
    /// The condition failed; the stored item, if there is one.
    Condition(Option<Item>),
    Unavailable(StoreError),
}

#[async_trait]
impl Store for DynamoStore {
    async fn upsert(&self, agent: StoredAgent) -> Result<Upsert, StoreError> {
        let (outcome, cost) = self.upsert_measured(&agent).await?;
        tracing::debug!(
            agent_id = agent.agent_id(),
            table_units = cost.computed.table,
            index_units = cost.computed.indexes,
            ?outcome,
            "dynamodb upsert"
        );
        Ok(outcome)
    }

    async fn get(&self, agent_id: &str, now_ms: i64) -> Result<Option<StoredAgent>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(A_AGENT, AttributeValue::S(agent_id.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        let Some(item) = output.item() else {
            return Ok(None);
        };
        let mut agent = decode(item)?;
        if agent.is_expired(now_ms) {
            return Ok(None);
        }
        agent.claims = self.read_claims(agent_id, now_ms).await?;
        Ok(Some(agent))
    }

    async fn query(
        &self,
        query: &CapacityQuery,
        after: Option<&Position>,
        now_ms: i64,
    ) -> Result<Page, StoreError> {
        let (page, cost) = self.query_measured(query, after, now_ms).await?;
        tracing::debug!(
            read_units = cost.units,
            index_entries = cost.index_entries,
            items_read = cost.items_read,
            matches = page.agents.len(),
            "dynamodb capacity query"
        );
        Ok(page)
    }

    async fn fleet(&self, now_ms: i64) -> Result<FleetTotals, StoreError> {
        match &self.fleet {
            Some(fleet) => fleet.read(now_ms).await,
            None => Err(StoreError::Unavailable(
                "no fleet table configured (ROLLCALL_FLEET_TABLE)".into(),
            )),
        }
    }

    /// DynamoDB's TTL deletes expired items itself; reads already hide them.
    async fn prune(&self, _now_ms: i64) -> Result<u64, StoreError> {
        Ok(0)
    }

    async fn claims(&self, agent_id: &str, now_ms: i64) -> Result<AgentClaims, StoreError> {
        self.read_claims(agent_id, now_ms).await
    }

    async fn put_claim(&self, claim: &Claim, now_ms: i64) -> Result<bool, StoreError> {
        self.write_claim(claim, now_ms).await
    }

    async fn extend_claim(
        &self,
        claim_id: &ClaimId,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<Option<Claim>, StoreError> {
        self.extend(claim_id, expires_at_ms, now_ms).await
    }

    async fn release_claim(&self, claim_id: &ClaimId, _now_ms: i64) -> Result<(), StoreError> {
        self.release(claim_id).await
    }

    async fn put_processes(
        &self,
        agent_id: &str,
        processes: &GpuProcesses,
        expires_at_s: i64,
    ) -> Result<(), StoreError> {
        self.write_processes(agent_id, processes, expires_at_s)
            .await
    }

    async fn processes(
        &self,
        agent_id: &str,
        now_ms: i64,
    ) -> Result<Option<GpuProcesses>, StoreError> {
        self.read_processes(agent_id, now_ms).await
    }

    async fn processes_of(
        &self,
        agent_ids: &[String],
        now_ms: i64,
    ) -> Result<Vec<(String, GpuProcesses)>, StoreError> {
        self.read_processes_of(agent_ids, now_ms).await
    }

    async fn put_history(
        &self,
        agent_id: &str,
        minutes: Vec<MinuteRollup>,
        expires_at_s: i64,
    ) -> Result<(), StoreError> {
        self.write_history(agent_id, minutes, expires_at_s).await
    }

    async fn history(
        &self,
        agent_id: &str,
        since_minute: u64,
        now_ms: i64,
    ) -> Result<Vec<MinuteRollup>, StoreError> {
        self.read_history(agent_id, since_minute, now_ms).await
    }

    async fn events(
        &self,
        agent_id: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<Event>, StoreError> {
        self.read_events(agent_id, after, limit, now_ms).await
    }

    async fn sweep(&self, now_ms: i64) -> Result<Sweep, StoreError> {
        self.sweep_due(now_ms).await
    }
}

fn unavailable<E: std::error::Error + 'static, R: std::fmt::Debug>(
    error: SdkError<E, R>,
) -> StoreError {
    StoreError::Unavailable(DisplayErrorContext(&error).to_string())
}

/// A string attribute for a table's or an index's key.
fn attribute(name: &str) -> Result<AttributeDefinition, StoreError> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(build_error)
}

fn key(name: &str, kind: KeyType) -> Result<KeySchemaElement, StoreError> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(build_error)
}

/// TTL on `expires_at`, as the template declares it for both tables.
/// Creates an on-demand table keyed by two strings, `hash` and `range`, with
/// its TTL on, as `infra/template.yaml` does; for local runs and tests.
async fn create_hash_range_table(
    client: &Client,
    table: &str,
    hash: &str,
    range: &str,
) -> Result<(), StoreError> {
    client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(hash)?)
        .attribute_definitions(attribute(range)?)
        .key_schema(key(hash, KeyType::Hash)?)
        .key_schema(key(range, KeyType::Range)?)
        .send()
        .await
        .map_err(unavailable)?;
    enable_ttl(client, table).await
}

async fn enable_ttl(client: &Client, table: &str) -> Result<(), StoreError> {
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name(TTL_ATTRIBUTE)
                .enabled(true)
                .build()
                .map_err(build_error)?,
        )
        .send()
        .await
        .map_err(unavailable)?;
    Ok(())
}

fn build_error(error: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::Unavailable(format!("invalid DynamoDB request: {error}"))
}
