//! What the benchmark binaries share.

use anyhow::{Context, bail};

/// The AWS emulator's endpoint, from `AWS_ENDPOINT_URL`: benchmarks only
/// ever talk to an emulator on this machine, so anything but a loopback
/// address is refused.
pub fn loopback_endpoint() -> anyhow::Result<String> {
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .context("set AWS_ENDPOINT_URL to the emulator, e.g. http://127.0.0.1:4566")?;
    let authority = endpoint
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    if !matches!(host, "127.0.0.1" | "localhost" | "::1") {
        bail!("{endpoint} is not a loopback address: benchmarks only talk to a local emulator");
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_endpoints_pass() {
        for (endpoint, loopback) in [
            ("http://127.0.0.1:4566", true),
            ("http://localhost:4566/", true),
            ("http://[::1]:4566", true),
            ("https://dynamodb.us-east-1.amazonaws.com", false),
            ("http://127.0.0.1.example.com:4566", false),
        ] {
            // SAFETY: this test alone in this binary touches the variable.
            unsafe { std::env::set_var("AWS_ENDPOINT_URL", endpoint) };
            assert_eq!(loopback_endpoint().is_ok(), loopback, "{endpoint}");
        }
    }
}
