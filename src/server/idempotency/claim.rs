//! Keeping a claim alive while its holder works, and ending it even when the store fails.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Config;
use crate::server::store::{Claim, ClaimToken, IdempotencyStore, Ownership, ScopedKey};

/// Renews a claim every third of its lease while its holder works, up to a deadline; stops
/// when dropped (the claim ended) or when the claim is lost.
pub(crate) struct LeaseKeeper(JoinHandle<()>);

impl LeaseKeeper {
    pub(crate) fn start<St: IdempotencyStore>(
        store: &St,
        key: &ScopedKey,
        claim: Claim,
        deadline: Instant,
    ) -> Self {
        let lease = claim.lease;
        let (store, key) = (store.clone(), key.clone());
        LeaseKeeper(tokio::spawn(async move {
            let every = (lease / 3).max(Duration::from_millis(10));
            let mut next = every;
            // Bounded by `deadline`; each turn is one renewal.
            while crate::time::after(Instant::now(), next) < deadline {
                tokio::time::sleep(next).await;
                match store.renew(&key, &claim).await {
                    Ok(Ownership::Held) => next = every,
                    Ok(Ownership::Lost) => {
                        tracing::warn!(key = %key.key(), "idempotency claim lost while its request runs (taken over by a recovery?)");
                        return;
                    }
                    Err(e) => {
                        // Sooner than usual: the lease is running out.
                        tracing::warn!(key = %key.key(), error = %e, "could not renew an idempotency lease");
                        next = (every / 4).max(Duration::from_millis(10));
                    }
                }
            }
            tracing::warn!(key = %key.key(), "idempotency claim held for its maximum time; no longer renewed");
        }))
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Gives up the claim `token`; if the store fails, tries again in the background.
pub(super) async fn release<St: IdempotencyStore>(
    store: &St,
    key: &ScopedKey,
    token: ClaimToken,
    config: &Config,
    why: &str,
) {
    tracing::debug!(key = %key.key(), why, "releasing idempotency key");
    if let Err(e) = store.release(key, token).await {
        tracing::warn!(key = %key.key(), error = %e, "could not release an idempotency key; trying again");
        release_later(store.clone(), key.clone(), token, config.lease);
    }
}

/// Releases the claim `token` again over one lease, in the background: a `begin` or
/// `release` that timed out may still run in a stalled store, late or (after a reconnect)
/// out of order. The token makes this harmless to any other claim.
pub(crate) fn release_later<St: IdempotencyStore>(
    store: St,
    key: ScopedKey,
    token: ClaimToken,
    lease: Duration,
) {
    tokio::spawn(async move {
        let step = (lease / 4).max(Duration::from_millis(25));
        let end = crate::time::after(Instant::now(), lease);
        // Bounded by one lease; each turn is one release.
        loop {
            if let Err(e) = store.release(&key, token).await {
                tracing::debug!(key = %key.key(), error = %e, "idempotency release failed; trying again");
            }
            if crate::time::after(Instant::now(), step) > end {
                break;
            }
            tokio::time::sleep(step).await;
        }
    });
}
