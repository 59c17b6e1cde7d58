//! The in-memory budget store: per-task and per-user budgets of one process, on DashMap.
//!
//! # Layout
//!
//! A key (scope + id) is stored as a 128-bit keyed hash (XXH3-128 with a random seed per
//! store), not as a string: no allocation per key, 16 bytes instead of the
//! id. Two ids collide with a probability of about n²/2¹²⁹ (10⁻²⁶ for a million keys), and
//! the random keys make collisions impossible to aim for. Each entry is the hash and a
//! 32-byte state (a `Mutex` around the count or cost sum and a deadline) — 48 bytes in the table, about
//! 45–95 bytes per tracked key with the table's free slots (measured by
//! `tests/store_memory_budget_bytes.rs`).
//!
//! # Limits
//!
//! - [`Limit::Count`]: a count and a deadline `ttl` after the last granted draw; past the
//!   deadline the count starts again from zero.
//! - [`Limit::Rate`]: GCRA, the exact equivalent of a token bucket. The state is the
//!   "theoretical arrival time" `tat`; a draw is granted when `max(tat, now) + T - now <=
//!   burst * T` (with `T = per / tokens`), and `tat` moves to `max(tat, now) + T`. The bucket
//!   is full again once `tat <= now`.
//!
//! - [`Limit::Cost`]: as a count, of units: a draw of `amount` fits if the sum stays within
//!   `max`.
//! - [`Limit::CostRate`]: GCRA as a rate, one unit taking `per / units` (rounded up to
//!   whole nanoseconds: the burst is exact, the refill never faster than the rate); a draw
//!   moves `tat` by `amount` such times, within `burst` of them.
//!
//! Both keep one deadline: past it, the key holds nothing worth keeping.
//!
//! # All or nothing, no deadlock
//!
//! A call draws from at most two keys (task, user). They are taken one after the other,
//! each under its own entry's lock, and **no lock is ever held while another is taken**:
//! there is no lock order to get wrong, so draws on the same keys in opposite orders (or on
//! keys of one shard) cannot deadlock. If a later key refuses, the earlier ones are given
//! back before the answer returns, so the outcome is all or nothing. For the instant between
//! the take and the give-back, a concurrent draw on the earlier key may see it one lower and
//! be refused: a conservative error, never an overdraw.
//!
//! # Eviction
//!
//! - Lazy: a draw on a key past its deadline starts it afresh.
//! - Sweep: the map is split in 32 DashMaps; the dead entries of the *next* partition are
//!   removed (and the partition shrunk if it is mostly empty) once as many draws as an
//!   eighth of its entries (at least 64) went by since the last sweep, or on the first draw
//!   100 ms after it. The work of a sweep is paid for by the draws before it (bounded work
//!   per draw), and the whole map is swept every 32 sweeps, so memory follows the number of
//!   keys active within their TTL. [`MemoryStore::evict_expired`] sweeps everything at once.

use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::time::Instant;

use super::slot::{Refusal, Slot, charge, give_back, nanos, take};
use super::{BudgetStore, Draw, Grant, Scope, StoreError};

/// The map is split into this many DashMaps, swept one at a time.
pub(crate) const PARTITIONS: usize = 32;
/// Shards of each partition's DashMap.
const SHARDS: usize = 4;
/// A sweep runs every this many draws...
const SWEEP_EVERY_DRAWS: u64 = 64;
/// ... or on the first draw this long after the last sweep.
const SWEEP_EVERY_NANOS: u64 = 100_000_000;

/// A key: the 128-bit keyed hash of scope and id.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    lo: u64,
    hi: u64,
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: the map needs no second one.
        state.write_u64(self.lo);
    }
}

/// Passes a `u64` through (keys are already keyed hashes).
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by `Key`; a plain FNV-1a so that any input still hashes.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Entry = Mutex<Slot>;
type Partition = DashMap<Key, Entry, BuildHasherDefault<PassThrough>>;

struct Inner {
    parts: Box<[Partition]>,
    seed: u64,
    start: Instant,
    draws: AtomicU64,
    /// `draws` when the last sweep ran.
    swept_at: AtomicU64,
    last_sweep: AtomicU64,
    cursor: AtomicUsize,
}

/// Budgets in this process's memory: a sharded, concurrent map of small entries, swept of
/// idle keys as it is used. See the `budget::memory` module source for the layout, the all-or-nothing
/// rule and eviction.
///
/// Clones share the map.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.len())
            .finish_non_exhaustive()
    }
}

fn lock(entry: &Entry) -> std::sync::MutexGuard<'_, Slot> {
    // A panic cannot happen while the lock is held (plain arithmetic), but a poisoned
    // lock still holds a valid slot.
    entry.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        let parts = (0..PARTITIONS)
            .map(|_| Partition::with_hasher_and_shard_amount(Default::default(), SHARDS))
            .collect();
        MemoryStore {
            inner: Arc::new(Inner {
                parts,
                seed: crate::random::u64(),
                start: Instant::now(),
                draws: AtomicU64::new(0),
                swept_at: AtomicU64::new(0),
                last_sweep: AtomicU64::new(0),
                cursor: AtomicUsize::new(0),
            }),
        }
    }

    /// Keys tracked, dead ones not yet swept included.
    pub fn len(&self) -> usize {
        self.inner.parts.iter().map(|p| p.len()).sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.inner.parts.iter().all(|p| p.is_empty())
    }

    /// Removes every dead key now (the whole map: O(keys)); returns how many. Draws already
    /// sweep a share of the map as they go, so this is rarely needed.
    pub fn evict_expired(&self) -> usize {
        let now = self.now();
        (0..PARTITIONS).map(|i| self.sweep(i, now)).sum()
    }

    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.inner.start))
    }

    fn key(&self, scope: Scope, id: &str) -> Key {
        // One pass of XXH3-128, seeded per store (and per scope): a task and a user with
        // the same id are different keys.
        let tag: u64 = match scope {
            Scope::Task => 2,
            Scope::User => 3,
            Scope::Process => 4,
            Scope::InFlight => 5,
            Scope::TaskCost => 6,
            Scope::UserCost => 7,
        };
        let h = xxhash_rust::xxh3::xxh3_128_with_seed(
            id.as_bytes(),
            self.inner.seed ^ tag.wrapping_mul(0x9E37_79B9_7F4A_7C15u64),
        );
        Key {
            lo: h as u64,
            hi: (h >> 64) as u64,
        }
    }

    fn part(&self, key: Key) -> &Partition {
        &self.inner.parts[(key.hi % PARTITIONS as u64) as usize]
    }

    /// Takes one draw on `key`; never holds more than one lock.
    fn take_one(&self, key: Key, d: &Draw, now: u64) -> Result<(), Refusal> {
        let (limit, amount) = (d.limit, d.amount);
        let part = self.part(key);
        if let Some(entry) = part.get(&key) {
            return take(&mut lock(&entry), limit, amount, now);
        }
        // A new key: decide on a fresh slot first, so that a refusal inserts nothing.
        let mut fresh = Slot::EMPTY;
        take(&mut fresh, limit, amount, now)?;
        let entry = part.entry(key).or_insert_with(|| Mutex::new(Slot::EMPTY));
        let mut slot = lock(&entry);
        if slot.kind == 0 {
            *slot = fresh;
            Ok(())
        } else {
            // Someone else inserted it in between: draw on theirs.
            take(&mut slot, limit, amount, now)
        }
    }

    fn give_back_one(&self, key: Key, d: &Draw) {
        if let Some(entry) = self.part(key).get(&key) {
            give_back(&mut lock(&entry), d.limit, d.amount);
        }
    }

    /// Counts a draw, and sweeps the next partition when one is due: after as many draws as
    /// an eighth of that partition's entries (at least 64), so that the work of sweeping is
    /// at most about 8 entries per draw however large the map, or on the first draw 100 ms
    /// after the last sweep.
    fn maybe_sweep(&self, now: u64) {
        let inner = &self.inner;
        let n = inner.draws.fetch_add(1, Ordering::Relaxed) + 1;
        let last = inner.last_sweep.load(Ordering::Relaxed);
        let since = n.saturating_sub(inner.swept_at.load(Ordering::Relaxed));
        let timed = now.saturating_sub(last) >= SWEEP_EVERY_NANOS;
        if !timed {
            // Cheap test first; the partition's size (a read of each of its shards) only
            // every 64 draws.
            if since < SWEEP_EVERY_DRAWS {
                return;
            }
            let next = inner.cursor.load(Ordering::Relaxed) % PARTITIONS;
            let work = inner.parts.get(next).map_or(0, |p| p.len()) as u64;
            if since < work / 8 {
                return;
            }
        }
        // One sweeper per period: whoever moves `last_sweep` sweeps.
        if inner
            .last_sweep
            .compare_exchange(last, now.max(last), Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        inner.swept_at.store(n, Ordering::Relaxed);
        let i = inner.cursor.fetch_add(1, Ordering::Relaxed) % PARTITIONS;
        self.sweep(i, now);
    }

    /// Removes the dead entries of partition `i`; returns how many.
    fn sweep(&self, i: usize, now: u64) -> usize {
        let Some(part) = self.inner.parts.get(i) else {
            return 0;
        };
        let before = part.len();
        part.retain(|_, entry| {
            let slot = entry.get_mut().unwrap_or_else(|p| p.into_inner());
            slot.until > now
        });
        let after = part.len();
        if part.capacity() > 64 && after * 4 < part.capacity() {
            part.shrink_to_fit();
        }
        before.saturating_sub(after)
    }
}

impl BudgetStore for MemoryStore {
    async fn draw(&self, draws: &[Draw]) -> Result<Grant, StoreError> {
        let now = self.now();
        self.maybe_sweep(now);
        // Bounded by the draws of one call (at most one per scope).
        for (i, d) in draws.iter().enumerate() {
            let key = self.key(d.scope, &d.key);
            if let Err((retry_in, left)) = self.take_one(key, d, now) {
                for prev in &draws[..i] {
                    self.give_back_one(self.key(prev.scope, &prev.key), prev);
                }
                return Ok(Grant::Denied {
                    scope: d.scope,
                    retry_in,
                    left,
                });
            }
        }
        Ok(Grant::Granted)
    }

    async fn refund(&self, draws: &[Draw]) -> Result<(), StoreError> {
        for d in draws.iter().filter(|d| d.limit.is_cost()) {
            self.give_back_one(self.key(d.scope, &d.key), d);
        }
        Ok(())
    }

    async fn charge(&self, draws: &[Draw]) -> Result<(), StoreError> {
        let now = self.now();
        for d in draws.iter().filter(|d| d.limit.is_cost()) {
            let key = self.key(d.scope, &d.key);
            let entry = self
                .part(key)
                .entry(key)
                .or_insert_with(|| Mutex::new(Slot::EMPTY));
            charge(&mut lock(&entry), d.limit, d.amount, now);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "memory_tests.rs"]
mod tests;
