//! [`RatioConfig`]: the settings of the process retry ratio, checked when built.

use std::time::Duration;

use crate::policy::PolicyError;

/// Settings of the process-wide retry ratio, checked when built: a bad value is an error
/// naming the setting, never clamped.
///
/// The ratio: retries as a fraction of calls, process-wide, over a sliding window, opening up while
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
/// (`record_retry_result`); a store denial after the ratio granted gives the retry back.
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
///
/// ```
/// use std::time::Duration;
/// use tower_retry_guard::Budgets;
/// use tower_retry_guard::budget::RatioConfig;
///
/// let ratio = RatioConfig::builder().ratio(0.2).window(Duration::from_secs(30)).build()?;
/// let budgets = Budgets::default().ratio(Some(ratio));
/// # let _ = budgets;
/// assert!(RatioConfig::builder().ratio(-1.0).build().is_err());
/// # Ok::<(), tower_retry_guard::PolicyError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatioConfig {
    pub(crate) ratio: f64,
    pub(crate) window: Duration,
    pub(crate) floor: u32,
    pub(crate) success_credit: f64,
    pub(crate) max_ratio: f64,
}

impl Default for RatioConfig {
    fn default() -> Self {
        RatioConfig {
            ratio: 0.1,
            window: Duration::from_secs(10),
            floor: RatioConfig::DEFAULT_FLOOR,
            success_credit: 3.0,
            max_ratio: 1.5,
        }
    }
}

impl RatioConfig {
    /// The default floor: 10 retries a second over the default 10 s window.
    pub const DEFAULT_FLOOR: u32 = 100;

    /// A builder starting from the defaults.
    pub fn builder() -> RatioConfigBuilder {
        RatioConfigBuilder(RatioConfig::default())
    }
}

/// Builds a [`RatioConfig`]; see [`RatioConfig::builder`].
#[derive(Debug, Clone, Copy)]
pub struct RatioConfigBuilder(RatioConfig);

/// The most any ratio may be: a thousand retries per call is no budget.
const MAX_RATIO: f64 = 1000.0;

impl RatioConfigBuilder {
    /// Retries allowed per logical call while retries are failing (default 0.1: at most
    /// 1.1 attempts per call in an outage); 0 ..= 1000, kept to six decimals, exactly.
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.0.ratio = ratio;
        self
    }

    /// The sliding window over which calls and retries are counted (default 10 s, at least
    /// 10 ms; moves in steps of a tenth of it).
    pub fn window(mut self, window: Duration) -> Self {
        self.0.window = window;
        self
    }

    /// Attempts (calls and retries) per window that are never throttled (default
    /// [`RatioConfig::DEFAULT_FLOOR`]: 10 a second over the 10 s window, Finagle's and
    /// tower's `TpsBudget` minimum). What is left of it after the window's calls, less
    /// `1 / ratio` (10) for each retry not paid for by successes (`R - success_credit x S`:
    /// failed or still in flight), is allowed as retries. A quiet process keeps its retries
    /// while they work at all; at 10 calls a second and more the calls use the floor up,
    /// and only the ratio speaks.
    pub fn floor(mut self, floor: u32) -> Self {
        self.0.floor = floor;
        self
    }

    /// Retries earned by each retry that succeeded (default 3.0; 0 ..= 1000): a retry that
    /// works pays for itself and two more, so the ratio opens up while retries work (at
    /// least a third of them succeeding) and closes down to `ratio` when they fail.
    pub fn success_credit(mut self, credit: f64) -> Self {
        self.0.success_credit = credit;
        self
    }

    /// The most retries per logical call, however well retries are doing (default 1.5: at
    /// most 2.5x the load); at least `ratio`, at most 1000.
    pub fn max_ratio(mut self, max: f64) -> Self {
        self.0.max_ratio = max;
        self
    }

    /// The settings, or the first one out of range.
    pub fn build(self) -> Result<RatioConfig, PolicyError> {
        let c = self.0;
        let err = |setting, problem: String| Err(PolicyError::new("retry ratio", setting, problem));
        for (setting, value) in [
            ("ratio", c.ratio),
            ("success_credit", c.success_credit),
            ("max_ratio", c.max_ratio),
        ] {
            if !(value.is_finite() && (0.0..=MAX_RATIO).contains(&value)) {
                return err(
                    setting,
                    format!("is {value}: must be a number in 0 ..= 1000"),
                );
            }
        }
        if c.max_ratio < c.ratio {
            return err(
                "max_ratio",
                format!(
                    "is {}: must not be below `ratio` ({})",
                    c.max_ratio, c.ratio
                ),
            );
        }
        if c.window < Duration::from_millis(10) {
            return err(
                "window",
                format!("is {:?}: must be at least 10 ms", c.window),
            );
        }
        Ok(c)
    }
}
