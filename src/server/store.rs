//! Where claimed and finished idempotency keys live: [`IdempotencyStore`] and the in-memory
//! [`MemoryIdempotencyStore`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use http::{HeaderMap, Method, StatusCode};
use tokio::time::Instant;

use crate::budget::StoreError;
use crate::request::IdempotencyKey;

/// An idempotency key within the scope of one principal (a user, an API key, a tenant).
///
/// Two requests share a stored result only when both the principal and the key are equal,
/// so user A's key never replays user B's response.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ScopedKey {
    principal: Option<Arc<str>>,
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

/// A store's answer to [`IdempotencyStore::begin`].
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// The key was free (or its earlier claim's lease had run out): the caller owns it now
    /// and must [`complete`](IdempotencyStore::complete) or
    /// [`release`](IdempotencyStore::release) it.
    Claimed,
    /// Another request with the same key and fingerprint is running.
    InFlight,
    /// A request with the same key and fingerprint finished: here is its result.
    Done(Stored),
    /// The key was used for a request with another fingerprint.
    Mismatch,
}

/// Where idempotency keys live: claimed (with a lease), then completed (with a result kept
/// for a TTL) or released.
///
/// Each method is one atomic step, so a remote implementation is one round trip each (for
/// Redis: one Lua script per call; `begin` reads the entry and, if absent or expired, writes
/// `{in_flight, fingerprint}` with `PX lease`; `complete` writes `{done, fingerprint, stored}`
/// with `PX ttl`; `renew` sets `PX lease` on an entry still in flight; `release` deletes the
/// entry only if it is still in flight). Use
/// [`ScopedKey::storage_key`] as the remote key.
pub trait IdempotencyStore: Clone + Send + Sync + 'static {
    /// Claims `key` for a request with `fingerprint`, unless it is held or done.
    ///
    /// A claim older than `lease` counts as abandoned (its process died) and is claimed anew.
    /// A fingerprint that differs from the entry's gives [`Begin::Mismatch`], whether the entry
    /// is in flight or done.
    fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Begin, StoreError>> + Send;

    /// Records the result of a claimed key, kept for `ttl`.
    fn complete(
        &self,
        key: &ScopedKey,
        stored: Stored,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Extends an in-flight claim's lease to `lease` from now (the claimant is alive and
    /// still working). A key that is done, or not held, is left alone.
    fn renew(
        &self,
        key: &ScopedKey,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Gives up a claim (the request did not finish), so a retry can run. A key that is done
    /// is left alone.
    fn release(&self, key: &ScopedKey) -> impl Future<Output = Result<(), StoreError>> + Send;
}

#[derive(Debug)]
enum Entry {
    InFlight {
        fingerprint: Fingerprint,
        until: Instant,
    },
    Done {
        fingerprint: Fingerprint,
        stored: Stored,
        until: Instant,
    },
}

impl Entry {
    fn until(&self) -> Instant {
        match self {
            Entry::InFlight { until, .. } | Entry::Done { until, .. } => *until,
        }
    }
}

/// Idempotency keys in this process's memory (a [`DashMap`]).
///
/// Entries expire: an in-flight claim when its lease runs out, a result when its TTL does.
/// Expired entries are dropped when touched, and by a sweep of the whole map at most once per
/// sweep interval (default 60 s, run by whichever call comes first after it), so memory stays
/// bounded by the traffic of one TTL. A cap on the number of entries (default 100 000) bounds
/// it absolutely: a new key beyond the cap is a [`StoreError`] (the layer answers 503).
///
/// Clones share the map. Time is [`tokio::time::Instant`], so tests can pause it.
#[derive(Clone)]
pub struct MemoryIdempotencyStore {
    inner: Arc<Inner>,
}

struct Inner {
    map: DashMap<ScopedKey, Entry>,
    max_entries: usize,
    sweep_every: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last sweep.
    last_sweep: AtomicU64,
}

impl fmt::Debug for MemoryIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryIdempotencyStore")
            .field("entries", &self.inner.map.len())
            .field("max_entries", &self.inner.max_entries)
            .field("sweep_every", &self.inner.sweep_every)
            .finish()
    }
}

impl Default for MemoryIdempotencyStore {
    fn default() -> Self {
        MemoryIdempotencyStore::new()
    }
}

impl MemoryIdempotencyStore {
    /// An empty store: at most 100 000 entries, swept every 60 s.
    pub fn new() -> Self {
        MemoryIdempotencyStore::with_limits(100_000, Duration::from_secs(60))
    }

    /// An empty store with a cap on entries and a sweep interval.
    pub fn with_limits(max_entries: usize, sweep_every: Duration) -> Self {
        MemoryIdempotencyStore {
            inner: Arc::new(Inner {
                map: DashMap::new(),
                max_entries,
                sweep_every,
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

    /// Drops every expired entry now.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.inner.map.retain(|_, e| e.until() > now);
    }

    fn maybe_sweep(&self, now: Instant) {
        self.sweep_if_older(now, self.inner.sweep_every);
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
            inner.map.retain(|_, e| e.until() > now);
        }
    }
}

impl IdempotencyStore for MemoryIdempotencyStore {
    async fn begin(
        &self,
        key: &ScopedKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        self.maybe_sweep(now);
        let claim = Entry::InFlight {
            fingerprint,
            until: now + lease,
        };
        // The length is read before taking the entry's shard lock (reading it under the lock
        // would deadlock); the cap is approximate under races, by at most the callers racing.
        let mut full = self.inner.map.len() >= self.inner.max_entries;
        if full {
            // Expired entries count until a sweep drops them: before refusing a new key for
            // want of room (a 503), make room from them. At most once a second, so a store
            // that is really full is not scanned on every request.
            self.sweep_if_older(now, self.inner.sweep_every.min(Duration::from_secs(1)));
            full = self.inner.map.len() >= self.inner.max_entries;
        }
        match self.inner.map.entry(key.clone()) {
            MapEntry::Occupied(mut e) => {
                let answer = match e.get() {
                    entry if entry.until() <= now => None,
                    Entry::InFlight { fingerprint: f, .. } => Some(if *f == fingerprint {
                        Begin::InFlight
                    } else {
                        Begin::Mismatch
                    }),
                    Entry::Done {
                        fingerprint: f,
                        stored,
                        ..
                    } => Some(if *f == fingerprint {
                        Begin::Done(stored.clone())
                    } else {
                        Begin::Mismatch
                    }),
                };
                match answer {
                    Some(a) => Ok(a),
                    None => {
                        e.insert(claim);
                        Ok(Begin::Claimed)
                    }
                }
            }
            MapEntry::Vacant(_) if full => Err(StoreError::new(format!(
                "memory idempotency store is full ({} entries)",
                self.inner.max_entries
            ))),
            MapEntry::Vacant(v) => {
                v.insert(claim);
                Ok(Begin::Claimed)
            }
        }
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        stored: Stored,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let Some(mut entry) = self.inner.map.get_mut(key) else {
            return Err(StoreError::new(
                "completing an idempotency key that is not claimed (its lease ran out?)",
            ));
        };
        if let Entry::InFlight { fingerprint, .. } = *entry {
            *entry = Entry::Done {
                fingerprint,
                stored,
                until: now + ttl,
            };
        }
        Ok(())
    }

    async fn renew(&self, key: &ScopedKey, lease: Duration) -> Result<(), StoreError> {
        if let Some(mut entry) = self.inner.map.get_mut(key) {
            if let Entry::InFlight { until, .. } = &mut *entry {
                *until = Instant::now() + lease;
            }
        }
        Ok(())
    }

    async fn release(&self, key: &ScopedKey) -> Result<(), StoreError> {
        self.inner
            .map
            .remove_if(key, |_, e| matches!(e, Entry::InFlight { .. }));
        Ok(())
    }
}
