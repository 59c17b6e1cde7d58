//! [`RetryPolicy`]: the per-operation bounds, validated when built.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::backoff::{Backoff, CallBackoff, Jitter, mix_seed};

/// The per-operation bounds of one logical call: how many retries, how long in all, how long
/// between attempts, and how long a server may ask us to wait.
///
/// A policy cannot be unbounded: [`RetryPolicyBuilder::build`] refuses a zero or unlimited
/// total time, more than [`RetryPolicy::MAX_RETRIES_LIMIT`] retries and contradictory settings.
///
/// ```
/// use std::time::Duration;
/// use tower_retry_guard::{Backoff, Jitter, RetryPolicy};
///
/// let policy = RetryPolicy::builder()
///     .max_retries(2)
///     .max_total_time(Duration::from_secs(30))
///     .backoff(Backoff::exponential(Duration::from_millis(200), 2.0, Duration::from_secs(5)))
///     .jitter(Jitter::Full)
///     .build()?;
/// assert_eq!(policy.max_retries(), 2);
/// # Ok::<(), tower_retry_guard::PolicyError>(())
/// ```
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_retries: u32,
    max_total_time: Duration,
    backoff: Backoff,
    jitter: Jitter,
    max_retry_after: Duration,
    seed: u64,
    calls: Arc<AtomicU64>,
}

impl Default for RetryPolicy {
    /// 3 retries (4 attempts), 10 s in all, 100 ms doubling to 10 s with equal jitter,
    /// server hints honoured up to 60 s.
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            max_total_time: Duration::from_secs(10),
            backoff: Backoff::default(),
            jitter: Jitter::default(),
            max_retry_after: Duration::from_secs(60),
            seed: crate::random::u64(),
            calls: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl RetryPolicy {
    /// The most retries a policy may allow: more is refused by [`RetryPolicyBuilder::build`].
    /// (gRPC caps attempts at 5; the SRE book recommends 3. Ten retries is already a storm.)
    pub const MAX_RETRIES_LIMIT: u32 = 10;

    /// The longest total time a policy may allow (24 h).
    pub const MAX_TOTAL_TIME_LIMIT: Duration = Duration::from_secs(24 * 60 * 60);

    /// A builder starting from the defaults.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder::default()
    }

    /// The most retries of one call (attempts = retries + 1).
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The most time one call may take, from its first attempt, attempts and waits included.
    /// No retry starts that would begin after it.
    pub fn max_total_time(&self) -> Duration {
        self.max_total_time
    }

    /// The backoff.
    pub fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// The jitter.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The longest server wait hint honoured; a longer one stops the retries at once.
    pub fn max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    /// A fresh backoff state for one call, with its own random stream. Called on a call's
    /// first failure only.
    /// The policy's seed (a call's stream is drawn from it and the call's number).
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    pub(crate) fn call_backoff(&self) -> CallBackoff {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        CallBackoff::new(mix_seed(self.seed, n))
    }
}

/// Builds a [`RetryPolicy`]; see [`RetryPolicy::builder`].
#[derive(Debug, Clone)]
pub struct RetryPolicyBuilder {
    max_retries: u32,
    max_total_time: Duration,
    backoff: Backoff,
    jitter: Jitter,
    max_retry_after: Duration,
    seed: Option<u64>,
}

impl Default for RetryPolicyBuilder {
    fn default() -> Self {
        let d = RetryPolicy::default();
        RetryPolicyBuilder {
            max_retries: d.max_retries,
            max_total_time: d.max_total_time,
            backoff: d.backoff,
            jitter: d.jitter,
            max_retry_after: d.max_retry_after,
            seed: None,
        }
    }
}

impl RetryPolicyBuilder {
    /// The most retries of one call (default 3; at most [`RetryPolicy::MAX_RETRIES_LIMIT`]).
    /// Zero turns retries off.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// The most time one call may take, attempts and waits included (default 10 s).
    pub fn max_total_time(mut self, total: Duration) -> Self {
        self.max_total_time = total;
        self
    }

    /// The backoff (default: 100 ms, x2, at most 10 s).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The jitter (default [`Jitter::Equal`]).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The longest server wait hint honoured (default 60 s). A longer hint stops the retries
    /// at once instead of sleeping uselessly.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Seeds the jitter, so that a test sees the same delays on every run. Each call still
    /// draws its own delays (call `n` of the policy uses a stream derived from `seed` and `n`).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Checks the settings and builds the policy.
    pub fn build(self) -> Result<RetryPolicy, PolicyError> {
        let err = |setting: &'static str, problem: String| {
            Err(PolicyError::new("retry policy", setting, problem))
        };
        if self.max_retries > RetryPolicy::MAX_RETRIES_LIMIT {
            return err(
                "max_retries",
                format!(
                    "{} is above the hard limit of {}",
                    self.max_retries,
                    RetryPolicy::MAX_RETRIES_LIMIT
                ),
            );
        }
        if self.max_total_time.is_zero() {
            return err("max_total_time", "must not be zero".into());
        }
        if self.max_total_time > RetryPolicy::MAX_TOTAL_TIME_LIMIT {
            return err(
                "max_total_time",
                format!(
                    "{:?} is unbounded for a retry (the limit is {:?})",
                    self.max_total_time,
                    RetryPolicy::MAX_TOTAL_TIME_LIMIT
                ),
            );
        }
        match self.backoff {
            Backoff::Constant(d) => {
                if d >= self.max_total_time {
                    return err(
                        "backoff",
                        format!(
                            "a delay of {d:?} leaves no time within max_total_time {:?}",
                            self.max_total_time
                        ),
                    );
                }
            }
            Backoff::Exponential {
                initial,
                multiplier,
                cap,
            } => {
                if initial.is_zero() {
                    return err(
                        "backoff.initial",
                        "must not be zero for an exponential backoff (use Backoff::Constant(Duration::ZERO))".into(),
                    );
                }
                if !multiplier.is_finite() || multiplier < 1.0 {
                    return err(
                        "backoff.multiplier",
                        format!("must be a finite number of at least 1 (got {multiplier})"),
                    );
                }
                if cap < initial {
                    return err(
                        "backoff.cap",
                        format!("{cap:?} is below the first delay {initial:?}"),
                    );
                }
                if initial >= self.max_total_time {
                    return err(
                        "backoff.initial",
                        format!(
                            "the first delay {initial:?} leaves no time within max_total_time {:?}",
                            self.max_total_time
                        ),
                    );
                }
            }
        }
        if let Jitter::Proportional(f) = self.jitter {
            if !f.is_finite() || !(0.0..=1.0).contains(&f) {
                return err(
                    "jitter",
                    format!("Proportional factor must be within [0, 1] (got {f})"),
                );
            }
        }
        Ok(RetryPolicy {
            max_retries: self.max_retries,
            max_total_time: self.max_total_time,
            backoff: self.backoff,
            jitter: self.jitter,
            max_retry_after: self.max_retry_after,
            seed: self.seed.unwrap_or_else(crate::random::u64),
            calls: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// A setting that cannot work, named when what it configures is built: a [`RetryPolicy`],
/// a retry ratio or in-flight cap, a server layer or store (there also named
/// `server::ConfigError`). Which setting, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    what: &'static str,
    setting: &'static str,
    problem: String,
}

impl PolicyError {
    pub(crate) fn new(what: &'static str, setting: &'static str, problem: String) -> Self {
        PolicyError {
            what,
            setting,
            problem,
        }
    }

    /// The setting at fault (`"max_total_time"`, `"backoff.cap"`, ...).
    pub fn setting(&self) -> &'static str {
        self.setting
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {}: `{}` {}",
            self.what, self.setting, self.problem
        )
    }
}

impl std::error::Error for PolicyError {}
