//! [`DedupeFn`]: one execution per key for a plain async function, backed by an
//! [`IdempotencyStore`] (memory or Redis), with the provider side's fencing.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::request::IdempotencyKey;
use crate::server::{
    Begin, CatchUnwind, Claim, ClaimToken, Fingerprint, IdempotencyStore, LeaseKeeper, Ownership,
    ScopedKey, Stored, release_later,
};
use crate::store::StoreError;

/// A function's result as kept in an [`IdempotencyStore`]: bytes in, bytes out.
///
/// Implemented for `String`, `Vec<u8>`, `Bytes` and `()`; for your own types, two lines with
/// the serializer you already use (`serde_json::to_vec(self)` / `serde_json::from_slice`).
pub trait StoredValue: Sized {
    /// The bytes kept for the result.
    fn encode(&self) -> Bytes;
    /// The result read back; `None` if the bytes are not one.
    fn decode(bytes: &Bytes) -> Option<Self>;
}

impl StoredValue for String {
    fn encode(&self) -> Bytes {
        Bytes::copy_from_slice(self.as_bytes())
    }
    fn decode(bytes: &Bytes) -> Option<Self> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

impl StoredValue for Vec<u8> {
    fn encode(&self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
    fn decode(bytes: &Bytes) -> Option<Self> {
        Some(bytes.to_vec())
    }
}

impl StoredValue for Bytes {
    fn encode(&self) -> Bytes {
        self.clone()
    }
    fn decode(bytes: &Bytes) -> Option<Self> {
        Some(bytes.clone())
    }
}

impl StoredValue for () {
    fn encode(&self) -> Bytes {
        Bytes::new()
    }
    fn decode(bytes: &Bytes) -> Option<Self> {
        bytes.is_empty().then_some(())
    }
}

/// Why [`DedupeFn::run`] gives no result.
#[derive(Debug)]
#[non_exhaustive]
pub enum DedupeFnError<E> {
    /// The function ran for this caller and failed; the key was released, so a retry runs
    /// it again.
    Inner(E),
    /// A run for this key started and never finished (its process died, or the caller gave
    /// up mid-run): whether its side effect happened is unknown, so it is not run again
    /// (unless [`DedupeFn::rerun_abandoned`]).
    OutcomeUnknown,
    /// Another run for this key was still running after [`DedupeFn::wait`].
    InFlight,
    /// The key was used for another operation.
    Mismatch,
    /// The kept result could not be decoded ([`StoredValue::decode`] said no).
    Undecodable,
    /// The store failed or is full; the function was not run (a side effect never runs
    /// without deduplication).
    Store(StoreError),
}

impl<E> DedupeFnError<E> {
    /// The function's error, if that is what this is.
    pub fn into_inner(self) -> Option<E> {
        match self {
            DedupeFnError::Inner(e) => Some(e),
            _ => None,
        }
    }
}

impl<E: fmt::Display> fmt::Display for DedupeFnError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DedupeFnError::Inner(e) => e.fmt(f),
            DedupeFnError::OutcomeUnknown => f.write_str(
                "an earlier run with this key started and never finished: its outcome is unknown; not run again",
            ),
            DedupeFnError::InFlight => f.write_str("a run with this key is still in progress"),
            DedupeFnError::Mismatch => {
                f.write_str("this key was used for another operation; use a new key")
            }
            DedupeFnError::Undecodable => f.write_str("the kept result could not be decoded"),
            DedupeFnError::Store(e) => write!(f, "{e}; not run"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for DedupeFnError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DedupeFnError::Inner(e) => Some(e),
            DedupeFnError::Store(e) => Some(e),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Config {
    ttl: Duration,
    lease: Duration,
    max_claim_time: Duration,
    wait: Duration,
    rerun_abandoned: bool,
}

/// Runs each keyed call of a function once: a duplicate gets the kept result, a
/// concurrent duplicate waits for it — the [`DedupeLayer`](crate::server::DedupeLayer) guarantee
/// for an agent's tool executor that is a plain async function.
///
/// The protocol is the provider side's ([`IdempotencyLayer`](crate::server::IdempotencyLayer)):
/// the key is claimed with a fresh [`ClaimToken`]; the claim is renewed every third of its
/// lease while the function runs; a success is recorded ([`StoredValue`]) and kept for the
/// TTL; a failure or a panic releases the key (a panic is then resumed), so a retry runs
/// the function again. A run that never finished (the caller dropped it, the process died)
/// leaves its claim to run out: its outcome is unknown, and it is not run again
/// ([`DedupeFnError::OutcomeUnknown`]) unless [`DedupeFn::rerun_abandoned`] says so. The
/// operation's name is the claim's fingerprint: the same key for another operation is a
/// [`DedupeFnError::Mismatch`].
///
/// Defaults: results kept 24 h, leases of 60 s renewed for at most 10 min, duplicates wait
/// up to 30 s for a running call. Clones share the store and wake each other's waiters.
#[derive(Clone)]
pub struct DedupeFn<St> {
    store: St,
    config: Config,
    settled: Arc<Notify>,
}

impl<St: fmt::Debug> fmt::Debug for DedupeFn<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupeFn")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}

impl<St: IdempotencyStore> DedupeFn<St> {
    /// Deduplicates on `store` with the defaults.
    pub fn new(store: St) -> Self {
        DedupeFn {
            store,
            config: Config {
                ttl: Duration::from_secs(24 * 60 * 60),
                lease: Duration::from_secs(60),
                max_claim_time: Duration::from_secs(10 * 60),
                wait: Duration::from_secs(30),
                rerun_abandoned: false,
            },
            settled: Arc::new(Notify::new()),
        }
    }

    /// How long a result is kept (default 24 h), and so how long an abandoned run answers
    /// [`DedupeFnError::OutcomeUnknown`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// How long a claim holds without renewal (default 60 s; at least 100 ms). A running
    /// function renews it every third of it, for at most `max_claim_time` (default 10 min).
    pub fn lease(mut self, lease: Duration, max_claim_time: Duration) -> Self {
        self.config.lease = lease.max(Duration::from_millis(100));
        self.config.max_claim_time = max_claim_time;
        self
    }

    /// How long a duplicate waits for a running call before [`DedupeFnError::InFlight`]
    /// (default 30 s).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.config.wait = wait;
        self
    }

    /// Whether a run whose outcome is unknown (abandoned) is run again (default `false`:
    /// it answers [`DedupeFnError::OutcomeUnknown`]). Turn it on only for functions whose
    /// side effect is harmless twice, or that check for themselves.
    pub fn rerun_abandoned(mut self, rerun: bool) -> Self {
        self.config.rerun_abandoned = rerun;
        self
    }

    /// Runs `f` once for `key` within `operation`; a duplicate gets the kept result.
    ///
    /// A duplicate that arrives while the first runs waits for it (in this process it is
    /// woken when the first ends; from another process it polls the store, backing off up
    /// to 1 s); if the first failed, the duplicate runs `f` itself, as a retry would.
    pub async fn run<F, Fut, T, E>(
        &self,
        operation: &str,
        key: &IdempotencyKey,
        f: F,
    ) -> Result<T, DedupeFnError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: StoredValue,
    {
        let key = ScopedKey::new(None, key.clone());
        let fingerprint = Fingerprint::of(&Method::POST, operation, b"");
        let config = self.config;
        let give_up_at = crate::time::after(Instant::now(), config.wait);
        let mut pause = Duration::from_millis(50);
        // Bounded by `wait`: each turn either returns or sleeps.
        loop {
            // Registered before `begin`, so that a run ending in between still wakes us.
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            let claim = Claim {
                token: ClaimToken::random(),
                fingerprint,
                lease: config.lease,
                keep: config.ttl,
                take_over: config.rerun_abandoned,
            };
            match self.store.begin(&key, &claim).await {
                Ok(Begin::Claimed) => return self.lead(key, claim, f).await,
                Ok(Begin::Done(stored)) => {
                    tracing::debug!(target: "tower_retry_guard", key = %key.key(), operation, "dedupe: replaying the kept result");
                    return T::decode(&stored.body).ok_or(DedupeFnError::Undecodable);
                }
                Ok(Begin::InFlight) => {
                    let now = Instant::now();
                    if now >= give_up_at {
                        return Err(DedupeFnError::InFlight);
                    }
                    // Wakes when the running call settles, or after the pause.
                    let _ = tokio::time::timeout(pause.min(give_up_at - now), settled).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Ok(Begin::Mismatch) => return Err(DedupeFnError::Mismatch),
                Ok(Begin::Abandoned) => {
                    tracing::warn!(target: "tower_retry_guard", key = %key.key(), operation, "dedupe: an earlier run's outcome is unknown; not running it again");
                    return Err(DedupeFnError::OutcomeUnknown);
                }
                Err(e) => {
                    if !e.is_full() {
                        // The store may still run this `begin` late: free what it claims.
                        release_later(self.store.clone(), key, claim.token, config.lease);
                    }
                    return Err(DedupeFnError::Store(e));
                }
            }
        }
    }

    /// Runs `f` under `claim`, then records its result or releases the key.
    async fn lead<F, Fut, T, E>(
        &self,
        key: ScopedKey,
        claim: Claim,
        f: F,
    ) -> Result<T, DedupeFnError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: StoredValue,
    {
        // Dropped last, on every path (a panic, a caller that gives up included): waiters
        // look at the key again.
        let _settle = Settle(&self.settled);
        let config = self.config;
        let deadline = crate::time::after(Instant::now(), config.max_claim_time);
        let keeper = LeaseKeeper::start(&self.store, &key, claim, deadline);
        let token = claim.token;
        match CatchUnwind::new(async move { f().await }).await {
            Ok(Ok(value)) => {
                let stored = Stored {
                    status: StatusCode::OK,
                    headers: HeaderMap::new(),
                    body: value.encode(),
                };
                self.complete(&key, &claim, stored).await;
                drop(keeper);
                Ok(value)
            }
            Ok(Err(e)) => {
                drop(keeper);
                self.release(&key, token, "the function failed").await;
                Err(DedupeFnError::Inner(e))
            }
            Err(panic) => {
                drop(keeper);
                self.release(&key, token, "the function panicked").await;
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Records the result, trying again with backoff while the lease keeper holds the claim.
    async fn complete(&self, key: &ScopedKey, claim: &Claim, stored: Stored) {
        let mut pause = Duration::from_millis(100);
        for _ in 0..5 {
            match self
                .store
                .complete(key, claim, stored.clone(), self.config.ttl)
                .await
            {
                Ok(Ownership::Held) => return,
                Ok(Ownership::Lost) => {
                    tracing::warn!(target: "tower_retry_guard", key = %key.key(), "dedupe: the claim was lost while the function ran; its result is not kept");
                    return;
                }
                Err(e) => {
                    tracing::warn!(target: "tower_retry_guard", key = %key.key(), error = %e, "dedupe: could not record the result; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
        tracing::warn!(target: "tower_retry_guard", key = %key.key(), "dedupe: the result could not be recorded; once the lease runs out, the key's outcome reads as unknown (never re-run)");
    }

    async fn release(&self, key: &ScopedKey, token: ClaimToken, why: &str) {
        tracing::debug!(target: "tower_retry_guard", key = %key.key(), why, "dedupe: releasing the key");
        if let Err(e) = self.store.release(key, token).await {
            tracing::warn!(target: "tower_retry_guard", key = %key.key(), error = %e, "dedupe: could not release the key; trying again");
            release_later(self.store.clone(), key.clone(), token, self.config.lease);
        }
    }
}

/// Wakes the waiters of a [`DedupeFn`] when a run ends, however it ends.
struct Settle<'a>(&'a Notify);

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        self.0.notify_waiters();
    }
}
