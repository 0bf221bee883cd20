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
pub(super) const A_UNTIL: &str = "until";
pub(super) const A_POOL: &str = "pool";
pub(super) const A_CORES: &str = "cores";
pub(super) const A_MEMORY: &str = "mem";
pub(super) const A_SHARD: &str = "shard";
pub(super) const A_RANK: &str = "rank";
/// The figure an entry held before it became the rank's own; items written
/// by earlier versions carry it, and the next write removes it.
pub(super) const A_LEGACY_FREE_VRAM: &str = "fv";
pub(super) const A_EXACT: &str = "fx";
pub(super) const A_RECORD: &str = "rec";

/// The capacity index as the unit model sees it; `create_table` and
/// `infra/template.yaml` declare the same shape.
pub const CAPACITY_INDEX: IndexShape = IndexShape {
    hash: A_SHARD,
    range: Some(A_RANK),
    projection: Projection::Include(&[A_EXACT, A_POOL]),
};
pub const TABLE_KEY: &[&str] = &[A_AGENT];

/// How far an agent's real largest free VRAM may wander below the figure
/// its index entry holds (twice this) before the entry is rewritten. A
/// display's allocations move by tens of MiB; a job starting or ending
/// moves by GiB.
pub const FV_SLACK_MB: u64 = 256;

/// What an index entry says about an agent's largest free VRAM on one GPU:
/// the figure its rank orders by, and whether the agent has exactly that.
/// An inexact entry holds an upper bound: the agent has between
/// `upper_mb − 2 × FV_SLACK_MB` and `upper_mb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexedVram {
    pub upper_mb: u64,
    pub exact: bool,
}

impl IndexedVram {
    pub fn exact(free_mb: u64) -> Self {
        Self {
            upper_mb: free_mb,
            exact: true,
        }
    }

    fn inexact(upper_mb: u64) -> Self {
        Self {
            upper_mb,
            exact: false,
        }
    }

    /// What a stored item's entry holds; `None` for an item without one.
    pub fn of_item(item: &Item) -> Option<Self> {
        let rank = item.get(A_RANK)?.as_s().ok()?;
        let (upper_mb, _) = parse_rank(rank)?;
        // An entry without the flag was written exact.
        let exact = item
            .get(A_EXACT)
            .and_then(|value| value.as_bool().ok())
            .copied()
            .unwrap_or(true);
        Some(Self { upper_mb, exact })
    }

    /// Whether this entry still places an agent that now has `free_mb`:
    /// exactly, or as an upper bound within the slack.
    pub fn holds(&self, free_mb: u64) -> bool {
        if self.exact {
            self.upper_mb == free_mb
        } else {
            (self.lower_mb()..=self.upper_mb).contains(&free_mb)
        }
    }

    /// The entry to write for an agent that now has `free_mb`, given the
    /// stored one. An entry is rewritten as rarely as the rank allows:
    /// - it still holds the figure: kept (no index write);
    /// - an exact entry whose agent dipped within the slack: the same rank,
    ///   marked inexact (one index unit, the flag; its return to the figure
    ///   costs nothing);
    /// - a small rise: an inexact bound with room either way (a key change);
    /// - a job started or ended: the exact figure (a key change).
    pub fn choose(free_mb: u64, stored: Option<Self>) -> Self {
        let Some(stored) = stored else {
            return Self::exact(free_mb);
        };
        if stored.holds(free_mb) {
            stored
        } else if free_mb < stored.upper_mb && stored.upper_mb - free_mb <= 2 * FV_SLACK_MB {
            Self::inexact(stored.upper_mb)
        } else if free_mb > stored.upper_mb && free_mb - stored.upper_mb <= FV_SLACK_MB {
            Self::inexact(free_mb.saturating_add(FV_SLACK_MB))
        } else {
            Self::exact(free_mb)
        }
    }

    /// The least free VRAM the agent can really have.
    pub fn lower_mb(&self) -> u64 {
        if self.exact {
            self.upper_mb
        } else {
            self.upper_mb.saturating_sub(2 * FV_SLACK_MB)
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
    format!("{}{agent_id}", rank_prefix(vram.upper_mb))
}

/// The upper figure and agent id a rank holds.
pub fn parse_rank(rank: &str) -> Option<(u64, &str)> {
    let (inverted, agent_id) = rank.split_once('#')?;
    let inverted: u64 = inverted.parse().ok()?;
    Some((RANK_MAX.checked_sub(inverted)?, agent_id))
}

/// The index partition an agent's entry lives in: its shard's online part
/// (`"3"`) while it may be online, the offline part (`"off3"`) once it has
/// left. An `online` query reads only the online parts, so an agent that
/// left costs it nothing.
pub fn partition_key(agent_id: &str, shards: u32, online: bool) -> String {
    let shard = shard_of(agent_id, shards);
    if online {
        shard.to_string()
    } else {
        format!("{OFFLINE_PART}{shard}")
    }
}

pub(super) const OFFLINE_PART: &str = "off";

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
            // A leaving heartbeat's deadline is its arrival.
            AttributeValue::S(partition_key(
                &heartbeat.agent_id,
                shards,
                agent.online_until_ms > agent.received_at_ms,
            )),
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
        assert_eq!(
            parse_rank(&rank_key(IndexedVram::inexact(9256), "lab-07")),
            Some((9256, "lab-07"))
        );
        assert!(rank_prefix(100) < rank(100, "a") && rank(100, "a") < rank_prefix_end(100));
        assert_eq!(parse_rank("garbage"), None);
    }

    #[test]
    fn the_entry_is_rewritten_only_when_its_rank_no_longer_holds() {
        let exact = IndexedVram::exact;
        let inexact = IndexedVram::inexact;
        assert_eq!(IndexedVram::choose(9000, None), exact(9000));
        assert_eq!(IndexedVram::choose(9000, Some(exact(9000))), exact(9000));
        // A dip keeps the rank and clears the flag; the return costs nothing.
        let dipped = IndexedVram::choose(8900, Some(exact(9000)));
        assert_eq!(dipped, inexact(9000));
        assert_eq!(IndexedVram::choose(9000, Some(dipped)), dipped);
        assert_eq!(
            IndexedVram::choose(9000 - 2 * FV_SLACK_MB, Some(dipped)),
            dipped
        );
        // A small rise: a bound with room either way.
        assert_eq!(
            IndexedVram::choose(9100, Some(exact(9000))),
            inexact(9100 + FV_SLACK_MB)
        );
        // A job started or ended: exact again.
        assert_eq!(
            IndexedVram::choose(8999 - 2 * FV_SLACK_MB, Some(dipped)),
            exact(8999 - 2 * FV_SLACK_MB)
        );
        assert_eq!(
            IndexedVram::choose(9001 + FV_SLACK_MB, Some(exact(9000))),
            exact(9001 + FV_SLACK_MB)
        );
        // Whatever is chosen places the agent: its figure within the bounds.
        for free_mb in [0, 100, 8000, 8900, 9000, 9100, 9300, 20_000] {
            for stored in [None, Some(exact(9000)), Some(dipped), Some(inexact(300))] {
                let chosen = IndexedVram::choose(free_mb, stored);
                assert!(chosen.holds(free_mb), "{free_mb} {stored:?} -> {chosen:?}");
            }
        }
        assert_eq!(inexact(100).lower_mb(), 0, "bounds saturate at zero");
    }

    #[test]
    fn the_entry_reads_back_from_the_item() {
        let mut item = Item::new();
        assert_eq!(IndexedVram::of_item(&item), None);
        for vram in [IndexedVram::exact(9000), IndexedVram::inexact(9256)] {
            set_index_figure(&mut item, "lab-07", vram);
            assert_eq!(IndexedVram::of_item(&item), Some(vram));
        }
        assert_eq!(
            partition_key("lab-07", 4, true),
            shard_of("lab-07", 4).to_string()
        );
        assert_eq!(
            partition_key("lab-07", 4, false),
            format!("off{}", shard_of("lab-07", 4))
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
