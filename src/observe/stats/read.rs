//! Reading the stats: per operation and error kind, all time and over windows.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::{BUCKET_SECS, BUCKETS, OpStats, RetryStats};
use crate::classify::ErrorKind;
use crate::observe::health::health_of;
use crate::observe::operation::OpKey;
use crate::observe::{Health, KindSnapshot, Window};

impl RetryStats {
    /// The operations seen, by name ([`RetryStats::OVERFLOW_OPERATION`] once it counted a call).
    pub fn operations(&self) -> Vec<String> {
        let overflow = &self.inner.overflow;
        let mut names: Vec<String> = self
            .inner
            .ops
            .iter()
            .filter(|e| !Arc::ptr_eq(e.value(), overflow) || overflow.calls.load(Relaxed) > 0)
            .map(|e| e.name.to_string())
            .collect();
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
            retry_cost: k.retry_cost.load(Relaxed),
            recovered: k.recovered.load(Relaxed),
            exhausted: k.exhausted.load(Relaxed),
            denied: std::array::from_fn(|i| k.denied[i].load(Relaxed)),
            store_unavailable: k.store_unavailable.load(Relaxed),
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
            t.retry_cost = t.retry_cost.saturating_add(k.retry_cost);
            t.recovered += k.recovered;
            t.exhausted += k.exhausted;
            for (total, n) in t.denied.iter_mut().zip(k.denied) {
                *total += n;
            }
            t.store_unavailable += k.store_unavailable;
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

    /// The verdict on an operation, from its last minute:
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
