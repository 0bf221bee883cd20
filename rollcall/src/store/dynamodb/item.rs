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

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use miniz_oxide::deflate::core::{
    CompressorOxide, TDEFLFlush, TDEFLStatus, compress, create_comp_flags_from_zip_params,
};

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
pub(super) const A_SHARD: &str = "shard";
pub(super) const A_RANK: &str = "rank";
/// The figure an entry held before it became the rank's own; items written
/// by earlier versions carry it, and the next write removes it.
pub(super) const A_LEGACY_FREE_VRAM: &str = "fv";
pub(super) const A_EXACT: &str = "fx";
/// The whole record, deflated against [`RECORD_DICTIONARY`].
pub(super) const A_RECORD: &str = "rd";
/// The whole record deflated alone, as earlier versions wrote it; still
/// read, and removed by the next write.
pub(super) const A_LEGACY_RECORD: &str = "rec";
/// Figures earlier versions kept beside the record; removed by the next write.
pub(super) const A_LEGACY_CORES: &str = "cores";
pub(super) const A_LEGACY_MEMORY: &str = "mem";

/// A typical record's JSON, which every record is deflated against (a
/// preset dictionary): the keys and the usual values then cost a few bytes
/// of back-reference instead of a few hundred of literals, so that a
/// 16-GPU host's item stays under 1 KB. Part of the stored format: changing
/// a byte of it makes every stored record unreadable, so a new dictionary
/// needs a new attribute name (a test pins its digest).
const RECORD_DICTIONARY: &[u8] = include_bytes!("record_dictionary.json");

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

pub(crate) const OFFLINE_PART: &str = "off";

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
        IndexedVram::exact(agent.heartbeat.max_gpu_free_mb()),
    )
}

/// The item for one agent: the figures the write condition and the index
/// need as attributes, and the whole record as a blob deflated against the
/// record dictionary, which keeps a 16-GPU item under 1 KB.
pub fn encode_indexed(
    agent: &StoredAgent,
    shards: u32,
    indexed: IndexedVram,
) -> Result<Item, StoreError> {
    let heartbeat = &agent.heartbeat;
    let json = serde_json::to_vec(agent)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode agent record: {e}")))?;
    let record = deflate_record(&json);
    let mut item = HashMap::from([
        (
            A_AGENT.into(),
            AttributeValue::S(heartbeat.agent_id.clone()),
        ),
        (A_SENT.into(), number(heartbeat.sent_at_ms)),
        (A_UNTIL.into(), number(agent.online_until_ms)),
        (TTL_ATTRIBUTE.into(), number(agent.expires_at_s)),
        (A_POOL.into(), AttributeValue::S(heartbeat.pool.clone())),
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
    if agent.online_until_ms > agent.received_at_ms {
        item.insert(
            super::changes::A_DEADLINE.into(),
            number(super::changes::deadline_watch(agent.online_until_ms)),
        );
    }
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

/// Whether an item is an agent's (history windows share the table).
pub(super) fn is_agent(item: &Item) -> bool {
    item.contains_key(A_RECORD) || item.contains_key(A_LEGACY_RECORD)
}

pub(super) fn decode(item: &Item) -> Result<StoredAgent, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("agent item: {why}"));
    let blob = |name: &str| item.get(name).and_then(|value| value.as_b().ok());
    let json = match (blob(A_RECORD), blob(A_LEGACY_RECORD)) {
        (Some(record), _) => inflate_record(record.as_ref()),
        (None, Some(record)) => inflate(record.as_ref()),
        (None, None) => return Err(corrupt("no record attribute")),
    }
    .ok_or_else(|| corrupt("the record does not inflate"))?;
    let mut agent: StoredAgent = serde_json::from_slice(&json)
        .map_err(|e| corrupt(&format!("rec is not an agent record: {e}")))?;
    agent.availability = super::changes::availability_of(item);
    Ok(agent)
}

/// Deflates a record's JSON against the dictionary: the dictionary goes
/// through the compressor first, a sync flush ends its part on a byte
/// boundary, and only what follows is kept.
fn deflate_record(json: &[u8]) -> Vec<u8> {
    let flags = create_comp_flags_from_zip_params(6, 0, 0);
    let mut compressor = CompressorOxide::new(flags);
    let mut output = Vec::with_capacity(json.len() + RECORD_DICTIONARY.len());
    push(
        &mut compressor,
        RECORD_DICTIONARY,
        TDEFLFlush::Sync,
        &mut output,
    );
    let dictionary_part = output.len();
    push(&mut compressor, json, TDEFLFlush::Finish, &mut output);
    output.split_off(dictionary_part)
}

/// Runs the compressor over all of `input`, growing `output` as it needs.
fn push(
    compressor: &mut CompressorOxide,
    mut input: &[u8],
    flush: TDEFLFlush,
    output: &mut Vec<u8>,
) {
    loop {
        let start = output.len();
        let room = input.len() + 1024;
        output.resize(start + room, 0);
        let (status, read, written) = compress(compressor, input, &mut output[start..], flush);
        output.truncate(start + written);
        input = &input[read..];
        match status {
            TDEFLStatus::Done => return,
            // Everything taken and flushed with room to spare: this flush is done.
            TDEFLStatus::Okay if input.is_empty() && written < room => return,
            TDEFLStatus::Okay => {}
            // The compressor fails only on bad parameters, which are fixed here.
            other => unreachable!("deflate failed: {other:?}"),
        }
    }
}

/// The inverse: the dictionary as a stored block (any encoding of it gives
/// the inflater the same history), then the kept part.
fn inflate_record(blob: &[u8]) -> Option<Vec<u8>> {
    let length = u16::try_from(RECORD_DICTIONARY.len()).ok()?;
    let mut stream = Vec::with_capacity(5 + RECORD_DICTIONARY.len() + blob.len());
    // A stored block, not the last: header bits 000, then byte-aligned.
    stream.push(0);
    stream.extend(length.to_le_bytes());
    stream.extend((!length).to_le_bytes());
    stream.extend(RECORD_DICTIONARY);
    stream.extend(blob);
    let mut json = inflate(&stream)?;
    Some(json.split_off(RECORD_DICTIONARY.len()))
}

/// Bounded, so that a corrupt blob cannot inflate without limit.
fn inflate(stream: &[u8]) -> Option<Vec<u8>> {
    miniz_oxide::inflate::decompress_to_vec_with_limit(stream, 1 << 20).ok()
}

/// An item's size by DynamoDB's rules: each attribute name's UTF-8 bytes plus
/// its value (strings: UTF-8 bytes; binary: raw bytes; numbers: about one byte
/// per two significant digits, plus one).
pub fn item_size(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_size(value))
        .sum()
}

/// One value's size: a map or list costs 3 bytes, and 1 more per element
/// beside the element's own size (and, in a map, its name).
fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(text) => text.len(),
        AttributeValue::B(blob) => blob.as_ref().len(),
        AttributeValue::N(digits) => number_size(digits),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::M(map) => {
            3 + map
                .iter()
                .map(|(name, value)| name.len() + value_size(value) + 1)
                .sum::<usize>()
        }
        AttributeValue::L(list) => {
            3 + list
                .iter()
                .map(|value| value_size(value) + 1)
                .sum::<usize>()
        }
        _ => 0,
    }
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

    /// A host as big as the protocol allows GPUs, with values unlike the
    /// dictionary's, and an item that still fits one write unit.
    fn host_with_gpus(gpus: usize) -> StoredAgent {
        let mut body = crate::heartbeat::tests::example();
        body["agent_id"] = "render-farm-node-00042".into();
        body["labels"] = serde_json::json!({"site": "berlin-2", "rack": "r12", "team": "vision"});
        body["host"]["hostname"] = "render-farm-node-00042.gpu.example.com".into();
        body["collector"] = serde_json::json!({"rss_mb": 4.92, "cpu_s": 1234.56});
        let gpu = |index: usize| {
            serde_json::json!({"index": index, "vendor": "nvidia", "name": "NVIDIA RTX 6000 Ada Generation",
                "uuid": format!("GPU-{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}", index * 0x9e37_79b9 % 0xffff_ffff,
                    index * 7919 % 0xffff, index * 104_729 % 0xfff, index * 1_299_709 % 0xfff,
                    (index + 3) * 0x9e37_79b9_7f4a),
                "memory_total_mb": 49140, "memory_free_mb": 49140 - 1234 * index as u64 - 17,
                "utilization_percent": 37 + index, "temperature_c": 51 + index, "power_w": 131.25 + index as f64})
        };
        body["gpus"] = (0..gpus).map(gpu).collect();
        let heartbeat = crate::heartbeat::Heartbeat::parse(body.to_string().as_bytes()).unwrap();
        StoredAgent::accept(
            heartbeat,
            1_764_132_000_500,
            crate::record::Deadlines::default(),
        )
    }

    #[test]
    fn a_record_comes_back_as_it_went_in_and_16_gpus_fit_one_unit() {
        for gpus in [0, 1, 2, 4, 8, 16] {
            let agent = host_with_gpus(gpus);
            let item = encode(&agent, 8).unwrap();
            assert_eq!(decode(&item).unwrap(), agent);
            let size = item_size(&item);
            // The same item as earlier versions wrote it, for the docs' table.
            let mut legacy = item.clone();
            legacy.remove(A_RECORD);
            let json = serde_json::to_vec(&agent).unwrap();
            let deflated = miniz_oxide::deflate::compress_to_vec(&json, 6);
            legacy.insert(
                A_LEGACY_RECORD.into(),
                AttributeValue::B(Blob::new(deflated)),
            );
            legacy.insert(
                A_LEGACY_CORES.into(),
                number(agent.heartbeat.cpu.cores_available),
            );
            legacy.insert(
                A_LEGACY_MEMORY.into(),
                number(agent.heartbeat.memory.available_mb),
            );
            println!(
                "{gpus} GPUs: {size} bytes (as earlier versions wrote it: {})",
                item_size(&legacy)
            );
            assert!(
                size <= 1024,
                "{gpus} GPUs: {size} bytes, past one write unit"
            );
        }
    }

    #[test]
    fn records_written_by_earlier_versions_still_read() {
        let agent = host_with_gpus(2);
        let json = serde_json::to_vec(&agent).unwrap();
        let mut item = encode(&agent, 8).unwrap();
        item.remove(A_RECORD);
        let legacy = miniz_oxide::deflate::compress_to_vec(&json, 6);
        item.insert(A_LEGACY_RECORD.into(), AttributeValue::B(Blob::new(legacy)));
        assert!(is_agent(&item));
        assert_eq!(decode(&item).unwrap(), agent);
        item.insert(
            A_LEGACY_RECORD.into(),
            AttributeValue::B(Blob::new(vec![1, 2, 3])),
        );
        assert!(matches!(decode(&item), Err(StoreError::Corrupt(_))));
        item.remove(A_LEGACY_RECORD);
        assert!(!is_agent(&item));
    }

    #[test]
    fn the_record_dictionary_never_changes() {
        use sha2::Digest as _;
        // Every stored record depends on these bytes (see RECORD_DICTIONARY).
        assert_eq!(
            hex::encode(sha2::Sha256::digest(RECORD_DICTIONARY)),
            "50932947e5132b82daba2b5dac1a4abdd83393330291473488870a07e71b375f"
        );
    }

    #[test]
    fn number_sizes_follow_dynamodb() {
        assert_eq!(number_size("1764132000123"), 8);
        assert_eq!(number_size("0"), 1);
        assert_eq!(number_size("1000"), 2);
        assert_eq!(number_size("-12.5"), 3);
    }
}
