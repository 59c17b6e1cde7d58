//! What the layer tells about a call: the tracing events, the stats, the `RetryInfo`.

use std::borrow::Cow;
use std::time::Duration;

use tokio::time::Instant;

use crate::call::CallState;
use crate::classify::{Classify, ErrorKind};
use crate::error::{RetryError, StopReason};
use crate::layer::Shared;
use crate::observe::CallOutcome;
use crate::request::Operation;

/// A retry is granted: the WARN event.
pub(crate) fn log_retry<Req, C, H>(shared: &Shared<C, H>, call: &CallState<Req>, delay: Duration) {
    let kind = call.last_kind.unwrap_or(ErrorKind::Other);
    let policy = &shared.layer.policy;
    tracing::warn!(
        target: "tower_retry_guard",
        operation = call.operation_name(),
        attempt = call.attempts + 1,
        retry = call.attempts,
        "http.request.resend_count" = call.attempts,
        error_kind = kind.as_str(),
        delay_ms = delay.as_millis() as u64,
        retries_left = policy.max_retries().saturating_sub(call.attempts),
        time_left_ms = call
            .deadline
            .saturating_duration_since(Instant::now() + delay)
            .as_millis() as u64,
        key = call.key.as_ref().map(|k| k.as_str()),
        "retrying"
    );
}

/// The call succeeded (at the first attempt, or recovered).
#[allow(clippy::result_large_err)] // the future's output type
pub(crate) fn succeed<Req, Res, E, C, H>(
    shared: &Shared<C, H>,
    call: &mut CallState<Req>,
    result: Result<Res, E>,
) -> Result<Res, RetryError<E>>
where
    C: Classify<Res, E>,
{
    let recovered = call.attempts > 1;
    // One clock read serves the stats window and the info's elapsed time.
    let now = Instant::now();
    shared
        .layer
        .stats
        .record_success(&call.op, now, if recovered { call.last_kind } else { None });
    match result {
        Ok(mut response) => {
            if recovered {
                tracing::info!(
                    target: "tower_retry_guard",
                    operation = call.operation_name(),
                    attempts = call.attempts,
                    outcome = "recovered",
                    total_delay_ms = call.total_delay.as_millis() as u64,
                    "succeeded after {} retries",
                    call.attempts - 1
                );
            }
            if recovered || shared.layer.info_on_success {
                let outcome = if recovered {
                    CallOutcome::Recovered
                } else {
                    CallOutcome::Succeeded
                };
                let info = call.info(outcome, now);
                shared.layer.classify.attach(&mut response, info);
            }
            Ok(response)
        }
        // A classifier that calls an error a success: pass it through, unwrapped in a
        // RetryError that says so.
        Err(e) => {
            let info = call.info(CallOutcome::Stopped(StopReason::NotRetryable), now);
            Err(RetryError::new(StopReason::NotRetryable, info, Some(e)))
        }
    }
}

/// The call stops on a failure of `kind`, for `reason`; `result` is the last attempt's
/// (none when the attempt was dropped at the deadline).
#[allow(clippy::result_large_err)] // the future's output type
pub(crate) fn stop<Req, Res, E, C, H>(
    shared: &Shared<C, H>,
    call: &mut CallState<Req>,
    result: Option<Result<Res, E>>,
    kind: ErrorKind,
    reason: StopReason,
) -> Result<Res, RetryError<E>>
where
    C: Classify<Res, E>,
{
    call.last_kind = Some(kind);
    // Whatever it held is given back now, not when the future is dropped.
    call.slot = None;
    call.permit = None;
    if call.operation.is_none() {
        // The call ended before a retry was considered (retries off, not retryable): name it
        // from its stats entry, made when the call started.
        call.operation = Some(Operation(Cow::Owned(call.op.name().to_owned())));
    }
    shared.layer.stats.record_stop(&call.op, kind, &reason);
    if call.attempts > 1 || reason != StopReason::NotRetryable {
        tracing::warn!(
            target: "tower_retry_guard",
            operation = call.operation_name(),
            attempts = call.attempts,
            error_kind = kind.as_str(),
            outcome = reason.as_str(),
            total_delay_ms = call.total_delay.as_millis() as u64,
            "gave up: {reason}"
        );
    } else {
        tracing::debug!(
            target: "tower_retry_guard",
            operation = call.operation_name(),
            error_kind = kind.as_str(),
            "not retryable"
        );
    }
    let info = call.info(CallOutcome::Stopped(reason.clone()), Instant::now());
    match result {
        Some(Ok(mut response)) => {
            shared.layer.classify.attach(&mut response, info);
            Ok(response)
        }
        Some(Err(e)) => Err(RetryError::new(reason, info, Some(e))),
        None => Err(RetryError::new(reason, info, None)),
    }
}
