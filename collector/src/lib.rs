//! rollcall-collector: samples this host and sends signed heartbeats.
//!
//! - [`config`]: settings from defaults, a TOML file, `ROLLCALL_*` and flags.
//! - [`agent_id`]: the agent id generated once and kept in a state file.
//! - [`drain`]: the draining marker that `drain` / `undrain` set and every
//!   heartbeat reads.
//! - [`files`]: key, config and state files read and written without
//!   following planted links, refused when others can change them.
//! - [`sample`]: one file per metric source; a failing source is left out of
//!   the heartbeat and logged, it never sinks the sample. GPUs live in
//!   [`sample::gpu`], one module per vendor, each read bounded in time.
//! - [`send`]: signing and POSTing a heartbeat over https (or loopback),
//!   never following redirects, and the retry backoff.
//! - [`service`]: the `run` loop: interval with jitter, retries, and the final
//!   `leaving` heartbeat on SIGTERM/SIGINT.

pub mod agent_id;
pub mod config;
pub mod drain;
pub mod files;
pub mod sample;
pub mod send;
pub mod service;
