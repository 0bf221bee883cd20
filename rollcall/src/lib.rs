//! rollcall: the wire protocol, signing, capacity filter and agent store
//! shared by the collector and the two functions.
//!
//! The contract these modules implement is `docs/PROTOCOL.md`.
//!
//! - [`names`]: the rules for agent ids, key ids, pools and labels, for every crate.
//! - [`signing`]: fleet secrets, agent-key derivation, the v1 signature.
//! - [`heartbeat`]: the v1 heartbeat body and its range checks.
//! - [`history`]: per-minute history's five-minute windows and its bounds.
//! - [`verify`]: ingest's request checks, in the protocol's order.
//! - [`record`]: what is stored per agent, its deadlines, and how it becomes the API's agent record.
//! - [`changes`]: state changes: an agent's transitions, derived once from
//!   two versions of its record, and the availability (`uptime_30d`) they add up to.
//! - [`capacity`]: capacity-query parameters, the one match rule, answer order, cursors.
//! - [`claims`]: claims on GPUs, their ids and bodies, and (feature `server`)
//!   the one claiming procedure both stores serve.
//! - [`wire`]: answers both ends of the wire share (ingest's 202, the agent record, a page of
//!   agents, an agent's history, the error body).
//! - [`fleet`]: what one agent adds to the fleet's figures, and their sums by pool.
//! - [`transport`]: where a heartbeat or a token may be sent (https, or
//!   plain http to loopback unless the operator accepts the risk).
//! - [`time`]: the clock in epoch milliseconds, and RFC 3339 as the protocol writes it.
//! - [`store`] (feature `server`): the store trait, the embedded SQLite store,
//!   and (feature `dynamodb`) the DynamoDB store: its item and index keys,
//!   capacity queries, history and capacity-unit model.
//! - [`aws`] (feature `dynamodb`): the one AWS SDK configuration.
//! - [`secrets`] (feature `dynamodb`): secrets from the environment, or from
//!   Secrets Manager with a bounded refresh.
//! - [`webhooks`] (feature `server`): each transition as a Standard Webhooks
//!   message, its signature, the grace and the retries; (feature `webhooks`)
//!   the POST.
//! - [`logging`] (feature `logging`): the log format every binary shares.
//! - [`api`] (feature `server`): JSON errors, `/healthz`, and serving one router
//!   through Lambda or plain HTTP.
//!
//! The collector builds with `default-features = false`, which leaves out the
//! store and HTTP server so that it stays small.

pub mod capacity;
pub mod changes;
pub mod claims;
pub mod fleet;
pub mod heartbeat;
pub mod history;
pub mod names;
pub mod record;
pub mod signing;
pub mod time;
pub mod transport;
pub mod verify;
#[cfg(feature = "server")]
pub mod webhooks;
pub mod wire;

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "dynamodb")]
pub mod aws;
#[cfg(feature = "logging")]
pub mod logging;
#[cfg(feature = "dynamodb")]
pub mod secrets;
#[cfg(feature = "server")]
pub mod store;
