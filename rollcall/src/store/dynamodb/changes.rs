//! State changes on DynamoDB (PROTOCOL.md §4): the sweep that marks agents
//! whose deadline passed, the events table, and what the agents table's
//! stream makes of both.
//!
//! - **Noticing a deadline.** While an agent may be online its item holds
//!   `dl`, its deadline rounded down to the minute, and the sparse index
//!   `by_deadline` (hash `shard`, range `dl`, keys only) lists it. `dl` is
//!   at most the deadline and, for an agent reporting on time, more than a
//!   heartbeat interval ahead of now, so a sweep that reads the entries
//!   with `dl <= now` reads the dead (and, briefly, the late) only: a
//!   bounded amount whatever the fleet's size. It moves each dead one to
//!   its shard's offline part and removes `dl` (one conditional
//!   `UpdateItem`, which a heartbeat since wins) and records its `offline`
//!   at once, for webhooks. A steady agent's `dl`
//!   changes once a minute: two index write units (docs/dynamodb.md,
//!   "State changes").
//! - **Deriving transitions.** Every write to an agent item reaches the
//!   stream consumer (`fleet-fn`) with its old and new image; it calls
//!   `changes::transitions` on them, so a heartbeat, a leaving, the sweep's
//!   mark and a query's mark all become events the same way, at least once,
//!   in order per agent. Events go to the events table keyed by agent and
//!   event key (a retried batch writes the same items), and the agent's
//!   availability (`av`) is updated on its item under an optimistic
//!   condition.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, ScalarAttributeType, WriteRequest};

use super::item::{A_AGENT, A_SHARD, Item, OFFLINE_PART, TTL_ATTRIBUTE, decode, is_agent, number};
use super::units::{IndexShape, Projection};
use super::{DynamoStore, build_error, create_hash_range_table, unavailable};
use crate::changes::{self, Availability, Event, Version};
use crate::store::{StoreError, Sweep};

pub const DEADLINE_INDEX_NAME: &str = "by_deadline";
/// The deadline rounded down to the minute, epoch seconds; present only
/// while the agent is in its shard's online part.
pub(super) const A_DEADLINE: &str = "dl";
/// `changes::Availability` as JSON, written by the stream consumer only.
pub(super) const A_AVAILABILITY: &str = "av";

/// The deadline index as the unit model sees it; `create_table` and
/// `infra/template.yaml` declare the same shape.
pub const DEADLINE_INDEX: IndexShape = IndexShape {
    hash: A_SHARD,
    range: Some(A_DEADLINE),
    projection: Projection::KeysOnly,
};

/// Entries one sweep reads per shard at most; more wait for the next run
/// (which `Sweep::more` asks for at once).
const SWEEP_PER_SHARD: i32 = 100;
/// Optimistic availability updates tried before the batch fails (and the
/// stream delivers it again).
const AVAILABILITY_TRIES: usize = 5;

const E_KEY: &str = "key";
const E_EVENT: &str = "ev";

/// What `dl` holds for a deadline: the minute it falls in.
pub fn deadline_watch(online_until_ms: i64) -> i64 {
    online_until_ms.div_euclid(60_000) * 60
}

impl DynamoStore {
    /// Marks the agents whose deadline passed by `now_ms` offline, up to
    /// `SWEEP_PER_SHARD` (100) candidates per shard.
    pub async fn sweep_due(&self, now_ms: i64) -> Result<Sweep, StoreError> {
        let mut reads = tokio::task::JoinSet::new();
        for shard in 0..self.shards {
            let store = self.clone();
            reads.spawn(async move { store.due_in(&shard.to_string(), now_ms).await });
        }
        let mut candidates = Vec::new();
        let mut more = false;
        while let Some(read) = reads.join_next().await {
            let (ids, part_has_more) =
                read.map_err(|e| StoreError::Unavailable(format!("sweep task failed: {e}")))??;
            candidates.extend(ids);
            more |= part_has_more;
        }
        let mut marked = 0;
        for chunk in candidates.chunks(100) {
            let (items, _) = self.read_batch(chunk.to_vec()).await?;
            for item in &items {
                let agent = match decode(item) {
                    Ok(agent) => agent,
                    Err(error) => {
                        tracing::warn!(%error, "an unreadable agent item was left unswept");
                        continue;
                    }
                };
                if agent.online_until_ms > now_ms || is_marked(item) {
                    continue;
                }
                let until = number(agent.online_until_ms);
                if self.move_offline(agent.agent_id(), until).await? {
                    marked += 1;
                    // Recorded at once, so that it reaches webhooks within
                    // about a minute of the deadline; the stream derives
                    // the same event (the same key) from the mark later.
                    if let Some(events) = &self.events {
                        events.put(&[changes::offline_at_deadline(&agent)]).await?;
                    }
                }
            }
        }
        Ok(Sweep { marked, more })
    }

    /// The agents in one shard's online part whose `dl` has come.
    async fn due_in(&self, part: &str, now_ms: i64) -> Result<(Vec<String>, bool), StoreError> {
        let output = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(DEADLINE_INDEX_NAME)
            .key_condition_expression("#shard = :part AND #dl <= :now")
            .expression_attribute_names("#shard", A_SHARD)
            .expression_attribute_names("#dl", A_DEADLINE)
            .expression_attribute_values(":part", AttributeValue::S(part.to_owned()))
            .expression_attribute_values(":now", number(now_ms.div_euclid(1000)))
            .limit(SWEEP_PER_SHARD)
            .send()
            .await
            .map_err(unavailable)?;
        let ids = output
            .items()
            .iter()
            .filter_map(|entry| entry.get(A_AGENT)?.as_s().ok().cloned())
            .collect();
        Ok((ids, output.last_evaluated_key().is_some()))
    }

    /// The agent's events from the events table, if one is configured.
    pub(super) async fn read_events(
        &self,
        agent_id: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<Event>, StoreError> {
        match &self.events {
            Some(events) => events.read(agent_id, after, limit, now_ms).await,
            None => Err(StoreError::Unavailable(
                "no events table configured (ROLLCALL_EVENTS_TABLE)".into(),
            )),
        }
    }
}

/// Whether the store has marked the agent offline: it left, or a sweep or
/// a query moved it to the offline part.
fn is_marked(item: &Item) -> bool {
    item.get(A_SHARD)
        .and_then(|shard| shard.as_s().ok())
        .is_some_and(|shard| shard.starts_with(OFFLINE_PART))
}

/// The table of events: partition `agent_id`, sort `key` (the event key),
/// the event as JSON, and a TTL 30 days after it happened.
#[derive(Clone)]
pub struct EventsTable {
    client: Client,
    name: String,
}

impl EventsTable {
    pub fn new(client: Client, name: impl Into<String>) -> Self {
        Self {
            client,
            name: name.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the table and its TTL, as `infra/template.yaml` does.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        create_hash_range_table(&self.client, &self.name, A_AGENT, E_KEY).await
    }

    /// Writes events, 25 to a request; one already there is written again
    /// unchanged. The same event twice in one call goes once: a
    /// `BatchWriteItem` naming a key twice is refused whole, and a stream
    /// batch refused for good would hold its shard for a day.
    pub async fn put(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut seen = std::collections::HashSet::new();
        let events: Vec<&Event> = events
            .iter()
            .filter(|event| seen.insert((event.agent_id.as_str(), event.key())))
            .collect();
        for chunk in events.chunks(25) {
            let mut requests = Vec::with_capacity(chunk.len());
            for event in chunk {
                let json = serde_json::to_string(event)
                    .map_err(|e| StoreError::Corrupt(format!("cannot encode an event: {e}")))?;
                let item = HashMap::from([
                    (
                        A_AGENT.to_owned(),
                        AttributeValue::S(event.agent_id.clone()),
                    ),
                    (E_KEY.to_owned(), AttributeValue::S(event.key())),
                    (E_EVENT.to_owned(), AttributeValue::S(json)),
                    (
                        TTL_ATTRIBUTE.to_owned(),
                        number((event.at_ms + changes::KEPT_MS).div_euclid(1000) + 86_400),
                    ),
                ]);
                let put = PutRequest::builder()
                    .set_item(Some(item))
                    .build()
                    .map_err(build_error)?;
                requests.push(WriteRequest::builder().put_request(put).build());
            }
            let mut pending = Some(HashMap::from([(self.name.clone(), requests)]));
            let mut backoff = Duration::from_millis(25);
            while let Some(request) = pending.take().filter(|request| !request.is_empty()) {
                let output = self
                    .client
                    .batch_write_item()
                    .set_request_items(Some(request))
                    .send()
                    .await
                    .map_err(unavailable)?;
                pending = output.unprocessed_items().cloned();
                if pending.as_ref().is_some_and(|left| !left.is_empty()) {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
        Ok(())
    }

    /// Up to `limit` events of the last 30 days after `after`, oldest first.
    pub async fn read(
        &self,
        agent_id: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<Event>, StoreError> {
        let floor = changes::key_after(now_ms - changes::KEPT_MS);
        let from = match after {
            Some(after) if after > floor.as_str() => after.to_owned(),
            _ => floor,
        };
        let output = self
            .client
            .query()
            .table_name(&self.name)
            .key_condition_expression("#agent = :agent AND #key > :from")
            .expression_attribute_names("#agent", A_AGENT)
            .expression_attribute_names("#key", E_KEY)
            .expression_attribute_values(":agent", AttributeValue::S(agent_id.to_owned()))
            .expression_attribute_values(":from", AttributeValue::S(from))
            .limit(i32::try_from(limit).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(unavailable)?;
        output
            .items()
            .iter()
            .map(|item| {
                let json = item
                    .get(E_EVENT)
                    .and_then(|value| value.as_s().ok())
                    .ok_or_else(|| StoreError::Corrupt("an event item lacks ev".into()))?;
                serde_json::from_str(json)
                    .map_err(|e| StoreError::Corrupt(format!("unreadable event: {e}")))
            })
            .collect()
    }
}

#[cfg(feature = "webhooks")]
#[async_trait::async_trait]
impl crate::webhooks::Neighbours for EventsTable {
    async fn around(&self, event: &Event) -> Result<(Option<Event>, Option<Event>), String> {
        let one = |forward: bool| async move {
            let output = self
                .client
                .query()
                .table_name(&self.name)
                .key_condition_expression(if forward {
                    "#agent = :agent AND #key > :key"
                } else {
                    "#agent = :agent AND #key < :key"
                })
                .expression_attribute_names("#agent", A_AGENT)
                .expression_attribute_names("#key", E_KEY)
                .expression_attribute_values(":agent", AttributeValue::S(event.agent_id.clone()))
                .expression_attribute_values(":key", AttributeValue::S(event.key()))
                .scan_index_forward(forward)
                .limit(1)
                .send()
                .await
                .map_err(|error| unavailable(error).to_string())?;
            output
                .items()
                .first()
                .and_then(|item| item.get(E_EVENT)?.as_s().ok())
                .map(|json| {
                    serde_json::from_str(json).map_err(|e| format!("unreadable event: {e}"))
                })
                .transpose()
        };
        Ok((one(false).await?, one(true).await?))
    }
}

/// The events a batch of the events table's stream carries, in order
/// (TTL's removals left out).
pub fn events_of(changes: &[super::fleet::Change]) -> Vec<Event> {
    changes
        .iter()
        .filter_map(|change| change.new.as_ref())
        .filter_map(|item| item.get(E_EVENT)?.as_s().ok())
        .filter_map(|json| match serde_json::from_str(json) {
            Ok(event) => Some(event),
            Err(error) => {
                tracing::warn!(%error, "an unreadable event in the stream was skipped");
                None
            }
        })
        .collect()
}

/// The stream consumer's half: the transitions a batch of agent-table
/// changes holds, recorded in the events table and in each agent's
/// availability.
#[derive(Clone)]
pub struct ChangeRecorder {
    client: Client,
    agents_table: String,
    events: EventsTable,
}

/// What one batch recorded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub events: usize,
    pub agents: usize,
}

impl ChangeRecorder {
    pub fn new(client: Client, agents_table: impl Into<String>, events: EventsTable) -> Self {
        Self {
            client,
            agents_table: agents_table.into(),
            events,
        }
    }

    /// Records a batch's transitions: events first, then availability, so
    /// a batch that fails part way is delivered again and finishes.
    pub async fn record(&self, changes: &[super::fleet::Change]) -> Result<Recorded, StoreError> {
        let mut by_agent: BTreeMap<String, (Vec<Event>, i64)> = BTreeMap::new();
        for change in changes {
            let Some(new_item) = change.new.as_ref().filter(|item| is_agent(item)) else {
                continue;
            };
            let new = match decode(new_item) {
                Ok(agent) => agent,
                Err(error) => {
                    tracing::warn!(%error, "an unreadable agent item in the stream was skipped");
                    continue;
                }
            };
            let old_item = change.old.as_ref().filter(|item| is_agent(item));
            let old = old_item.and_then(|item| decode(item).ok());
            let before = old.as_ref().zip(old_item).map(|(agent, item)| Version {
                agent,
                marked_offline: is_marked(item),
            });
            let events = changes::transitions(
                before,
                Version {
                    agent: &new,
                    marked_offline: is_marked(new_item),
                },
            );
            // An item written before availability was kept starts it now.
            if events.is_empty() && new_item.contains_key(A_AVAILABILITY) {
                continue;
            }
            let entry = by_agent
                .entry(new.agent_id().to_owned())
                .or_insert_with(|| (Vec::new(), new.received_at_ms));
            entry.0.extend(events);
        }
        let all: Vec<Event> = by_agent
            .values()
            .flat_map(|(events, _)| events.clone())
            .collect();
        self.events.put(&all).await?;
        for (agent_id, (events, first_seen_ms)) in &by_agent {
            self.update_availability(agent_id, events, *first_seen_ms)
                .await?;
        }
        Ok(Recorded {
            events: all.len(),
            agents: by_agent.len(),
        })
    }

    /// Applies `events` to the agent's stored availability, under the
    /// condition that nobody changed it since it was read.
    async fn update_availability(
        &self,
        agent_id: &str,
        events: &[Event],
        first_seen_ms: i64,
    ) -> Result<(), StoreError> {
        for _ in 0..AVAILABILITY_TRIES {
            let output = self
                .client
                .get_item()
                .table_name(&self.agents_table)
                .key(A_AGENT, AttributeValue::S(agent_id.to_owned()))
                .projection_expression("#av, #agent")
                .expression_attribute_names("#av", A_AVAILABILITY)
                .expression_attribute_names("#agent", A_AGENT)
                .consistent_read(true)
                .send()
                .await
                .map_err(unavailable)?;
            let Some(item) = output.item() else {
                // Gone (expired and deleted): nothing to keep it for.
                return Ok(());
            };
            let stored = item.get(A_AVAILABILITY).and_then(|value| value.as_s().ok());
            let mut availability = match stored {
                Some(json) => serde_json::from_str(json).map_err(|e| {
                    StoreError::Corrupt(format!("unreadable availability of {agent_id}: {e}"))
                })?,
                None => Availability::first_seen(first_seen_ms),
            };
            availability.apply(events);
            let json = serde_json::to_string(&availability)
                .map_err(|e| StoreError::Corrupt(format!("cannot encode availability: {e}")))?;
            let mut update = self
                .client
                .update_item()
                .table_name(&self.agents_table)
                .key(A_AGENT, AttributeValue::S(agent_id.to_owned()))
                .update_expression("SET #av = :av")
                .expression_attribute_names("#av", A_AVAILABILITY)
                .expression_attribute_names("#agent", A_AGENT)
                .expression_attribute_values(":av", AttributeValue::S(json));
            update = match stored {
                Some(stored) => update
                    .condition_expression("attribute_exists(#agent) AND #av = :seen")
                    .expression_attribute_values(":seen", AttributeValue::S(stored.clone())),
                None => update
                    .condition_expression("attribute_exists(#agent) AND attribute_not_exists(#av)"),
            };
            match update.send().await {
                Ok(_) => return Ok(()),
                Err(error)
                    if error
                        .as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                {
                    continue;
                }
                Err(error) => return Err(unavailable(error)),
            }
        }
        Err(StoreError::Unavailable(format!(
            "the availability of {agent_id} kept changing under its update"
        )))
    }
}

/// Reads `av` beside a decoded record.
pub(super) fn availability_of(item: &Item) -> Option<Availability> {
    let json = item.get(A_AVAILABILITY)?.as_s().ok()?;
    match serde_json::from_str(json) {
        Ok(availability) => Some(availability),
        Err(error) => {
            tracing::warn!(%error, "unreadable availability; the record is read without it");
            None
        }
    }
}

/// The attribute definition the deadline index's range key needs.
pub(super) fn deadline_attribute()
-> Result<aws_sdk_dynamodb::types::AttributeDefinition, StoreError> {
    aws_sdk_dynamodb::types::AttributeDefinition::builder()
        .attribute_name(A_DEADLINE)
        .attribute_type(ScalarAttributeType::N)
        .build()
        .map_err(build_error)
}
