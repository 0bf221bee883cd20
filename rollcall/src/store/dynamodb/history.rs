//! Per-minute history: one item per agent and aligned five-minute window.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;

use super::item::{A_AGENT, Item, TTL_ATTRIBUTE, number};
use super::{DynamoStore, unavailable};
use crate::heartbeat::{MinuteRollup, Spread};
use crate::history;
use crate::store::StoreError;

impl DynamoStore {
    /// One item per aligned five-minute window (`<agent>#h#<window>`), so that
    /// a history costs one write per window, not per minute, and a read knows
    /// its keys from the time range alone. Each minute is its own attribute
    /// (`m<minute>`), so one `UpdateItem` merges a window that arrives in
    /// parts without reading it first. The items carry no index keys, so
    /// capacity queries never see them. The windows are written concurrently:
    /// ingest bounds how many one heartbeat brings and how long it waits.
    pub(super) async fn write_history(
        &self,
        agent_id: &str,
        minutes: Vec<MinuteRollup>,
        expires_at_s: i64,
    ) -> Result<(), StoreError> {
        let mut windows: BTreeMap<u64, Vec<MinuteRollup>> = BTreeMap::new();
        for rollup in minutes {
            windows
                .entry(history::window_of(rollup.minute))
                .or_default()
                .push(rollup);
        }
        let mut writes = tokio::task::JoinSet::new();
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
            let write = self
                .client
                .update_item()
                .table_name(&self.table)
                .key(A_AGENT, AttributeValue::S(key))
                .update_expression(format!("SET {}", assignments.join(", ")))
                .set_expression_attribute_names(Some(names))
                .set_expression_attribute_values(Some(values));
            writes.spawn(async move { write.send().await.map_err(unavailable) });
        }
        while let Some(written) = writes.join_next().await {
            written
                .map_err(|error| StoreError::Unavailable(format!("history write: {error}")))??;
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
        let since_minute = since_minute.max(now_minute.saturating_sub(history::MAX_READ_MINUTES));
        let keys: Vec<String> = (history::window_of(since_minute)..=history::window_of(now_minute))
            .map(|window| history_key(agent_id, window))
            .collect();
        let now_s = now_ms.div_euclid(1000);
        let mut minutes = Vec::new();
        for chunk in keys.chunks(super::query::TABLE_BATCH) {
            let (items, _) = self.read_batch(chunk.to_vec()).await?;
            for item in &items {
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
        }
        minutes.sort_by_key(|rollup| rollup.minute);
        Ok(minutes)
    }
}

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
        let json = serde_json::to_string(&StoredMinute::of(rollup))
            .map_err(|e| StoreError::Corrupt(format!("cannot encode history: {e}")))?;
        item.insert(minute_attribute(rollup.minute), AttributeValue::S(json));
    }
    Ok(item)
}

/// One minute as a window stores it: positional, `[[load min, avg, max],
/// [memory min, avg, max], [free VRAM per GPU]]`, since the attribute's name
/// holds the minute and key names would double the window (an 8-GPU window
/// of real figures was over 1 KB with them, two write units).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredMinute([f64; 3], [f64; 3], Vec<u64>);

impl StoredMinute {
    fn of(rollup: &MinuteRollup) -> Self {
        let spread = |s: &Spread| [s.min, s.avg, s.max];
        Self(
            spread(&rollup.load_1m),
            spread(&rollup.memory_available_mb),
            rollup.gpu_free_mb_min.clone(),
        )
    }

    fn rollup(self, minute: u64) -> MinuteRollup {
        let spread = |[min, avg, max]: [f64; 3]| Spread { min, avg, max };
        MinuteRollup {
            minute,
            load_1m: spread(self.0),
            memory_available_mb: spread(self.1),
            gpu_free_mb_min: self.2,
        }
    }
}

/// The attribute that holds one minute of a history window.
fn minute_attribute(minute: u64) -> String {
    format!("m{minute}")
}

fn decode_history(item: &Item) -> Result<Vec<MinuteRollup>, StoreError> {
    let unreadable = |e: serde_json::Error| StoreError::Corrupt(format!("unreadable history: {e}"));
    item.iter()
        .filter_map(|(name, value)| {
            let minute = name.strip_prefix('m')?.parse::<u64>().ok()?;
            Some((minute, value))
        })
        .map(|(minute, value)| {
            let text = value
                .as_s()
                .map_err(|_| StoreError::Corrupt("history minute is not a string".into()))?;
            // Windows written before the positional form hold whole roll-ups.
            if text.starts_with('{') {
                serde_json::from_str(text).map_err(unreadable)
            } else {
                let stored: StoredMinute = serde_json::from_str(text).map_err(unreadable)?;
                Ok(stored.rollup(minute))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::dynamodb::item_size;

    /// Figures as a collector's minute of 1 s samples really averages them.
    fn minute(minute: u64, gpus: usize) -> MinuteRollup {
        MinuteRollup {
            minute,
            load_1m: Spread {
                min: 27.53,
                avg: 28.013666666666666,
                max: 29.71,
            },
            memory_available_mb: Spread {
                min: 734_123.0,
                avg: 734_987.4666666667,
                max: 736_002.0,
            },
            gpu_free_mb_min: (0..gpus as u64)
                .map(|gpu| 81_559 - 1_234 * gpu - 17)
                .collect(),
        }
    }

    #[test]
    fn a_window_of_real_figures_fits_one_unit_up_to_16_gpus() {
        for gpus in [0, 1, 2, 4, 8, 16] {
            let minutes: Vec<_> = (0..5).map(|m| minute(29_402_000 + m, gpus)).collect();
            let key = history_key("render-farm-node-00042", 5_880_400);
            let item = encode_history(&key, &minutes, 1_795_700_000).unwrap();
            let size = item_size(&item);
            println!("a five-minute window, {gpus} GPUs: {size} bytes");
            assert!(size <= 1024, "{gpus} GPUs: {size} bytes");
            let mut read = decode_history(&item).unwrap();
            read.sort_by_key(|rollup| rollup.minute);
            assert_eq!(read, minutes);
        }
    }

    #[test]
    fn windows_written_whole_still_read() {
        let rollup = minute(29_402_001, 2);
        let mut item = encode_history("a#h#1", &[], 1).unwrap();
        item.insert(
            minute_attribute(rollup.minute),
            AttributeValue::S(serde_json::to_string(&rollup).unwrap()),
        );
        assert_eq!(decode_history(&item).unwrap(), vec![rollup]);
    }
}
