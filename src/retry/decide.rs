//! Every decision after an attempt, and every reason a call stops: the pure
//! [`decide`] (the outcome, the local checks, the delay, the hint, the deadline), then the
//! steps that need the world — the change hook's answer ([`unchanged`]), the budgets'
//! verdict ([`granted`]), the deadline once the store answered ([`in_time`]), the in-flight
//! slot ([`slot`]), the copy to send ([`copy`]) and the deadline met while waiting
//! ([`deadline`]) — each mapped to its [`StopReason`] here and nowhere else.
//!
//! The order is DESIGN.md's: cheap and local first, shared last; nothing is drawn from a
//! budget unless the retry will really happen.

use std::time::Duration;

use tokio::time::Instant;

use super::call::Call;
use super::config::Config;
use crate::backoff::CallBackoff;
use crate::budget::{Budgets, RatioPermit, RetrySlot, Scope, Verdict};
use crate::classify::{ErrorKind, Outcome};
use crate::observe::StopReason;
use crate::policy::RetryPolicy;
use crate::request::SideEffect;

/// What to do after an attempt.
#[derive(Debug)]
pub(crate) enum Decision {
    /// The call succeeded.
    Succeed,
    /// The call ends on a failure of this kind, for this reason.
    Stop(ErrorKind, StopReason),
    /// Retry after `delay`, if the hook and the budgets agree; `backoff` is the call's
    /// random stream advanced past this delay.
    Retry {
        kind: ErrorKind,
        delay: Duration,
        backoff: CallBackoff,
    },
}

/// The decision after an attempt whose result the classifier called `outcome`, at `now`:
/// retries left? a copy to send? a key for a side effect? then the delay (backoff, at least
/// the server's hint) against the hint cap and the deadline.
///
/// Pure: it reads the call and the policy and changes nothing; the caller stores the
/// advanced backoff if it retries.
pub(crate) fn decide<Req, C, H>(
    config: &Config<C, H>,
    call: &Call<Req>,
    outcome: Outcome,
    now: Instant,
) -> Decision {
    let (kind, after) = match outcome {
        Outcome::Success => return Decision::Succeed,
        Outcome::Fail { kind } if kind == ErrorKind::GaveUp => {
            return Decision::Stop(kind, StopReason::InnerGaveUp);
        }
        Outcome::Fail { kind } => return Decision::Stop(kind, StopReason::NotRetryable),
        Outcome::Retry { kind, after } => (kind, after),
    };
    let policy = &config.policy;
    let stop = |reason| Decision::Stop(kind, reason);
    let retries = call.attempts.saturating_sub(1);
    if retries >= policy.max_retries() {
        return stop(StopReason::Exhausted {
            max_retries: policy.max_retries(),
        });
    }
    if call.next.is_none() {
        return stop(StopReason::NotCloneable);
    }
    if call.side_effect == SideEffect::SideEffecting && call.key.is_none() {
        return stop(StopReason::SideEffectWithoutKey {
            operation: call.op.as_str().to_owned(),
        });
    }
    let mut backoff = match &call.retried {
        Some(r) => r.backoff.clone(),
        None => CallBackoff::new(policy.seed()),
    };
    let delay = backoff.next_delay(&policy.backoff(), policy.jitter(), retries + 1);
    let remaining = call.deadline.saturating_duration_since(now);
    if remaining.is_zero() {
        // The time is up whatever the server says.
        return stop(deadline(policy));
    }
    let mut delay = delay;
    if let Some(hint) = after {
        if hint > policy.max_retry_after() {
            return stop(StopReason::HintTooLong {
                hint,
                max: policy.max_retry_after(),
            });
        }
        if hint >= remaining {
            return stop(StopReason::HintTooLong {
                hint,
                max: remaining,
            });
        }
        delay = delay.max(hint);
    }
    if delay >= remaining {
        return stop(deadline(policy));
    }
    Decision::Retry {
        kind,
        delay,
        backoff,
    }
}

/// The change hook's answer: an output failure is not retried unchanged.
pub(crate) fn unchanged(kind: ErrorKind, changed: bool) -> Option<StopReason> {
    (kind == ErrorKind::OutputInvalid && !changed).then_some(StopReason::OutputUnchanged)
}

/// The budgets' verdict: the process ratio's share of a granted retry, or why not.
pub(crate) fn granted(verdict: Verdict) -> Result<RatioPermit, StopReason> {
    match verdict {
        Verdict::Granted(permit) => Ok(permit),
        Verdict::Denied { scope, key, limit } => Err(StopReason::Budget { scope, key, limit }),
        Verdict::StoreUnavailable(error) => Err(StopReason::StoreUnavailable { error }),
    }
}

/// A retry granted by a slow store still has to start before the deadline.
pub(crate) fn in_time<Req>(
    policy: &RetryPolicy,
    call: &Call<Req>,
    delay: Duration,
    now: Instant,
) -> Result<(), StopReason> {
    if now + delay >= call.deadline {
        Err(deadline(policy))
    } else {
        Ok(())
    }
}

/// A slot for the retry about to be sent, if the in-flight cap has one.
pub(crate) fn slot(budgets: &Budgets) -> Result<Option<RetrySlot>, StopReason> {
    budgets.take_slot().map_err(|limit| StopReason::Budget {
        scope: Scope::InFlight,
        key: None,
        limit,
    })
}

/// The copy the retry sends (`decide` grants a retry only to a call that has one).
pub(crate) fn copy<Req>(call: &mut Call<Req>) -> Result<Req, StopReason> {
    call.next.take().ok_or(StopReason::NotCloneable)
}

/// The call's total time ran out (at a check, or while it waited).
pub(crate) fn deadline(policy: &RetryPolicy) -> StopReason {
    StopReason::Deadline {
        max_total_time: policy.max_total_time(),
    }
}

/// The inner service failed while getting ready: nothing was sent.
pub(crate) fn not_ready() -> StopReason {
    StopReason::NotReady
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
