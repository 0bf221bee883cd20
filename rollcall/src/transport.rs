//! Where a signed heartbeat or a bearer token may be sent: https anywhere,
//! plain http only to this machine unless the operator accepts the risk.
//! The collector and the CLI ask the same rule.

/// Why a URL may not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    #[error("{url:?} is not a URL: {reason}")]
    NotAUrl { url: String, reason: String },
    #[error(
        "{url:?} is plain http:// to another host: anyone on the path could {risk}; use https://, or pass --insecure-plain-http to accept that"
    )]
    PlainHttp { url: String, risk: &'static str },
    #[error("{url:?}: scheme {scheme:?} is not http or https")]
    Scheme { url: String, scheme: String },
}

/// How a URL that may be used is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Https,
    /// Plain http to this machine.
    Loopback,
    /// Plain http to another host, which the operator asked for.
    InsecurePlainHttp,
}

/// Checks `url`; `risk` says what an eavesdropper could do, for the error.
pub fn check(
    url: &str,
    insecure_plain_http: bool,
    risk: &'static str,
) -> Result<Transport, TransportError> {
    let parsed = url::Url::parse(url).map_err(|error| TransportError::NotAUrl {
        url: url.to_owned(),
        reason: error.to_string(),
    })?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(address)) => address.is_loopback(),
        Some(url::Host::Ipv6(address)) => address.is_loopback(),
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(Transport::Https),
        "http" if loopback => Ok(Transport::Loopback),
        "http" if insecure_plain_http => Ok(Transport::InsecurePlainHttp),
        "http" => Err(TransportError::PlainHttp {
            url: url.to_owned(),
            risk,
        }),
        other => Err(TransportError::Scheme {
            url: url.to_owned(),
            scheme: other.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback_unless_asked() {
        for url in [
            "https://ingest.example.org/v1/heartbeats",
            "http://127.0.0.1:8080/v1/heartbeats",
            "http://127.9.9.9/v1/heartbeats",
            "http://[::1]:8080/v1/heartbeats",
            "http://localhost:8080/v1/heartbeats",
        ] {
            assert!(check(url, false, "read it").is_ok(), "{url}");
        }
        for url in [
            "http://10.0.0.5:8080/v1/heartbeats",
            "http://ingest.example.org/v1/heartbeats",
            "http://localhost.example.org/v1/heartbeats",
        ] {
            let error = check(url, false, "read it").unwrap_err().to_string();
            assert!(
                error.contains("--insecure-plain-http") && error.contains("read it"),
                "{url}: {error}"
            );
            assert_eq!(
                check(url, true, "read it"),
                Ok(Transport::InsecurePlainHttp),
                "{url}"
            );
        }
        assert!(check("ftp://x/v1/heartbeats", true, "").is_err());
        assert!(check("not a url", true, "").is_err());
    }
}
