//! What [`Dedupe`](super::Dedupe) keeps: a slot per scoped key (running, or done with its
//! result), and how many keys each scope holds.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::request::IdempotencyKey;

/// A result shared between callers: a `Result<Res, DedupeError<E>>`, type-erased so the map
/// needs not name the service's types.
pub(super) type Shared = Arc<dyn Any + Send + Sync>;

pub(super) enum Slot {
    Running {
        id: u64,
        done: watch::Receiver<Option<Shared>>,
    },
    Done {
        result: Shared,
        until: Instant,
    },
}

/// A key within its scope.
pub(super) type ScopedId = (Option<Arc<str>>, IdempotencyKey);

pub(super) struct State {
    pub(super) map: DashMap<ScopedId, Slot>,
    /// Keys held per scope; a row exists only while its scope holds a key. Locked after a
    /// `map` shard, never before.
    pub(super) per_scope: DashMap<Option<Arc<str>>, usize>,
    pub(super) next_id: AtomicU64,
    pub(super) epoch: Instant,
    pub(super) last_sweep: AtomicU64,
}

impl State {
    pub(super) fn maybe_sweep(&self, now: Instant, every: Duration) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let last = self.last_sweep.load(Ordering::Relaxed);
        if ms.saturating_sub(last) >= every.as_millis() as u64
            && self
                .last_sweep
                .compare_exchange(last, ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.map.retain(|(scope, _), slot| {
                let keep = match slot {
                    Slot::Running { .. } => true,
                    Slot::Done { until, .. } => *until > now,
                };
                if !keep {
                    self.uncount(scope);
                }
                keep
            });
        }
    }

    /// Drops the running slot `id` for `key` (not a newer one).
    pub(super) fn forget(&self, key: &ScopedId, id: u64) {
        let removed = self.map.remove_if(
            key,
            |_, slot| matches!(slot, Slot::Running { id: i, .. } if *i == id),
        );
        if removed.is_some() {
            self.uncount(&key.0);
        }
    }

    /// Counts a new key for `scope`, unless the scope holds its share.
    pub(super) fn count(&self, scope: &Option<Arc<str>>, max: usize) -> bool {
        let mut held = self.per_scope.entry(scope.clone()).or_insert(0);
        if *held >= max {
            return false;
        }
        *held += 1;
        true
    }

    fn uncount(&self, scope: &Option<Arc<str>>) {
        let empty = match self.per_scope.get_mut(scope) {
            Some(mut held) => {
                *held = held.saturating_sub(1);
                *held == 0
            }
            None => false,
        };
        if empty {
            self.per_scope.remove_if(scope, |_, held| *held == 0);
        }
    }
}
