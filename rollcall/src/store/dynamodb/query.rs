//! Capacity queries: candidates from the index, exact answers from the table.
//!
//! The index orders agents by the most free VRAM each can have (its rank),
//! then agent id: exactly answer order for an agent whose figure is exact,
//! and an upper bound for one whose figure has wandered within the slack.
//! So no agent can come before the entry a shard has read last, and none
//! before its own entry. Candidates are read from the table with
//! `BatchGetItem` in index order, only as many as the page needs, and an
//! agent is answered once nothing unread or unfetched can come before it.
//! `CapacityQuery::matches` has the final word on each (status, cores,
//! memory, labels, exact VRAM), as in every store.

use std::collections::{BinaryHeap, HashMap, HashSet};

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, ReturnConsumedCapacity};

use super::item::{
    A_AGENT, A_EXACT, A_POOL, A_RANK, A_SHARD, FV_SLACK_MB, INDEX_NAME, IndexedVram, Item, decode,
    item_size, parse_rank, rank_prefix, rank_prefix_end,
};
use super::units::read_units;
use super::{DynamoStore, ReadCost, build_error, unavailable};
use crate::capacity::{CapacityQuery, Position, answer_order};
use crate::record::StoredAgent;
use crate::store::{Page, PageFill, StoreError};

/// The most index entries one Query request asks for. Entries are about 60
/// bytes, so this stays well under a request's 1 MB.
const INDEX_BATCH: i32 = 1000;
/// `BatchGetItem` takes at most 100 keys.
const TABLE_BATCH: usize = 100;

/// One index entry.
#[derive(Debug, Clone)]
struct Candidate {
    /// The earliest place in answer order the agent can take: its rank.
    earliest: Position,
    vram: IndexedVram,
    pool: Option<String>,
}

/// An accepted agent, ordered so that a max-heap pops answer order.
struct Answer(Position, StoredAgent);

impl PartialEq for Answer {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Answer {}
impl PartialOrd for Answer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Answer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        answer_order(&other.0, &self.0)
    }
}

/// The ranks a query reads: from the cursor's, widened by what an inexact
/// entry may hide, down to the VRAM bound.
struct RankRange {
    from: String,
    to: String,
}

impl RankRange {
    /// `None` when no rank can hold a match.
    fn new(query: &CapacityQuery, after: Option<&Position>) -> Option<Self> {
        let min_mb = if query.required_gpus() > 0 {
            let min_free_mb = query.min_gpu_free_mb().ceil();
            if min_free_mb >= u64::MAX as f64 {
                return None;
            }
            min_free_mb as u64
        } else {
            0
        };
        let from = match after {
            // An inexact entry ranked up to twice the slack above the cursor
            // may still really come after it.
            Some(cursor) => rank_prefix(cursor.gpu_free_max_mb.saturating_add(2 * FV_SLACK_MB)),
            None => "0".to_owned(),
        };
        let to = rank_prefix_end(min_mb);
        (from <= to).then_some(Self { from, to })
    }
}

/// Reading one shard's part of the index, page by page.
struct ShardReader {
    shard: u32,
    next_key: Option<Item>,
    done: bool,
    requests: u32,
    /// The last entry read: nothing unread in this shard comes before it.
    last: Option<Position>,
}

impl ShardReader {
    /// The earliest place an agent whose entry this shard has not returned
    /// yet can take; `None` once the shard is read to the end.
    fn unread_bound(&self) -> Option<Position> {
        if self.done {
            return None;
        }
        Some(self.last.clone().unwrap_or(Position {
            gpu_free_max_mb: u64::MAX,
            agent_id: String::new(),
        }))
    }
}

/// Of two bounds, the one earlier in answer order.
fn earlier(a: Option<Position>, b: Option<Position>) -> Option<Position> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if answer_order(&a, &b).is_le() { a } else { b }),
        (a, b) => a.or(b),
    }
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
        let mut fill = PageFill::new(query.limit);
        let Some(range) = RankRange::new(query, after) else {
            return Ok((fill.page(), cost));
        };
        let mut readers: Vec<ShardReader> = (0..self.shards)
            .map(|shard| ShardReader {
                shard,
                next_key: None,
                done: false,
                requests: 0,
                last: None,
            })
            .collect();
        // Read from the index, not yet from the table; earliest last.
        let mut pending: Vec<Candidate> = Vec::new();
        let mut fetched: BinaryHeap<Answer> = BinaryHeap::new();
        let mut seen: HashSet<String> = HashSet::new();
        loop {
            let unread = readers
                .iter()
                .filter_map(ShardReader::unread_bound)
                .fold(None, |earliest, bound| earlier(earliest, Some(bound)));
            let next_pending = pending.last().map(|candidate| candidate.earliest.clone());
            let frontier = earlier(unread.clone(), next_pending.clone());
            if settle(&mut fetched, frontier.as_ref(), &mut fill) {
                return Ok((fill.page(), cost));
            }
            let Some(frontier) = frontier else {
                return Ok((fill.page(), cost));
            };
            if next_pending.is_some_and(|next| next == frontier) {
                // Only as many as the page still needs: each costs a read.
                let wanted = fill
                    .wanted()
                    .saturating_sub(fetched.len())
                    .clamp(1, TABLE_BATCH);
                let batch: Vec<Candidate> = pending
                    .drain(pending.len().saturating_sub(wanted)..)
                    .rev()
                    .collect();
                self.read_candidates(&batch, query, after, now_ms, &mut fetched, &mut cost)
                    .await?;
            } else {
                for candidate in self
                    .read_index(&mut readers, unread.as_ref(), query, &range, &mut cost)
                    .await?
                {
                    if worth_reading(&candidate, query, after)
                        && seen.insert(candidate.earliest.agent_id.clone())
                    {
                        pending.push(candidate);
                    }
                }
                pending.sort_by(|a, b| answer_order(&b.earliest, &a.earliest));
            }
        }
    }

    /// Reads the next index page of every shard that holds the others back.
    async fn read_index(
        &self,
        readers: &mut [ShardReader],
        bottleneck: Option<&Position>,
        query: &CapacityQuery,
        range: &RankRange,
        cost: &mut ReadCost,
    ) -> Result<Vec<Candidate>, StoreError> {
        let shards = readers.len().max(1);
        let mut requests = tokio::task::JoinSet::new();
        for (position, reader) in readers.iter_mut().enumerate() {
            if reader.unread_bound().as_ref() != bottleneck {
                continue;
            }
            // A shard's first page holds about its share of the answer, with
            // room to spare; each later one twice the last, for crowds.
            let first = (query.limit + 1) * 3 / 2 / shards + 8;
            let limit = i32::try_from(first << reader.requests.min(10))
                .unwrap_or(INDEX_BATCH)
                .min(INDEX_BATCH);
            reader.requests += 1;
            let request = self.index_page(reader, range, limit);
            requests.spawn(async move { (position, request.send().await) });
        }
        let mut candidates = Vec::new();
        while let Some(joined) = requests.join_next().await {
            let (position, output) =
                joined.map_err(|e| StoreError::Unavailable(format!("index read failed: {e}")))?;
            let output = output.map_err(unavailable)?;
            let reader = &mut readers[position];
            // Billed by the entries' projected attributes: the keys (the
            // table's included) and what the index projects.
            let shard_bytes = A_SHARD.len() + reader.shard.to_string().len();
            let bytes: usize = output
                .items()
                .iter()
                .map(|entry| item_size(entry) + shard_bytes + A_AGENT.len())
                .sum();
            cost.add_index_read(
                output.items().len(),
                read_units(bytes, false),
                output.consumed_capacity().and_then(|c| c.capacity_units()),
            );
            for entry in output.items() {
                let candidate = candidate(entry)?;
                reader.last = Some(candidate.earliest.clone());
                candidates.push(candidate);
            }
            reader.next_key = output.last_evaluated_key().cloned();
            reader.done = reader.next_key.is_none();
        }
        Ok(candidates)
    }

    /// The request for `reader`'s next index page within `range`.
    fn index_page(
        &self,
        reader: &mut ShardReader,
        range: &RankRange,
        limit: i32,
    ) -> aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder {
        self.client
            .query()
            .table_name(&self.table)
            .index_name(INDEX_NAME)
            .key_condition_expression("#shard = :shard AND #rank BETWEEN :from AND :to")
            .projection_expression("#rank, #fx, #pool")
            .expression_attribute_names("#shard", A_SHARD)
            .expression_attribute_names("#rank", A_RANK)
            .expression_attribute_names("#fx", A_EXACT)
            .expression_attribute_names("#pool", A_POOL)
            .expression_attribute_values(":shard", AttributeValue::S(reader.shard.to_string()))
            .expression_attribute_values(":from", AttributeValue::S(range.from.clone()))
            .expression_attribute_values(":to", AttributeValue::S(range.to.clone()))
            .set_exclusive_start_key(reader.next_key.take())
            .limit(limit)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
    }

    /// Reads `candidates` from the table and keeps those that match now and
    /// come after the cursor, by their real figures.
    async fn read_candidates(
        &self,
        candidates: &[Candidate],
        query: &CapacityQuery,
        after: Option<&Position>,
        now_ms: i64,
        fetched: &mut BinaryHeap<Answer>,
        cost: &mut ReadCost,
    ) -> Result<(), StoreError> {
        let mut keys = KeysAndAttributes::builder();
        for candidate in candidates {
            keys = keys.keys(HashMap::from([(
                A_AGENT.to_owned(),
                AttributeValue::S(candidate.earliest.agent_id.clone()),
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
        for agent in found.into_values() {
            let position = Position::of(&agent);
            let after_cursor = after.is_none_or(|cursor| answer_order(cursor, &position).is_lt());
            if after_cursor && query.matches(&agent, now_ms) {
                fetched.push(Answer(position, agent));
            }
        }
        Ok(())
    }
}

/// What the index entry alone rules out, so that it costs no table read: a
/// place at or before the cursor, too little free VRAM, another pool.
fn worth_reading(candidate: &Candidate, query: &CapacityQuery, after: Option<&Position>) -> bool {
    let after_cursor = after.is_none_or(|cursor| {
        if candidate.vram.exact {
            answer_order(cursor, &candidate.earliest).is_lt()
        } else {
            // It may really sit anywhere down to its lower bound.
            candidate.vram.lower_mb() <= cursor.gpu_free_max_mb
        }
    });
    let enough_vram = query.required_gpus() == 0
        || candidate.earliest.gpu_free_max_mb as f64 >= query.min_gpu_free_mb();
    let in_pool = query
        .pool
        .as_ref()
        .is_none_or(|pool| candidate.pool.as_ref() == Some(pool));
    after_cursor && enough_vram && in_pool
}

/// Answers everything fetched that nothing unread or unfetched can overtake
/// (all of it when `frontier` is `None`); `true` once the page is full.
fn settle(
    fetched: &mut BinaryHeap<Answer>,
    frontier: Option<&Position>,
    fill: &mut PageFill,
) -> bool {
    while let Some(Answer(position, _)) = fetched.peek() {
        if frontier.is_some_and(|bound| answer_order(position, bound).is_ge()) {
            return false;
        }
        if let Some(Answer(_, agent)) = fetched.pop()
            && fill.push(agent)
        {
            return true;
        }
    }
    false
}

fn candidate(entry: &Item) -> Result<Candidate, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("index entry: {why}"));
    let rank = entry
        .get(A_RANK)
        .and_then(|value| value.as_s().ok())
        .ok_or_else(|| corrupt("no rank"))?;
    let (upper_mb, agent_id) = parse_rank(rank).ok_or_else(|| corrupt("unreadable rank"))?;
    // An entry without the flag was written exact.
    let exact = entry
        .get(A_EXACT)
        .and_then(|value| value.as_bool().ok())
        .copied()
        .unwrap_or(true);
    Ok(Candidate {
        earliest: Position {
            gpu_free_max_mb: upper_mb,
            agent_id: agent_id.to_owned(),
        },
        vram: IndexedVram::from_rank(upper_mb, exact),
        pool: entry
            .get(A_POOL)
            .and_then(|value| value.as_s().ok())
            .cloned(),
    })
}
