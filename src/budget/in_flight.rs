//! The cap on retries in flight (Envoy's `max_retries` circuit breaker, as a share).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::policy::PolicyError;

/// Settings of the cap on retries in flight: at most `max(min, share x active calls)`
/// retry attempts may be outstanding (sent and not yet answered) at once, across every layer
/// that shares one [`Budgets`](crate::Budgets). Envoy's default: 20% of active requests, at
/// least 3. A call sleeping before its retry, or waiting for the inner service to be ready
/// for it, holds no slot; it takes one once the service is ready, just before the retry is
/// sent, and if none is free the retry is not sent: the call ends with the last failure and
/// [`Scope::InFlight`](crate::budget::Scope::InFlight), and gives its share of the process
/// ratio back (a task or user draw already taken stays spent). A retry that hangs holds its
/// slot at most until the call's deadline (`max_total_time`), when the call ends.
///
/// The ratio budget bounds retries over time; this cap bounds them at an instant, so that a
/// burst of failures cannot turn into a burst of retries before the window notices.
///
/// ```
/// use tower_retry_guard::Budgets;
/// use tower_retry_guard::budget::InFlightCap;
///
/// let budgets = Budgets::default().in_flight(Some(InFlightCap::new(0.1, 5)?));
/// # let _ = budgets;
/// assert!(InFlightCap::new(f64::NAN, 5).is_err());
/// # Ok::<(), tower_retry_guard::PolicyError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InFlightCap {
    share: f64,
    min: u32,
}

impl Default for InFlightCap {
    /// 20% of active calls, at least 3 (Envoy's defaults).
    fn default() -> Self {
        InFlightCap { share: 0.2, min: 3 }
    }
}

impl InFlightCap {
    /// At most `max(min, share x active calls)` retries in flight; `share` is retries in
    /// flight per active call (0 ..= 1000), `min` those always allowed. A share out of range
    /// (negative, NaN, infinite) is an error naming it, never clamped.
    pub fn new(share: f64, min: u32) -> Result<Self, PolicyError> {
        if !(share.is_finite() && (0.0..=1000.0).contains(&share)) {
            return Err(PolicyError::new(
                "in-flight cap",
                "share",
                format!("is {share}: must be a number in 0 ..= 1000"),
            ));
        }
        Ok(InFlightCap { share, min })
    }
}

/// The counters behind an [`InFlightCap`].
pub(crate) struct InFlight {
    cap: InFlightCap,
    /// Logical calls started and not yet dropped.
    active: AtomicU64,
    /// Retry attempts sent and not answered yet.
    retrying: AtomicU64,
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("cap", &self.cap)
            .field("active", &self.active.load(Ordering::Relaxed))
            .field("retrying", &self.retrying.load(Ordering::Relaxed))
            .finish()
    }
}

impl InFlight {
    pub(crate) fn new(cap: InFlightCap) -> Self {
        InFlight {
            cap,
            active: AtomicU64::new(0),
            retrying: AtomicU64::new(0),
        }
    }

    pub(crate) fn call_started(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn call_ended(&self) {
        let _ = self
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    fn allowed(&self) -> u64 {
        let active = self.active.load(Ordering::Relaxed) as f64;
        ((self.cap.share * active).floor() as u64).max(u64::from(self.cap.min))
    }

    /// Takes a slot if fewer than the cap are in flight; never overdraws under races.
    pub(crate) fn try_take(&self) -> bool {
        let allowed = self.allowed();
        self.retrying
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < allowed).then_some(n + 1)
            })
            .is_ok()
    }

    pub(crate) fn release(&self) {
        let _ = self
            .retrying
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Retries in flight now.
    pub(crate) fn retrying(&self) -> u64 {
        self.retrying.load(Ordering::Relaxed)
    }

    /// Calls active now.
    pub(crate) fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "{} of {} retries in flight used (retries in flight <= max({}, {} x {} active \
             calls)); change it with `Budgets::in_flight(Some(InFlightCap::new(share, min)?))`",
            self.retrying(),
            self.allowed(),
            self.cap.min,
            self.cap.share,
            self.active()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_is_the_larger_of_min_and_share_of_active() {
        let f = InFlight::new(InFlightCap::default());
        for _ in 0..100 {
            f.call_started();
        }
        // 20% of 100 = 20 slots.
        let taken = (0..50).filter(|_| f.try_take()).count();
        assert_eq!(taken, 20);
        f.release();
        assert!(f.try_take());
        assert!(!f.try_take());
        for _ in 0..100 {
            f.call_ended();
        }
        // No active calls: the minimum of 3, and 20 are still out.
        assert!(!f.try_take());
        for _ in 0..20 {
            f.release();
        }
        assert_eq!((0..10).filter(|_| f.try_take()).count(), 3);
    }

    #[test]
    fn counters_never_go_below_zero() {
        let f = InFlight::new(InFlightCap::default());
        f.release();
        f.call_ended();
        assert_eq!(f.retrying(), 0);
        assert_eq!(f.active(), 0);
    }

    #[test]
    fn races_never_overdraw() {
        let f = std::sync::Arc::new(InFlight::new(InFlightCap { share: 0.0, min: 7 }));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let f = f.clone();
                std::thread::spawn(move || (0..1000).filter(|_| f.try_take()).count())
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        assert_eq!(total, 7);
    }
}
