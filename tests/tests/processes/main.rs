//! The built programs as operators run them: the collector, the functions
//! and the CLI over real sockets, killed, restarted, rotated, starved of
//! their store, installed from the Debian package, scraped by Prometheus and
//! drawn in a browser. One test binary, so the AWS SDK is linked once for
//! all of them; each module says what it covers.
//!
//! Run one part with a filter: `cargo test -p rollcall-tests --test processes
//! crash::` (add `-- --include-ignored` for the parts that need root, the
//! emulator or Chromium; `scripts/test` runs them all).

mod cli;
mod collector_release;
mod collector_transport;
mod crash;
mod debian_package;
mod e2e;
mod fleet_page;
mod loadgen_smoke;
mod outage;
mod prometheus;
mod rotation;
mod secrets_refresh;
mod up_script;
