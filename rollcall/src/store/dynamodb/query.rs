//! Capacity queries: the index in rank order, answers from the table, every
//! page inside a read budget.
//!
//! The index orders agents by the figure of their entry (the most free VRAM
//! on one GPU each can have, exact for all but agents whose figure wanders
//! within the slack), then agent id. DynamoDB answers in that order: each
//! shard's part is read in rank order, the shards are merged, candidates are
//! read from the table with `BatchGetItem` in full batches, and
//! `CapacityQuery::matches` has the final word on each (status, cores,
//! memory, labels, exact VRAM), as in every store. An answer's place is its
//! entry's, so a page is decided from the index alone: it resumes exactly
//! after the last entry it decided, and an item that is newer than its entry
//! (the index lags) cannot move an answer before one it should follow.
//!
//! A page stops when its budget ([`PageBudget`]) is spent, with fewer answers
//! than asked for and a cursor after the last entry it decided, so that no
//! filter, however selective, makes one request read the fleet.
//!
//! Agents that left sit in the offline part of their shard, which an
//! `online` query never reads. An agent that died without a word is still in
//! the online part: the first query that reads it moves it (a conditional
//! update that loses to any heartbeat), so it is read one by one once.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, ReturnConsumedCapacity};

use super::item::{
    A_AGENT, A_EXACT, A_POOL, A_RANK, A_SHARD, A_UNTIL, INDEX_NAME, IndexedVram, Item,
    OFFLINE_PART, decode, item_size, parse_rank, rank_key, rank_prefix_end,
};
use super::units::read_units;
use super::{DynamoStore, ReadCost, build_error, unavailable};
use crate::capacity::{CapacityQuery, Position, StatusFilter, answer_order};
use crate::record::StoredAgent;
use crate::store::{Page, PageFill, StoreError};

/// The most index entries one Query request asks for. Entries are about 60
/// bytes, so this stays well under a request's 1 MB.
const INDEX_BATCH: i32 = 1000;
/// `BatchGetItem` takes at most 100 keys.
pub(super) const TABLE_BATCH: usize = 100;
/// What an item read is budgeted at: one item up to 4 KB, eventually
/// consistent. Agent items are under 2 KB.
const ITEM_UNITS: f64 = 0.5;
/// Unprocessed keys are sent again after this, doubled each time.
const UNPROCESSED_BACKOFF: Duration = Duration::from_millis(25);
/// Agents that died without a word, moved to the offline part per page at most.
const MAX_MOVES_PER_PAGE: usize = 25;

/// What one page may read before it stops short with a cursor. The figures
/// hold at any fleet size: a page's reads follow the budget, not the fleet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PageBudget {
    /// Read units, index and table together, by DynamoDB's billing rules.
    pub read_units: f64,
    /// Rounds of requests one after another (each round's requests run
    /// concurrently).
    pub rounds: u32,
    /// Wall-clock time; a round is not started past it.
    pub time: Duration,
}

impl Default for PageBudget {
    /// About 160 read units and 2 s: a page of 100 answers with room to
    /// spare (about 55 units for the agents and their index entries, 50 for
    /// their claims items, found or not), far inside the query function's
    /// 10 s timeout.
    fn default() -> Self {
        Self {
            read_units: 160.0,
            rounds: 12,
            time: Duration::from_secs(2),
        }
    }
}

/// One index entry, in answer order by `position`.
#[derive(Debug, Clone)]
struct Entry {
    position: Position,
    pool: Option<String>,
    /// Read from an online part: an offline agent found through it is moved.
    online_part: bool,
}

/// Reading one partition of the index (a shard's online or offline part)
/// in rank order.
struct PartReader {
    partition: String,
    online_part: bool,
    next_key: Option<Item>,
    done: bool,
    requests: u32,
    /// The last entry read: nothing unread in this part comes before it.
    last: Option<Position>,
}

impl PartReader {
    fn new(partition: String, online_part: bool) -> Self {
        Self {
            partition,
            online_part,
            next_key: None,
            done: false,
            requests: 0,
            last: None,
        }
    }

    /// The earliest place an entry this part has not returned yet can take;
    /// `None` once the part is read to the end.
    fn unread_bound(&self) -> Option<Position> {
        if self.done {
            return None;
        }
        Some(self.last.clone().unwrap_or(Position {
            max_gpu_free_mb: u64::MAX,
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

/// What a page has spent and decided so far.
struct Progress {
    budget: PageBudget,
    started: Instant,
    rounds: u32,
    cost: ReadCost,
    /// The last entry decided, in order: every entry up to it is answered
    /// or ruled out.
    decided: Option<Position>,
    fetched: usize,
    matched: usize,
}

impl Progress {
    fn units_left(&self) -> f64 {
        self.budget.read_units - self.cost.units
    }

    /// Whether another round may start. A page always decides something
    /// before it stops, so following cursors always ends.
    fn may_continue(&self) -> bool {
        self.decided.is_none()
            || (self.rounds < self.budget.rounds
                && self.started.elapsed() < self.budget.time
                && self.units_left() >= ITEM_UNITS)
    }

    /// How many candidates the next table read should take: what the page
    /// still needs, scaled by how many of those read so far matched, within
    /// what the budget has left.
    fn fetch_size(&self, wanted: usize) -> usize {
        let scaled = wanted.saturating_mul(self.fetched + 1) / (self.matched + 1);
        let affordable = (self.units_left() / ITEM_UNITS).floor().max(1.0) as usize;
        let most = 3 * TABLE_BATCH;
        scaled.clamp(wanted.clamp(1, most), most).min(affordable)
    }

    /// Rules on `decided` in order with what the table read `found`: the
    /// matches join the page, the agents found offline in an online part are
    /// noted for moving. `true` once the page is full.
    fn decide(
        &mut self,
        decided: Vec<(Entry, bool)>,
        mut found: HashMap<String, Fetched>,
        query: &CapacityQuery,
        now_ms: i64,
        fill: &mut PageFill,
        moves: &mut Vec<(String, Option<AttributeValue>)>,
    ) -> bool {
        for (entry, was_read) in decided {
            self.decided = Some(entry.position.clone());
            if !was_read {
                continue;
            }
            self.fetched += 1;
            let Some(Fetched { agent, until }) = found.remove(&entry.position.agent_id) else {
                continue;
            };
            if agent.is_expired(now_ms) {
                continue;
            }
            if entry.online_part && !agent.is_online(now_ms) && moves.len() < MAX_MOVES_PER_PAGE {
                moves.push((agent.agent_id().to_owned(), until));
            }
            if query.matches(&agent, now_ms) {
                self.matched += 1;
                if fill.push(entry.position, agent) {
                    return true;
                }
            }
        }
        false
    }
}

/// The next ready entries in order, up to `size` that need a table read;
/// each with whether it does (the index rules the others out at once).
fn take_next(
    pending: &mut VecDeque<Entry>,
    ready: usize,
    size: usize,
    query: &CapacityQuery,
) -> Vec<(Entry, bool)> {
    let (mut take, mut reads) = (0, 0);
    for entry in pending.iter().take(ready) {
        if worth_reading(entry, query) {
            if reads == size {
                break;
            }
            reads += 1;
        }
        take += 1;
    }
    pending
        .drain(..take)
        .map(|entry| {
            let read = worth_reading(&entry, query);
            (entry, read)
        })
        .collect()
}

/// An agent read from the table, with what moving it needs.
struct Fetched {
    agent: StoredAgent,
    until: Option<AttributeValue>,
}

impl DynamoStore {
    /// A capacity query within the default budget, with what it read.
    pub async fn query_measured(
        &self,
        query: &CapacityQuery,
        after: Option<&Position>,
        now_ms: i64,
    ) -> Result<(Page, ReadCost), StoreError> {
        self.query_within(query, after, now_ms, PageBudget::default())
            .await
    }

    /// A capacity query that stops once `budget` is spent.
    pub async fn query_within(
        &self,
        query: &CapacityQuery,
        after: Option<&Position>,
        now_ms: i64,
        budget: PageBudget,
    ) -> Result<(Page, ReadCost), StoreError> {
        let mut progress = Progress {
            budget,
            started: Instant::now(),
            rounds: 0,
            cost: ReadCost::default(),
            decided: None,
            fetched: 0,
            matched: 0,
        };
        let mut fill = PageFill::new(query.limit);
        let Some(to) = rank_bound(query) else {
            return Ok((fill.page(), progress.cost));
        };
        let from = after.map_or_else(|| "0".to_owned(), rank_of);
        if from > to {
            return Ok((fill.page(), progress.cost));
        }
        let mut readers = self.readers(query.status);
        // Read from the index and not yet decided, in answer order.
        let mut pending: VecDeque<Entry> = VecDeque::new();
        let mut moves = Vec::new();
        loop {
            if !progress.may_continue() {
                let next = progress.decided.clone();
                return Ok((
                    self.finish(fill.short_page(next), moves).await,
                    progress.cost,
                ));
            }
            let unread = readers
                .iter()
                .filter_map(PartReader::unread_bound)
                .fold(None, |earliest, bound| earlier(earliest, Some(bound)));
            let ready = pending
                .iter()
                .take_while(|entry| {
                    unread
                        .as_ref()
                        .is_none_or(|bound| answer_order(&entry.position, bound).is_le())
                })
                .count();
            let size = progress.fetch_size(fill.wanted());
            if ready < size && unread.is_some() {
                // Not enough decidable yet: read on in every part that holds
                // back the entries the next table read would take.
                let horizon = pending.get(size).map(|entry| entry.position.clone());
                let entries = self
                    .read_index(
                        &mut readers,
                        horizon.as_ref(),
                        query,
                        (&from, &to),
                        after,
                        &mut progress,
                    )
                    .await?;
                let mut merged: Vec<Entry> = pending.drain(..).chain(entries).collect();
                merged.sort_by(|a, b| answer_order(&a.position, &b.position));
                pending.extend(merged);
                continue;
            }
            if ready == 0 {
                return Ok((self.finish(fill.page(), moves).await, progress.cost));
            }
            let decided = take_next(&mut pending, ready, size, query);
            let batch: Vec<String> = decided
                .iter()
                .filter(|(_, read)| *read)
                .map(|(entry, _)| entry.position.agent_id.clone())
                .collect();
            let mut found = self.read_items(&batch, &mut progress).await?;
            self.add_claims(&mut found, query, now_ms, &mut progress)
                .await?;
            if progress.decide(decided, found, query, now_ms, &mut fill, &mut moves) {
                return Ok((self.finish(fill.page(), moves).await, progress.cost));
            }
        }
    }

    /// Reads the claims of the agents that match but for claims: claims
    /// can rule them out, and the answer shows them. Agents that fail
    /// anyway cost no claims read.
    async fn add_claims(
        &self,
        found: &mut HashMap<String, Fetched>,
        query: &CapacityQuery,
        now_ms: i64,
        progress: &mut Progress,
    ) -> Result<(), StoreError> {
        let candidates: Vec<String> = found
            .values()
            .filter(|fetched| query.matches_before_claims(&fetched.agent, now_ms))
            .map(|fetched| fetched.agent.agent_id().to_owned())
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        progress.rounds += 1;
        let (mut claims, cost) = self.read_claims_of(&candidates, now_ms).await?;
        progress.cost.merge(&cost);
        for (agent_id, fetched) in found.iter_mut() {
            if let Some(held) = claims.remove(agent_id) {
                fetched.agent.claims = held;
            }
        }
        Ok(())
    }

    /// Every part a query with this status reads: online parts always
    /// (an agent that died without a word may still be there), offline
    /// parts unless only online agents are asked for.
    fn readers(&self, status: StatusFilter) -> Vec<PartReader> {
        let offline = status != StatusFilter::Online;
        (0..self.shards)
            .flat_map(|shard| {
                let online = PartReader::new(shard.to_string(), true);
                let left =
                    offline.then(|| PartReader::new(format!("{OFFLINE_PART}{shard}"), false));
                std::iter::once(online).chain(left)
            })
            .collect()
    }

    /// The page, once the agents found offline in an online part have been
    /// moved out of it. A move that fails is left to the next query.
    async fn finish(&self, page: Page, moves: Vec<(String, Option<AttributeValue>)>) -> Page {
        let mut requests = tokio::task::JoinSet::new();
        for (agent_id, until) in moves {
            let Some(until) = until else { continue };
            let store = self.clone();
            requests.spawn(async move {
                let moved = store.move_offline(&agent_id, until).await;
                (agent_id, moved)
            });
        }
        while let Some(joined) = requests.join_next().await {
            match joined {
                Ok((agent_id, Ok(true))) => {
                    tracing::debug!(agent_id, "offline agent moved out of the online index")
                }
                Ok((agent_id, Ok(false))) => {
                    tracing::debug!(agent_id, "offline agent not moved: it reported since")
                }
                Ok((agent_id, Err(error))) => {
                    tracing::debug!(agent_id, %error, "offline agent not moved")
                }
                Err(error) => tracing::debug!(%error, "move task failed"),
            }
        }
        page
    }

    /// Moves an agent found past its deadline (its `until` as read, in
    /// `until_seen`) to its shard's offline part: `false` when a heartbeat
    /// won the race since the read, and the agent stays where it is.
    pub async fn move_offline(
        &self,
        agent_id: &str,
        until_seen: AttributeValue,
    ) -> Result<bool, StoreError> {
        let offline = super::partition_key(agent_id, self.shards, false);
        let online = super::partition_key(agent_id, self.shards, true);
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(A_AGENT, AttributeValue::S(agent_id.to_owned()))
            // Out of the deadline index too: nothing is left to notice.
            .update_expression("SET #shard = :offline REMOVE #dl")
            .expression_attribute_names("#dl", super::changes::A_DEADLINE)
            // Loses to any heartbeat since the read.
            .condition_expression("#until = :until AND #shard = :online")
            .expression_attribute_names("#shard", A_SHARD)
            .expression_attribute_names("#until", A_UNTIL)
            .expression_attribute_values(":offline", AttributeValue::S(offline))
            .expression_attribute_values(":online", AttributeValue::S(online))
            .expression_attribute_values(":until", until_seen)
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(error) => Err(super::unavailable(error)),
        }
    }

    /// Reads the next index page of every part whose unread entries may
    /// come before `horizon` (every unfinished part when `None`).
    async fn read_index(
        &self,
        readers: &mut [PartReader],
        horizon: Option<&Position>,
        query: &CapacityQuery,
        (from, to): (&str, &str),
        after: Option<&Position>,
        progress: &mut Progress,
    ) -> Result<Vec<Entry>, StoreError> {
        let parts = readers.len().max(1);
        let mut requests = tokio::task::JoinSet::new();
        for (position, reader) in readers.iter_mut().enumerate() {
            let Some(bound) = reader.unread_bound() else {
                continue;
            };
            if horizon.is_some_and(|horizon| answer_order(&bound, horizon).is_gt()) {
                continue;
            }
            // A part's first page holds about its share of the answer, with
            // room to spare; each later one twice the last, for crowds.
            let first = (query.limit + 1) * 3 / 2 / parts + 8;
            // Entries are under 100 bytes: half a unit reads about 40.
            let affordable = (progress.units_left().max(0.0) * 80.0) as usize / parts;
            let limit = i32::try_from((first << reader.requests.min(10)).min(affordable).max(1))
                .unwrap_or(INDEX_BATCH)
                .min(INDEX_BATCH);
            reader.requests += 1;
            let request = self.index_page(reader, from, to, limit);
            requests.spawn(async move { (position, request.send().await) });
        }
        progress.rounds += 1;
        let mut entries = Vec::new();
        while let Some(joined) = requests.join_next().await {
            let (position, output) =
                joined.map_err(|e| StoreError::Unavailable(format!("index read failed: {e}")))?;
            let output = output.map_err(unavailable)?;
            let reader = &mut readers[position];
            // Billed by the entries' projected attributes: the keys (the
            // table's included) and what the index projects.
            let key_bytes = A_SHARD.len() + reader.partition.len() + A_AGENT.len();
            let bytes: usize = output
                .items()
                .iter()
                .map(|entry| item_size(entry) + key_bytes)
                .sum();
            progress.cost.add_index_read(
                output.items().len(),
                read_units(bytes, false),
                output.consumed_capacity().and_then(|c| c.capacity_units()),
            );
            for item in output.items() {
                let entry = entry(item, reader.online_part)?;
                reader.last = Some(entry.position.clone());
                // The range starts at the cursor's own entry, inclusive.
                if after != Some(&entry.position) {
                    entries.push(entry);
                }
            }
            reader.next_key = output.last_evaluated_key().cloned();
            reader.done = reader.next_key.is_none();
        }
        Ok(entries)
    }

    /// The request for `reader`'s next index page within `from..=to`.
    fn index_page(
        &self,
        reader: &mut PartReader,
        from: &str,
        to: &str,
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
            .expression_attribute_values(":shard", AttributeValue::S(reader.partition.clone()))
            .expression_attribute_values(":from", AttributeValue::S(from.to_owned()))
            .expression_attribute_values(":to", AttributeValue::S(to.to_owned()))
            .set_exclusive_start_key(reader.next_key.take())
            .limit(limit)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
    }

    /// Reads `agent_ids` from the table in one round: full batches of 100
    /// keys, concurrently, each resending its unprocessed keys with backoff.
    async fn read_items(
        &self,
        agent_ids: &[String],
        progress: &mut Progress,
    ) -> Result<HashMap<String, Fetched>, StoreError> {
        if agent_ids.is_empty() {
            return Ok(HashMap::new());
        }
        progress.rounds += 1;
        let mut batches = tokio::task::JoinSet::new();
        for chunk in agent_ids.chunks(TABLE_BATCH) {
            let store = self.clone();
            let chunk = chunk.to_vec();
            batches.spawn(async move { store.read_batch(chunk).await });
        }
        let mut found = HashMap::new();
        while let Some(joined) = batches.join_next().await {
            let (items, cost) = joined
                .map_err(|e| StoreError::Unavailable(format!("table read failed: {e}")))??;
            progress.cost.merge(&cost);
            for item in items {
                let agent = decode(&item)?;
                found.insert(
                    agent.agent_id().to_owned(),
                    Fetched {
                        agent,
                        until: item.get(A_UNTIL).cloned(),
                    },
                );
            }
        }
        Ok(found)
    }

    /// One `BatchGetItem` of at most 100 keys, until no key is left
    /// unprocessed (DynamoDB leaves some when throttled or past 16 MB).
    pub(super) async fn read_batch(
        &self,
        agent_ids: Vec<String>,
    ) -> Result<(Vec<Item>, ReadCost), StoreError> {
        let mut keys = KeysAndAttributes::builder();
        for agent_id in agent_ids {
            keys = keys.keys(HashMap::from([(
                A_AGENT.to_owned(),
                AttributeValue::S(agent_id),
            )]));
        }
        let mut pending = Some(HashMap::from([(
            self.table.clone(),
            keys.build().map_err(build_error)?,
        )]));
        let mut items = Vec::new();
        let mut cost = ReadCost::default();
        let mut backoff = UNPROCESSED_BACKOFF;
        while let Some(request) = pending.take().filter(|request| !request.is_empty()) {
            if cost.requests > 0 {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            let output = self
                .client
                .batch_get_item()
                .set_request_items(Some(request))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(unavailable)?;
            let read = output
                .responses()
                .and_then(|tables| tables.get(&self.table))
                .map(Vec::as_slice)
                .unwrap_or_default();
            cost.add_table_read(
                read,
                output
                    .consumed_capacity()
                    .iter()
                    .filter_map(|c| c.capacity_units())
                    .reduce(|a, b| a + b),
            );
            items.extend(read.iter().cloned());
            pending = output.unprocessed_keys().cloned();
        }
        Ok((items, cost))
    }
}

/// The lowest rank that can hold a match: every entry past it has too
/// little free VRAM. `None` when no rank can.
fn rank_bound(query: &CapacityQuery) -> Option<String> {
    let min_free_mb = query.vram_floor_mb().ceil();
    if min_free_mb >= u64::MAX as f64 {
        return None;
    }
    Some(rank_prefix_end(min_free_mb as u64))
}

/// The rank a cursor stands at: the entry it was issued after.
fn rank_of(cursor: &Position) -> String {
    rank_key(IndexedVram::exact(cursor.max_gpu_free_mb), &cursor.agent_id)
}

/// What the index entry alone rules out, so that it costs no table read:
/// too little free VRAM, a pool not asked for or not visible to the caller. (Every entry read is past the
/// cursor: the range starts there and skips the cursor's own.)
fn worth_reading(entry: &Entry, query: &CapacityQuery) -> bool {
    let enough_vram = entry.position.max_gpu_free_mb as f64 >= query.vram_floor_mb();
    let in_pool = entry.pool.as_ref().is_none_or(|pool| {
        query.sees_pool(pool) && query.pool.as_ref().is_none_or(|wanted| wanted == pool)
    });
    enough_vram && in_pool
}

fn entry(item: &Item, online_part: bool) -> Result<Entry, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("index entry: {why}"));
    let rank = item
        .get(A_RANK)
        .and_then(|value| value.as_s().ok())
        .ok_or_else(|| corrupt("no rank"))?;
    let (upper_mb, agent_id) = parse_rank(rank).ok_or_else(|| corrupt("unreadable rank"))?;
    Ok(Entry {
        position: Position {
            max_gpu_free_mb: upper_mb,
            agent_id: agent_id.to_owned(),
        },
        pool: item
            .get(A_POOL)
            .and_then(|value| value.as_s().ok())
            .cloned(),
        online_part,
    })
}
