//! Capacity queries: candidates from the index, exact answers from the table.
//!
//! The index orders agents by free-VRAM bucket, then agent id; within a
//! bucket that is not answer order. But each entry also carries the exact
//! free VRAM (`fv`), so once every shard has been read past a bucket, the
//! entries of that bucket and all above it can be sorted exactly in memory:
//! no agent still unread can come before them. Those candidates are then read
//! from the table with `BatchGetItem`, in answer order, only as many as the
//! page needs, and `CapacityQuery::matches` has the final word on each
//! (status, cores, memory, labels, exact VRAM), as in every store.

use std::collections::{HashMap, HashSet};

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, ReturnConsumedCapacity};

use super::item::{
    A_AGENT, A_BUCKET, A_FREE_VRAM, A_POOL, A_SHARD, BUCKET_MAX, INDEX_NAME, Item, bucket_of,
    bucket_prefix, decode, item_size,
};
use super::units::read_units;
use super::{DynamoStore, ReadCost, build_error, unavailable};
use crate::capacity::{CapacityQuery, Position, answer_order};
use crate::record::StoredAgent;
use crate::store::{Page, StoreError};

/// Index entries per Query request after a shard's first one. Entries are
/// about 60 bytes, so this stays well under a request's 1 MB.
const INDEX_BATCH: i32 = 1000;
/// `BatchGetItem` takes at most 100 keys.
const TABLE_BATCH: usize = 100;

/// One index entry: where the agent stands in answer order, and its bucket.
#[derive(Debug, Clone)]
struct Candidate {
    position: Position,
    bucket: u64,
    pool: Option<String>,
}

/// The buckets a query reads, highest first.
struct BucketRange {
    high: u64,
    low: u64,
}

impl BucketRange {
    /// `None` when no bucket can hold a match.
    fn new(query: &CapacityQuery, after: Option<&Position>) -> Option<Self> {
        let low = if query.required_gpus() > 0 {
            let min_free_mb = query.min_gpu_free_mb().ceil();
            if min_free_mb >= u64::MAX as f64 {
                return None;
            }
            bucket_of(min_free_mb as u64)
        } else {
            0
        };
        let high = after.map_or(BUCKET_MAX, |position| bucket_of(position.gpu_free_max_mb));
        (low <= high).then_some(Self { high, low })
    }
}

/// Reading one shard's part of the index, page by page.
struct ShardReader {
    shard: u32,
    next_key: Option<Item>,
    done: bool,
    requests: u32,
    /// Every entry of this shard in a bucket at or above this one has been
    /// read. Starts above the range: nothing read yet.
    complete_from: u64,
}

impl DynamoStore {
    /// A capacity query, with what it read.
    pub async fn query_measured(
        &self,
        query: &CapacityQuery,
        after: Option<&Position>,
        now_ms: i64,
    ) -> Result<(Page, ReadCost), StoreError> {
        let mut cost = ReadCost::default();
        let mut accepted: Vec<(Position, StoredAgent)> = Vec::new();
        let Some(range) = BucketRange::new(query, after) else {
            return Ok((page(accepted, query.limit), cost));
        };
        let mut readers: Vec<ShardReader> = (0..self.shards)
            .map(|shard| ShardReader {
                shard,
                next_key: None,
                done: false,
                requests: 0,
                complete_from: range.high + 1,
            })
            .collect();
        let mut unsorted: Vec<Candidate> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        loop {
            let complete_from = readers
                .iter()
                .map(|reader| {
                    if reader.done {
                        range.low
                    } else {
                        reader.complete_from
                    }
                })
                .max()
                .unwrap_or(range.low);
            // Entries at or above `complete_from` cannot be overtaken by one
            // still unread, so they can be answered in exact order now.
            let (mut ready, later): (Vec<Candidate>, Vec<Candidate>) = unsorted
                .into_iter()
                .partition(|candidate| candidate.bucket >= complete_from);
            unsorted = later;
            ready.sort_by(|a, b| answer_order(&a.position, &b.position));
            let mut start = 0;
            while start < ready.len() {
                // Only as many as the page still needs: each costs a read.
                let wanted = (query.limit + 1 - accepted.len()).min(TABLE_BATCH);
                let end = (start + wanted).min(ready.len());
                self.read_candidates(&ready[start..end], query, now_ms, &mut accepted, &mut cost)
                    .await?;
                start = end;
                if accepted.len() > query.limit {
                    return Ok((page(accepted, query.limit), cost));
                }
            }
            if readers.iter().all(|reader| reader.done) {
                return Ok((page(accepted, query.limit), cost));
            }
            let bottleneck = complete_from;
            let entries = self
                .read_index(&mut readers, bottleneck, query, &range, &mut cost)
                .await?;
            for candidate in entries {
                if worth_reading(&candidate, query, after)
                    && seen.insert(candidate.position.agent_id.clone())
                {
                    unsorted.push(candidate);
                }
            }
        }
    }

    /// Reads the next index page of every shard that holds the others back.
    async fn read_index(
        &self,
        readers: &mut [ShardReader],
        bottleneck: u64,
        query: &CapacityQuery,
        range: &BucketRange,
        cost: &mut ReadCost,
    ) -> Result<Vec<Candidate>, StoreError> {
        let mut requests = tokio::task::JoinSet::new();
        for (position, reader) in readers.iter_mut().enumerate() {
            if reader.done || reader.complete_from != bottleneck {
                continue;
            }
            // A shard's first page may hold the whole answer; later ones are
            // for crowded buckets, read in bulk.
            let limit = if reader.requests == 0 {
                i32::try_from(query.limit + 1).unwrap_or(INDEX_BATCH)
            } else {
                INDEX_BATCH
            };
            reader.requests += 1;
            let request = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(INDEX_NAME)
                .key_condition_expression("#shard = :shard AND #bucket BETWEEN :from AND :to")
                .projection_expression("#agent, #bucket, #fv, #pool")
                .expression_attribute_names("#shard", A_SHARD)
                .expression_attribute_names("#bucket", A_BUCKET)
                .expression_attribute_names("#agent", A_AGENT)
                .expression_attribute_names("#fv", A_FREE_VRAM)
                .expression_attribute_names("#pool", A_POOL)
                .expression_attribute_values(":shard", AttributeValue::S(reader.shard.to_string()))
                .expression_attribute_values(":from", AttributeValue::S(bucket_prefix(range.high)))
                .expression_attribute_values(
                    // '$' sorts just after '#': every key of the lowest bucket.
                    ":to",
                    AttributeValue::S(bucket_prefix(range.low).replace('#', "$")),
                )
                .set_exclusive_start_key(reader.next_key.take())
                .limit(limit)
                .return_consumed_capacity(ReturnConsumedCapacity::Total);
            requests.spawn(async move { (position, request.send().await) });
        }
        let mut candidates = Vec::new();
        while let Some(joined) = requests.join_next().await {
            let (position, output) =
                joined.map_err(|e| StoreError::Unavailable(format!("index read failed: {e}")))?;
            let output = output.map_err(unavailable)?;
            let reader = &mut readers[position];
            // Billed by the projected attributes' sizes, `shard` included.
            let shard_bytes = A_SHARD.len() + reader.shard.to_string().len();
            let bytes: usize = output
                .items()
                .iter()
                .map(|entry| item_size(entry) + shard_bytes)
                .sum();
            cost.add_index_read(
                output.items().len(),
                read_units(bytes, false),
                output.consumed_capacity().and_then(|c| c.capacity_units()),
            );
            for item in output.items() {
                let candidate = candidate(item)?;
                reader.complete_from = reader.complete_from.min(candidate.bucket + 1);
                candidates.push(candidate);
            }
            reader.next_key = output.last_evaluated_key().cloned();
            reader.done = reader.next_key.is_none();
        }
        Ok(candidates)
    }

    /// Reads `candidates` from the table and keeps, in their order, those
    /// that match now.
    async fn read_candidates(
        &self,
        candidates: &[Candidate],
        query: &CapacityQuery,
        now_ms: i64,
        accepted: &mut Vec<(Position, StoredAgent)>,
        cost: &mut ReadCost,
    ) -> Result<(), StoreError> {
        let mut keys = KeysAndAttributes::builder();
        for candidate in candidates {
            keys = keys.keys(HashMap::from([(
                A_AGENT.to_owned(),
                AttributeValue::S(candidate.position.agent_id.clone()),
            )]));
        }
        let mut pending = Some(HashMap::from([(
            self.table.clone(),
            keys.build().map_err(build_error)?,
        )]));
        let mut found: HashMap<String, StoredAgent> = HashMap::new();
        while let Some(request) = pending.take().filter(|request| !request.is_empty()) {
            let output = self
                .client
                .batch_get_item()
                .set_request_items(Some(request))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(unavailable)?;
            let items = output
                .responses()
                .and_then(|tables| tables.get(&self.table))
                .map(Vec::as_slice)
                .unwrap_or_default();
            cost.add_table_read(
                items,
                output
                    .consumed_capacity()
                    .iter()
                    .filter_map(|c| c.capacity_units())
                    .reduce(|a, b| a + b),
            );
            for item in items {
                let agent = decode(item)?;
                found.insert(agent.agent_id().to_owned(), agent);
            }
            pending = output.unprocessed_keys().cloned();
        }
        for candidate in candidates {
            if let Some(agent) = found.remove(&candidate.position.agent_id)
                && query.matches(&agent, now_ms)
            {
                accepted.push((candidate.position.clone(), agent));
            }
        }
        Ok(())
    }
}

/// What the index entry alone rules out, so that it costs no table read: a
/// place at or before the cursor, too little free VRAM, another pool.
fn worth_reading(candidate: &Candidate, query: &CapacityQuery, after: Option<&Position>) -> bool {
    let after_cursor = after
        .is_none_or(|cursor| answer_order(cursor, &candidate.position) == std::cmp::Ordering::Less);
    let enough_vram = query.required_gpus() == 0
        || candidate.position.gpu_free_max_mb as f64 >= query.min_gpu_free_mb();
    let in_pool = query
        .pool
        .as_ref()
        .is_none_or(|pool| candidate.pool.as_ref() == Some(pool));
    after_cursor && enough_vram && in_pool
}

/// The first `limit` answers, and a cursor when there were more.
fn page(mut accepted: Vec<(Position, StoredAgent)>, limit: usize) -> Page {
    let next = (accepted.len() > limit)
        .then(|| limit.checked_sub(1).map(|last| accepted[last].0.clone()))
        .flatten();
    accepted.truncate(limit);
    Page {
        agents: accepted.into_iter().map(|(_, agent)| agent).collect(),
        next,
    }
}

fn candidate(entry: &Item) -> Result<Candidate, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("index entry: {why}"));
    let text = |name: &str| entry.get(name).and_then(|value| value.as_s().ok());
    let agent_id = text(A_AGENT).ok_or_else(|| corrupt("no agent_id"))?;
    let free_mb: u64 = entry
        .get(A_FREE_VRAM)
        .and_then(|value| value.as_n().ok())
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(|| corrupt("no fv"))?;
    Ok(Candidate {
        bucket: bucket_of(free_mb),
        position: Position {
            gpu_free_max_mb: free_mb,
            agent_id: agent_id.clone(),
        },
        pool: text(A_POOL).cloned(),
    })
}
