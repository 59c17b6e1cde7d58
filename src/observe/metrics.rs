//! Feature `metrics`: what the layer records through the [`metrics`] facade, under one
//! naming convention: the crate's prefix `tower_retry_guard_`, Prometheus style (snake
//! case, `_total` on counters, the unit as a suffix: `_seconds`). Each metric is described
//! (HELP text and unit) by
//! [`RetryStats::describe_metrics`](crate::RetryStats::describe_metrics).
//!
//! | name | type | labels | counts |
//! | --- | --- | --- | --- |
//! | [`ATTEMPTS`] `tower_retry_guard_attempts_total` | counter | `operation`, `attempt_type` (`original` / `retry`) | every request sent, first attempts included (as gRPC's retry metrics tell original attempts from retries) |
//! | [`RETRIES`] `tower_retry_guard_retries_total` | counter | `operation`, `error_type` | retries sent, by the failure that caused them |
//! | [`CALLS`] `tower_retry_guard_calls_total` | counter | `operation`, `outcome` | logical calls ended, by outcome (`succeeded`, `recovered`, or a [`StopReason`](crate::StopReason) label) |
//! | [`RETRY_DELAY`] `tower_retry_guard_retry_delay_seconds` | histogram | `operation` | the delay before each retry sent |
//! | [`STREAM_FAILURES`] `tower_retry_guard_stream_failures_total` | counter | `operation`, `error_type` | streams failed after their first content event (never retried) |
//!
//! Label values are bounded: `operation` is the stats' operation name (ids collapsed, at
//! most [`RetryStats::DEFAULT_MAX_OPERATIONS`](crate::RetryStats::DEFAULT_MAX_OPERATIONS)
//! names, the rest under
//! [`RetryStats::OVERFLOW_OPERATION`](crate::RetryStats::OVERFLOW_OPERATION));
//! `error_type` is an [`ErrorKind`] label; `outcome` a fixed set.

use std::sync::Arc;

use metrics::Unit;

use crate::classify::ErrorKind;

/// Requests sent, first attempts (`attempt_type="original"`) and retries
/// (`attempt_type="retry"`).
pub const ATTEMPTS: &str = "tower_retry_guard_attempts_total";
/// Retries sent, by the failure (`error_type`) that caused them.
pub const RETRIES: &str = "tower_retry_guard_retries_total";
/// Logical calls ended, by `outcome`.
pub const CALLS: &str = "tower_retry_guard_calls_total";
/// The delay before each retry, in seconds.
pub const RETRY_DELAY: &str = "tower_retry_guard_retry_delay_seconds";
/// Streams that failed after their first content event, by `error_type`.
pub const STREAM_FAILURES: &str = "tower_retry_guard_stream_failures_total";
/// The cost of the retries sent, in the user's units (`Cost`), by `error_type`.
pub const RETRY_COST: &str = "tower_retry_guard_retry_cost_total";

/// Describes every metric to the installed recorder (see
/// [`RetryStats::describe_metrics`](crate::RetryStats::describe_metrics)).
pub(crate) fn describe() {
    metrics::describe_counter!(
        ATTEMPTS,
        Unit::Count,
        "Requests sent by the retry layer: first attempts (attempt_type=original) and retries (attempt_type=retry)."
    );
    metrics::describe_counter!(
        RETRIES,
        Unit::Count,
        "Retries sent, by the error type of the failed attempt that caused them."
    );
    metrics::describe_counter!(
        CALLS,
        Unit::Count,
        "Logical calls ended (all attempts of one call), by outcome."
    );
    metrics::describe_histogram!(
        RETRY_DELAY,
        Unit::Seconds,
        "Delay before each retry sent (backoff or the server's hint)."
    );
    metrics::describe_counter!(
        RETRY_COST,
        Unit::Count,
        "Cost of the retries sent, in the units of the request's Cost (tokens, micro-dollars), by error type."
    );
    metrics::describe_counter!(
        STREAM_FAILURES,
        Unit::Count,
        "Streamed responses that failed after their first content event (not retried), by error type."
    );
}

pub(crate) fn original_attempt(operation: &Arc<str>) {
    metrics::counter!(ATTEMPTS, "operation" => operation.clone(), "attempt_type" => "original")
        .increment(1);
}

pub(crate) fn retry(operation: &Arc<str>, kind: ErrorKind, delay: std::time::Duration) {
    metrics::counter!(ATTEMPTS, "operation" => operation.clone(), "attempt_type" => "retry")
        .increment(1);
    metrics::counter!(RETRIES, "operation" => operation.clone(), "error_type" => kind.as_str())
        .increment(1);
    metrics::histogram!(RETRY_DELAY, "operation" => operation.clone()).record(delay.as_secs_f64());
}

pub(crate) fn retry_cost(operation: &Arc<str>, kind: ErrorKind, cost: u64) {
    metrics::counter!(RETRY_COST, "operation" => operation.clone(), "error_type" => kind.as_str())
        .increment(cost);
}

pub(crate) fn call(operation: &Arc<str>, outcome: &'static str) {
    metrics::counter!(CALLS, "operation" => operation.clone(), "outcome" => outcome).increment(1);
}

pub(crate) fn stream_failure(operation: &Arc<str>, kind: ErrorKind) {
    metrics::counter!(STREAM_FAILURES, "operation" => operation.clone(), "error_type" => kind.as_str())
        .increment(1);
}
