//! [`MemoryIdempotencyStore`]: idempotency keys in this process's memory, bounded in entries
//! and bytes, for everyone and for each principal.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use tokio::time::Instant;

mod builder;
mod usage;

pub use self::builder::MemoryIdempotencyStoreBuilder;

use super::store::{
    Begin, Claim, ClaimToken, Fingerprint, IdempotencyStore, Ownership, ScopedKey, Stored,
};
use crate::store::StoreError;
use crate::time::after;

/// Bytes counted for an entry beside its key and stored response: the map slot, the entry
/// and the principal's `Arc` (an estimate, so the byte budget bounds the real footprint).
const ENTRY_OVERHEAD: usize = 128;

/// Bytes every claim holds in reserve for its result, so that a small answer (the layer's
/// "completed, result not kept" marker) always fits once the request ran, even in a full
/// store: a result is never refused room after its side effect happened, only a larger one.
pub(crate) const MARKER_RESERVE: usize = 512;

#[derive(Debug)]
enum Entry {
    InFlight {
        fingerprint: Fingerprint,
        token: ClaimToken,
        lease_until: Instant,
        until: Instant,
        size: usize,
    },
    Done {
        fingerprint: Fingerprint,
        token: ClaimToken,
        stored: Stored,
        until: Instant,
        size: usize,
    },
}

impl Entry {
    fn until(&self) -> Instant {
        match self {
            Entry::InFlight { until, .. } | Entry::Done { until, .. } => *until,
        }
    }

    fn size(&self) -> usize {
        match self {
            Entry::InFlight { size, .. } | Entry::Done { size, .. } => *size,
        }
    }
}

/// The limits of a [`MemoryIdempotencyStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    max_entries: usize,
    max_bytes: usize,
    max_entries_per_principal: usize,
    max_bytes_per_principal: usize,
    sweep_every: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 100_000,
            max_bytes: 256 << 20,
            max_entries_per_principal: 25_000,
            max_bytes_per_principal: 64 << 20,
            sweep_every: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    entries: usize,
    bytes: usize,
}

/// Idempotency keys in this process's memory (a [`DashMap`]).
///
/// Entries expire: a result when its TTL runs out, a claim when its record does
/// ([`Claim::keep`]; its *lease* running out only makes it abandoned). Expired entries are
/// dropped when touched, and by a sweep of the whole map at most once per sweep interval
/// (default 60 s, run by whichever call comes first after it).
///
/// Memory is bounded twice, and fairly: at most 100 000 entries and 256 MiB (keys, stored
/// responses and a fixed overhead per entry) in all, and at most 25 000 entries and 64 MiB
/// per principal (the global scope, requests without a principal, counts as one principal).
/// A new key beyond a limit is refused with a [`StoreError::full`] naming the limit and the
/// principal (the layer answers 503, or 429 for a principal over its share); nothing is
/// evicted early, since a result dropped before its TTL would let a retry run again. A result
/// too large for what is left is refused the same way; the layer then keeps a small marker
/// instead ("completed, result not kept"), so the request still never runs twice. Raise the
/// per-principal share to the whole store for a single-tenant server
/// ([`MemoryIdempotencyStoreBuilder::max_per_principal`]).
///
/// Clones share the map. Time is [`tokio::time::Instant`], so tests can pause it.
#[derive(Clone)]
pub struct MemoryIdempotencyStore {
    inner: Arc<Inner>,
}

struct Inner {
    map: DashMap<ScopedKey, Entry>,
    /// Per principal; a row exists only while the principal holds an entry. Locked after a
    /// `map` shard, never before.
    usage: DashMap<Option<Arc<str>>, Usage>,
    entries: AtomicUsize,
    bytes: AtomicUsize,
    limits: Limits,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last sweep.
    last_sweep: AtomicU64,
}

impl fmt::Debug for MemoryIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryIdempotencyStore")
            .field("entries", &self.len())
            .field("bytes", &self.bytes())
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl Default for MemoryIdempotencyStore {
    fn default() -> Self {
        MemoryIdempotencyStore::new()
    }
}

impl MemoryIdempotencyStore {
    /// An empty store with the default limits (see the type's docs).
    pub fn new() -> Self {
        MemoryIdempotencyStore::with(Limits::default())
    }

    /// A builder for other limits.
    pub fn builder() -> MemoryIdempotencyStoreBuilder {
        MemoryIdempotencyStoreBuilder::new()
    }

    fn with(limits: Limits) -> Self {
        MemoryIdempotencyStore {
            inner: Arc::new(Inner {
                map: DashMap::new(),
                usage: DashMap::new(),
                entries: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                limits,
                epoch: Instant::now(),
                last_sweep: AtomicU64::new(0),
            }),
        }
    }

    /// Entries held now, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.inner.map.len()
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.inner.map.is_empty()
    }

    /// Bytes counted against the budget now (keys, stored responses, overhead).
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// Entries and bytes held now by `principal` (`None`: the global scope).
    pub fn usage_of(&self, principal: Option<&str>) -> (usize, usize) {
        let principal: Option<Arc<str>> = principal.map(Arc::from);
        self.inner
            .usage
            .get(&principal)
            .map_or((0, 0), |u| (u.entries, u.bytes))
    }

    /// Drops every expired entry now.
    pub fn sweep(&self) {
        self.sweep_expired(Instant::now());
    }

    fn sweep_expired(&self, now: Instant) {
        let inner = &self.inner;
        inner.map.retain(|key, e| {
            let keep = e.until() > now;
            if !keep {
                inner.refund(key, 1, e.size());
            }
            keep
        });
    }

    /// Sweeps if the last sweep is at least `every` old.
    fn sweep_if_older(&self, now: Instant, every: Duration) {
        let inner = &self.inner;
        let ms = now.saturating_duration_since(inner.epoch).as_millis() as u64;
        let last = inner.last_sweep.load(Ordering::Relaxed);
        if ms.saturating_sub(last) >= every.as_millis() as u64
            && inner
                .last_sweep
                .compare_exchange(last, ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.sweep_expired(now);
        }
    }

    /// Before a new key: the periodic sweep, and, when a limit is near, a sweep of expired
    /// entries (they count until dropped) at most once a second, so a store that is really
    /// full is not scanned on every request. Never called under a map lock (a sweep takes
    /// every shard).
    fn make_room(&self, key: &ScopedKey, size: usize, now: Instant) {
        self.sweep_if_older(now, self.inner.limits.sweep_every);
        if self.inner.check(key, size).is_err() {
            let every = self.inner.limits.sweep_every.min(Duration::from_secs(1));
            self.sweep_if_older(now, every);
        }
    }
}

fn key_size(key: &ScopedKey) -> usize {
    ENTRY_OVERHEAD + MARKER_RESERVE + key.key().as_str().len() + key.principal().map_or(0, str::len)
}

impl IdempotencyStore for MemoryIdempotencyStore {
    async fn begin(&self, key: &ScopedKey, claim: &Claim) -> Result<Begin, StoreError> {
        let now = Instant::now();
        let size = key_size(key);
        self.make_room(key, size, now);
        let inner = &self.inner;
        let fresh = Entry::InFlight {
            fingerprint: claim.fingerprint,
            token: claim.token,
            lease_until: after(now, claim.lease),
            until: after(now, claim.keep.max(claim.lease)),
            size,
        };
        match inner.map.entry(key.clone()) {
            MapEntry::Occupied(mut e) => {
                let answer = match e.get_mut() {
                    entry if entry.until() <= now => None,
                    Entry::InFlight { fingerprint, .. } | Entry::Done { fingerprint, .. }
                        if *fingerprint != claim.fingerprint =>
                    {
                        Some(Begin::Mismatch)
                    }
                    Entry::Done { stored, .. } => Some(Begin::Done(stored.clone())),
                    Entry::InFlight { lease_until, .. } if *lease_until > now => {
                        Some(Begin::InFlight)
                    }
                    Entry::InFlight {
                        token,
                        lease_until,
                        until,
                        ..
                    } => Some(if claim.take_over {
                        *token = claim.token;
                        *lease_until = after(now, claim.lease);
                        *until = (*until).max(after(now, claim.keep.max(claim.lease)));
                        Begin::Claimed
                    } else {
                        Begin::Abandoned
                    }),
                };
                if let Some(answer) = answer {
                    return Ok(answer);
                }
                // The record expired: it is gone, and the key is new again.
                inner.refund(key, 1, e.get().size());
                match inner.charge(key, 1, size) {
                    Ok(()) => {
                        e.insert(fresh);
                        Ok(Begin::Claimed)
                    }
                    Err(full) => {
                        e.remove();
                        Err(full)
                    }
                }
            }
            MapEntry::Vacant(v) => {
                inner.charge(key, 1, size)?;
                v.insert(fresh);
                Ok(Begin::Claimed)
            }
        }
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        claim: &Claim,
        stored: Stored,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        let now = Instant::now();
        let inner = &self.inner;
        let extra = stored.size().saturating_sub(MARKER_RESERVE);
        let done = |size| Entry::Done {
            fingerprint: claim.fingerprint,
            token: claim.token,
            stored,
            until: after(now, ttl),
            size,
        };
        match inner.map.entry(key.clone()) {
            MapEntry::Occupied(mut e) => match e.get() {
                Entry::Done { token, .. } if *token == claim.token => Ok(Ownership::Held),
                Entry::InFlight { token, size, .. } if *token == claim.token => {
                    let size = *size;
                    inner.charge(key, 0, extra)?;
                    e.insert(done(size + extra));
                    Ok(Ownership::Held)
                }
                entry if entry.until() > now => Ok(Ownership::Lost),
                // Expired: the key is gone, as below.
                entry => {
                    let size = entry.size();
                    inner.refund(key, 1, size);
                    let size = key_size(key) + extra;
                    match inner.charge(key, 1, size) {
                        Ok(()) => {
                            e.insert(done(size));
                            Ok(Ownership::Held)
                        }
                        Err(full) => {
                            e.remove();
                            Err(full)
                        }
                    }
                }
            },
            // The key is gone (not released by this claim: its holder completes it): write
            // the result, so a retry replays it instead of running again.
            MapEntry::Vacant(v) => {
                let size = key_size(key) + extra;
                inner.charge(key, 1, size)?;
                v.insert(done(size));
                Ok(Ownership::Held)
            }
        }
    }

    async fn renew(&self, key: &ScopedKey, claim: &Claim) -> Result<Ownership, StoreError> {
        let now = Instant::now();
        let inner = &self.inner;
        match inner.map.entry(key.clone()) {
            MapEntry::Occupied(mut e) => match e.get_mut() {
                Entry::InFlight {
                    token,
                    lease_until,
                    until,
                    ..
                } if *token == claim.token && *until > now => {
                    *lease_until = after(now, claim.lease);
                    *until = (*until).max(*lease_until);
                    Ok(Ownership::Held)
                }
                _ => Ok(Ownership::Lost),
            },
            // The key is gone (the store lost it): claim it again, so retries wait.
            MapEntry::Vacant(v) => {
                let size = key_size(key);
                inner.charge(key, 1, size)?;
                v.insert(Entry::InFlight {
                    fingerprint: claim.fingerprint,
                    token: claim.token,
                    lease_until: after(now, claim.lease),
                    until: after(now, claim.keep.max(claim.lease)),
                    size,
                });
                Ok(Ownership::Held)
            }
        }
    }

    async fn release(&self, key: &ScopedKey, token: ClaimToken) -> Result<Ownership, StoreError> {
        let removed = self.inner.map.remove_if(
            key,
            |_, e| matches!(e, Entry::InFlight { token: t, .. } if *t == token),
        );
        match removed {
            Some((key, entry)) => {
                self.inner.refund(&key, 1, entry.size());
                Ok(Ownership::Held)
            }
            None => Ok(Ownership::Lost),
        }
    }
}
