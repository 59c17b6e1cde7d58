//! [`RetryStats`]: per operation and error kind, windowed, with a health verdict; a bounded
//! number of operations.

use std::time::Duration;

use super::outcome::StopReason;
use crate::classify::ErrorKind;

use std::hash::Hasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use dashmap::DashMap;
use tokio::time::Instant;

use crate::budget::Scope;

use super::operation::OpKey;
use super::operation::{DEFAULT_MAX_OPERATIONS, OVERFLOW_OPERATION};

const KINDS: usize = ErrorKind::ALL.len();
const BUCKET_SECS: u64 = 10;
const BUCKETS: usize = 60; // 10 minutes of 10 s buckets

mod read;
/// Counters of one error kind of one operation.
#[derive(Debug, Default)]
struct KindCounters {
    /// Failed attempts of this kind.
    failures: AtomicU64,
    /// Retries made after a failure of this kind.
    retries: AtomicU64,
    /// What those retries cost (units of the cost budgets), where known.
    retry_cost: AtomicU64,
    /// Calls that succeeded after their last failure was of this kind.
    recovered: AtomicU64,
    /// Calls that ran out of attempts or time (exhausted, deadline, hint too long).
    exhausted: AtomicU64,
    /// Calls denied a retry by a budget, per [`Scope`] (`Scope::index`).
    denied: [AtomicU64; Scope::COUNT],
    /// Calls not retried because the budget store could not be reached.
    store_unavailable: AtomicU64,
    /// Calls not retried for another reason (not retryable, side effect without key,
    /// output unchanged, not cloneable, inner gave up).
    not_retried: AtomicU64,
    /// Streams that failed after their first content event (never retried).
    mid_stream: AtomicU64,
}

#[derive(Debug, Default)]
struct Bucket {
    epoch: AtomicU64,
    calls: AtomicU64,
    retries: AtomicU64,
    recovered: AtomicU64,
    failed: AtomicU64,
}

#[derive(Debug)]
struct OpStats {
    /// Shared: a metric label clones it without allocating.
    name: Arc<str>,
    /// The entry of the operations past the cap.
    overflow: bool,
    calls: AtomicU64,
    kinds: [KindCounters; KINDS],
    window: [Bucket; BUCKETS],
}

/// The longest operation name kept, in bytes: a longer one (a path the model chose, say) is
/// cut at a character boundary and marked with `…`, so that an operation's entry stays
/// small whatever its path. It is still found by its full name (entries are keyed by it).
const MAX_NAME: usize = 256;

fn bounded(mut name: String) -> String {
    if name.len() > MAX_NAME {
        let mut cut = MAX_NAME;
        // Bounded: a UTF-8 character is at most 4 bytes.
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
        name.push('…');
    }
    name
}

impl OpStats {
    fn new(name: String) -> Self {
        OpStats {
            overflow: name == OVERFLOW_OPERATION,
            name: bounded(name).into(),
            calls: AtomicU64::new(0),
            kinds: Default::default(),
            window: std::array::from_fn(|_| Bucket::default()),
        }
    }
}

/// Shared, cheap-to-clone retry statistics: per operation and error kind, how many calls,
/// retries, recoveries, exhaustions, budget denials and refusals, with windowed rates over
/// the last minute and ten minutes and a [`Health`](crate::observe::Health) verdict.
///
/// At most [`RetryStats::DEFAULT_MAX_OPERATIONS`] operations are tracked (or the number given to
/// [`RetryStats::with_max_operations`]); the calls of any further operation are counted
/// under one name, [`RetryStats::OVERFLOW_OPERATION`], and a warning says so once. Each tracked
/// operation takes about 3.6 KB (its name is cut at 256 bytes), so the stats stay under 4 MB
/// by default, whatever the number and length of distinct paths (metric labels are bounded
/// the same way). The default operation
/// name already collapses ids in paths (`GET /v1/batches/{id}`).
///
/// The success path touches one sharded map read and two relaxed atomics of its operation;
/// no lock is held that two threads wait for. Windowed counts are approximate under heavy
/// concurrency when a bucket rolls over (a few events may land in the old bucket).
#[derive(Debug, Clone)]
pub struct RetryStats {
    inner: Arc<StatsInner>,
}

/// The map's keys are already FNV-1a outputs: hashing them again is wasted work on the
/// success path.
#[derive(Debug, Clone, Copy, Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type OpMap = DashMap<u64, Arc<OpStats>, std::hash::BuildHasherDefault<PassThrough>>;

#[derive(Debug)]
struct StatsInner {
    ops: OpMap,
    origin: Instant,
    max_ops: usize,
    /// Operations tracked (the overflow entry not included).
    tracked: AtomicUsize,
    /// The overflow entry (also in `ops`, under its name's key).
    overflow: Arc<OpStats>,
    warned: AtomicBool,
}

impl Default for RetryStats {
    fn default() -> Self {
        RetryStats::new()
    }
}

/// One operation's counters, held by a call from its start to its end, so that the end
/// records without a second map lookup.
#[derive(Debug, Clone)]
pub(crate) struct OpHandle(Arc<OpStats>);

impl OpHandle {
    /// The operation's name.
    pub(crate) fn name(&self) -> &str {
        &self.0.name
    }

    /// Whether this is the entry of the operations past the cap (whose name is not theirs).
    pub(crate) fn is_overflow(&self) -> bool {
        self.0.overflow
    }
}

impl RetryStats {
    /// The most operations tracked by default.
    pub const DEFAULT_MAX_OPERATIONS: usize = DEFAULT_MAX_OPERATIONS;

    /// The name the calls of operations past the cap are counted under.
    pub const OVERFLOW_OPERATION: &'static str = OVERFLOW_OPERATION;

    /// Empty stats, tracking at most [`RetryStats::DEFAULT_MAX_OPERATIONS`] operations.
    pub fn new() -> Self {
        RetryStats::with_max_operations(DEFAULT_MAX_OPERATIONS)
    }

    /// Feature `metrics`: describes every metric of [`observe::metrics`](crate::observe::metrics)
    /// (HELP text and unit) to the installed recorder. Called when a `RetryStats` is made
    /// (so a recorder installed before the layer is built learns them); call it again
    /// after installing a recorder later.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn describe_metrics() {
        super::metrics::describe();
    }

    /// Empty stats tracking at most `max` operations; the rest are counted under
    /// [`RetryStats::OVERFLOW_OPERATION`].
    pub fn with_max_operations(max: usize) -> Self {
        #[cfg(feature = "metrics")]
        super::metrics::describe();
        let overflow = Arc::new(OpStats::new(OVERFLOW_OPERATION.to_owned()));
        let ops = OpMap::default();
        ops.insert(OpKey::of_name(OVERFLOW_OPERATION).0, overflow.clone());
        RetryStats {
            inner: Arc::new(StatsInner {
                ops,
                origin: Instant::now(),
                max_ops: max,
                tracked: AtomicUsize::new(0),
                overflow,
                warned: AtomicBool::new(false),
            }),
        }
    }

    /// Operations tracked now (the overflow entry not included); at most the cap.
    pub fn tracked_operations(&self) -> usize {
        self.inner.tracked.load(Relaxed)
    }

    fn epoch(&self) -> u64 {
        self.inner.origin.elapsed().as_secs() / BUCKET_SECS
    }

    fn epoch_at(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.inner.origin).as_secs() / BUCKET_SECS
    }

    /// The entry of an HTTP request's default operation (`METHOD /collapsed/path`). The
    /// path is first looked up as it is: a path without an id-like segment (most API
    /// paths, and every one seen before) is its own collapsed form, so one hash and one map
    /// read name it, with no scan for ids. A path with ids misses (its raw form is never an
    /// entry) and is collapsed.
    pub(crate) fn handle_of_path(&self, method: &http::Method, path: &str) -> OpHandle {
        if let Some(op) = self.inner.ops.get(&OpKey::of_raw_path(method, path).0) {
            return OpHandle(op.clone());
        }
        self.handle(OpKey::of_method_path(method, path), || {
            super::operation::default_operation(method, path)
                .as_str()
                .to_owned()
        })
    }

    /// The entry of an operation, made (and named) on first sight. One map read on the
    /// success path.
    pub(crate) fn handle(&self, key: OpKey, name: impl FnOnce() -> String) -> OpHandle {
        let inner = &*self.inner;
        if let Some(op) = inner.ops.get(&key.0) {
            return OpHandle(op.clone());
        }
        // A new operation: only if the cap has room (reserved first, so racing callers
        // never pass it).
        let reserved = inner
            .tracked
            .fetch_update(Relaxed, Relaxed, |n| (n < inner.max_ops).then_some(n + 1))
            .is_ok();
        if !reserved {
            if !inner.warned.swap(true, Relaxed) {
                tracing::warn!(
                    target: "tower_retry_guard",
                    max_operations = inner.max_ops,
                    "retry stats track at most {} operations; further ones are counted as \
                     `{OVERFLOW_OPERATION}` (name operations with a route template: an \
                     `Operation` extension or `RetryLayer::operation_fn`)",
                    inner.max_ops
                );
            }
            return OpHandle(inner.overflow.clone());
        }
        let mut made = false;
        let op = inner
            .ops
            .entry(key.0)
            .or_insert_with(|| {
                made = true;
                Arc::new(OpStats::new(name()))
            })
            .clone();
        if !made {
            // Another caller made it in between: give the reservation back.
            inner.tracked.fetch_sub(1, Relaxed);
        }
        OpHandle(op)
    }

    fn with_handle(&self, handle: &OpHandle, now: Instant, f: impl FnOnce(&OpStats, &Bucket)) {
        let epoch = self.epoch_at(now);
        let op = &*handle.0;
        let bucket = &op.window[(epoch % BUCKETS as u64) as usize];
        let seen = bucket.epoch.load(Relaxed);
        if seen != epoch
            && bucket
                .epoch
                .compare_exchange(seen, epoch, Relaxed, Relaxed)
                .is_ok()
        {
            bucket.calls.store(0, Relaxed);
            bucket.retries.store(0, Relaxed);
            bucket.recovered.store(0, Relaxed);
            bucket.failed.store(0, Relaxed);
        }
        f(op, bucket);
    }

    /// The first attempt of a call is sent (only the `metrics` feature counts it: the stats
    /// count calls).
    #[inline]
    pub(crate) fn record_original_attempt(&self, handle: &OpHandle) {
        #[cfg(feature = "metrics")]
        super::metrics::original_attempt(&handle.0.name);
        let _ = handle;
    }

    /// A logical call ended in success.
    pub(crate) fn record_success(
        &self,
        handle: &OpHandle,
        now: Instant,
        recovered_from: Option<ErrorKind>,
    ) {
        self.with_handle(handle, now, |op, bucket| {
            op.calls.fetch_add(1, Relaxed);
            bucket.calls.fetch_add(1, Relaxed);
            if let Some(kind) = recovered_from {
                op.kinds[kind.index()].recovered.fetch_add(1, Relaxed);
                bucket.recovered.fetch_add(1, Relaxed);
            }
            #[cfg(feature = "metrics")]
            super::metrics::call(
                &op.name,
                if recovered_from.is_some() {
                    "recovered"
                } else {
                    "succeeded"
                },
            );
        });
    }

    /// An attempt failed with `kind` and a retry was sent after `delay`.
    pub(crate) fn record_retry(
        &self,
        handle: &OpHandle,
        kind: ErrorKind,
        delay: Duration,
        cost: u64,
    ) {
        let _ = delay;
        self.with_handle(handle, Instant::now(), |op, bucket| {
            let k = &op.kinds[kind.index()];
            k.failures.fetch_add(1, Relaxed);
            k.retries.fetch_add(1, Relaxed);
            if cost > 0 {
                // Saturating: a counter that stops at the top, never wraps to a small sum.
                let _ = k
                    .retry_cost
                    .fetch_update(Relaxed, Relaxed, |c| Some(c.saturating_add(cost)));
            }
            bucket.retries.fetch_add(1, Relaxed);
            #[cfg(feature = "metrics")]
            {
                super::metrics::retry(&op.name, kind, delay);
                if cost > 0 {
                    super::metrics::retry_cost(&op.name, kind, cost);
                }
            }
        });
    }

    /// A logical call ended on a failure of `kind`, for `reason`.
    pub(crate) fn record_stop(&self, handle: &OpHandle, kind: ErrorKind, reason: &StopReason) {
        self.with_handle(handle, Instant::now(), |op, bucket| {
            op.calls.fetch_add(1, Relaxed);
            bucket.calls.fetch_add(1, Relaxed);
            let k = &op.kinds[kind.index()];
            k.failures.fetch_add(1, Relaxed);
            let upstream = match reason {
                StopReason::Exhausted { .. }
                | StopReason::Deadline { .. }
                | StopReason::HintTooLong { .. } => {
                    k.exhausted.fetch_add(1, Relaxed);
                    true
                }
                StopReason::Budget { scope, .. } => {
                    k.denied[scope.index()].fetch_add(1, Relaxed);
                    true
                }
                StopReason::StoreUnavailable { .. } => {
                    k.store_unavailable.fetch_add(1, Relaxed);
                    true
                }
                _ => {
                    k.not_retried.fetch_add(1, Relaxed);
                    // A retryable failure we were not allowed to retry still says the
                    // upstream failed; a client error does not.
                    !matches!(reason, StopReason::NotRetryable | StopReason::InvalidKey(_))
                }
            };
            if upstream {
                bucket.failed.fetch_add(1, Relaxed);
            }
            #[cfg(feature = "metrics")]
            super::metrics::call(&op.name, reason.as_str());
        });
    }

    /// A stream of `operation` failed with `kind` after its first content event had been
    /// delivered. The call was already counted (as a success: its response was returned);
    /// this counts the failure and, in the window, an upstream failure.
    pub(crate) fn record_mid_stream_failure(&self, operation: &str, kind: ErrorKind) {
        let handle = self.handle(OpKey::of_name(operation), || operation.to_owned());
        self.with_handle(&handle, Instant::now(), |op, bucket| {
            op.kinds[kind.index()].mid_stream.fetch_add(1, Relaxed);
            bucket.failed.fetch_add(1, Relaxed);
            #[cfg(feature = "metrics")]
            super::metrics::stream_failure(&op.name, kind);
        });
    }
}

#[cfg(test)]
#[path = "stats_tests.rs"]
mod tests;
