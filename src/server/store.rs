//! Where claimed and finished idempotency keys live: the [`IdempotencyStore`] seam and the
//! types it speaks in (keys, fingerprints, claims, stored responses).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use crate::request::IdempotencyKey;
use crate::store::StoreError;

/// An idempotency key within the scope of one principal (a user, an API key, a tenant).
///
/// Two requests share a stored result only when both the principal and the key are equal,
/// so user A's key never replays user B's response.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ScopedKey {
    pub(super) principal: Option<Arc<str>>,
    key: IdempotencyKey,
}

impl ScopedKey {
    /// A key scoped to `principal` (`None`: the global scope).
    pub fn new(principal: Option<&str>, key: IdempotencyKey) -> Self {
        ScopedKey {
            principal: principal.map(Arc::from),
            key,
        }
    }

    /// The principal, if any.
    pub fn principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }

    /// The key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// A single string naming this scoped key, unambiguous for every principal and key
    /// (`g:<key>` or `p:<principal length>:<principal>:<key>`): a key for a remote store.
    pub fn storage_key(&self) -> String {
        match &self.principal {
            None => format!("g:{}", self.key.as_str()),
            Some(p) => format!("p:{}:{}:{}", p.len(), p, self.key.as_str()),
        }
    }
}

impl fmt::Debug for ScopedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopedKey")
            .field("principal", &self.principal())
            .field("key", &self.key.as_str())
            .finish()
    }
}

/// What a request looked like: a 128-bit XXH3 hash of its method, path (with query) and body.
///
/// XXH3-128 is a specified, seed-free hash with the same output on every platform, version
/// and language, so processes sharing a remote store agree on it; 128 bits make an accidental
/// collision negligible. It is not a cryptographic hash, and needs not be: a fingerprint is
/// only compared with others under the same [`ScopedKey`], so a forged collision could only
/// make a client's own request replay that client's own earlier response.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(u128);

impl Fingerprint {
    /// The fingerprint of a request's method, path (and query) and body. Each part is
    /// length-prefixed, so no two different requests hash the same input.
    pub fn of(method: &Method, path_and_query: &str, body: &[u8]) -> Self {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for part in [method.as_str().as_bytes(), path_and_query.as_bytes(), body] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        Fingerprint(h.digest128())
    }

    /// A fingerprint from its raw value (as read back from a remote store).
    pub const fn from_u128(value: u128) -> Self {
        Fingerprint(value)
    }

    /// The raw value.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({:032x})", self.0)
    }
}

/// A finished response as kept by a store: status, headers and the whole body.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The status.
    pub status: StatusCode,
    /// The headers (hop-by-hop headers removed).
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Stored {
    /// Bytes this entry holds, roughly (body plus header names and values).
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len())
                .sum::<usize>()
    }
}

/// A claim's fencing token: minted by the layer for each [`begin`](IdempotencyStore::begin),
/// so that every later step on the key ([`renew`](IdempotencyStore::renew),
/// [`complete`](IdempotencyStore::complete), [`release`](IdempotencyStore::release)) acts on
/// that claim only. A holder whose claim was taken over, or a `begin` that timed out and ran
/// late, can never overwrite or free somebody else's claim.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimToken(u128);

impl ClaimToken {
    /// A new random token (128 random bits).
    pub fn random() -> Self {
        ClaimToken(u128::from_le_bytes(crate::random::bytes16()))
    }

    /// A token from its raw value (as read back from a remote store).
    pub const fn from_u128(value: u128) -> Self {
        ClaimToken(value)
    }

    /// The raw value.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Debug for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClaimToken({:032x})", self.0)
    }
}

/// What [`IdempotencyStore::begin`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The claim's token.
    pub token: ClaimToken,
    /// What the request looks like; the same key with another fingerprint is a mismatch.
    pub fingerprint: Fingerprint,
    /// How long the claim holds without a renewal. A claim whose lease ran out without a
    /// result is *abandoned*: the outcome of its request is unknown.
    pub lease: Duration,
    /// How long the record of the claim is kept (the TTL of results): an abandoned claim
    /// still answers [`Begin::Abandoned`] until then, so a retry never re-runs it by surprise.
    pub keep: Duration,
    /// Take over an abandoned claim (same fingerprint) instead of answering
    /// [`Begin::Abandoned`]: the caller chose to run the request again.
    pub take_over: bool,
}

/// A store's answer to [`IdempotencyStore::begin`].
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// The key was free (or abandoned, and [`Claim::take_over`] was set): the claim is the
    /// caller's now, under its token; it must [`complete`](IdempotencyStore::complete) or
    /// [`release`](IdempotencyStore::release) it.
    Claimed,
    /// Another request with the same key and fingerprint is running (its lease holds).
    InFlight,
    /// A request with the same key and fingerprint finished: here is its result.
    Done(Stored),
    /// The key was used for a request with another fingerprint.
    Mismatch,
    /// A request with the same key and fingerprint was started, and its lease ran out
    /// without a result (its process died, or lost the store for a whole lease): whether its
    /// side effect happened is unknown.
    Abandoned,
}

/// Whether a step on a claim found the claim still the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// The claim was the caller's; the step took effect (or had already: completing twice
    /// under one token is not an error).
    Held,
    /// The key is no longer claimed under the caller's token (released, taken over,
    /// completed by another claim, or expired): the step changed nothing.
    Lost,
}

/// Where idempotency keys live: claimed (with a token and a lease), then completed (with a
/// result kept for a TTL) or released.
///
/// Each method is one atomic step, so a remote implementation is one round trip each (for
/// Redis: one Lua script per call). Every step after `begin` names the claim by its
/// [`ClaimToken`] and changes nothing unless the key is still claimed under it (fencing).
/// A claim outlives its lease as a record (until [`Claim::keep`]): a lease that runs out
/// makes it [`Begin::Abandoned`], never free, so a stalled store cannot turn a running or
/// finished request into one that runs again. Use [`ScopedKey::storage_key`] as the remote
/// key.
pub trait IdempotencyStore: Clone + Send + Sync + 'static {
    /// Claims `key` for a request, unless it is held, done or abandoned (see [`Begin`]).
    ///
    /// A fingerprint that differs from the entry's gives [`Begin::Mismatch`], whatever the
    /// entry's state.
    fn begin(
        &self,
        key: &ScopedKey,
        claim: &Claim,
    ) -> impl Future<Output = Result<Begin, StoreError>> + Send;

    /// Records the result of `claim` on `key`, kept for `ttl`. Completes a claim whose lease
    /// ran out too, as long as nobody took it over; and writes the result if the key is gone
    /// altogether (a store that lost its data, say a Redis restarted without persistence),
    /// so that retries find it rather than run the request again. Only another claim's entry
    /// (in flight or done) makes it [`Ownership::Lost`].
    fn complete(
        &self,
        key: &ScopedKey,
        claim: &Claim,
        stored: Stored,
        ttl: Duration,
    ) -> impl Future<Output = Result<Ownership, StoreError>> + Send;

    /// Extends `claim`'s lease to [`Claim::lease`] from now (the holder is alive and still
    /// working), even if it had run out, as long as nobody took it over; re-creates the claim
    /// if the key is gone altogether (the store lost it), so retries wait rather than run.
    fn renew(
        &self,
        key: &ScopedKey,
        claim: &Claim,
    ) -> impl Future<Output = Result<Ownership, StoreError>> + Send;

    /// Gives up the claim `token` (the request did nothing), so a retry can run.
    fn release(
        &self,
        key: &ScopedKey,
        token: ClaimToken,
    ) -> impl Future<Output = Result<Ownership, StoreError>> + Send;
}
