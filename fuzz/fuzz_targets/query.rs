//! Capacity-query parameters and cursors from arbitrary text, and the match
//! rule over whatever parses.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use rollcall::capacity::{CapacityQuery, CursorSealer, MAX_LIMIT, MAX_QUERY_NUMBER};
use rollcall::heartbeat::{Heartbeat, MAX_LABELS};
use rollcall::record::{Deadlines, StoredAgent};

static SEALER: LazyLock<CursorSealer> = LazyLock::new(|| CursorSealer::new(b"fuzz"));
static AGENT: LazyLock<StoredAgent> = LazyLock::new(|| {
    let body = br#"{"v":1,"agent_id":"a","sent_at_ms":1,"interval_s":30,"labels":{"site":"b2"},
        "cpu":{"cores_physical":8,"cores_logical":16,"cores_available":6,"load_1m":1,"load_5m":1,"load_15m":1},
        "memory":{"total_mb":64000,"available_mb":41000},
        "gpus":[{"index":0,"vendor":"nvidia","memory_total_mb":24564,"memory_free_mb":20110},
                {"index":1,"vendor":"amd","memory_total_mb":16384,"memory_free_mb":1000}]}"#;
    StoredAgent::accept(Heartbeat::parse(body).unwrap(), 1_000, Deadlines::default())
});

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = CapacityQuery::from_query_string(&text);
    if let Ok(query) = &parsed {
        assert!((1..=MAX_LIMIT).contains(&query.limit));
        for bound in [query.min_cpu_cores, query.min_memory_gb, query.min_gpu_vram_gb].into_iter().flatten() {
            assert!((0.0..=MAX_QUERY_NUMBER).contains(&bound));
        }
        assert!(query.labels.len() <= MAX_LABELS);
        for now in [0, 1_000, 90_999, 91_000, i64::MAX] {
            let _ = query.matches(&AGENT, now);
        }
    }
    // Cursors open only for the filters they were sealed for, and round-trip.
    let query = parsed.unwrap_or_default();
    if let Ok(position) = SEALER.open(&text, &query) {
        assert_eq!(SEALER.open(&SEALER.seal(&position, &query), &query).unwrap(), position);
    }
});
