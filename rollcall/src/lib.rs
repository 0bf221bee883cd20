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
//! - [`api`] (feature `server`): JSON errors, the routes every function shares
//!   (`/healthz`, `/openapi.json`, JSON 404 and 405), and serving one router
//!   through Lambda or plain HTTP.
//!
//! The collector builds with `default-features = false`, which leaves out the
//! store and HTTP server so that it stays small.
//!
//! # Names
//!
//! The wire's names are the contract (`docs/PROTOCOL.md`) and stay as they
//! are; the code's names follow one scheme, so a quantity has one name
//! wherever the code holds it:
//!
//! - A figure's name ends in its unit: `_mb` (MiB), `_gb` (GiB, only where
//!   the API speaks GiB), `_s`, `_ms`, `_minutes`.
//! - A bound says which way it bounds first: `min_` for a filter's floor,
//!   `max_` for the largest of several or a limit. Free VRAM is `gpu_free`:
//!   a GPU's own is the wire's `memory_free_mb`, the agent's largest is
//!   [`heartbeat::Heartbeat::max_gpu_free_mb`] (the capacity order), a
//!   query's floor is [`capacity::CapacityQuery::min_gpu_free_mb`]; the API
//!   shows them in GiB as `gpu_vram_available_gb`, `gpu_vram_available_max_gb`
//!   and `min_gpu_vram_gb`.
//! - A moment is named for what happened then, in milliseconds (or seconds)
//!   since the Unix epoch as `i64` (`received_at_ms`, `online_until_ms`,
//!   `expires_at_s`), what [`time::now_ms`] returns, so that differences and
//!   deadlines need no casts. The one `u64` is the heartbeat's `sent_at_ms`,
//!   the collector's clock as the wire carries it (the parser refuses a
//!   negative); it is compared with server times only after `i64::try_from`.
//! - The collector's one-heartbeat run is `once`, as its subcommand is
//!   named, wherever the code must know it is one (it is run from cron).
//!
//! Stored names are formats too: DynamoDB attributes are short (`rd`, `fx`,
//! `fv`; each has a named constant in `store/dynamodb/item.rs`), and a SQLite
//! column keeps the name every existing database has.

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
