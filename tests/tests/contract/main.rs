//! What rollcall promises, held to the letter: the wire protocol
//! (PROTOCOL.md), both stores, the OpenAPI documents, the Lambda code path
//! and the template's IAM grants. One test binary, so the AWS SDK is linked
//! once for all of them; each module says what it covers.
//!
//! Run one part with a filter: `cargo test -p rollcall-tests --test contract
//! dynamodb::` (add `-- --include-ignored` with the emulator running).

mod dynamodb;
mod history_outage;
mod hostile;
mod iam_policies;
mod lambda_runtime;
mod openapi;
mod query_api;
mod rejections;
mod store_conformance;
