//! What the layer tells about a call: the tracing events, the stats, the [`RetryInfo`].

use std::time::Duration;

use tokio::time::Instant;

use super::call::{Call, OpName};
use super::config::Config;
use crate::classify::{Classify, ErrorKind, Outcome};
use crate::error::RetryError;
use crate::observe::StopReason;
use crate::observe::{CallOutcome, RetryInfo};
use crate::request::{InvalidKey, RetryRequest};

/// A request refused before it was sent (boxed: the success path moves less).
pub(crate) type Refusal = Box<(StopReason, RetryInfo)>;

/// What the call did so far, ending with `outcome`. The operation is named unless the first
/// attempt succeeded.
pub(crate) fn info<Req>(call: &Call<Req>, outcome: CallOutcome, now: Instant) -> RetryInfo {
    let operation = (!matches!(outcome, CallOutcome::Succeeded)).then(|| call.op.to_operation());
    RetryInfo {
        attempts: call.attempts,
        retries: call.attempts.saturating_sub(1),
        total_delay: call.total_delay(),
        retry_cost: call.retry_cost(),
        elapsed: now.saturating_duration_since(call.started),
        key: call.key.clone(),
        last_error: call.last_kind,
        outcome,
        operation,
        reservation: call.retried.as_ref().and_then(|r| r.reservation.clone()),
    }
}

/// A request with an invalid key: counted, logged, refused before anything is sent.
pub(crate) fn refused<C, H>(config: &Config<C, H>, op: &OpName, invalid: InvalidKey) -> Refusal {
    let reason = StopReason::InvalidKey(invalid.clone());
    config
        .stats
        .record_stop(&op.handle, ErrorKind::ClientError, &reason);
    tracing::warn!(
        target: "tower_retry_guard",
        operation = op.as_str(),
        error = %invalid,
        "request refused before sending: invalid idempotency key"
    );
    let mut info = RetryInfo::refused(reason.clone());
    info.operation = Some(op.to_operation());
    Box::new((reason, info))
}

/// A retry is granted: the WARN event, on the call's span (the attempt that failed has
/// ended; the retry's own span starts when it is sent).
pub(crate) fn log_retry<Req, C, H>(
    config: &Config<C, H>,
    call: &Call<Req>,
    delay: Duration,
    cost: Option<u64>,
) {
    let kind = call.last_kind.unwrap_or(ErrorKind::Other);
    tracing::warn!(
        target: "tower_retry_guard",
        operation = call.op.as_str(),
        attempt = call.attempts + 1,
        retry = call.attempts,
        "error.type" = kind.as_str(),
        delay_ms = delay.as_millis() as u64,
        retries_left = config.policy.max_retries().saturating_sub(call.attempts),
        time_left_ms = call
            .deadline
            .saturating_duration_since(Instant::now() + delay)
            .as_millis() as u64,
        key = call.key.as_ref().map(|k| k.as_str()),
        cost,
        "retrying"
    );
}

/// The call succeeded (at the first attempt, or recovered). `waited`: the call waited at
/// least once (else no time passed since it started, and the clock is not read again).
#[inline]
pub(crate) fn succeed<Req, Res, E, C, H>(
    config: &Config<C, H>,
    call: &mut Call<Req>,
    result: Result<Res, E>,
    waited: bool,
) -> Result<Res, RetryError<E>>
where
    C: Classify<Res, E>,
{
    let recovered = call.in_retry();
    if recovered {
        config.budgets.on_retry_result(true);
        // Its retry slot is free.
        call.failed(&config.policy).slot = None;
    }
    let now = if waited { Instant::now() } else { call.started };
    let recovered_from = if recovered { call.last_kind } else { None };
    config
        .stats
        .record_success(&call.op.handle, now, recovered_from);
    match result {
        Ok(mut response) => {
            if recovered {
                recovered_info(config, call, &mut response, now);
            } else if config.info_on_success {
                let info = info(call, CallOutcome::Succeeded, now);
                config.classify.attach(&mut response, info);
            }
            Ok(response)
        }
        // A classifier that calls an error a success: pass it through, in a RetryError
        // that says so.
        Err(e) => {
            let info = info(call, CallOutcome::Stopped(StopReason::NotRetryable), now);
            Err(RetryError::new(StopReason::NotRetryable, info, Some(e)))
        }
    }
}

#[cold]
fn recovered_info<Req, Res, E, C, H>(
    config: &Config<C, H>,
    call: &Call<Req>,
    response: &mut Res,
    now: Instant,
) where
    C: Classify<Res, E>,
{
    tracing::info!(
        target: "tower_retry_guard",
        operation = call.op.as_str(),
        attempts = call.attempts,
        outcome = "recovered",
        total_delay_ms = call.total_delay().as_millis() as u64,
        "succeeded after {} retries",
        call.attempts - 1
    );
    config
        .classify
        .attach(response, info(call, CallOutcome::Recovered, now));
}

/// The call stops on a failure of `kind`, for `reason`; `result` is the last attempt's
/// (none when the attempt was dropped at the deadline). The call is consumed: whatever it
/// held (a retry slot, the active-call count) is given back here.
pub(crate) fn stop<Req, Res, E, C, H>(
    config: &Config<C, H>,
    mut call: Call<Req>,
    result: Option<Result<Res, E>>,
    kind: ErrorKind,
    reason: StopReason,
) -> Result<Res, RetryError<E>>
where
    C: Classify<Res, E>,
{
    call.last_kind = Some(kind);
    config.stats.record_stop(&call.op.handle, kind, &reason);
    if call.in_retry() || reason != StopReason::NotRetryable {
        tracing::warn!(
            target: "tower_retry_guard",
            operation = call.op.as_str(),
            attempts = call.attempts,
            "error.type" = kind.as_str(),
            outcome = reason.as_str(),
            total_delay_ms = call.total_delay().as_millis() as u64,
            "gave up: {reason}"
        );
    } else {
        tracing::debug!(
            target: "tower_retry_guard",
            operation = call.op.as_str(),
            "error.type" = kind.as_str(),
            "not retryable"
        );
    }
    let info = info(&call, CallOutcome::Stopped(reason.clone()), Instant::now());
    drop(call);
    match result {
        Some(Ok(mut response)) => {
            config.classify.attach(&mut response, info);
            Ok(response)
        }
        Some(Err(e)) => Err(RetryError::new(reason, info, Some(e))),
        None => Err(RetryError::new(reason, info, None)),
    }
}

/// The logical call's span, if a subscriber wants it (else none is built, nor its `log`
/// fallback). Named `retry_call`; `otel.name` (the operation) names it for the
/// OpenTelemetry bridge. Its children: one [`attempt_span`] per request sent.
pub(crate) fn span<Req: RetryRequest>(call: &Call<Req>, request: &Req) -> tracing::Span {
    if !tracing::enabled!(target: "tower_retry_guard", tracing::Level::INFO) {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: "tower_retry_guard",
        "retry_call",
        "otel.name" = call.op.as_str(),
        operation = call.op.as_str(),
        "http.request.method" = request.view().method.map(|m| m.as_str()),
        side_effect = call.side_effect.as_str(),
        key = call.key.as_ref().map(|k| k.as_str()),
    )
}

/// The span of one attempt (a physical request), a child of the call's `parent` span;
/// none when the call has none (no subscriber wants it). Named `retry_attempt`, with the
/// OpenTelemetry HTTP client attributes: `otel.name` is the method (the operation for a
/// request without one: a tool call), `otel.kind` `client`; `http.request.resend_count` only on a retry (the semantic
/// conventions leave it out of the first attempt); `http.response.status_code`,
/// `error.type` and `otel.status_code` are recorded when the attempt answers
/// ([`attempt_answered`]).
pub(crate) fn attempt_span<Req: RetryRequest>(
    parent: &tracing::Span,
    request: &Req,
    resend_count: u32,
    operation: &str,
) -> tracing::Span {
    if parent.is_none() {
        return tracing::Span::none();
    }
    let method = request.view().method.map(|m| m.as_str());
    let server = request.server();
    tracing::info_span!(
        target: "tower_retry_guard",
        parent: parent,
        "retry_attempt",
        "otel.name" = method.unwrap_or(operation),
        "otel.kind" = "client",
        "http.request.method" = method,
        // Integers as i64: OpenTelemetry's int (the bridge would record a u64 as text).
        "http.request.resend_count" = (resend_count > 0).then_some(i64::from(resend_count)),
        "server.address" = server.map(|(host, _)| host),
        "server.port" = server.and_then(|(_, port)| port).map(i64::from),
        "http.response.status_code" = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
        "otel.status_code" = tracing::field::Empty,
    )
}

/// An attempt answered: its status code (what the classifier knows) and, for a failure,
/// its `error.type` (the [`ErrorKind`]'s label), on its span. Nothing when untraced.
#[inline]
pub(crate) fn attempt_answered<Res, E, C: Classify<Res, E>>(
    span: &tracing::Span,
    classify: &C,
    result: &Result<Res, E>,
    outcome: &Outcome,
) {
    if span.is_none() {
        return;
    }
    if let Some(code) = classify.status_code(result) {
        span.record("http.response.status_code", i64::from(code));
    }
    match outcome {
        Outcome::Success => {}
        Outcome::Retry { kind, .. } | Outcome::Fail { kind } => attempt_failed(span, *kind),
    }
}

/// An attempt failed with `kind` (or was dropped at the deadline: `timeout`).
pub(crate) fn attempt_failed(span: &tracing::Span, kind: ErrorKind) {
    span.record("error.type", kind.as_str());
    span.record("otel.status_code", "error");
}
