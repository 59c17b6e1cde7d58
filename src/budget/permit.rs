//! Guards: each resource a call takes from the budgets is given back by dropping its guard,
//! never by a flag and a refund site (tower's `limit` holds a `_permit` the same way).
//!
//! - [`ActiveCall`]: the call counts as active (for [`InFlightCap`](super::InFlightCap)) while
//!   it lives; made once the first attempt's future exists, so a panicking inner `call` never
//!   leaves a call counted.
//! - [`RetrySlot`]: one retry in flight, taken once the inner service is ready for it, freed
//!   when the retry answers, the call ends or its future is dropped (a deadline included).
//! - [`RatioPermit`]: the process ratio's share of one granted retry; committed when the retry
//!   is sent, given back if it is dropped before (a store denial, no slot, the deadline, a
//!   caller who gave up while it slept).

use std::fmt;
use std::sync::Arc;

use super::in_flight::InFlight;
use super::ratio::RetryRatio;

/// One active call.
pub(crate) struct ActiveCall(Option<Arc<InFlight>>);

impl ActiveCall {
    pub(crate) fn new(in_flight: Option<&Arc<InFlight>>) -> Self {
        ActiveCall(in_flight.map(|f| {
            f.call_started();
            f.clone()
        }))
    }
}

impl Drop for ActiveCall {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            f.call_ended();
        }
    }
}

/// One retry in flight.
pub(crate) struct RetrySlot(Arc<InFlight>);

impl RetrySlot {
    /// A slot if fewer than the cap are in flight.
    pub(crate) fn try_take(in_flight: &Arc<InFlight>) -> Option<Self> {
        in_flight.try_take().then(|| RetrySlot(in_flight.clone()))
    }
}

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// The process ratio's share of one granted retry: given back on drop unless committed.
pub(crate) struct RatioPermit(Option<Arc<RetryRatio>>);

impl RatioPermit {
    /// A permit that gives nothing back (no ratio).
    pub(crate) fn none() -> Self {
        RatioPermit(None)
    }

    /// A retry withdrawn from `ratio`.
    pub(crate) fn withdrawn(ratio: Arc<RetryRatio>) -> Self {
        RatioPermit(Some(ratio))
    }

    /// The retry was sent: the withdrawal stays.
    pub(crate) fn commit(mut self) {
        self.0 = None;
    }
}

impl Drop for RatioPermit {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.refund();
        }
    }
}

impl fmt::Debug for RatioPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "RatioPermit(held)"
        } else {
            "RatioPermit(none)"
        })
    }
}
