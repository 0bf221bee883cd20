//! Per-minute history: one item per agent and aligned five-minute window.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};

use super::item::{A_AGENT, Item, TTL_ATTRIBUTE, number};
use super::{DynamoStore, build_error, unavailable};
use crate::heartbeat::MinuteRollup;
use crate::store::StoreError;

impl DynamoStore {
    /// One item per aligned five-minute window (`<agent>#h#<window>`), so that
    /// a history costs one write per window, not per minute, and a read knows
    /// its keys from the time range alone. Each minute is its own attribute
    /// (`m<minute>`), so one `UpdateItem` merges a window that arrives in
    /// parts without reading it first. The items carry no index keys, so
    /// capacity queries never see them.
    pub(super) async fn write_history(
        &self,
        agent_id: &str,
        minutes: Vec<MinuteRollup>,
        expires_at_s: i64,
    ) -> Result<(), StoreError> {
        let mut windows: BTreeMap<u64, Vec<MinuteRollup>> = BTreeMap::new();
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

    pub(super) async fn read_history(
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
            let mut request = KeysAndAttributes::builder();
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
) -> Result<Item, StoreError> {
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

fn decode_history(item: &Item) -> Result<Vec<MinuteRollup>, StoreError> {
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
