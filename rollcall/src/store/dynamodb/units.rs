//! DynamoDB capacity units by AWS's documented rules, worked out from the
//! item before and after a write. The emulator does not model index writes,
//! so the store's cost is computed, not read off it.
//!
//! Writes: the table costs one unit per started KB of the larger of the old
//! and new item. Each global secondary index costs, per item:
//! - nothing when the item is in neither version of the index, or when it
//!   is in both under the same keys and no projected attribute changed;
//! - one write of the new entry when the entry appears, or when its keys
//!   stay and a projected attribute changed;
//! - one delete of the old entry when it disappears;
//! - a delete and a put (two writes) when an index key changed.
//!
//! An index entry's size is its key attributes, the table's key, its
//! projected attributes, and 100 bytes of overhead.
//! Reads: one unit per started 4 KB, half for eventually consistent reads.

use super::item::{Item, item_size};

/// What a global secondary index holds.
pub enum Projection {
    KeysOnly,
    Include(&'static [&'static str]),
    All,
}

pub struct IndexShape {
    pub hash: &'static str,
    pub range: Option<&'static str>,
    pub projection: Projection,
}

/// Write units of one write, split as DynamoDB bills them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WriteUnits {
    pub table: u64,
    pub indexes: u64,
}

impl WriteUnits {
    pub fn total(&self) -> u64 {
        self.table + self.indexes
    }
}

const KB: usize = 1024;
const INDEX_ENTRY_OVERHEAD: usize = 100;

/// Units for replacing `old` (absent for a new item) with `new`, where the
/// table's primary key is `table_key`.
pub fn write_units(
    table_key: &[&str],
    old: Option<&Item>,
    new: &Item,
    indexes: &[IndexShape],
) -> WriteUnits {
    let larger = old.map_or(0, item_size).max(item_size(new));
    WriteUnits {
        table: larger.div_ceil(KB).max(1) as u64,
        indexes: indexes
            .iter()
            .map(|index| index_units(table_key, index, old, new))
            .sum(),
    }
}

fn index_units(table_key: &[&str], index: &IndexShape, old: Option<&Item>, new: &Item) -> u64 {
    let entry_units = |item: &Item| index_entry_size(table_key, index, item).div_ceil(KB) as u64;
    let old = old.filter(|item| in_index(index, item));
    let new = Some(new).filter(|item| in_index(index, item));
    match (old, new) {
        (None, None) => 0,
        (None, Some(new)) => entry_units(new),
        (Some(old), None) => entry_units(old),
        (Some(old), Some(new)) if keys(index).any(|key| old.get(key) != new.get(key)) => {
            entry_units(old) + entry_units(new)
        }
        (Some(old), Some(new))
            if projected(table_key, index, new).any(|name| old.get(name) != new.get(name))
                || projected(table_key, index, old).any(|name| old.get(name) != new.get(name)) =>
        {
            entry_units(new)
        }
        (Some(_), Some(_)) => 0,
    }
}

fn keys(index: &IndexShape) -> impl Iterator<Item = &'static str> {
    std::iter::once(index.hash).chain(index.range)
}

/// An item is in a (sparse) index only when it has every index key.
fn in_index(index: &IndexShape, item: &Item) -> bool {
    keys(index).all(|key| item.contains_key(key))
}

/// The attribute names an index entry of `item` holds.
fn projected<'a>(
    table_key: &'a [&'a str],
    index: &'a IndexShape,
    item: &'a Item,
) -> impl Iterator<Item = &'a str> + 'a {
    item.keys().map(String::as_str).filter(move |name| {
        keys(index).any(|key| key == *name)
            || table_key.contains(name)
            || match index.projection {
                Projection::KeysOnly => false,
                Projection::Include(names) => names.contains(name),
                Projection::All => true,
            }
    })
}

fn index_entry_size(table_key: &[&str], index: &IndexShape, item: &Item) -> usize {
    let entry: Item = projected(table_key, index, item)
        .map(|name| (name.to_owned(), item[name].clone()))
        .collect();
    item_size(&entry) + INDEX_ENTRY_OVERHEAD
}

/// Read units for `bytes` read by one request (a Query sums the items it
/// evaluates before rounding).
pub fn read_units(bytes: usize, strongly_consistent: bool) -> f64 {
    let units = bytes.div_ceil(4 * KB).max(1) as f64;
    if strongly_consistent {
        units
    } else {
        units / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::types::AttributeValue;

    const KEY: &[&str] = &["id"];

    fn item(pairs: &[(&str, &str)]) -> Item {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), AttributeValue::S(value.to_string())))
            .collect()
    }

    fn index(projection: Projection) -> IndexShape {
        IndexShape {
            hash: "shard",
            range: Some("rank"),
            projection,
        }
    }

    #[test]
    fn the_table_costs_a_unit_per_started_kb_of_the_larger_version() {
        let small = item(&[("id", "a"), ("x", "1")]);
        let big = item(&[("id", "a"), ("x", &"z".repeat(1500))]);
        assert_eq!(write_units(KEY, None, &small, &[]).table, 1);
        assert_eq!(write_units(KEY, None, &big, &[]).table, 2);
        // Shrinking a 2 KB item still bills its old size.
        assert_eq!(write_units(KEY, Some(&big), &small, &[]).table, 2);
    }

    #[test]
    fn a_new_index_entry_is_one_write() {
        let new = item(&[("id", "a"), ("shard", "1"), ("rank", "r1")]);
        assert_eq!(
            write_units(KEY, None, &new, &[index(Projection::KeysOnly)]).indexes,
            1
        );
    }

    #[test]
    fn a_changed_index_key_is_a_delete_and_a_put() {
        let old = item(&[("id", "a"), ("shard", "1"), ("rank", "r1")]);
        let new = item(&[("id", "a"), ("shard", "1"), ("rank", "r2")]);
        assert_eq!(
            write_units(KEY, Some(&old), &new, &[index(Projection::KeysOnly)]).indexes,
            2
        );
    }

    #[test]
    fn a_changed_projected_attribute_is_one_write_and_an_unprojected_one_is_free() {
        let old = item(&[
            ("id", "a"),
            ("shard", "1"),
            ("rank", "r1"),
            ("until", "100"),
        ]);
        let new = item(&[
            ("id", "a"),
            ("shard", "1"),
            ("rank", "r1"),
            ("until", "200"),
        ]);
        let all = [index(Projection::All)];
        let keys_only = [index(Projection::KeysOnly)];
        let include_until = [index(Projection::Include(&["until"]))];
        let include_other = [index(Projection::Include(&["pool"]))];
        assert_eq!(write_units(KEY, Some(&old), &new, &all).indexes, 1);
        assert_eq!(
            write_units(KEY, Some(&old), &new, &include_until).indexes,
            1
        );
        assert_eq!(write_units(KEY, Some(&old), &new, &keys_only).indexes, 0);
        assert_eq!(
            write_units(KEY, Some(&old), &new, &include_other).indexes,
            0
        );
        // Nothing changed at all: nothing to write in the index.
        assert_eq!(
            write_units(KEY, Some(&old), &old, &all),
            WriteUnits {
                table: 1,
                indexes: 0
            }
        );
    }

    #[test]
    fn entering_and_leaving_a_sparse_index() {
        let outside = item(&[("id", "a"), ("x", "1")]);
        let inside = item(&[("id", "a"), ("shard", "1"), ("rank", "r1")]);
        let shape = [index(Projection::KeysOnly)];
        assert_eq!(write_units(KEY, Some(&outside), &inside, &shape).indexes, 1);
        assert_eq!(write_units(KEY, Some(&inside), &outside, &shape).indexes, 1);
        assert_eq!(
            write_units(KEY, Some(&outside), &outside, &shape).indexes,
            0
        );
    }

    #[test]
    fn a_large_projected_entry_costs_per_started_kb() {
        let blob = "z".repeat(1000);
        let old = item(&[("id", "a"), ("shard", "1"), ("rank", "r1"), ("rec", "old")]);
        let new = item(&[("id", "a"), ("shard", "1"), ("rank", "r1"), ("rec", &blob)]);
        // 1,000 bytes of rec plus keys and the 100-byte overhead pass 1 KB.
        assert_eq!(
            write_units(KEY, Some(&old), &new, &[index(Projection::All)]).indexes,
            2
        );
    }

    /// The capacity index under the model, with the store's own writes: a
    /// heartbeat whose entry still places the agent costs one unit in all;
    /// one that needs a new entry pays for the failed condition (1), the
    /// put (1) and the entry (2 for a key, 1 for the flag alone). The index
    /// that projected everything cost 2 even when nothing it ordered by had
    /// moved.
    #[test]
    fn a_steady_heartbeat_costs_one_unit_and_a_moved_one_four() {
        use super::super::item::FV_SLACK_MB;
        use super::super::modelled_write;
        use crate::heartbeat::Heartbeat;
        use crate::record::{Deadlines, StoredAgent};
        let heartbeat = |sent_at_ms: u64, free_mb: u64| {
            let body = format!(
                r#"{{"v":1,"agent_id":"lab-07","sent_at_ms":{sent_at_ms},"interval_s":30,
                "cpu":{{"cores_physical":8,"cores_logical":16,"cores_available":6,"load_1m":1.9,"load_5m":1.2,"load_15m":0.8}},
                "memory":{{"total_mb":64000,"available_mb":41000}},
                "gpus":[{{"index":0,"vendor":"nvidia","memory_total_mb":24564,"memory_free_mb":{free_mb}}}]}}"#
            );
            let heartbeat = Heartbeat::parse(body.as_bytes()).unwrap();
            StoredAgent::accept(heartbeat, sent_at_ms as i64, Deadlines::default())
        };
        let mut previous: Option<Item> = None;
        let mut costs = Vec::new();
        for (step, free_mb) in [
            20_000,
            20_000,
            19_900,
            20_000,
            20_100,
            20_180,
            20_100 + FV_SLACK_MB,
            6_000,
        ]
        .into_iter()
        .enumerate()
        {
            // A second apart, so that the deadline stays in one minute and
            // the deadline index costs nothing after the first write (its
            // cost is the next test's).
            let agent = heartbeat(1_764_132_000_000 + 1_000 * step as u64, free_mb);
            let (item, units) = modelled_write(previous.as_ref(), &agent, 4).unwrap();
            costs.push(units);
            previous = Some(item);
        }
        assert_eq!(
            costs[0],
            WriteUnits {
                table: 2,
                indexes: 2
            }
        );
        let totals: Vec<u64> = costs.iter().map(WriteUnits::total).collect();
        // first (both indexes' entries); steady; a dip (the flag alone); back to the figure (nothing
        // moves, where the entry used to be re-ranked twice); a rise past the
        // figure (a new bound); wandering inside it; at its top; a job started.
        assert_eq!(totals, [4, 1, 3, 1, 4, 1, 1, 4], "{costs:?}");

        // The deadline index: a steady agent's entry moves once a minute (a
        // key change, 2 units), every other heartbeat at 30 s.
        let mut previous: Option<Item> = None;
        let mut totals = Vec::new();
        for step in 0..6u64 {
            let agent = heartbeat(1_764_132_000_000 + 30_000 * step, 20_000);
            let (item, units) = modelled_write(previous.as_ref(), &agent, 4).unwrap();
            totals.push(units.total());
            previous = Some(item);
        }
        assert_eq!(totals, [4, 3, 1, 3, 1, 3]);
    }

    #[test]
    fn reads_are_per_started_4_kb_and_half_when_eventually_consistent() {
        assert_eq!(read_units(1, true), 1.0);
        assert_eq!(read_units(4096, true), 1.0);
        assert_eq!(read_units(4097, true), 2.0);
        assert_eq!(read_units(4097, false), 1.0);
        assert_eq!(read_units(0, false), 0.5);
    }
}
