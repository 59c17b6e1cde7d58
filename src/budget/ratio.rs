//! The process-wide retry ratio: retries as a fraction of calls over a sliding window, more
//! while retries are succeeding.
//!
//! The rule is documented on [`RatioConfig`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use super::ratio_config::RatioConfig;
use super::ring::{BUCKETS, MAX_CAS_TURNS, Ring, SCALE, count_of, epoch_of, live, pack};

/// A ratio in millionths (the config is validated: finite, 0 ..= 1000).
fn micros(x: f64) -> u128 {
    (x * SCALE as f64).round() as u128
}

/// The process-wide retry ratio; its rule is documented on [`RatioConfig`].
pub(crate) struct RetryRatio {
    config: RatioConfig,
    ratio: u128,
    credit: u128,
    max_ratio: u128,
    start: Instant,
    bucket_nanos: u64,
    calls: Ring,
    succeeded: Ring,
    failed: Ring,
    /// Retries granted, per bucket (for expiry).
    retries: Ring,
    /// Retries in the window: the one word every withdrawal compare-and-swaps. Equal to the
    /// sum of the live `retries` buckets, plus grants not yet recorded in a bucket.
    in_window: AtomicU64,
}

impl fmt::Debug for RetryRatio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryRatio")
            .field("config", &self.config)
            .field("now", &self.describe_counts())
            .finish()
    }
}

impl RetryRatio {
    /// A ratio with these (validated) settings.
    pub(crate) fn new(config: RatioConfig) -> Self {
        RetryRatio {
            config,
            ratio: micros(config.ratio),
            credit: micros(config.success_credit),
            max_ratio: micros(config.max_ratio),
            start: Instant::now(),
            bucket_nanos: u64::try_from(config.window.as_nanos() / BUCKETS as u128)
                .unwrap_or(u64::MAX)
                .max(1),
            calls: Ring::new(),
            succeeded: Ring::new(),
            failed: Ring::new(),
            retries: Ring::new(),
            in_window: AtomicU64::new(0),
        }
    }

    fn epoch(&self) -> u32 {
        self.epoch_at(Instant::now())
    }

    /// The bucket epoch of a clock reading (64-bit division: this runs on every call).
    #[inline]
    fn epoch_at(&self, now: Instant) -> u32 {
        let elapsed = now.saturating_duration_since(self.start);
        let nanos = elapsed
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(elapsed.subsec_nanos()));
        (nanos / self.bucket_nanos) as u32
    }

    /// A logical call started (the success path: one atomic add).
    #[cfg(test)]
    pub(crate) fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// [`RetryRatio::deposit`] with the caller's clock reading.
    #[inline]
    pub(crate) fn deposit_at(&self, now: Instant) {
        self.calls.add(self.epoch_at(now));
    }

    /// Drops expired retry buckets from the window's count.
    fn expire(&self, epoch: u32) {
        for slot in &self.retries.0 {
            let v = slot.load(Ordering::Acquire);
            if count_of(v) == 0 || live(epoch_of(v), epoch) {
                continue;
            }
            if slot
                .compare_exchange(v, pack(epoch_of(v), 0), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.sub_in_window(u64::from(count_of(v)));
            }
        }
    }

    fn sub_in_window(&self, n: u64) {
        let _ = self
            .in_window
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(n))
            });
    }

    /// The floor left after `calls` calls and `unpaid` retries not paid for by successes, in
    /// millionths of a retry: `floor - calls - unpaid / ratio`.
    fn floor_left(&self, calls: u128, unpaid: u64) -> u128 {
        let floor = (u128::from(self.config.floor) * SCALE).saturating_sub(calls * SCALE);
        if unpaid == 0 {
            return floor;
        }
        if self.ratio == 0 {
            return 0;
        }
        floor.saturating_sub(u128::from(unpaid) * SCALE * SCALE / self.ratio)
    }

    /// Retries granted in the window and not paid for by successes (`R - credit x S`, in
    /// whole retries, at least 0), when `taken` retries are in the window.
    fn unproven(&self, taken: u64, succeeded: u128) -> u64 {
        let taken = u128::from(taken) * SCALE;
        let paid = self.credit * succeeded;
        u64::try_from(taken.saturating_sub(paid).div_ceil(SCALE)).unwrap_or(u64::MAX)
    }

    /// The allowance at `epoch`, in millionths of a retry.
    fn allowance(&self, epoch: u32) -> u128 {
        let calls = u128::from(self.calls.sum(epoch));
        let succeeded = u128::from(self.succeeded.sum(epoch));
        self.allowance_at(calls, succeeded, self.in_window.load(Ordering::Acquire))
    }

    /// The allowance for `calls` calls and `succeeded` retries that worked, with `taken`
    /// retries in the window, in millionths of a retry.
    fn allowance_at(&self, calls: u128, succeeded: u128, taken: u64) -> u128 {
        let earned = self.ratio * calls + self.credit * succeeded;
        let capped = earned.min(self.max_ratio * calls);
        // Every retry granted and not seen succeeding counts against the floor at once (a
        // retry still in flight too: a burst of grants cannot outrun the failures' news);
        // every retry that succeeded pays one such back.
        capped.max(self.floor_left(calls, self.unproven(taken, succeeded)))
    }

    /// Takes one retry if the window allows it.
    pub(crate) fn try_withdraw(&self) -> bool {
        let epoch = self.epoch();
        self.expire(epoch);
        let calls = u128::from(self.calls.sum(epoch));
        let succeeded = u128::from(self.succeeded.sum(epoch));
        let mut taken = self.in_window.load(Ordering::Acquire);
        for _ in 0..MAX_CAS_TURNS {
            // Decided on the very count the compare-and-swap checks: withdrawals racing on
            // other threads cannot all pass on one allowance computed before they took
            // theirs (the floor shrinks with every retry taken).
            if (u128::from(taken) + 1) * SCALE > self.allowance_at(calls, succeeded, taken) {
                return false;
            }
            match self.in_window.compare_exchange_weak(
                taken,
                taken + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return match self.retries.add_exact(epoch) {
                        Some(dead) => {
                            if dead > 0 {
                                self.sub_in_window(u64::from(dead));
                            }
                            true
                        }
                        None => {
                            // Not recorded in a bucket, so it would never expire: undo.
                            self.sub_in_window(1);
                            false
                        }
                    };
                }
                Err(actual) => taken = actual,
            }
        }
        false
    }

    /// Gives back a retry that was taken but not made (a later budget refused it).
    pub(crate) fn refund(&self) {
        let epoch = self.epoch();
        // The newest live bucket that holds a retry: the one just taken, normally.
        for back in 0..BUCKETS as u32 {
            let e = epoch.wrapping_sub(back);
            let slot = self.retries.slot(e);
            let mut v = slot.load(Ordering::Acquire);
            for _ in 0..MAX_CAS_TURNS {
                if epoch_of(v) != e || count_of(v) == 0 {
                    break;
                }
                match slot.compare_exchange_weak(v, v - 1, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        self.sub_in_window(1);
                        return;
                    }
                    Err(actual) => v = actual,
                }
            }
        }
        // Nothing live to give back: the retry has already left the window.
    }

    /// A retried attempt ended; feeds the adaptive part of the rule.
    pub(crate) fn record_retry_result(&self, succeeded: bool) {
        let epoch = self.epoch();
        if succeeded {
            self.succeeded.add(epoch);
        } else {
            self.failed.add(epoch);
        }
    }

    fn describe_counts(&self) -> String {
        let epoch = self.epoch();
        format!(
            "{} retries for {} calls, {} succeeded, {} failed",
            self.retries.sum(epoch),
            self.calls.sum(epoch),
            self.succeeded.sum(epoch),
            self.failed.sum(epoch)
        )
    }

    /// How full the ratio is, its rule with this window's numbers, and how to change it
    /// (for errors and logs).
    pub(crate) fn describe(&self) -> String {
        let epoch = self.epoch();
        let (calls, succeeded, failed) = (
            self.calls.sum(epoch),
            self.succeeded.sum(epoch),
            self.failed.sum(epoch),
        );
        let taken = self.in_window.load(Ordering::Acquire);
        let x = |m: u128| m as f64 / SCALE as f64;
        let window = self.config.window;
        format!(
            "{taken} of {:.1} retries used in the last {window:?}, for {calls} calls ({failed} \
             failed); allowed = max(floor {} - {calls} calls - {} unpaid retries x {}, min({} x {calls} \
             calls + {} x \
             {succeeded} succeeded retries, {} x {calls} calls)); shared by one `Budgets` and \
             its clones; change it with `Budgets::ratio(Some(RatioConfig::builder()..build()?))` or turn \
             it off with `Budgets::ratio(None)`",
            x(self.allowance(epoch)),
            self.config.floor,
            self.unproven(taken, u128::from(succeeded)),
            (SCALE * SCALE)
                .checked_div(self.ratio)
                .map_or(f64::INFINITY, x),
            x(self.ratio),
            x(self.credit),
            x(self.max_ratio),
        )
    }
}

#[cfg(test)]
#[path = "ratio_tests.rs"]
mod tests;
