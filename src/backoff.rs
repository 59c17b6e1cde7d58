//! How long to wait before a retry: [`Backoff`] and [`Jitter`].

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The delay before each retry, before jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Backoff {
    /// The same delay before every retry. `Duration::ZERO` retries at once without touching
    /// the timer (mostly for tests and benchmarks: a real retry wants a delay).
    Constant(Duration),
    /// `initial`, then `initial * multiplier^(n-1)` before the n-th retry, never above `cap`.
    Exponential {
        /// The delay before the first retry (default 100 ms).
        initial: Duration,
        /// The growth factor (default 2.0); must be finite and at least 1.
        multiplier: f64,
        /// The largest delay (default 10 s); must not be below `initial`.
        cap: Duration,
    },
}

impl Default for Backoff {
    /// First retry after 100 ms, doubling, at most 10 s.
    fn default() -> Self {
        Backoff::Exponential {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            cap: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// An exponential backoff: `initial`, x`multiplier`, at most `cap`.
    pub const fn exponential(initial: Duration, multiplier: f64, cap: Duration) -> Self {
        Backoff::Exponential {
            initial,
            multiplier,
            cap,
        }
    }

    /// The delay before the first retry.
    pub fn initial(&self) -> Duration {
        match *self {
            Backoff::Constant(d) => d,
            Backoff::Exponential { initial, .. } => initial,
        }
    }

    /// The largest delay.
    pub fn cap(&self) -> Duration {
        match *self {
            Backoff::Constant(d) => d,
            Backoff::Exponential { cap, .. } => cap,
        }
    }

    /// The delay before retry number `retry` (1 for the first retry), without jitter.
    pub fn delay(&self, retry: u32) -> Duration {
        match *self {
            Backoff::Constant(d) => d,
            Backoff::Exponential {
                initial,
                multiplier,
                cap,
            } => {
                let exp = retry.saturating_sub(1).min(1024) as i32;
                let secs = initial.as_secs_f64() * multiplier.powi(exp);
                if !secs.is_finite() || secs >= cap.as_secs_f64() {
                    cap
                } else {
                    Duration::from_secs_f64(secs.max(0.0))
                }
            }
        }
    }
}

/// How each delay is spread, so that clients that failed together do not retry together.
///
/// The default is [`Jitter::Equal`]: half of the backoff is kept as a floor and the other half
/// drawn at random (`v/2 + U(0, v/2)`). Marc Brooker's simulation of competing clients (AWS
/// Architecture Blog, "Exponential Backoff And Jitter") shows full and equal jitter both cut the
/// work done by more than half against no jitter, full jitter slightly more; but full jitter
/// may retry after 0 ms, re-hitting an overloaded LLM provider at once. Keeping a floor is also
/// what gRPC does (A6: the backoff times a factor in [0.8, 1.2], [`Jitter::Proportional`]).
/// With the default backoff the first retry therefore waits 50–100 ms.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Jitter {
    /// No jitter: exactly the backoff. Synchronised clients stay synchronised.
    None,
    /// `U(0, v)`: the least total work (Brooker), but a retry may come at once.
    Full,
    /// `v/2 + U(0, v/2)`: the default.
    #[default]
    Equal,
    /// `min(cap, U(initial, previous * 3))`, growing from the previous delay (Brooker).
    Decorrelated,
    /// `v * U(1 - f, 1 + f)`, e.g. `Proportional(0.2)` as in gRPC A6; `f` in `[0, 1]`.
    Proportional(f64),
}

/// One call's backoff state: its own random stream, drawn on its first failure only, so that
/// every call gets different jitter (tower's `ExponentialBackoffMaker` hands every backoff it
/// makes the same sequence) and the success path never touches a random generator.
#[derive(Debug, Clone)]
pub(crate) struct CallBackoff {
    rng: SmallRng,
    previous: Duration,
}

impl CallBackoff {
    pub(crate) fn new(seed: u64) -> Self {
        CallBackoff {
            rng: SmallRng::seed_from_u64(seed),
            previous: Duration::ZERO,
        }
    }

    /// The jittered delay before retry number `retry` (1-based).
    pub(crate) fn next_delay(&mut self, backoff: &Backoff, jitter: Jitter, retry: u32) -> Duration {
        let base = backoff.delay(retry);
        let cap = backoff.cap();
        let delay = match jitter {
            Jitter::None => base,
            Jitter::Full => self.uniform(Duration::ZERO, base),
            Jitter::Equal => {
                let half = base / 2;
                half + self.uniform(Duration::ZERO, base - half)
            }
            Jitter::Decorrelated => {
                let initial = backoff.initial();
                let prev = if self.previous.is_zero() {
                    initial
                } else {
                    self.previous
                };
                let high = prev.saturating_mul(3).min(cap).max(initial);
                self.uniform(initial, high)
            }
            Jitter::Proportional(f) => {
                let f = if f.is_finite() {
                    f.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let factor = (1.0 - f + 2.0 * f * self.rng.random::<f64>()).max(0.0);
                // Not `mul_f64`: it panics when the product overflows a Duration (a base at
                // a huge cap times a factor above 1); the cap bounds the delay anyway.
                Duration::try_from_secs_f64(base.as_secs_f64() * factor).map_or(cap, |d| d.min(cap))
            }
        };
        self.previous = delay;
        delay
    }

    fn uniform(&mut self, low: Duration, high: Duration) -> Duration {
        if high <= low {
            return low;
        }
        let span = (high - low).as_nanos().min(u64::MAX as u128) as u64;
        low + Duration::from_nanos(self.rng.random_range(0..=span))
    }
}

/// SplitMix64: spreads consecutive counters into unrelated seeds.
pub(crate) fn mix_seed(base: u64, counter: u64) -> u64 {
    let mut z = base ^ counter.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
