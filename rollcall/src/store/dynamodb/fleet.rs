//! The fleet's sums for `/metrics`, kept in their own small table as agents
//! write, so that a scrape reads a few small items and never the fleet.
//!
//! The agents table streams every change (old and new image) to the fleet
//! function (`fleet-fn`), which turns each change into the difference it
//! makes to the sums ([`Tally`]) and adds it to the fleet table in one
//! idempotent transaction per batch.
//!
//! An agent counts as online until its deadline and as on record until its
//! expiry, so its share is added to a *bucket* keyed by that time: partition
//! `online` (bucket by deadline) or `record` (bucket by expiry), sort key
//! the bucket's end in epoch seconds, one attribute per figure and pool
//! (`n.render`, `cores.render`, ...). A scrape sums the buckets that end after
//! now; an agent whose time passes drops out of the sums with its bucket,
//! with no write at all. A bucket is at most 1/200 of the agent's span wide
//! (10 s for a 90 s deadline, an hour for a week's retention), so an agent
//! leaves the sums at most that late. A sum that ever went wrong (a change
//! applied twice after the transaction token expired) heals when its
//! bucket passes. docs/dynamodb.md ("Fleet sums") weighs the design.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem, Update};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::item::{Item, TTL_ATTRIBUTE, decode, is_agent, item_size, number};
use super::units::read_units;
use super::{ReadCost, build_error, create_hash_range_table, unavailable};
use crate::fleet::{Figures, FleetTotals, Share};
use crate::store::StoreError;

pub const FLEET_PART: &str = "part";
pub const FLEET_BUCKET: &str = "bucket";
const A_AGENTS: &str = "n";
const A_CORES: &str = "cores";
const A_GPUS: &str = "gpus";
const A_GPU_FREE: &str = "free_mb";
const A_GPU_TOTAL: &str = "total_mb";

/// Bucket widths, narrowest first; an agent's bucket is the narrowest that
/// is at least 1/200 of its span.
const WIDTHS_S: [i64; 4] = [10, 300, 3600, 86_400];
const SPAN_PARTS: i64 = 200;
/// A bucket outlives its end by this much before DynamoDB's TTL removes it.
const BUCKET_KEPT_S: i64 = 3600;
/// DynamoDB's limit of actions per transaction.
const TRANSACTION_ITEMS: usize = 100;
/// Pools one update adds to a bucket (5 figures each), which keeps its
/// expression well inside DynamoDB's 4 KB; more pools take more updates.
const POOLS_PER_UPDATE: usize = 16;
/// Pages of buckets one scrape reads at most (each up to 1 MB).
const MAX_PAGES: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// Figures of agents online, by deadline.
    Online,
    /// Agents on record, by expiry.
    Record,
}

impl Family {
    fn part(self) -> &'static str {
        match self {
            Family::Online => "online",
            Family::Record => "record",
        }
    }
}

/// The end of the bucket for something that lasts until `until_s`, having
/// started at `from_s`.
pub fn bucket_end(from_s: i64, until_s: i64) -> i64 {
    let span = (until_s - from_s).max(0);
    let width = WIDTHS_S
        .into_iter()
        .find(|width| width * SPAN_PARTS >= span)
        .unwrap_or(WIDTHS_S[WIDTHS_S.len() - 1]);
    until_s.div_euclid(width) * width
        + if until_s.rem_euclid(width) == 0 {
            0
        } else {
            width
        }
}

fn bucket_key(end_s: i64) -> String {
    format!("{end_s:012}")
}

/// One change to the agents table, as the stream delivers it.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub old: Option<Item>,
    pub new: Option<Item>,
}

/// The differences one batch of changes makes to the buckets.
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    deltas: BTreeMap<(Family, i64, String), Figures>,
}

impl Tally {
    /// The differences of `changes`; buckets that ended by `as_of_s` are
    /// left out, since no scrape reads them again.
    pub fn of(changes: &[Change], as_of_s: Option<i64>) -> Self {
        let share = |image: &Option<Item>| match image.as_ref().map(share_of) {
            Some(Ok(share)) => share,
            Some(Err(error)) => {
                tracing::warn!(%error, "fleet sums: an agent item that does not decode is left out");
                None
            }
            None => None,
        };
        let shares: Vec<_> = changes
            .iter()
            .map(|change| (share(&change.old), share(&change.new)))
            .collect();
        Self::of_shares(&shares, as_of_s)
    }

    /// The same from each change's shares, old and new.
    pub fn of_shares(changes: &[(Option<Share>, Option<Share>)], as_of_s: Option<i64>) -> Self {
        let mut tally = Tally::default();
        for (old, new) in changes {
            old.iter().for_each(|share| tally.add(share, -1));
            new.iter().for_each(|share| tally.add(share, 1));
        }
        tally.deltas.retain(|(_, end, _), figures| {
            !figures.is_zero() && as_of_s.is_none_or(|as_of| *end > as_of)
        });
        tally
    }

    fn add(&mut self, share: &Share, sign: i64) {
        let from_s = share.received_at_ms.div_euclid(1000);
        let deadline_s = share.online_until_ms.div_euclid(1000)
            + i64::from(share.online_until_ms.rem_euclid(1000) != 0);
        let online = (
            Family::Online,
            bucket_end(from_s, deadline_s),
            share.pool.clone(),
        );
        self.deltas
            .entry(online)
            .or_default()
            .add(&share.online, sign);
        let record = (
            Family::Record,
            bucket_end(from_s, share.expires_at_s),
            share.pool.clone(),
        );
        let one = Figures {
            agents: 1,
            ..Figures::default()
        };
        self.deltas.entry(record).or_default().add(&one, sign);
    }

    /// The bucket items these differences write (every pool's figures for
    /// one bucket are in one item).
    pub fn buckets(&self) -> usize {
        let mut items: Vec<(Family, i64)> = self
            .deltas
            .keys()
            .map(|(family, end, _)| (*family, *end))
            .collect();
        items.dedup();
        items.len()
    }

    /// The sums as a scrape at `now_s` would read them from these buckets
    /// alone: for tests and for checking a tally against a fleet.
    pub fn totals(&self, now_s: i64) -> FleetTotals {
        let mut totals = FleetTotals::default();
        for ((family, end, pool), figures) in &self.deltas {
            if *end > now_s {
                add_bucket(&mut totals, *family, pool, figures);
            }
        }
        totals
    }
}

/// An agent's share, or `None` for items that are not agents (history windows).
fn share_of(item: &Item) -> Result<Option<Share>, StoreError> {
    if !is_agent(item) {
        return Ok(None);
    }
    Ok(Some(Share::of(&decode(item)?)))
}

fn add_bucket(totals: &mut FleetTotals, family: Family, pool: &str, figures: &Figures) {
    let pool = totals.pools.entry(pool.to_owned()).or_default();
    match family {
        Family::Online => pool.online.add(figures, 1),
        Family::Record => pool.on_record += figures.agents,
    }
}

/// A batch of stream records, parsed from the Lambda event.
#[derive(Debug, Default)]
pub struct StreamBatch {
    pub changes: Vec<Change>,
    /// Names the batch for the transactions' idempotency tokens: the same
    /// batch delivered again writes nothing twice.
    pub id: String,
    /// When the newest change was made, by DynamoDB's clock.
    pub newest_s: Option<i64>,
}

impl StreamBatch {
    /// Parses a DynamoDB Streams event (`{"Records": [...]}`).
    pub fn from_event(event: &serde_json::Value) -> Result<Self, String> {
        let records = event
            .get("Records")
            .and_then(|records| records.as_array())
            .ok_or("the event has no Records list")?;
        let mut batch = StreamBatch::default();
        let mut sequences = Vec::new();
        for (position, record) in records.iter().enumerate() {
            let change = &record["dynamodb"];
            let image = |name: &str| {
                change
                    .get(name)
                    .map(item_from_json)
                    .transpose()
                    .map_err(|why| format!("Records[{position}].dynamodb.{name}: {why}"))
            };
            batch.changes.push(Change {
                old: image("OldImage")?,
                new: image("NewImage")?,
            });
            if let Some(sequence) = change["SequenceNumber"].as_str() {
                sequences.push(sequence.to_owned());
            }
            if let Some(at) = change["ApproximateCreationDateTime"].as_f64() {
                let at = at as i64;
                batch.newest_s = Some(batch.newest_s.map_or(at, |newest| newest.max(at)));
            }
        }
        let source = records
            .first()
            .and_then(|record| record["eventSourceARN"].as_str())
            .unwrap_or_default();
        batch.id = format!("{source}|{}|{}", records.len(), sequences.join(","));
        Ok(batch)
    }
}

/// One attribute map in DynamoDB's JSON (`{"S": "x"}`, `{"N": "1"}`, ...).
pub fn item_from_json(value: &serde_json::Value) -> Result<Item, String> {
    value
        .as_object()
        .ok_or("not an attribute map")?
        .iter()
        .map(|(name, value)| Ok((name.clone(), attribute_from_json(value)?)))
        .collect()
}

/// The inverse, for the types an agent item holds (`S`, `N`, `B`, `BOOL`):
/// an item as the stream delivers it, for tests and tools that feed the
/// fleet function.
pub fn item_to_json(item: &Item) -> serde_json::Value {
    let value = |value: &AttributeValue| match value {
        AttributeValue::S(text) => serde_json::json!({ "S": text }),
        AttributeValue::N(digits) => serde_json::json!({ "N": digits }),
        AttributeValue::Bool(flag) => serde_json::json!({ "BOOL": flag }),
        AttributeValue::B(blob) => serde_json::json!({
            "B": base64::engine::general_purpose::STANDARD.encode(blob.as_ref())
        }),
        _ => serde_json::Value::Null,
    };
    item.iter()
        .map(|(name, attribute)| (name.clone(), value(attribute)))
        .collect()
}

fn attribute_from_json(value: &serde_json::Value) -> Result<AttributeValue, String> {
    let object = value.as_object().filter(|object| object.len() == 1);
    let Some((kind, inner)) = object.and_then(|object| object.iter().next()) else {
        return Err("an attribute value must have exactly one type".into());
    };
    let text = || {
        inner
            .as_str()
            .map(str::to_owned)
            .ok_or(format!("{kind} must be a string"))
    };
    let texts = || {
        inner
            .as_array()
            .ok_or(format!("{kind} must be a list"))?
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or(format!("{kind} holds a non-string"))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let blob = |text: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Blob::new)
            .map_err(|_| format!("{kind} is not base64"))
    };
    Ok(match kind.as_str() {
        "S" => AttributeValue::S(text()?),
        "N" => AttributeValue::N(text()?),
        "B" => AttributeValue::B(blob(&text()?)?),
        "BOOL" => AttributeValue::Bool(inner.as_bool().ok_or("BOOL must be true or false")?),
        "NULL" => AttributeValue::Null(true),
        "SS" => AttributeValue::Ss(texts()?),
        "NS" => AttributeValue::Ns(texts()?),
        "BS" => AttributeValue::Bs(
            texts()?
                .iter()
                .map(|text| blob(text))
                .collect::<Result<_, _>>()?,
        ),
        "M" => AttributeValue::M(item_from_json(inner)?),
        "L" => AttributeValue::L(
            inner
                .as_array()
                .ok_or("L must be a list")?
                .iter()
                .map(attribute_from_json)
                .collect::<Result<_, _>>()?,
        ),
        other => return Err(format!("unknown attribute type {other}")),
    })
}

/// The fleet table: where the sums live.
#[derive(Clone, Debug)]
pub struct FleetTable {
    client: Client,
    name: String,
}

impl FleetTable {
    /// `client` should be built once per process.
    pub fn new(client: Client, name: impl Into<String>) -> Self {
        Self {
            client,
            name: name.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a batch's differences, in transactions of up to 100 buckets,
    /// each with a token made from the batch, so that a redelivered batch
    /// (within DynamoDB's ten minutes) adds nothing twice. Returns the
    /// buckets written.
    pub async fn apply(&self, batch: &StreamBatch) -> Result<usize, StoreError> {
        let tally = Tally::of(&batch.changes, batch.newest_s.map(|newest| newest - 60));
        let mut by_bucket: BTreeMap<(Family, i64), Vec<(&str, &Figures)>> = BTreeMap::new();
        for ((family, end, pool), figures) in &tally.deltas {
            by_bucket
                .entry((*family, *end))
                .or_default()
                .push((pool.as_str(), figures));
        }
        let mut updates = Vec::new();
        for ((family, end), pools) in &by_bucket {
            for some in pools.chunks(POOLS_PER_UPDATE) {
                updates.push(((*family, *end), self.update(*family, *end, some)?));
            }
        }
        let transactions = pack(updates);
        for (position, transaction) in transactions.iter().enumerate() {
            let token = transaction_token(&batch.id, position);
            self.transact(transaction, &token).await?;
        }
        Ok(by_bucket.len())
    }

    /// One bucket's update: an `ADD` of each pool's figures.
    fn update(
        &self,
        family: Family,
        end_s: i64,
        pools: &[(&str, &Figures)],
    ) -> Result<TransactWriteItem, StoreError> {
        let mut update = Update::builder()
            .table_name(&self.name)
            .key(FLEET_PART, AttributeValue::S(family.part().into()))
            .key(FLEET_BUCKET, AttributeValue::S(bucket_key(end_s)))
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_values(":ttl", number(end_s + BUCKET_KEPT_S));
        let mut adds = Vec::new();
        for (pool, figures) in pools {
            for (field, value) in fields(family, figures) {
                let n = adds.len();
                adds.push(format!("#a{n} :a{n}"));
                update = update
                    .expression_attribute_names(format!("#a{n}"), format!("{field}.{pool}"))
                    .expression_attribute_values(format!(":a{n}"), number(value));
            }
        }
        let update = update.update_expression(format!("ADD {} SET #ttl = :ttl", adds.join(", ")));
        Ok(TransactWriteItem::builder()
            .update(update.build().map_err(build_error)?)
            .build())
    }

    /// One transaction, retried with backoff while it conflicts with
    /// another batch's on the same buckets.
    async fn transact(&self, items: &[TransactWriteItem], token: &str) -> Result<(), StoreError> {
        let mut backoff = Duration::from_millis(20);
        for attempt in 1.. {
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.to_vec()))
                .client_request_token(token)
                .send()
                .await;
            match result {
                Ok(_) => return Ok(()),
                Err(error) if attempt < 6 && is_conflict(&error) => {
                    // Batches of other stream shards touch the same buckets;
                    // the jitter keeps two of them from meeting again.
                    tokio::time::sleep(backoff.mul_f64(1.0 + fastrand::f64())).await;
                    backoff *= 2;
                }
                Err(error) => return Err(unavailable(error)),
            }
        }
        unreachable!("the loop returns")
    }

    /// The sums at `now_ms`: the buckets of both families that end after now.
    pub async fn read(&self, now_ms: i64) -> Result<FleetTotals, StoreError> {
        Ok(self.read_measured(now_ms).await?.0)
    }

    /// The sums, with what reading them cost: a `Query` is billed by the
    /// bytes of the buckets it returns (`ReadCost::items_read` counts them).
    pub async fn read_measured(&self, now_ms: i64) -> Result<(FleetTotals, ReadCost), StoreError> {
        let now_s = now_ms.div_euclid(1000);
        let mut totals = FleetTotals::default();
        let mut cost = ReadCost::default();
        for family in [Family::Online, Family::Record] {
            let mut start: Option<HashMap<String, AttributeValue>> = None;
            for page in 0.. {
                if page == MAX_PAGES {
                    tracing::warn!(
                        family = family.part(),
                        "fleet sums: more buckets than a scrape reads; figures are partial"
                    );
                    break;
                }
                let output = self
                    .client
                    .query()
                    .table_name(&self.name)
                    .key_condition_expression("#part = :part AND #bucket > :now")
                    .expression_attribute_names("#part", FLEET_PART)
                    .expression_attribute_names("#bucket", FLEET_BUCKET)
                    .expression_attribute_values(":part", AttributeValue::S(family.part().into()))
                    .expression_attribute_values(":now", AttributeValue::S(bucket_key(now_s)))
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(unavailable)?;
                let bytes: usize = output.items().iter().map(item_size).sum();
                cost.add_index_read(output.items().len(), read_units(bytes, false), None);
                for item in output.items() {
                    for (pool, figures) in bucket_of(item)? {
                        add_bucket(&mut totals, family, pool, &figures);
                    }
                }
                match output.last_evaluated_key() {
                    Some(key) => start = Some(key.clone()),
                    None => break,
                }
            }
        }
        // Pools whose buckets all netted out are no longer in the fleet.
        totals
            .pools
            .retain(|_, pool| pool.on_record != 0 || !pool.online.is_zero());
        Ok((totals, cost))
    }

    /// Creates the table with its TTL, as `infra/template.yaml` does; for
    /// local runs and tests.
    pub async fn create(&self) -> Result<(), StoreError> {
        create_hash_range_table(&self.client, &self.name, FLEET_PART, FLEET_BUCKET).await
    }
}

/// A bucket item's figures by pool, from its `<field>.<pool>` attributes.
fn bucket_of(item: &Item) -> Result<BTreeMap<&str, Figures>, StoreError> {
    let mut pools: BTreeMap<&str, Figures> = BTreeMap::new();
    for (name, value) in item {
        let Some((field, pool)) = name.split_once('.') else {
            continue;
        };
        let figure: i64 = value
            .as_n()
            .ok()
            .and_then(|digits| digits.parse().ok())
            .ok_or_else(|| {
                StoreError::Corrupt(format!("fleet bucket: {name} is not an integer"))
            })?;
        let figures = pools.entry(pool).or_default();
        match field {
            A_AGENTS => figures.agents = figure,
            A_CORES => figures.cores_available = figure,
            A_GPUS => figures.gpus = figure,
            A_GPU_FREE => figures.gpu_free_mb = figure,
            A_GPU_TOTAL => figures.gpu_total_mb = figure,
            // A figure a later version keeps: not this version's to show.
            _ => {}
        }
    }
    Ok(pools)
}

/// A bucket item's key: its family and its end.
type BucketItem = (Family, i64);

/// The figures a family keeps for one pool.
fn fields(family: Family, figures: &Figures) -> Vec<(&'static str, i64)> {
    let mut fields = vec![(A_AGENTS, figures.agents)];
    if family == Family::Online {
        fields.extend([
            (A_CORES, figures.cores_available),
            (A_GPUS, figures.gpus),
            (A_GPU_FREE, figures.gpu_free_mb),
            (A_GPU_TOTAL, figures.gpu_total_mb),
        ]);
    }
    fields
}

/// Updates into transactions, in order: at most 100 each, and a bucket at
/// most once in each (a transaction may not touch an item twice), so that
/// the same batch always makes the same transactions and tokens.
fn pack(updates: Vec<(BucketItem, TransactWriteItem)>) -> Vec<Vec<TransactWriteItem>> {
    let mut transactions: Vec<(Vec<BucketItem>, Vec<TransactWriteItem>)> = Vec::new();
    for (key, update) in updates {
        // The first transaction with room that does not touch this bucket yet.
        let fits = transactions
            .iter()
            .position(|(keys, items)| items.len() < TRANSACTION_ITEMS && !keys.contains(&key));
        let index = fits.unwrap_or_else(|| {
            transactions.push((Vec::new(), Vec::new()));
            transactions.len() - 1
        });
        transactions[index].0.push(key);
        transactions[index].1.push(update);
    }
    transactions.into_iter().map(|(_, items)| items).collect()
}

/// DynamoDB's idempotency token: at most 36 characters.
fn transaction_token(batch_id: &str, chunk: usize) -> String {
    let digest = Sha256::digest(format!("{batch_id}|{chunk}").as_bytes());
    hex::encode(&digest[..16])
}

fn is_conflict<R>(error: &SdkError<TransactWriteItemsError, R>) -> bool {
    match error.as_service_error() {
        Some(TransactWriteItemsError::TransactionInProgressException(_)) => true,
        Some(TransactWriteItemsError::TransactionCanceledException(canceled)) => canceled
            .cancellation_reasons()
            .iter()
            .any(|reason| reason.code() == Some("TransactionConflict")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::Heartbeat;
    use crate::heartbeat::tests::example;
    use crate::record::{Deadlines, StoredAgent};
    use crate::store::dynamodb::encode;

    const NOW_MS: i64 = 1_764_132_000_000;

    fn agent(agent_id: &str, pool: &str, free_mb: u64, received_at_ms: i64) -> StoredAgent {
        let mut heartbeat: Heartbeat = serde_json::from_value(example()).unwrap();
        heartbeat.agent_id = agent_id.into();
        heartbeat.pool = pool.into();
        heartbeat.gpus[0].memory_free_mb = free_mb;
        heartbeat.sent_at_ms = received_at_ms as u64;
        StoredAgent::accept(heartbeat, received_at_ms, Deadlines::default())
    }

    fn item(agent: &StoredAgent) -> Item {
        encode(agent, 4).unwrap()
    }

    fn change(old: Option<&StoredAgent>, new: Option<&StoredAgent>) -> Change {
        Change {
            old: old.map(item),
            new: new.map(item),
        }
    }

    fn expected(agents: &[&StoredAgent], now_ms: i64) -> FleetTotals {
        let mut totals = FleetTotals::default();
        agents.iter().for_each(|agent| totals.add(agent, now_ms));
        totals
    }

    #[test]
    fn buckets_are_a_two_hundredth_of_the_span_at_most() {
        // A 30 s agent's 90 s deadline: 10 s buckets, ending on or after it.
        assert_eq!(bucket_end(1000, 1090), 1090);
        assert_eq!(bucket_end(1000, 1091), 1100);
        // A week's retention: hour buckets.
        assert_eq!(bucket_end(0, 7 * 86_400 + 1), 7 * 86_400 + 3600);
        // An hourly cron job's three-hour deadline: five-minute buckets.
        assert_eq!(bucket_end(0, 3 * 3600 + 1), 3 * 3600 + 300);
        // Beyond 200 days: day buckets, and never before the time itself.
        for (from, until) in [(0, 400 * 86_400 + 7), (5, 5), (100, 50)] {
            let end = bucket_end(from, until);
            assert!(
                end >= until && end - until < 86_400,
                "{from} {until} -> {end}"
            );
        }
    }

    #[test]
    fn a_tally_of_changes_sums_to_the_fleet_they_leave() {
        let a1 = agent("a", "render", 20_000, NOW_MS - 20_000);
        let a2 = agent("a", "render", 4_000, NOW_MS - 5_000);
        let b = agent("b", "train", 10_000, NOW_MS - 10_000);
        let gone = agent("c", "render", 1_000, NOW_MS - 30_000);
        let changes = [
            change(None, Some(&a1)),
            change(None, Some(&b)),
            change(None, Some(&gone)),
            change(Some(&a1), Some(&a2)),
            // A history window is no agent: it adds nothing.
            Change {
                old: None,
                new: Some(Item::from([(
                    "agent_id".into(),
                    AttributeValue::S("a#h#1".into()),
                )])),
            },
            change(Some(&gone), None),
        ];
        let tally = Tally::of(&changes, None);
        let now_s = NOW_MS / 1000;
        assert_eq!(tally.totals(now_s), expected(&[&a2, &b], NOW_MS));
        let render = tally.totals(now_s).pools["render"];
        assert_eq!(
            (
                render.on_record,
                render.online.agents,
                render.online.gpu_free_mb
            ),
            (1, 1, 4_000)
        );
        // Past every deadline, the agents are on record and offline.
        let later_s = now_s + 120;
        assert_eq!(tally.totals(later_s), expected(&[&a2, &b], later_s * 1000));
        assert_eq!(tally.totals(later_s).pools["train"].offline(), 1);
        // A change that moves nothing (the query function's move to the
        // offline part) writes no bucket.
        assert_eq!(Tally::of(&[change(Some(&b), Some(&b))], None).buckets(), 0);
    }

    #[test]
    fn buckets_already_past_are_not_written() {
        let new = agent("a", "default", 100, NOW_MS);
        let as_of = Some(NOW_MS / 1000);
        // Back after two hours: the old deadline's bucket has passed (not
        // written), the old expiry's hour has not (the agent moves out of it).
        let old = agent("a", "default", 100, NOW_MS - 2 * 3_600_000);
        assert_eq!(
            Tally::of(&[change(Some(&old), Some(&new))], as_of).buckets(),
            3
        );
        // Ten minutes on, the expiry stays in its hour: only the new deadline is written.
        let old = agent("a", "default", 100, NOW_MS - 600_000);
        assert_eq!(
            Tally::of(&[change(Some(&old), Some(&new))], as_of).buckets(),
            1
        );
    }

    #[test]
    fn a_bucket_is_written_once_per_transaction_and_reads_back_by_pool() {
        let table = FleetTable::new(
            Client::from_conf(
                aws_sdk_dynamodb::Config::builder()
                    .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                    .build(),
            ),
            "fleet",
        );
        let figures = Figures {
            agents: 2,
            cores_available: 12,
            gpus: 3,
            gpu_free_mb: 100,
            gpu_total_mb: 200,
        };
        let pools: Vec<String> = (0..40).map(|n| format!("pool.{n}")).collect();
        let mut updates = Vec::new();
        for end in [10, 20] {
            let all: Vec<(&str, &Figures)> =
                pools.iter().map(|pool| (pool.as_str(), &figures)).collect();
            for some in all.chunks(POOLS_PER_UPDATE) {
                updates.push((
                    (Family::Online, end),
                    table.update(Family::Online, end, some).unwrap(),
                ));
            }
        }
        // 40 pools: three updates per bucket, so three transactions, each
        // touching each bucket once.
        let transactions = pack(updates);
        assert_eq!(
            transactions.iter().map(Vec::len).collect::<Vec<_>>(),
            [2, 2, 2]
        );
        let update = transactions[0][0].update().unwrap();
        let mut item = Item::new();
        for (placeholder, name) in update.expression_attribute_names().unwrap() {
            if let Some(value) = update
                .expression_attribute_values()
                .unwrap()
                .get(&placeholder.replace('#', ":"))
            {
                item.insert(name.clone(), value.clone());
            }
        }
        let read = bucket_of(&item).unwrap();
        assert_eq!(read.len(), POOLS_PER_UPDATE);
        assert_eq!(read["pool.0"], figures, "a pool's name may hold a dot");
        item.insert("n.x".into(), AttributeValue::S("many".into()));
        assert!(bucket_of(&item).is_err());
    }

    #[test]
    fn a_stream_event_parses_into_the_items_written() {
        let a = agent("a", "default", 100, NOW_MS);
        let event = serde_json::json!({"Records": [
            {"eventName": "INSERT", "eventSourceARN": "arn:stream",
             "dynamodb": {"NewImage": item_to_json(&item(&a)), "SequenceNumber": "100",
                          "ApproximateCreationDateTime": 1764132000.0}},
            {"eventName": "REMOVE",
             "dynamodb": {"OldImage": item_to_json(&item(&a)), "SequenceNumber": "101",
                          "ApproximateCreationDateTime": 1764132001.0}},
        ]});
        let batch = StreamBatch::from_event(&event).unwrap();
        assert_eq!(batch.changes[0].new.as_ref(), Some(&item(&a)));
        assert!(batch.changes[0].old.is_none() && batch.changes[1].new.is_none());
        assert_eq!(batch.newest_s, Some(1_764_132_001));
        assert_eq!(batch.id, "arn:stream|2|100,101");
        assert_ne!(
            transaction_token(&batch.id, 0),
            transaction_token(&batch.id, 1)
        );
        assert!(transaction_token(&batch.id, 0).len() <= 36);

        for (broken, why) in [
            (serde_json::json!({}), "no Records"),
            (
                serde_json::json!({"Records": [{"dynamodb": {"NewImage": {"x": {"S": 1}}}}]}),
                "S must be a string",
            ),
            (
                serde_json::json!({"Records": [{"dynamodb": {"NewImage": {"x": {"Q": "1"}}}}]}),
                "unknown attribute type Q",
            ),
            (
                serde_json::json!({"Records": [{"dynamodb": {"NewImage": {"x": {"B": "*"}}}}]}),
                "not base64",
            ),
        ] {
            let error = StreamBatch::from_event(&broken).unwrap_err();
            assert!(error.contains(why), "{error}");
        }
    }
}
