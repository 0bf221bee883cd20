//! Claims on DynamoDB: one item per agent whose GPUs were claimed, beside
//! its record in the agents table (key `<agent_id>#c`, as history windows
//! are `<agent_id>#h#<window>`).
//!
//! The item holds a map per claimed GPU, `g<index>` = {`c`: claim id, `h`:
//! holder, `u`: UUID, `e`: expiry in ms}. A claim is one `UpdateItem` that
//! sets each of its GPUs' slots on condition that every one of them is
//! absent or expired: atomic because it is one item, with no transaction
//! (which would bill two write units per item). It costs one write unit
//! while the item stays under 1 KB (about four claimed GPUs with long
//! holders; eight with short ones), and a lost race costs the same and
//! hands back the item at no extra cost (`ALL_OLD` on a failed condition).
//!
//! Claims are kept apart from the agent's item because a heartbeat may
//! replace that item whole, and so that a heartbeat's write does not grow
//! with its claims. The item carries the table's TTL attribute, set a day
//! past each write: no claim outlives a day from its last write
//! (`claims::MAX_TTL_S`), so TTL never removes a live claim, and every read
//! ignores expired slots before TTL removes them. Items without a record
//! are no agents to the capacity index (they have no index keys) or to the
//! fleet function.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};

use super::item::{A_AGENT, Item, TTL_ATTRIBUTE, number};
use super::{DynamoStore, ReadCost, unavailable};
use crate::claims::{AgentClaims, Claim, ClaimId, GpuClaim, MAX_TTL_S};
use crate::store::StoreError;

/// `#` cannot appear in an agent id, so this key never collides with one.
pub fn claims_key(agent_id: &str) -> String {
    format!("{agent_id}#c")
}

fn slot_name(index: u32) -> String {
    format!("g{index}")
}

/// Releasing retries this often when a slot changed under it.
const RELEASE_ATTEMPTS: usize = 3;

impl DynamoStore {
    /// An agent's claims item, read consistently: what a claim, an
    /// extension or a release has just written is what comes back.
    async fn claims_item(&self, agent_id: &str) -> Result<Option<Item>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(A_AGENT, AttributeValue::S(claims_key(agent_id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(output.item().cloned())
    }

    /// The live claims of one agent.
    pub(super) async fn read_claims(
        &self,
        agent_id: &str,
        now_ms: i64,
    ) -> Result<AgentClaims, StoreError> {
        let item = self.claims_item(agent_id).await?;
        Ok(AgentClaims::live(
            item.as_ref().map(slots).transpose()?.unwrap_or_default(),
            now_ms,
        ))
    }

    /// The live claims of several agents at once (eventually consistent:
    /// a capacity answer may be a moment behind a claim, but a claim itself
    /// is decided by its conditional write, never by this read).
    pub(super) async fn read_claims_of(
        &self,
        agent_ids: &[String],
        now_ms: i64,
    ) -> Result<(HashMap<String, AgentClaims>, ReadCost), StoreError> {
        let mut found = HashMap::new();
        let mut cost = ReadCost::default();
        let mut batches = tokio::task::JoinSet::new();
        for chunk in agent_ids.chunks(super::query::TABLE_BATCH) {
            let store = self.clone();
            let keys: Vec<String> = chunk.iter().map(|id| claims_key(id)).collect();
            let requested = keys.len() as u64;
            batches.spawn(async move {
                store.read_batch(keys).await.map(|(items, mut cost)| {
                    cost.requested = requested;
                    (items, cost)
                })
            });
        }
        while let Some(joined) = batches.join_next().await {
            let (items, mut read) = joined
                .map_err(|e| StoreError::Unavailable(format!("claims read failed: {e}")))??;
            // Most agents have no claims item, and a key read that finds
            // nothing is billed half a unit all the same.
            let missing = read.requested.saturating_sub(items.len() as u64);
            read.units += missing as f64 * 0.5;
            cost.merge(&read);
            for item in items {
                let Some(agent_id) = item
                    .get(A_AGENT)
                    .and_then(|key| key.as_s().ok())
                    .and_then(|key| key.strip_suffix("#c"))
                else {
                    continue;
                };
                found.insert(
                    agent_id.to_owned(),
                    AgentClaims::live(slots(&item)?, now_ms),
                );
            }
        }
        Ok((found, cost))
    }

    /// The size of an agent's claims item by DynamoDB's rules (0 without
    /// one): what its claim writes are billed by.
    pub async fn claims_item_size(&self, agent_id: &str) -> Result<usize, StoreError> {
        Ok(self
            .claims_item(agent_id)
            .await?
            .as_ref()
            .map_or(0, super::item_size))
    }

    pub(super) async fn write_claim(&self, claim: &Claim, now_ms: i64) -> Result<bool, StoreError> {
        let mut sets = Vec::new();
        let mut conditions = Vec::new();
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(
                A_AGENT,
                AttributeValue::S(claims_key(claim.claim_id.agent_id())),
            )
            .expression_attribute_names("#e", "e")
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_values(":now", number(now_ms))
            .expression_attribute_values(":ttl", number(item_expiry(now_ms)));
        for (index, slot) in claim.slots() {
            let (name, value) = (format!("#g{index}"), format!(":g{index}"));
            sets.push(format!("{name} = {value}"));
            conditions.push(format!(
                "(attribute_not_exists({name}) OR {name}.#e <= :now)"
            ));
            update = update
                .expression_attribute_names(&name, slot_name(index))
                .expression_attribute_values(&value, slot_value(&slot));
        }
        let result = update
            .update_expression(format!("SET {}, #ttl = :ttl", sets.join(", ")))
            .condition_expression(conditions.join(" AND "))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error) if condition_failed(&error) => Ok(false),
            Err(error) => Err(unavailable(error)),
        }
    }

    pub(super) async fn extend(
        &self,
        claim_id: &ClaimId,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<Option<Claim>, StoreError> {
        let claims = self.read_claims(claim_id.agent_id(), now_ms).await?;
        let Some(mut claim) = claims.claim(claim_id) else {
            return Ok(None);
        };
        let mut sets = Vec::new();
        let mut conditions = Vec::new();
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(A_AGENT, AttributeValue::S(claims_key(claim_id.agent_id())))
            .expression_attribute_names("#c", "c")
            .expression_attribute_names("#e", "e")
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_values(":id", AttributeValue::S(claim_id.to_string()))
            .expression_attribute_values(":now", number(now_ms))
            .expression_attribute_values(":until", number(expires_at_ms))
            .expression_attribute_values(":ttl", number(item_expiry(now_ms)));
        for gpu in &claim.gpus {
            let name = format!("#g{}", gpu.index);
            sets.push(format!("{name}.#e = :until"));
            conditions.push(format!("{name}.#c = :id AND {name}.#e > :now"));
            update = update.expression_attribute_names(&name, slot_name(gpu.index));
        }
        let result = update
            .update_expression(format!("SET {}, #ttl = :ttl", sets.join(", ")))
            .condition_expression(conditions.join(" AND "))
            .send()
            .await;
        match result {
            Ok(_) => {
                claim.expires_at_ms = expires_at_ms;
                Ok(Some(claim))
            }
            // Released or expired between the read and the write.
            Err(error) if condition_failed(&error) => Ok(None),
            Err(error) => Err(unavailable(error)),
        }
    }

    /// Removes the slots that still name `claim_id`, expired ones too; a
    /// slot another claim took meanwhile is left alone.
    pub(super) async fn release(&self, claim_id: &ClaimId) -> Result<(), StoreError> {
        let key = claims_key(claim_id.agent_id());
        let id = claim_id.to_string();
        for _ in 0..RELEASE_ATTEMPTS {
            let item = self.claims_item(claim_id.agent_id()).await?;
            let held: Vec<u32> = item
                .as_ref()
                .map(slots)
                .transpose()?
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, slot)| slot.claim_id == id)
                .map(|(index, _)| index)
                .collect();
            if held.is_empty() {
                return Ok(());
            }
            let mut update = self
                .client
                .update_item()
                .table_name(&self.table)
                .key(A_AGENT, AttributeValue::S(key.clone()))
                .expression_attribute_names("#c", "c")
                .expression_attribute_values(":id", AttributeValue::S(id.clone()));
            let mut names = Vec::new();
            for index in &held {
                let name = format!("#g{index}");
                update = update.expression_attribute_names(&name, slot_name(*index));
                names.push(name);
            }
            let conditions: Vec<String> = names
                .iter()
                .map(|name| format!("{name}.#c = :id"))
                .collect();
            let result = update
                .update_expression(format!("REMOVE {}", names.join(", ")))
                .condition_expression(conditions.join(" AND "))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::None)
                .send()
                .await;
            match result {
                Ok(_) => return Ok(()),
                Err(error) if condition_failed(&error) => continue,
                Err(error) => return Err(unavailable(error)),
            }
        }
        Err(StoreError::Unavailable(format!(
            "claim {id}: its GPUs kept changing during the release; retry"
        )))
    }
}

/// Past every live claim's expiry: none is held more than `MAX_TTL_S`
/// from its last write, so TTL never removes a live claim.
fn item_expiry(now_ms: i64) -> i64 {
    now_ms.div_euclid(1000) + MAX_TTL_S as i64 + 60
}

fn condition_failed<R: std::fmt::Debug>(
    error: &aws_sdk_dynamodb::error::SdkError<UpdateItemError, R>,
) -> bool {
    error
        .as_service_error()
        .is_some_and(UpdateItemError::is_conditional_check_failed_exception)
}

fn slot_value(slot: &GpuClaim) -> AttributeValue {
    let mut map = HashMap::from([
        ("c".to_owned(), AttributeValue::S(slot.claim_id.clone())),
        ("h".to_owned(), AttributeValue::S(slot.holder.clone())),
        ("e".to_owned(), number(slot.expires_at_ms)),
    ]);
    if let Some(uuid) = &slot.uuid {
        map.insert("u".to_owned(), AttributeValue::S(uuid.clone()));
    }
    AttributeValue::M(map)
}

/// Every slot of a claims item, live or not.
fn slots(item: &Item) -> Result<Vec<(u32, GpuClaim)>, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt(format!("claims item: {why}"));
    let mut found = Vec::new();
    for (name, value) in item {
        let Some(index) = name.strip_prefix('g').and_then(|i| i.parse::<u32>().ok()) else {
            continue;
        };
        let map = value
            .as_m()
            .map_err(|_| corrupt(format!("{name} is not a map")))?;
        let text = |key: &str| map.get(key).and_then(|v| v.as_s().ok()).cloned();
        found.push((
            index,
            GpuClaim {
                claim_id: text("c").ok_or_else(|| corrupt(format!("{name} has no claim id")))?,
                holder: text("h").unwrap_or_default(),
                uuid: text("u"),
                expires_at_ms: map
                    .get("e")
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| corrupt(format!("{name} has no expiry")))?,
            },
        ));
    }
    Ok(found)
}
