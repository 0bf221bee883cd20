//! The production store: one DynamoDB item per agent.
//!
//! The item holds the indexed figures as attributes and the full record as
//! a deflated JSON blob. With two GPUs the item stays under 1 KB, so a
//! heartbeat costs one write unit on the table.
//!
//! Capacity queries read a global secondary index (`by_free_vram`). Its
//! partition key is a shard number: each agent is hashed to one of `shards`
//! fixed values, which keeps heartbeat writes from landing on one hot
//! partition. Its sort key `rank` is `<9999999999 − largest free VRAM in
//! MiB, 10 digits>#<agent id>`, so ascending rank is exactly answer order.
//! A query sends one key condition per shard: `rank` runs from the cursor up
//! to the VRAM bound. The shards' answers are merged in rank order. The
//! reads therefore grow with the agents that have enough free VRAM, not with
//! the fleet. Filters on status, cores, memory and pool are applied on the
//! server. Labels and per-vendor GPU counts are checked in
//! `CapacityQuery::matches`, which has the final word as in every store.
//!
//! DynamoDB's TTL deletes expired items lazily, often days late, so every
//! read filters on `expires_at` itself. `docs/dynamodb.md` covers the
//! design, its costs and its limits.

use std::collections::{HashMap, VecDeque};
use std::io::Read as _;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, ReturnConsumedCapacity, ScalarAttributeType,
    TimeToLiveSpecification,
};

use super::{Page, Store, StoreError, Upsert};
use crate::capacity::{CapacityQuery, Position, StatusFilter, answer_order};
use crate::heartbeat::MinuteRollup;
use crate::record::StoredAgent;

pub const INDEX_NAME: &str = "by_free_vram";
pub const TTL_ATTRIBUTE: &str = "expires_at";
const RANK_MAX: u64 = 9_999_999_999;
/// Items evaluated per Query request.
const MAX_QUERY_BATCH: i32 = 500;

const A_AGENT: &str = "agent_id";
const A_SENT: &str = "sent";
const A_UNTIL: &str = "until";
const A_POOL: &str = "pool";
const A_CORES: &str = "cores";
const A_MEMORY: &str = "mem";
const A_SHARD: &str = "shard";
const A_RANK: &str = "rank";
const A_RECORD: &str = "rec";

#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    shards: u32,
}

/// Capacity units DynamoDB reported for one call (`None` where it reported none).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Consumed {
    /// Table and indexes together: what is billed.
    pub total: Option<f64>,
    /// The table alone.
    pub table: Option<f64>,
}

impl Consumed {
    fn of(capacity: Option<&aws_sdk_dynamodb::types::ConsumedCapacity>) -> Self {
        Self {
            total: capacity.and_then(|c| c.capacity_units()),
            table: capacity
                .and_then(|c| c.table())
                .and_then(|t| t.capacity_units()),
        }
    }
}

/// What a capacity query read. DynamoDB bills a Query by the bytes it
/// evaluates, filtered out or not, in 4 KB steps at 0.5 units each (eventually
/// consistent). Emulators often report a flat figure per request, so the
/// estimate from the evaluated items is kept beside the reported one.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReadCost {
    pub requests: u32,
    /// Items the key conditions selected, before filters: what is billed.
    pub items_evaluated: u64,
    /// Read units as DynamoDB reported them.
    pub reported_units: Option<f64>,
    /// Read units by the billing rule, sizing filtered items like returned ones.
    pub estimated_units: f64,
}

impl ReadCost {
    fn add_request(
        &mut self,
        evaluated: u64,
        returned_bytes: usize,
        returned: usize,
        reported: Option<f64>,
    ) {
        let mean_item_bytes = returned_bytes
            .checked_div(returned)
            .unwrap_or(TYPICAL_ITEM_BYTES);
        let bytes = evaluated as usize * mean_item_bytes;
        self.requests += 1;
        self.items_evaluated += evaluated;
        self.estimated_units += (bytes.div_ceil(4096).max(1)) as f64 * 0.5;
        if let Some(units) = reported {
            self.reported_units = Some(self.reported_units.unwrap_or(0.0) + units);
        }
    }
}

/// A two-GPU agent item, for read estimates when a request returned none.
const TYPICAL_ITEM_BYTES: usize = 700;

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
                            .projection_type(ProjectionType::All)
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

    /// The conditional write, with the write units DynamoDB reports.
    pub async fn upsert_measured(
        &self,
        agent: &StoredAgent,
    ) -> Result<(Upsert, Consumed), StoreError> {
        let item = encode(agent, self.shards)?;
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            // An expired item is gone (TTL deletes lazily), whatever its sent_at_ms.
            .condition_expression(
                "attribute_not_exists(#agent) OR #sent < :sent OR #expires <= :now_s",
            )
            .expression_attribute_names("#agent", A_AGENT)
            .expression_attribute_names("#sent", A_SENT)
            .expression_attribute_names("#expires", TTL_ATTRIBUTE)
            .expression_attribute_values(":sent", number(agent.heartbeat.sent_at_ms))
            .expression_attribute_values(":now_s", number(agent.received_at_ms.div_euclid(1000)))
            .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
            .send()
            .await;
        match result {
            Ok(output) => Ok((Upsert::Written, Consumed::of(output.consumed_capacity()))),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok((Upsert::Stale, Consumed::default()))
            }
            Err(error) => Err(unavailable(error)),
        }
    }

    /// A capacity query, with the read units DynamoDB reports.
    pub async fn query_measured(
        &self,
        query: &CapacityQuery,
        after: Option<&Position>,
        now_ms: i64,
    ) -> Result<(Page, ReadCost), StoreError> {
        let mut consumed = ReadCost::default();
        let Some(plan) = RankRange::new(query, after) else {
            return Ok((
                Page {
                    agents: Vec::new(),
                    next: None,
                },
                consumed,
            ));
        };
        let mut shards: Vec<ShardStream> = (0..self.shards).map(ShardStream::new).collect();
        let mut agents: Vec<StoredAgent> = Vec::new();
        loop {
            for shard in shards.iter_mut() {
                while shard.buffer.is_empty() && !shard.done {
                    self.fetch(shard, query, &plan, after, now_ms, &mut consumed)
                        .await?;
                }
            }
            let next = shards
                .iter()
                .enumerate()
                .filter_map(|(position, shard)| {
                    shard
                        .buffer
                        .front()
                        .map(|agent| (position, Position::of(agent)))
                })
                .min_by(|(_, a), (_, b)| answer_order(a, b));
            let Some((position, _)) = next else {
                return Ok((Page { agents, next: None }, consumed));
            };
            let agent = shards[position].buffer.pop_front().expect("front exists");
            if agents.len() == query.limit {
                let next = agents.last().map(Position::of);
                return Ok((Page { agents, next }, consumed));
            }
            agents.push(agent);
        }
    }

    async fn fetch(
        &self,
        shard: &mut ShardStream,
        query: &CapacityQuery,
        plan: &RankRange,
        after: Option<&Position>,
        now_ms: i64,
        cost: &mut ReadCost,
    ) -> Result<(), StoreError> {
        let mut filters = vec!["#expires > :now_s".to_owned()];
        let mut names: HashMap<String, String> = HashMap::from([
            ("#shard".into(), A_SHARD.into()),
            ("#rank".into(), A_RANK.into()),
            ("#expires".into(), TTL_ATTRIBUTE.into()),
        ]);
        let mut values: HashMap<String, AttributeValue> = HashMap::from([
            (":shard".into(), AttributeValue::S(shard.id.to_string())),
            (":from".into(), AttributeValue::S(plan.from.clone())),
            (":to".into(), AttributeValue::S(plan.to.clone())),
            (":now_s".into(), number(now_ms.div_euclid(1000))),
        ]);
        match query.status {
            StatusFilter::All => {}
            StatusFilter::Online => filters.push("#until > :now_ms".into()),
            StatusFilter::Offline => filters.push("#until <= :now_ms".into()),
        }
        if query.status != StatusFilter::All {
            names.insert("#until".into(), A_UNTIL.into());
            values.insert(":now_ms".into(), number(now_ms));
        }
        if let Some(pool) = &query.pool {
            filters.push("#pool = :pool".into());
            names.insert("#pool".into(), A_POOL.into());
            values.insert(":pool".into(), AttributeValue::S(pool.clone()));
        }
        if let Some(cores) = query.min_cpu_cores {
            filters.push("#cores >= :cores".into());
            names.insert("#cores".into(), A_CORES.into());
            values.insert(":cores".into(), AttributeValue::N(cores.to_string()));
        }
        if let Some(gb) = query.min_memory_gb {
            filters.push("#mem >= :mem".into());
            names.insert("#mem".into(), A_MEMORY.into());
            values.insert(":mem".into(), AttributeValue::N((gb * 1024.0).to_string()));
        }
        let batch = i32::try_from(query.limit + 1)
            .unwrap_or(MAX_QUERY_BATCH)
            .min(MAX_QUERY_BATCH);
        let output = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(INDEX_NAME)
            .key_condition_expression("#shard = :shard AND #rank BETWEEN :from AND :to")
            .filter_expression(filters.join(" AND "))
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .set_exclusive_start_key(shard.next_key.take())
            .limit(batch)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(unavailable)?;
        let returned_bytes: usize = output.items().iter().map(item_size).sum();
        cost.add_request(
            u64::try_from(output.scanned_count()).unwrap_or(0),
            returned_bytes,
            output.items().len(),
            output.consumed_capacity().and_then(|c| c.capacity_units()),
        );
        for item in output.items() {
            let agent = decode(item)?;
            // BETWEEN includes the cursor's own rank; pages resume strictly after it.
            if after.is_some_and(|position| !position.is_before(&agent)) {
                continue;
            }
            if query.matches(&agent, now_ms) {
                shard.buffer.push_back(agent);
            }
        }
        shard.next_key = output.last_evaluated_key().cloned();
        shard.done = shard.next_key.is_none();
        Ok(())
    }
}

#[async_trait]
impl Store for DynamoStore {
    async fn upsert(&self, agent: StoredAgent) -> Result<Upsert, StoreError> {
        let (outcome, consumed) = self.upsert_measured(&agent).await?;
        tracing::debug!(agent_id = agent.agent_id(), write_units = ?consumed.total, ?outcome, "dynamodb upsert");
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
        let (page, consumed) = self.query_measured(query, after, now_ms).await?;
        tracing::debug!(
            read_units = consumed.estimated_units,
            items_evaluated = consumed.items_evaluated,
            matches = page.agents.len(),
            "dynamodb capacity query"
        );
        Ok(page)
    }

    /// DynamoDB's TTL deletes expired items itself; reads already hide them.
    async fn prune(&self, _now_ms: i64) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// One item per aligned five-minute window (`<agent>#h#<window>`), so that
    /// a history costs one write per window, not per minute, and a read knows
    /// its keys from the time range alone. Each minute is its own attribute
    /// (`m<minute>`), so one `UpdateItem` merges a window that arrives in
    /// parts without reading it first. The items carry no index keys, so
    /// capacity queries never see them.
    async fn put_history(
        &self,
        agent_id: &str,
        minutes: Vec<MinuteRollup>,
        expires_at_s: i64,
    ) -> Result<(), StoreError> {
        let mut windows: std::collections::BTreeMap<u64, Vec<MinuteRollup>> =
            std::collections::BTreeMap::new();
        for rollup in minutes {
            windows
                .entry(rollup.minute / HISTORY_WINDOW_MINUTES)
                .or_default()
                .push(rollup);
        }
        for (window, rollups) in windows {
            let key = history_key(agent_id, window);
            let mut item = encode_history(&key, &rollups, expires_at_s)?;
            item.remove(A_AGENT);
            // Every other attribute of the window's item (its TTL and one per
            // minute) is set by one UpdateItem, which merges without a read.
            let mut assignments = Vec::new();
            let mut names = HashMap::new();
            let mut values = HashMap::new();
            for (position, (name, value)) in item.into_iter().enumerate() {
                assignments.push(format!("#a{position} = :a{position}"));
                names.insert(format!("#a{position}"), name);
                values.insert(format!(":a{position}"), value);
            }
            self.client
                .update_item()
                .table_name(&self.table)
                .key(A_AGENT, AttributeValue::S(key))
                .update_expression(format!("SET {}", assignments.join(", ")))
                .set_expression_attribute_names(Some(names))
                .set_expression_attribute_values(Some(values))
                .send()
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn history(
        &self,
        agent_id: &str,
        since_minute: u64,
        now_ms: i64,
    ) -> Result<Vec<MinuteRollup>, StoreError> {
        let now_minute = u64::try_from(now_ms.div_euclid(60_000)).unwrap_or(0);
        // Nothing older than the longest history retention can still be
        // stored, so a far-back `since` never turns into millions of keys.
        let since_minute =
            since_minute.max(now_minute.saturating_sub(MAX_HISTORY_RETENTION_MINUTES));
        let keys: Vec<String> = (since_minute / HISTORY_WINDOW_MINUTES
            ..=now_minute / HISTORY_WINDOW_MINUTES)
            .map(|window| history_key(agent_id, window))
            .collect();
        let now_s = now_ms.div_euclid(1000);
        let mut minutes = Vec::new();
        for chunk in keys.chunks(100) {
            let mut request = aws_sdk_dynamodb::types::KeysAndAttributes::builder();
            for key in chunk {
                request = request.keys(HashMap::from([(
                    A_AGENT.to_owned(),
                    AttributeValue::S(key.clone()),
                )]));
            }
            let mut pending = Some(HashMap::from([(
                self.table.clone(),
                request.build().map_err(build_error)?,
            )]));
            while let Some(items) = pending.take().filter(|items| !items.is_empty()) {
                let output = self
                    .client
                    .batch_get_item()
                    .set_request_items(Some(items))
                    .send()
                    .await
                    .map_err(unavailable)?;
                for item in output
                    .responses()
                    .and_then(|tables| tables.get(&self.table))
                    .into_iter()
                    .flatten()
                {
                    let expired = item
                        .get(TTL_ATTRIBUTE)
                        .and_then(|v| v.as_n().ok())
                        .and_then(|n| n.parse::<i64>().ok())
                        .is_none_or(|at| at <= now_s);
                    if !expired {
                        minutes.extend(
                            decode_history(item)?
                                .into_iter()
                                .filter(|rollup| rollup.minute >= since_minute),
                        );
                    }
                }
                pending = output.unprocessed_keys().cloned();
            }
        }
        minutes.sort_by_key(|rollup| rollup.minute);
        Ok(minutes)
    }
}

/// Minutes per history item.
const HISTORY_WINDOW_MINUTES: u64 = 5;
/// The longest history retention ingest accepts (`--history-retention-s`, 31 days).
const MAX_HISTORY_RETENTION_MINUTES: u64 = 31 * 24 * 60;

/// `#` cannot appear in an agent id, so these keys never collide with agents.
pub fn history_key(agent_id: &str, window: u64) -> String {
    format!("{agent_id}#h#{window}")
}

/// The item a window of history becomes once `put_history` wrote `minutes`
/// into it (for sizing: the write itself is an `UpdateItem`).
pub fn encode_history(
    key: &str,
    minutes: &[MinuteRollup],
    expires_at_s: i64,
) -> Result<HashMap<String, AttributeValue>, StoreError> {
    let mut item = HashMap::from([
        (A_AGENT.to_owned(), AttributeValue::S(key.to_owned())),
        (TTL_ATTRIBUTE.to_owned(), number(expires_at_s)),
    ]);
    for rollup in minutes {
        let json = serde_json::to_string(rollup)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode history: {e}")))?;
        item.insert(minute_attribute(rollup.minute), AttributeValue::S(json));
    }
    Ok(item)
}

/// The attribute that holds one minute of a history window.
fn minute_attribute(minute: u64) -> String {
    format!("m{minute}")
}

fn decode_history(item: &HashMap<String, AttributeValue>) -> Result<Vec<MinuteRollup>, StoreError> {
    item.iter()
        .filter(|(name, _)| {
            name.strip_prefix('m').is_some_and(|digits| {
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
            })
        })
        .map(|(_, value)| {
            let text = value
                .as_s()
                .map_err(|_| StoreError::Corrupt("history minute is not a string".into()))?;
            serde_json::from_str(text)
                .map_err(|e| StoreError::Corrupt(format!("unreadable history: {e}")))
        })
        .collect()
}

/// The `rank` interval one query reads in every shard.
struct RankRange {
    from: String,
    to: String,
}

impl RankRange {
    /// `None` when nothing can match (the VRAM bound is past any real GPU).
    fn new(query: &CapacityQuery, after: Option<&Position>) -> Option<Self> {
        let min_free_mb = if query.required_gpus() > 0 {
            query.min_gpu_free_mb().ceil()
        } else {
            0.0
        };
        if min_free_mb > RANK_MAX as f64 {
            return None;
        }
        // '$' sorts just after '#', so this bound takes every agent id at that rank.
        let to = format!("{:010}$", RANK_MAX - min_free_mb as u64);
        let from = match after {
            Some(position) => rank(position.gpu_free_max_mb, &position.agent_id),
            None => "0".to_owned(),
        };
        (from <= to).then_some(Self { from, to })
    }
}

struct ShardStream {
    id: u32,
    buffer: VecDeque<StoredAgent>,
    next_key: Option<HashMap<String, AttributeValue>>,
    done: bool,
}

impl ShardStream {
    fn new(id: u32) -> Self {
        Self {
            id,
            buffer: VecDeque::new(),
            next_key: None,
            done: false,
        }
    }
}

pub fn rank(gpu_free_max_mb: u64, agent_id: &str) -> String {
    format!(
        "{:010}#{agent_id}",
        RANK_MAX - gpu_free_max_mb.min(RANK_MAX)
    )
}

/// FNV-1a: stable across builds and languages, unlike std's hasher.
pub fn shard_of(agent_id: &str, shards: u32) -> u32 {
    let hash = agent_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    (hash % u64::from(shards.max(1))) as u32
}

/// The item for one agent.
pub fn encode(
    agent: &StoredAgent,
    shards: u32,
) -> Result<HashMap<String, AttributeValue>, StoreError> {
    let heartbeat = &agent.heartbeat;
    let json = serde_json::to_vec(agent)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode agent record: {e}")))?;
    let record = miniz_oxide::deflate::compress_to_vec(&json, 6);
    Ok(HashMap::from([
        (
            A_AGENT.into(),
            AttributeValue::S(heartbeat.agent_id.clone()),
        ),
        (A_SENT.into(), number(heartbeat.sent_at_ms)),
        (A_UNTIL.into(), number(agent.online_until_ms)),
        (TTL_ATTRIBUTE.into(), number(agent.expires_at_s)),
        (A_POOL.into(), AttributeValue::S(heartbeat.pool.clone())),
        (A_CORES.into(), number(heartbeat.cpu.cores_available)),
        (A_MEMORY.into(), number(heartbeat.memory.available_mb)),
        (
            A_SHARD.into(),
            AttributeValue::S(shard_of(&heartbeat.agent_id, shards).to_string()),
        ),
        (
            A_RANK.into(),
            AttributeValue::S(rank(heartbeat.gpu_free_max_mb(), &heartbeat.agent_id)),
        ),
        (A_RECORD.into(), AttributeValue::B(Blob::new(record))),
    ]))
}

fn decode(item: &HashMap<String, AttributeValue>) -> Result<StoredAgent, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("agent item: {why}"));
    let blob = item
        .get(A_RECORD)
        .and_then(|value| value.as_b().ok())
        .ok_or_else(|| corrupt("no rec attribute"))?;
    let mut json = Vec::new();
    // Bounded so that a corrupt blob cannot inflate without limit.
    miniz_oxide::inflate::decompress_to_vec_with_limit(blob.as_ref(), 1 << 20)
        .map_err(|_| corrupt("rec does not inflate"))?
        .as_slice()
        .read_to_end(&mut json)
        .map_err(|_| corrupt("rec unreadable"))?;
    serde_json::from_slice(&json).map_err(|e| corrupt(&format!("rec is not an agent record: {e}")))
}

/// An item's size by DynamoDB's rules: each attribute name's UTF-8 bytes plus
/// its value (strings: UTF-8 bytes; binary: raw bytes; numbers: about one byte
/// per two significant digits, plus one).
pub fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    AttributeValue::S(text) => text.len(),
                    AttributeValue::B(blob) => blob.as_ref().len(),
                    AttributeValue::N(digits) => number_size(digits),
                    AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
                    _ => 0,
                }
        })
        .sum()
}

fn number_size(digits: &str) -> usize {
    let significant = digits.trim_start_matches('-').replace('.', "");
    let significant = significant.trim_start_matches('0').trim_end_matches('0');
    significant.len().div_ceil(2) + 1
}

fn number(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn unavailable<E: std::error::Error + 'static, R: std::fmt::Debug>(
    error: SdkError<E, R>,
) -> StoreError {
    StoreError::Unavailable(DisplayErrorContext(&error).to_string())
}

fn build_error(error: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::Unavailable(format!("invalid DynamoDB request: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_orders_as_answers_do() {
        let mut ranks = [
            rank(100, "b"),
            rank(20_000, "z"),
            rank(100, "a"),
            rank(0, "c"),
        ];
        ranks.sort();
        assert_eq!(
            ranks,
            [
                rank(20_000, "z"),
                rank(100, "a"),
                rank(100, "b"),
                rank(0, "c")
            ]
        );
    }

    #[test]
    fn shards_spread_and_are_stable() {
        assert_eq!(shard_of("lab-07", 4), shard_of("lab-07", 4));
        let mut counts = [0; 4];
        for i in 0..4000 {
            counts[shard_of(&format!("node-{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&count| count > 800), "{counts:?}");
    }

    #[test]
    fn number_sizes_follow_dynamodb() {
        assert_eq!(number_size("1764132000123"), 8);
        assert_eq!(number_size("0"), 1);
        assert_eq!(number_size("1000"), 2);
        assert_eq!(number_size("-12.5"), 3);
    }
}
