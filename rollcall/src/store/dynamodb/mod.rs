//! The production store: one DynamoDB item per agent.
//!
//! - [`item`]: the item an agent becomes, the capacity index's keys, sizes.
//! - [`query`]: capacity queries, candidates from the index and answers from the table.
//! - [`history`]: per-minute history, one item per five-minute window.
//! - [`units`]: DynamoDB's capacity units, computed from AWS's rules.
//!
//! A heartbeat is one conditional `PutItem`, one write unit when the item is
//! under 1 KB and its largest free VRAM did not move. DynamoDB's TTL deletes
//! expired items lazily, often days late, so every read checks `expires_at`
//! itself. `docs/dynamodb.md` covers the design, its costs and its limits.

mod history;
mod item;
mod query;
pub mod units;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, ReturnConsumedCapacity, ReturnValue, ScalarAttributeType,
    TimeToLiveSpecification,
};

use super::{Page, Store, StoreError, Upsert};
use crate::capacity::{CapacityQuery, Position};
use crate::heartbeat::MinuteRollup;
use crate::record::StoredAgent;

pub use history::{encode_history, history_key};
use item::{A_AGENT, A_EXACT, A_FREE_VRAM, A_POOL, A_RANK, A_SENT, A_SHARD, decode, number};
pub use item::{
    CAPACITY_INDEX, FV_SLACK_MB, INDEX_NAME, IndexedVram, Item, TABLE_KEY, TTL_ATTRIBUTE, encode,
    encode_indexed, item_size, rank_key, set_index_figure, shard_of,
};
use units::{WriteUnits, read_units, write_units};

#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    shards: u32,
}

/// What one heartbeat cost: the write's units computed by the unit model
/// from the item before and after, what DynamoDB reported for the table
/// (emulators report the table only, if at all), and the read units of the
/// look at the index figure before the write.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WriteCost {
    pub computed: WriteUnits,
    pub reported_table: Option<f64>,
    pub read_units: f64,
}

/// What a capacity query read, by DynamoDB's billing rules: an index `Query`
/// by the bytes of the entries it returns, a `BatchGetItem` per item, each
/// rounded up to 4 KB, eventually consistent at half a unit per 4 KB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReadCost {
    pub requests: u32,
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
        }
    }

    /// A client from the standard AWS configuration chain. It honours
    /// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_DYNAMODB`, so the same binary talks to
    /// AWS, LocalStack or ministack.
    pub async fn client_from_env() -> Client {
        Client::new(&crate::aws::sdk_config().await)
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
        let attribute = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build_error)
        };
        let key = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(build_error)
        };
        self.client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute(A_AGENT)?)
            .attribute_definitions(attribute(A_SHARD)?)
            .attribute_definitions(attribute(A_RANK)?)
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
            .send()
            .await
            .map_err(unavailable)?;
        self.client
            .update_time_to_live()
            .table_name(&self.table)
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

    /// The figure the agent's index entry holds now, if it can be read. An
    /// eventually consistent read costs a tenth of a write, and it saves one
    /// whenever the entry can stay as it is. A stale answer is harmless: the
    /// entry is only kept when it is within the slack of the new figure.
    async fn indexed_figure(&self, agent_id: &str) -> (Option<Item>, f64) {
        let read = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(A_AGENT, AttributeValue::S(agent_id.to_owned()))
            .projection_expression("#fv")
            .expression_attribute_names("#fv", A_FREE_VRAM)
            .send()
            .await;
        match read {
            // Billed by the whole item (at most 4 KB), whatever is projected.
            Ok(output) => (output.item().cloned(), units::read_units(1, false)),
            Err(error) => {
                // Only an optimisation: the write goes ahead with an exact figure.
                tracing::debug!(agent_id, error = %DisplayErrorContext(&error), "index figure unread");
                (None, 0.0)
            }
        }
    }

    /// The conditional write, with what it cost. The old item comes back with
    /// the write (`ALL_OLD` costs nothing extra), so the units are computed
    /// from exactly the two versions DynamoDB billed.
    pub async fn upsert_measured(
        &self,
        agent: &StoredAgent,
    ) -> Result<(Upsert, WriteCost), StoreError> {
        let (stored, read_units) = self.indexed_figure(agent.agent_id()).await;
        let vram = IndexedVram::choose(agent.heartbeat.gpu_free_max_mb(), stored.as_ref());
        let item = encode_indexed(agent, self.shards, vram)?;
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item.clone()))
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
                    computed: write_units(TABLE_KEY, output.attributes(), &item, &[CAPACITY_INDEX]),
                    reported_table: output
                        .consumed_capacity()
                        .and_then(|c| c.table())
                        .and_then(|t| t.capacity_units())
                        .or_else(|| output.consumed_capacity().and_then(|c| c.capacity_units())),
                    read_units,
                };
                Ok((Upsert::Written, cost))
            }
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                // A failed condition still bills the table write, and
                // changes no index.
                let cost = WriteCost {
                    computed: write_units(TABLE_KEY, None, &item, &[]),
                    reported_table: None,
                    read_units,
                };
                Ok((Upsert::Stale, cost))
            }
            Err(error) => Err(unavailable(error)),
        }
    }
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
        let agent = decode(item)?;
        Ok((!agent.is_expired(now_ms)).then_some(agent))
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

    /// DynamoDB's TTL deletes expired items itself; reads already hide them.
    async fn prune(&self, _now_ms: i64) -> Result<u64, StoreError> {
        Ok(0)
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
}

fn unavailable<E: std::error::Error + 'static, R: std::fmt::Debug>(
    error: SdkError<E, R>,
) -> StoreError {
    StoreError::Unavailable(DisplayErrorContext(&error).to_string())
}

fn build_error(error: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::Unavailable(format!("invalid DynamoDB request: {error}"))
}
