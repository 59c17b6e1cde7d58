//! The process-wide retry ratio: retries as a fraction of calls over a sliding window, more
//! while retries are succeeding.
//!
//! The rule is documented on [`RetryRatio`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use super::ratio_config::RatioConfig;
use super::ring::{BUCKETS, MAX_CAS_TURNS, Ring, SCALE, count_of, epoch_of, live, pack};

/// A ratio in millionths (the config is validated: finite, 0 ..= 1000).
fn micros(x: f64) -> u128 {
    (x * SCALE as f64).round() as u128
}

/// Retries as a fraction of calls, process-wide, over a sliding window, opening up while
/// retries succeed.
///
/// Shared by every layer that shares one [`Budgets`](super::Budgets).
///
/// # The rule
///
/// Over the last `window` (default 10 s, kept as a ring of 10 buckets), with
///
/// - `C` = logical calls started,
/// - `R` = retries granted (in flight, failed or succeeded),
/// - `S` = retries that succeeded,
/// - `F` = retries that failed,
///
/// one more retry is granted when
///
/// ```text
/// R + 1 <= max( floor - C - (R - success_credit * S) / ratio,
///               min( ratio * C + success_credit * S,  max_ratio * C ) )
/// ```
///
/// With the defaults (`ratio` 0.1, `success_credit` 3, `max_ratio` 1.5, `floor` 100):
///
/// - **A quiet process.** The floor (100 attempts per window, 10 a second) lets a process
///   that makes a few calls a second retry as its policy says while its retries work at
///   all: at 1 call a second against a provider failing 50% at random, 93.4% of calls
///   succeed (3 retries give at most 93.75%; `examples/storm.rs`). Retries that keep
///   failing use it up (10 each), so a quiet process in an outage makes ~0.8 retries per
///   call, about one retry a second.
/// - **Retries fail (outage).** `S = 0`, so `R <= 0.1 * C`: at most 1.1 attempts per call
///   at 10 calls a second and more, the SRE book's figure: the calls themselves use the
///   floor up (`floor - C <= 0` from 100 calls a window).
/// - **Retries work.** A retry that succeeds pays for itself and for two more: the
///   allowance grows by 3 for each, so when at least a third of the retries succeed the
///   allowance outgrows what is spent and only `max_ratio` (1.5 retries per call, i.e. at
///   most 2.5x the load) bounds it. At 50% random failure a call needs 0.875 retries on
///   average, and nearly all are granted (about 93% of calls succeed, as without a budget);
///   at 10% random failure, 0.11.
/// - **In between**, the allowance follows the success of the retries themselves.
///
/// A "retry" is counted when it is granted, and its result when the retried attempt ends
/// (`record_retry_result`); a store denial after the ratio granted gives the retry back
/// (`refund`).
///
/// # Unlike tower's `TpsBudget`
///
/// - **No overdraw.** The decision is a compare-and-swap of the window's retry count
///   against the allowance: two racing withdrawals cannot both take the last retry (tower
///   reads the balance, then subtracts, so racing withdrawals can all succeed).
/// - **Exact fractions.** Ratios are kept in millionths and compared in integers: a ratio
///   of 0.4 allows 40 retries per 100 calls, not the 50 that `1 / 0.4` truncated to 2
///   gives (tower issue 857).
/// - **Adaptive.** The allowance follows the success of the retries (above).
/// - **Cheap deposits.** A call's deposit is one `fetch_add` on the current bucket (plus,
///   once per bucket period, a compare-and-swap that starts the bucket afresh); no lock.
///
/// Envoy's cap on retries *in flight* is [`InFlightCap`](super::InFlightCap), beside it.
pub(crate) struct RetryRatio {
    config: RatioConfig,
    ratio: u128,
    credit: u128,
    max_ratio: u128,
    start: Instant,
    bucket_nanos: u128,
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
            bucket_nanos: (config.window.as_nanos() / BUCKETS as u128).max(1),
            calls: Ring::new(),
            succeeded: Ring::new(),
            failed: Ring::new(),
            retries: Ring::new(),
            in_window: AtomicU64::new(0),
        }
    }

    fn epoch(&self) -> u32 {
        let elapsed = Instant::now().saturating_duration_since(self.start);
        (elapsed.as_nanos() / self.bucket_nanos) as u32
    }

    /// A logical call started (the success path: one atomic add).
    #[cfg(test)]
    pub(crate) fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// [`RetryRatio::deposit`] with the caller's clock reading.
    #[inline]
    pub(crate) fn deposit_at(&self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start);
        self.calls
            .add((elapsed.as_nanos() / self.bucket_nanos) as u32);
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
    /// whole retries, at least 0).
    fn unproven(&self, succeeded: u128) -> u64 {
        let taken = u128::from(self.in_window.load(Ordering::Acquire)) * SCALE;
        let paid = self.credit * succeeded;
        u64::try_from(taken.saturating_sub(paid).div_ceil(SCALE)).unwrap_or(u64::MAX)
    }

    /// The allowance at `epoch`, in millionths of a retry.
    fn allowance(&self, epoch: u32) -> u128 {
        let calls = u128::from(self.calls.sum(epoch));
        let succeeded = u128::from(self.succeeded.sum(epoch));
        let earned = self.ratio * calls + self.credit * succeeded;
        let capped = earned.min(self.max_ratio * calls);
        // Every retry granted and not seen succeeding counts against the floor at once (a
        // retry still in flight too: a burst of grants cannot outrun the failures' news);
        // every retry that succeeded pays one such back.
        capped.max(self.floor_left(calls, self.unproven(succeeded)))
    }

    /// Takes one retry if the window allows it.
    pub(crate) fn try_withdraw(&self) -> bool {
        let epoch = self.epoch();
        self.expire(epoch);
        let allowance = self.allowance(epoch);
        let mut taken = self.in_window.load(Ordering::Acquire);
        for _ in 0..MAX_CAS_TURNS {
            if (u128::from(taken) + 1) * SCALE > allowance {
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
            self.unproven(u128::from(succeeded)),
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
