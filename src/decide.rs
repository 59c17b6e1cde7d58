//! The decision after a failed attempt, in the order DESIGN.md gives: the local checks, the
//! change hook, the delay against the hint cap and the deadline, then the budgets.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::budget::{Acquire, RatioPermit, Verdict};
use crate::call::{CallState, operation_of};
use crate::classify::ErrorKind;
use crate::error::StopReason;
use crate::layer::{ChangeRequest, RetryContext, Shared};
use crate::request::{RetryRequest, SideEffect};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What to do after a failed attempt.
pub(crate) enum Next {
    Stop(ErrorKind, StopReason),
    /// Granted: wait this long, holding the process ratio's share until the retry is sent.
    Wait(Duration, RatioPermit),
    /// The store decides.
    Acquire(BoxFuture<Verdict>, Duration),
}

/// The budgets' verdict as a stop reason (`None`: granted).
pub(crate) fn refusal(verdict: Verdict) -> Result<RatioPermit, StopReason> {
    match verdict {
        Verdict::Granted(permit) => Ok(permit),
        Verdict::Denied { scope, key, limit } => Err(StopReason::Budget { scope, key, limit }),
        Verdict::StoreUnavailable(error) => Err(StopReason::StoreUnavailable { error }),
    }
}

/// The call's total time ran out.
pub(crate) fn deadline_reason<C, H>(shared: &Shared<C, H>) -> StopReason {
    StopReason::Deadline {
        max_total_time: shared.layer.policy.max_total_time(),
    }
}

/// The local checks, the change hook, the delay, then the budgets.
pub(crate) fn decide<Req, Res, E, C, H>(
    shared: &Shared<C, H>,
    call: &mut CallState<Req>,
    result: &Result<Res, E>,
    kind: ErrorKind,
    after: Option<Duration>,
) -> Next
where
    Req: RetryRequest,
    H: ChangeRequest<Req, Res, E>,
{
    let layer = &shared.layer;
    let policy = &layer.policy;
    let retries = call.attempts - 1;
    if retries >= policy.max_retries() {
        return Next::Stop(
            kind,
            StopReason::Exhausted {
                max_retries: policy.max_retries(),
            },
        );
    }
    let Some(next) = call.next.as_mut() else {
        return Next::Stop(kind, StopReason::NotCloneable);
    };
    if call.operation.is_none() {
        call.operation = Some(operation_of(shared, next));
    }
    if call.side_effect == SideEffect::SideEffecting && call.key.is_none() {
        let operation = call
            .operation
            .as_ref()
            .map(|o| o.as_str().to_owned())
            .unwrap_or_default();
        return Next::Stop(kind, StopReason::SideEffectWithoutKey { operation });
    }
    let retry = retries + 1;
    let changed = layer
        .change
        .change(next, result, &RetryContext { retry, kind });
    if kind == ErrorKind::OutputInvalid && !changed {
        return Next::Stop(kind, StopReason::OutputUnchanged);
    }
    let backoff = call
        .backoff
        .get_or_insert_with(|| policy.call_backoff())
        .next_delay(&policy.backoff(), policy.jitter(), retry);
    let remaining = call
        .deadline
        .saturating_duration_since(tokio::time::Instant::now());
    if remaining.is_zero() {
        // The time is up whatever the server says.
        return Next::Stop(kind, deadline_reason(shared));
    }
    let mut delay = backoff;
    if let Some(hint) = after {
        if hint > policy.max_retry_after() {
            return Next::Stop(
                kind,
                StopReason::HintTooLong {
                    hint,
                    max: policy.max_retry_after(),
                },
            );
        }
        if hint >= remaining {
            return Next::Stop(
                kind,
                StopReason::HintTooLong {
                    hint,
                    max: remaining,
                },
            );
        }
        delay = delay.max(hint);
    }
    if delay >= remaining {
        return Next::Stop(kind, deadline_reason(shared));
    }
    let task = next.task_id(&layer.names);
    let user = next.user_id(&layer.names);
    match layer.budgets.acquire(task, user) {
        Acquire::Ready(verdict) => match refusal(verdict) {
            Ok(permit) => Next::Wait(delay, permit),
            Err(reason) => Next::Stop(kind, reason),
        },
        Acquire::Pending(verdict) => Next::Acquire(verdict, delay),
    }
}
