//! The fleet secrets ingest verifies with: fixed from the environment
//! locally, fetched from Secrets Manager (and refreshed) in AWS.

use rollcall::heartbeat::Heartbeat;
use rollcall::secrets::Secret;
use rollcall::verify::{Keyring, Rejection};

pub struct KeySource {
    keyring: Secret<Keyring>,
}

impl KeySource {
    pub fn new(keyring: Secret<Keyring>) -> Self {
        Self { keyring }
    }

    /// A keyring that never changes.
    pub fn fixed(keyring: Keyring) -> Self {
        Self::new(Secret::fixed(keyring))
    }

    /// The key ids known now, sorted (for logs).
    pub async fn key_ids(&self) -> Vec<String> {
        let keyring = self.keyring.current().await;
        let mut ids: Vec<String> = keyring.key_ids().map(str::to_owned).collect();
        ids.sort_unstable();
        ids
    }

    /// [`Keyring::verify`] with the current secrets. An unknown key id in a
    /// well-formed request inside the clock window may mean the secret was
    /// rotated since it was fetched: that asks for one early refresh,
    /// rate-limited and time-bounded inside [`Secret`], and one more try.
    pub async fn verify<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h [u8]>,
        body: &[u8],
        now_s: i64,
    ) -> Result<Heartbeat, Rejection> {
        let result = self.keyring.current().await.verify(&header, body, now_s);
        let worth_a_refresh = matches!(
            result,
            Err(Rejection::UnknownKeyId {
                in_clock_window: true,
                ..
            })
        );
        if worth_a_refresh && self.keyring.refresh_early().await {
            return self.keyring.current().await.verify(&header, body, now_s);
        }
        result
    }
}
