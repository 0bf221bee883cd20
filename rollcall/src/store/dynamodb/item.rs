//! How an agent becomes one DynamoDB item, and what the capacity index holds.
//!
//! The index `by_vram_rank` is keyed by `shard` (hash) and `rank` (range:
//! the most free VRAM on one GPU the agent can have, inverted so that
//! ascending is answer order, then the agent id). It projects only what
//! rarely changes: `fx`, whether that figure is exact, and `pool`. Every other
//! attribute changes on every heartbeat and stays out of the index.
//!
//! The figure behind the rank is kept while the agent's real figure stays
//! within `FV_SLACK_MB` of it, so the entry is rewritten only when a job
//! starts or ends, or a display's allocations have wandered far: an idle or
//! steadily training GPU's heartbeat costs one write unit in all, and a
//! wandering desktop's nearly so (docs/dynamodb.md).

use std::collections::HashMap;
use std::io::Read as _;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

use super::units::{IndexShape, Projection};
use crate::record::StoredAgent;
use crate::store::StoreError;

pub type Item = HashMap<String, AttributeValue>;

pub const INDEX_NAME: &str = "by_vram_rank";
pub const TTL_ATTRIBUTE: &str = "expires_at";

pub(super) const A_AGENT: &str = "agent_id";
pub(super) const A_SENT: &str = "sent";
const A_UNTIL: &str = "until";
pub(super) const A_POOL: &str = "pool";
const A_CORES: &str = "cores";
const A_MEMORY: &str = "mem";
pub(super) const A_SHARD: &str = "shard";
pub(super) const A_RANK: &str = "rank";
pub(super) const A_FREE_VRAM: &str = "fv";
pub(super) const A_EXACT: &str = "fx";
const A_RECORD: &str = "rec";

/// The capacity index as the unit model sees it; `create_table` and
/// `infra/template.yaml` declare the same shape.
pub const CAPACITY_INDEX: IndexShape = IndexShape {
    hash: A_SHARD,
    range: Some(A_RANK),
    projection: Projection::Include(&[A_EXACT, A_POOL]),
};
pub const TABLE_KEY: &[&str] = &[A_AGENT];

/// How far an agent's real largest free VRAM may wander from the figure its
/// index entry holds before the entry is rewritten. A display's allocations
/// move by tens of MiB; a job starting or ending moves by GiB.
pub const FV_SLACK_MB: u64 = 256;

/// What an index entry says about an agent's largest free VRAM on one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexedVram {
    pub free_mb: u64,
    /// The agent really has `free_mb`; otherwise it has within
    /// `FV_SLACK_MB` of it.
    pub exact: bool,
}

impl IndexedVram {
    pub fn exact(free_mb: u64) -> Self {
        Self {
            free_mb,
            exact: true,
        }
    }

    /// The figure to write for an agent that now has `free_mb`, given its
    /// stored item: the stored figure while the real one stays within the
    /// slack of it, so that the index entry is left alone.
    pub fn choose(free_mb: u64, stored: Option<&Item>) -> Self {
        let kept = stored
            .and_then(|item| item.get(A_FREE_VRAM))
            .and_then(|value| value.as_n().ok())
            .and_then(|digits| digits.parse::<u64>().ok());
        match kept {
            Some(kept) if kept.abs_diff(free_mb) <= FV_SLACK_MB => Self {
                free_mb: kept,
                exact: kept == free_mb,
            },
            _ => Self::exact(free_mb),
        }
    }

    /// The figure an entry holds, from its rank (`upper_mb`) and flag.
    pub fn from_rank(upper_mb: u64, exact: bool) -> Self {
        Self {
            free_mb: if exact {
                upper_mb
            } else {
                upper_mb.saturating_sub(FV_SLACK_MB)
            },
            exact,
        }
    }

    /// The most free VRAM the agent can really have: what the rank orders by.
    pub fn upper_mb(&self) -> u64 {
        if self.exact {
            self.free_mb
        } else {
            self.free_mb.saturating_add(FV_SLACK_MB)
        }
    }

    /// The least free VRAM the agent can really have.
    pub fn lower_mb(&self) -> u64 {
        if self.exact {
            self.free_mb
        } else {
            self.free_mb.saturating_sub(FV_SLACK_MB)
        }
    }
}

/// Ranks are written as `RANK_MAX − figure`, so that ascending is answer order.
const RANK_MAX: u64 = 9_999_999_999;

/// The rank prefix of every entry whose upper figure is `upper_mb`; it sorts
/// just before all of them.
pub fn rank_prefix(upper_mb: u64) -> String {
    format!("{:010}#", RANK_MAX - upper_mb.min(RANK_MAX))
}

/// A rank bound that sorts just after every entry whose upper figure is `upper_mb`.
pub fn rank_prefix_end(upper_mb: u64) -> String {
    // '$' sorts just after '#'.
    format!("{:010}$", RANK_MAX - upper_mb.min(RANK_MAX))
}

pub fn rank_key(vram: IndexedVram, agent_id: &str) -> String {
    format!("{}{agent_id}", rank_prefix(vram.upper_mb()))
}

/// The upper figure and agent id a rank holds.
pub(super) fn parse_rank(rank: &str) -> Option<(u64, &str)> {
    let (inverted, agent_id) = rank.split_once('#')?;
    let inverted: u64 = inverted.parse().ok()?;
    Some((RANK_MAX.checked_sub(inverted)?, agent_id))
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

/// The item for one agent, its index entry exact.
pub fn encode(agent: &StoredAgent, shards: u32) -> Result<Item, StoreError> {
    encode_indexed(
        agent,
        shards,
        IndexedVram::exact(agent.heartbeat.gpu_free_max_mb()),
    )
}

/// The item for one agent: the figures the write condition and the index
/// need as attributes, and the whole record as a deflated blob, which keeps a
/// two-GPU item under 1 KB.
pub fn encode_indexed(
    agent: &StoredAgent,
    shards: u32,
    indexed: IndexedVram,
) -> Result<Item, StoreError> {
    let heartbeat = &agent.heartbeat;
    let json = serde_json::to_vec(agent)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode agent record: {e}")))?;
    let record = miniz_oxide::deflate::compress_to_vec(&json, 6);
    let mut item = HashMap::from([
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
        (A_RECORD.into(), AttributeValue::B(Blob::new(record))),
    ]);
    set_index_figure(&mut item, &heartbeat.agent_id, indexed);
    Ok(item)
}

/// Sets the attributes that say where the agent stands in the index.
pub fn set_index_figure(item: &mut Item, agent_id: &str, indexed: IndexedVram) {
    item.insert(
        A_RANK.into(),
        AttributeValue::S(rank_key(indexed, agent_id)),
    );
    item.insert(A_FREE_VRAM.into(), number(indexed.free_mb));
    item.insert(A_EXACT.into(), AttributeValue::Bool(indexed.exact));
}

pub(super) fn decode(item: &Item) -> Result<StoredAgent, StoreError> {
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
pub fn item_size(item: &Item) -> usize {
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

pub(super) fn number(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sort_as_answers_do() {
        let rank = |free_mb, id| rank_key(IndexedVram::exact(free_mb), id);
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
        let wandered = IndexedVram {
            free_mb: 9000,
            exact: false,
        };
        assert_eq!(
            parse_rank(&rank_key(wandered, "lab-07")),
            Some((9000 + FV_SLACK_MB, "lab-07"))
        );
        assert!(rank_prefix(100) < rank(100, "a") && rank(100, "a") < rank_prefix_end(100));
        assert_eq!(parse_rank("garbage"), None);
    }

    #[test]
    fn the_entry_keeps_its_figure_while_the_real_one_stays_within_the_slack() {
        let stored = |free_mb: u64| HashMap::from([(A_FREE_VRAM.to_owned(), number(free_mb))]);
        assert_eq!(IndexedVram::choose(9000, None), IndexedVram::exact(9000));
        assert_eq!(
            IndexedVram::choose(9000, Some(&stored(9000))),
            IndexedVram::exact(9000)
        );
        let wandered = IndexedVram::choose(9000 + FV_SLACK_MB, Some(&stored(9000)));
        assert_eq!(
            wandered,
            IndexedVram {
                free_mb: 9000,
                exact: false
            }
        );
        assert!(
            wandered.lower_mb() <= 9000 + FV_SLACK_MB && 9000 + FV_SLACK_MB <= wandered.upper_mb()
        );
        assert_eq!(
            IndexedVram::choose(9001 + FV_SLACK_MB, Some(&stored(9000))),
            IndexedVram::exact(9001 + FV_SLACK_MB)
        );
        assert_eq!(
            IndexedVram::choose(100, Some(&stored(200))).lower_mb(),
            0,
            "bounds saturate at zero"
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
