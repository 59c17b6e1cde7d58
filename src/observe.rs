//! What the layer tells: [`RetryInfo`] on every response and error.

use std::fmt;
use std::time::Duration;

use crate::classify::ErrorKind;
use crate::error::StopReason;
use crate::request::{IdempotencyKey, Operation};

/// How a logical call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// The first attempt succeeded.
    Succeeded,
    /// An attempt succeeded after at least one retry.
    Recovered,
    /// The layer stopped on a failure, for this reason.
    Stopped(StopReason),
}

impl CallOutcome {
    /// A short, stable name: `succeeded`, `recovered`, or the stop reason's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            CallOutcome::Succeeded => "succeeded",
            CallOutcome::Recovered => "recovered",
            CallOutcome::Stopped(reason) => reason.as_str(),
        }
    }

    /// Whether the call ended in a success.
    pub fn is_success(&self) -> bool {
        matches!(self, CallOutcome::Succeeded | CallOutcome::Recovered)
    }
}

impl fmt::Display for CallOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallOutcome::Stopped(reason) => write!(f, "stopped: {reason}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// What the layer did for one logical call. In the response's extensions (HTTP) and in
/// [`RetryError::info`](crate::RetryError::info).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryInfo {
    /// Attempts made (1 when the first succeeded; 0 when nothing was sent).
    pub attempts: u32,
    /// Retries made (attempts - 1).
    pub retries: u32,
    /// Time slept between attempts.
    pub total_delay: Duration,
    /// Time from the first attempt to the end.
    pub elapsed: Duration,
    /// The idempotency key sent on every attempt, if any.
    pub key: Option<IdempotencyKey>,
    /// The kind of the last failed attempt, if any.
    pub last_error: Option<ErrorKind>,
    /// How the call ended.
    pub outcome: CallOutcome,
    /// The operation's name; set when at least one attempt failed.
    pub operation: Option<Operation>,
}

impl RetryInfo {
    pub(crate) fn empty() -> Self {
        RetryInfo {
            attempts: 0,
            retries: 0,
            total_delay: Duration::ZERO,
            elapsed: Duration::ZERO,
            key: None,
            last_error: None,
            outcome: CallOutcome::Succeeded,
            operation: None,
        }
    }
}

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use dashmap::DashMap;
use tokio::time::Instant;

use crate::budget::Scope;

/// A reviewer's verdict on one operation, from the last minute of calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Few retries, few failures.
    Healthy,
    /// Retries are spiking but end in success: the upstream is unstable but recoverable.
    UnstableRecovering,
    /// Calls fail after their retries (or are denied them): the upstream issue surfaces.
    Failing,
}

impl Health {
    /// `healthy`, `unstable_recovering`, `failing`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::UnstableRecovering => "unstable_recovering",
            Health::Failing => "failing",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Healthy => "healthy",
            Health::UnstableRecovering => "unstable but recovering",
            Health::Failing => "failing",
        })
    }
}

const KINDS: usize = ErrorKind::ALL.len();
const BUCKET_SECS: u64 = 10;
const BUCKETS: usize = 60; // 10 minutes of 10 s buckets

/// Counters of one error kind of one operation.
#[derive(Debug, Default)]
struct KindCounters {
    /// Failed attempts of this kind.
    failures: AtomicU64,
    /// Retries made after a failure of this kind.
    retries: AtomicU64,
    /// Calls that succeeded after their last failure was of this kind.
    recovered: AtomicU64,
    /// Calls that ran out of attempts or time (exhausted, deadline, hint too long).
    exhausted: AtomicU64,
    /// Calls denied a retry by a budget, per scope (operation, task, user, process, in
    /// flight) and store unavailable (index 5).
    denied: [AtomicU64; 6],
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
    name: String,
    calls: AtomicU64,
    kinds: [KindCounters; KINDS],
    window: [Bucket; BUCKETS],
}

impl OpStats {
    fn new(name: String) -> Self {
        OpStats {
            name,
            calls: AtomicU64::new(0),
            kinds: Default::default(),
            window: std::array::from_fn(|_| Bucket::default()),
        }
    }
}

/// Shared, cheap-to-clone retry statistics: per operation and error kind, how many calls,
/// retries, recoveries, exhaustions, budget denials and refusals, with windowed rates over
/// the last minute and ten minutes and a [`Health`] verdict.
///
/// The success path touches one sharded map read and two relaxed atomics of its operation;
/// no lock is held that two threads wait for. Windowed counts are approximate under heavy
/// concurrency when a bucket rolls over (a few events may land in the old bucket).
#[derive(Debug, Clone)]
pub struct RetryStats {
    inner: Arc<StatsInner>,
}

/// The map's keys are already SipHash outputs: hashing them again is wasted work on the
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
}

impl Default for RetryStats {
    fn default() -> Self {
        RetryStats::new()
    }
}

/// A windowed summary of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Window {
    /// Logical calls.
    pub calls: u64,
    /// Retries made.
    pub retries: u64,
    /// Calls that succeeded after a retry.
    pub recovered: u64,
    /// Calls that ended on a retryable failure (exhausted, deadline, denied...).
    pub failed: u64,
}

/// The totals of one operation and error kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct KindSnapshot {
    /// Failed attempts.
    pub failures: u64,
    /// Retries made after such a failure.
    pub retries: u64,
    /// Calls that succeeded in the end.
    pub recovered: u64,
    /// Calls that ran out of attempts or time.
    pub exhausted: u64,
    /// Calls denied by a budget: operation, task, user, process, in flight, store
    /// unavailable.
    pub denied: [u64; 6],
    /// Calls not retried for another reason.
    pub not_retried: u64,
    /// Streams that failed after their first content event had been delivered (never
    /// retried; counted by [`StreamGuardLayer`](crate::stream::StreamGuardLayer)).
    pub mid_stream_failures: u64,
}

impl KindSnapshot {
    /// Calls denied by any budget (or an unavailable store).
    pub fn denied_total(&self) -> u64 {
        self.denied.iter().sum()
    }
}

fn scope_index(scope: Scope) -> usize {
    match scope {
        Scope::Operation => 0,
        Scope::Task => 1,
        Scope::User => 2,
        Scope::Process => 3,
        Scope::InFlight => 4,
    }
}

/// The stats key of an operation: a hash of its name, or of method and path, so that the
/// success path never formats a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpKey(pub(crate) u64);

impl OpKey {
    const SEED: u64 = 0xcbf2_9ce4_8422_2325;

    /// FNV-1a: byte-wise, so hashing the pieces of a name in a row equals hashing the name.
    fn feed(mut h: u64, bytes: &[u8]) -> u64 {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    pub(crate) fn of_name(name: &str) -> Self {
        OpKey(Self::feed(Self::SEED, name.as_bytes()))
    }

    pub(crate) fn of_method_path(method: &http::Method, path: &str) -> Self {
        // Must equal `of_name(format!("{method} {path}"))`, which names the entry.
        let h = Self::feed(Self::SEED, method.as_str().as_bytes());
        let h = Self::feed(h, b" ");
        OpKey(Self::feed(h, path.as_bytes()))
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
}

impl RetryStats {
    /// Empty stats.
    pub fn new() -> Self {
        RetryStats {
            inner: Arc::new(StatsInner {
                ops: OpMap::default(),
                origin: Instant::now(),
            }),
        }
    }

    fn epoch(&self) -> u64 {
        self.inner.origin.elapsed().as_secs() / BUCKET_SECS
    }

    fn epoch_at(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.inner.origin).as_secs() / BUCKET_SECS
    }

    /// The entry of an operation, made (and named) on first sight. One map read on the
    /// success path.
    pub(crate) fn handle(&self, key: OpKey, name: impl FnOnce() -> String) -> OpHandle {
        if let Some(op) = self.inner.ops.get(&key.0) {
            return OpHandle(op.clone());
        }
        OpHandle(
            self.inner
                .ops
                .entry(key.0)
                .or_insert_with(|| Arc::new(OpStats::new(name())))
                .clone(),
        )
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
            metrics::counter!(
                "retry_calls_total",
                "operation" => op.name.clone(),
                "outcome" => if recovered_from.is_some() { "recovered" } else { "succeeded" }
            )
            .increment(1);
        });
    }

    /// An attempt failed with `kind` and a retry was sent after `delay`.
    pub(crate) fn record_retry(&self, handle: &OpHandle, kind: ErrorKind, delay: Duration) {
        let _ = delay;
        self.with_handle(handle, Instant::now(), |op, bucket| {
            let k = &op.kinds[kind.index()];
            k.failures.fetch_add(1, Relaxed);
            k.retries.fetch_add(1, Relaxed);
            bucket.retries.fetch_add(1, Relaxed);
            #[cfg(feature = "metrics")]
            {
                metrics::counter!(
                    "retry_attempts_total",
                    "operation" => op.name.clone(),
                    "error_kind" => kind.as_str()
                )
                .increment(1);
                metrics::histogram!("retry_delay_seconds", "operation" => op.name.clone())
                    .record(delay.as_secs_f64());
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
                    k.denied[scope_index(*scope)].fetch_add(1, Relaxed);
                    true
                }
                StopReason::StoreUnavailable { .. } => {
                    k.denied[5].fetch_add(1, Relaxed);
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
            metrics::counter!(
                "retry_calls_total",
                "operation" => op.name.clone(),
                "outcome" => reason.as_str()
            )
            .increment(1);
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
            metrics::counter!(
                "retry_stream_failures_total",
                "operation" => op.name.clone(),
                "error_kind" => kind.as_str()
            )
            .increment(1);
        });
    }

    /// The operations seen, by name.
    pub fn operations(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.ops.iter().map(|e| e.name.clone()).collect();
        names.sort();
        names
    }

    fn find(&self, operation: &str) -> Option<Arc<OpStats>> {
        self.inner
            .ops
            .get(&OpKey::of_name(operation).0)
            .map(|e| e.clone())
    }

    /// All-time logical calls of an operation.
    pub fn calls(&self, operation: &str) -> u64 {
        self.find(operation).map_or(0, |o| o.calls.load(Relaxed))
    }

    /// All-time totals of an operation for one error kind.
    pub fn kind(&self, operation: &str, kind: ErrorKind) -> KindSnapshot {
        let Some(op) = self.find(operation) else {
            return KindSnapshot::default();
        };
        let k = &op.kinds[kind.index()];
        KindSnapshot {
            failures: k.failures.load(Relaxed),
            retries: k.retries.load(Relaxed),
            recovered: k.recovered.load(Relaxed),
            exhausted: k.exhausted.load(Relaxed),
            denied: std::array::from_fn(|i| k.denied[i].load(Relaxed)),
            not_retried: k.not_retried.load(Relaxed),
            mid_stream_failures: k.mid_stream.load(Relaxed),
        }
    }

    /// All-time totals of an operation over every error kind.
    pub fn totals(&self, operation: &str) -> KindSnapshot {
        let mut t = KindSnapshot::default();
        for kind in ErrorKind::ALL {
            let k = self.kind(operation, kind);
            t.failures += k.failures;
            t.retries += k.retries;
            t.recovered += k.recovered;
            t.exhausted += k.exhausted;
            for i in 0..6 {
                t.denied[i] += k.denied[i];
            }
            t.not_retried += k.not_retried;
            t.mid_stream_failures += k.mid_stream_failures;
        }
        t
    }

    /// The last `span` of an operation, rounded to 10 s buckets (at most 10 minutes).
    pub fn window(&self, operation: &str, span: Duration) -> Window {
        let Some(op) = self.find(operation) else {
            return Window::default();
        };
        let now = self.epoch();
        let n = (span.as_secs().div_ceil(BUCKET_SECS)).clamp(1, BUCKETS as u64);
        let mut w = Window::default();
        for back in 0..n {
            let Some(epoch) = now.checked_sub(back) else {
                break;
            };
            let b = &op.window[(epoch % BUCKETS as u64) as usize];
            if b.epoch.load(Relaxed) != epoch {
                continue;
            }
            w.calls += b.calls.load(Relaxed);
            w.retries += b.retries.load(Relaxed);
            w.recovered += b.recovered.load(Relaxed);
            w.failed += b.failed.load(Relaxed);
        }
        w
    }

    /// The last minute of an operation.
    pub fn last_minute(&self, operation: &str) -> Window {
        self.window(operation, Duration::from_secs(60))
    }

    /// The last ten minutes of an operation.
    pub fn last_ten_minutes(&self, operation: &str) -> Window {
        self.window(operation, Duration::from_secs(600))
    }

    /// The reviewer's verdict on an operation, from its last minute:
    ///
    /// - [`Health::Failing`] when at least 5% of calls ended on an upstream failure (retries
    ///   exhausted, deadline, denied by a budget) and failures outnumber recoveries;
    /// - [`Health::UnstableRecovering`] when retries are at least 5% of calls (or anything
    ///   failed), but recoveries outnumber failures;
    /// - [`Health::Healthy`] otherwise (also with no calls).
    pub fn health(&self, operation: &str) -> Health {
        health_of(&self.last_minute(operation))
    }
}

fn health_of(w: &Window) -> Health {
    if w.calls == 0 {
        return Health::Healthy;
    }
    let failed_share = w.failed as f64 / w.calls as f64;
    let retry_share = w.retries as f64 / w.calls as f64;
    if failed_share >= 0.05 && w.failed >= w.recovered {
        Health::Failing
    } else if retry_share >= 0.05 || w.failed > 0 {
        Health::UnstableRecovering
    } else {
        Health::Healthy
    }
}

impl fmt::Display for RetryStats {
    /// A table: per operation, calls and retries over the last minute and all time, then a
    /// row per error kind seen.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<32} {:>8} {:>8} {:>9} {:>9} {:>7} {:>11}  health (last minute)",
            "operation / error kind",
            "calls",
            "retries",
            "recovered",
            "exhausted",
            "denied",
            "not retried"
        )?;
        for name in self.operations() {
            let t = self.totals(&name);
            let w = self.last_minute(&name);
            writeln!(
                f,
                "{:<32} {:>8} {:>8} {:>9} {:>9} {:>7} {:>11}  {} ({} calls, {} retries, {} recovered, {} failed)",
                truncate(&name, 32),
                self.calls(&name),
                t.retries,
                t.recovered,
                t.exhausted,
                t.denied_total(),
                t.not_retried,
                health_of(&w),
                w.calls,
                w.retries,
                w.recovered,
                w.failed,
            )?;
            if t.mid_stream_failures > 0 {
                writeln!(
                    f,
                    "  {:<30} {:>8}  (after the first content event; not retried)",
                    "mid-stream failures", t.mid_stream_failures
                )?;
            }
            for kind in ErrorKind::ALL {
                let k = self.kind(&name, kind);
                if k.failures == 0 && k.mid_stream_failures == 0 {
                    continue;
                }
                writeln!(
                    f,
                    "  {:<30} {:>8} {:>8} {:>9} {:>9} {:>7} {:>11}",
                    kind.as_str(),
                    "",
                    k.retries,
                    k.recovered,
                    k.exhausted,
                    k.denied_total(),
                    k.not_retried
                )?;
            }
        }
        Ok(())
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn op_key_of_method_path_equals_of_name() {
        let paths = [
            "",
            "/",
            "/x",
            "/v1/chat/completions",
            "/v1/messages/batches/msgbatch_0123456789abcdef/results",
            "/ünïcödé/路径",
            "/exactly8",
            "/1234567",
        ];
        let methods = [
            http::Method::GET,
            http::Method::POST,
            http::Method::PUT,
            http::Method::DELETE,
            http::Method::PATCH,
            http::Method::from_bytes(b"PURGE").unwrap(),
        ];
        for m in &methods {
            for p in paths {
                assert_eq!(
                    OpKey::of_method_path(m, p),
                    OpKey::of_name(&format!("{m} {p}")),
                    "{m} {p}"
                );
            }
        }
        assert_ne!(
            OpKey::of_method_path(&http::Method::GET, "/a"),
            OpKey::of_method_path(&http::Method::GET, "/b")
        );
        assert_ne!(
            OpKey::of_method_path(&http::Method::GET, "/a"),
            OpKey::of_method_path(&http::Method::POST, "/a")
        );
    }

    proptest! {
        #[test]
        fn op_key_streaming_equivalence(method in "[A-Z]{1,12}", path in "/\\PC{0,60}") {
            let m = http::Method::from_bytes(method.as_bytes()).unwrap();
            prop_assert_eq!(
                OpKey::of_method_path(&m, &path),
                OpKey::of_name(&format!("{m} {path}"))
            );
        }
    }

    #[test]
    fn stats_find_an_entry_keyed_by_method_and_path_by_its_name() {
        let stats = RetryStats::new();
        let key = OpKey::of_method_path(&http::Method::POST, "/v1/messages");
        let handle = stats.handle(key, || "POST /v1/messages".to_owned());
        stats.record_success(&handle, Instant::now(), None);
        // A second handle for the same key finds the entry, and never names it again.
        let again = stats.handle(key, || unreachable!("the entry exists"));
        stats.record_retry(&again, ErrorKind::Overloaded, Duration::from_millis(100));
        assert_eq!(stats.calls("POST /v1/messages"), 1);
        assert_eq!(
            stats
                .kind("POST /v1/messages", ErrorKind::Overloaded)
                .retries,
            1
        );
        assert_eq!(again.name(), "POST /v1/messages");
    }

    #[test]
    fn health_thresholds() {
        let w = |calls, retries, recovered, failed| Window {
            calls,
            retries,
            recovered,
            failed,
        };
        assert_eq!(health_of(&w(0, 0, 0, 0)), Health::Healthy);
        assert_eq!(health_of(&w(100, 4, 4, 0)), Health::Healthy);
        assert_eq!(health_of(&w(100, 5, 5, 0)), Health::UnstableRecovering);
        assert_eq!(health_of(&w(100, 50, 40, 10)), Health::UnstableRecovering);
        assert_eq!(health_of(&w(100, 1, 0, 1)), Health::UnstableRecovering);
        assert_eq!(health_of(&w(100, 30, 5, 5)), Health::Failing);
        assert_eq!(health_of(&w(10, 30, 0, 10)), Health::Failing);
    }
}
