//! GPU processes on DynamoDB: the newest snapshot of an agent's GPU
//! processes, one item beside its record (key `<agent_id>#p`).
//!
//! A host with four busy GPUs can report 128 processes, several KB of JSON,
//! which would push the agent's item past one write unit on every heartbeat.
//! So the snapshot is an extension (PROTOCOL.md §3) in an item of its own:
//! `sent` (the heartbeat's `sent_at_ms`, for a newer-only `PutItem`),
//! `expires_at` (the record's TTL) and `pz`, the snapshot's JSON deflated.
//! The collector sends a snapshot only when the processes changed (or every
//! few minutes), so a steady job costs the heartbeat nothing extra. Only
//! `GET /v1/agents/{id}` reads it: capacity queries never do.

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

use super::item::{A_AGENT, A_SENT, Item, TTL_ATTRIBUTE, number};
use super::{DynamoStore, unavailable};
use crate::heartbeat::GpuProcesses;
use crate::store::StoreError;

const A_PROCESSES: &str = "pz";
/// More than any valid snapshot inflates to (16 GPUs × 32 processes).
const MAX_INFLATED: usize = 256 * 1024;

/// `#` cannot appear in an agent id, so this key never collides with one.
pub fn processes_key(agent_id: &str) -> String {
    format!("{agent_id}#p")
}

/// The item a snapshot becomes.
pub fn encode_processes(
    agent_id: &str,
    processes: &GpuProcesses,
    expires_at_s: i64,
) -> Result<Item, StoreError> {
    let json = serde_json::to_vec(processes)
        .map_err(|e| StoreError::Unavailable(format!("cannot encode processes: {e}")))?;
    let deflated = miniz_oxide::deflate::compress_to_vec(&json, 6);
    Ok(Item::from([
        (
            A_AGENT.to_owned(),
            AttributeValue::S(processes_key(agent_id)),
        ),
        (A_SENT.to_owned(), number(processes.sent_at_ms)),
        (TTL_ATTRIBUTE.to_owned(), number(expires_at_s)),
        (
            A_PROCESSES.to_owned(),
            AttributeValue::B(Blob::new(deflated)),
        ),
    ]))
}

impl DynamoStore {
    pub(super) async fn write_processes(
        &self,
        agent_id: &str,
        processes: &GpuProcesses,
        expires_at_s: i64,
    ) -> Result<(), StoreError> {
        let item = encode_processes(agent_id, processes, expires_at_s)?;
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#sent) OR #sent < :sent")
            .expression_attribute_names("#sent", A_SENT)
            .expression_attribute_values(":sent", number(processes.sent_at_ms))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // A newer snapshot is stored: this one is already out of date.
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(error) => Err(unavailable(error)),
        }
    }

    /// Several agents' snapshots: `BatchGetItem`s of 100 keys at once.
    pub(super) async fn read_processes_of(
        &self,
        agent_ids: &[String],
        now_ms: i64,
    ) -> Result<Vec<(String, GpuProcesses)>, StoreError> {
        let mut batches = tokio::task::JoinSet::new();
        for chunk in agent_ids.chunks(super::query::TABLE_BATCH) {
            let store = self.clone();
            let keys: Vec<String> = chunk.iter().map(|id| processes_key(id)).collect();
            batches.spawn(async move { store.read_batch(keys).await });
        }
        let mut found = Vec::new();
        while let Some(joined) = batches.join_next().await {
            let (items, _) = joined
                .map_err(|e| StoreError::Unavailable(format!("processes read failed: {e}")))??;
            for item in items {
                let agent_id = item
                    .get(A_AGENT)
                    .and_then(|key| key.as_s().ok())
                    .and_then(|key| key.strip_suffix("#p"))
                    .map(str::to_owned);
                if let (Some(agent_id), Some(snapshot)) =
                    (agent_id, decode_processes(&item, now_ms)?)
                {
                    found.push((agent_id, snapshot));
                }
            }
        }
        Ok(found)
    }

    pub(super) async fn read_processes(
        &self,
        agent_id: &str,
        now_ms: i64,
    ) -> Result<Option<GpuProcesses>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(A_AGENT, AttributeValue::S(processes_key(agent_id)))
            .send()
            .await
            .map_err(unavailable)?;
        match output.item() {
            Some(item) => decode_processes(item, now_ms),
            None => Ok(None),
        }
    }
}

/// A snapshot item's contents; `None` once expired.
fn decode_processes(item: &Item, now_ms: i64) -> Result<Option<GpuProcesses>, StoreError> {
    let expired = item
        .get(TTL_ATTRIBUTE)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse::<i64>().ok())
        .is_none_or(|at| at <= now_ms.div_euclid(1000));
    if expired {
        return Ok(None);
    }
    let corrupt = |why: String| StoreError::Corrupt(format!("processes item: {why}"));
    let deflated = item
        .get(A_PROCESSES)
        .and_then(|v| v.as_b().ok())
        .ok_or_else(|| corrupt("no pz".into()))?;
    let json = miniz_oxide::inflate::decompress_to_vec_with_limit(deflated.as_ref(), MAX_INFLATED)
        .map_err(|e| corrupt(format!("cannot inflate: {e:?}")))?;
    serde_json::from_slice(&json)
        .map(Some)
        .map_err(|e| corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::GpuProcess;

    /// What a snapshot's write costs: busy hosts with long-running jobs.
    #[test]
    fn snapshot_sizes() {
        let snapshot = |gpus: u32, per_gpu: u32| GpuProcesses {
            sent_at_ms: 1_764_132_000_123,
            gpus: (0..gpus)
                .map(|gpu| {
                    let processes = (0..per_gpu)
                        .map(|i| GpuProcess {
                            pid: 100_000 + fastrand_like(gpu * 100 + i) % 3_000_000,
                            used_mb: 1_000 + u64::from(fastrand_like(i + gpu)) % 60_000,
                            name: Some(
                                ["python3", "pt_main_thread", "Xorg", "blender"][(i % 4) as usize]
                                    .into(),
                            ),
                            user: Some(format!("user{}", i % 7)),
                        })
                        .collect();
                    (gpu, processes)
                })
                .collect(),
        };
        let mut sizes = Vec::new();
        for (gpus, per_gpu) in [(1, 1), (4, 1), (8, 2), (4, 32), (16, 32)] {
            let item =
                encode_processes("gpu-node-0042", &snapshot(gpus, per_gpu), 1_764_800_000).unwrap();
            sizes.push(((gpus, per_gpu), super::super::item_size(&item)));
        }
        println!("processes item bytes: {sizes:?}");
        // A GPU with one job each fits one write unit up to 8 GPUs.
        assert!(
            sizes.iter().take(3).all(|(_, size)| *size <= 1024),
            "{sizes:?}"
        );
        // 16 GPUs × 32 processes, the most a heartbeat carries, stays far under 400 KB.
        assert!(sizes[4].1 < 16 * 1024, "{sizes:?}");
    }

    /// A fixed scramble, so the sizes do not depend on a random seed.
    fn fastrand_like(n: u32) -> u32 {
        n.wrapping_mul(2_654_435_761).rotate_left(13)
    }
}
