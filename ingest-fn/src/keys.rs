//! The fleet secrets ingest verifies with: fixed from the environment
//! locally, fetched from Secrets Manager (and refreshed) in AWS.

use rollcall::heartbeat::Heartbeat;
use rollcall::secrets::Secret;
use rollcall::signing::HEADER_KEY_ID;
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

    /// [`Keyring::verify`] with the current secrets. An unknown key id may
    /// mean the secret was rotated since it was fetched: that triggers one
    /// early refresh, rate-limited inside [`Secret`], and one more try.
    pub async fn verify<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h [u8]>,
        body: &[u8],
        now_s: i64,
    ) -> Result<Heartbeat, Rejection> {
        let keyring = self.keyring.current().await;
        let result = keyring.verify(&header, body, now_s);
        let unknown_key_id = header(HEADER_KEY_ID)
            .and_then(|value| std::str::from_utf8(value).ok())
            .is_some_and(|key_id| !keyring.knows(key_id));
        if result.is_err() && unknown_key_id && self.keyring.refresh_early().await {
            return self.keyring.current().await.verify(&header, body, now_s);
        }
        result
    }
}
