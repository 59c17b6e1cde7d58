//! How a call ended: [`StopReason`], [`CallOutcome`], and the [`RetryInfo`] every response
//! and error carries.

use std::fmt;
use std::time::Duration;

use crate::budget::Scope;
use crate::classify::ErrorKind;
use crate::request::{IdempotencyKey, InvalidKey, Operation};

/// Why the layer stopped retrying a call (or never started).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The classifier said the failure is not worth retrying.
    NotRetryable,
    /// The policy's retries are used up.
    Exhausted {
        /// The policy's limit.
        max_retries: u32,
    },
    /// The call's total time ran out: the next retry would start after it, or an attempt
    /// (or the budget store, or the inner service getting ready) was still running at it
    /// and was dropped.
    Deadline {
        /// The policy's limit.
        max_total_time: Duration,
    },
    /// The server asked to wait longer than the policy honours, or than the deadline allows.
    HintTooLong {
        /// What the server asked for.
        hint: Duration,
        /// The longest wait that was possible.
        max: Duration,
    },
    /// The request could not be copied for another attempt (a streaming body).
    NotCloneable,
    /// A side-effecting request without an idempotency key is never retried.
    SideEffectWithoutKey {
        /// The operation.
        operation: String,
    },
    /// The model's output failed, and nothing would change on a retry (no `on_retry` hook,
    /// or the hook changed nothing): "same prompt, same model, same result".
    OutputUnchanged,
    /// The request's idempotency key is invalid; nothing was sent.
    InvalidKey(InvalidKey),
    /// A retry budget said no.
    Budget {
        /// Which budget.
        scope: Scope,
        /// Its key (the task or user id), if it has one.
        key: Option<String>,
        /// The limit, in words.
        limit: String,
    },
    /// The budget store could not be reached, and budgets fail closed.
    StoreUnavailable {
        /// What went wrong.
        error: String,
    },
    /// An inner retry layer of this crate already gave up: retrying here would multiply
    /// attempts.
    InnerGaveUp,
    /// The inner service failed while getting ready (`poll_ready`): nothing was sent.
    NotReady,
}

impl StopReason {
    /// A short, stable, snake_case name (tracing fields, metric labels).
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::NotRetryable => "not_retryable",
            StopReason::Exhausted { .. } => "exhausted",
            StopReason::Deadline { .. } => "deadline",
            StopReason::HintTooLong { .. } => "hint_too_long",
            StopReason::NotCloneable => "not_cloneable",
            StopReason::SideEffectWithoutKey { .. } => "side_effect_without_key",
            StopReason::OutputUnchanged => "output_unchanged",
            StopReason::InvalidKey(_) => "invalid_key",
            StopReason::Budget { .. } => "budget",
            StopReason::StoreUnavailable { .. } => "store_unavailable",
            StopReason::InnerGaveUp => "inner_gave_up",
            StopReason::NotReady => "not_ready",
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::NotRetryable => f.write_str("not retryable"),
            StopReason::Exhausted { max_retries } => {
                write!(f, "retries exhausted (max {max_retries})")
            }
            StopReason::Deadline { max_total_time } => {
                write!(f, "deadline: the next retry would end past the total time of {max_total_time:?}")
            }
            StopReason::HintTooLong { hint, max } => write!(
                f,
                "the server asked to wait {hint:?}, more than the {max:?} that can be waited"
            ),
            StopReason::NotCloneable => {
                f.write_str("the request cannot be cloned (streaming body?), so it cannot be retried")
            }
            StopReason::SideEffectWithoutKey { operation } => write!(
                f,
                "side effect without idempotency key: `{operation}` is not retried"
            ),
            StopReason::OutputUnchanged => f.write_str(
                "output failure, nothing to change: a retry of the same request would give the same output",
            ),
            StopReason::InvalidKey(e) => write!(f, "{e}; nothing was sent"),
            StopReason::Budget { scope, key, limit } => match key {
                Some(key) => write!(f, "{scope} retry budget `{key}` exhausted ({limit})"),
                None => write!(f, "{scope} retry budget exhausted ({limit})"),
            },
            StopReason::StoreUnavailable { error } => {
                write!(f, "budget store unavailable ({error}); failing closed")
            }
            StopReason::InnerGaveUp => {
                f.write_str("an inner retry layer already gave up; not retried again")
            }
            StopReason::NotReady => {
                f.write_str("the inner service failed while getting ready; nothing was sent")
            }
        }
    }
}

/// How a logical call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// The first attempt succeeded.
    Succeeded,
    /// An attempt succeeded after at least one retry.
    Recovered,
    /// The layer stopped on a failure, for this reason.
    Stopped(StopReason),
}

impl CallOutcome {
    /// A short, stable name: `succeeded`, `recovered`, or the stop reason's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            CallOutcome::Succeeded => "succeeded",
            CallOutcome::Recovered => "recovered",
            CallOutcome::Stopped(reason) => reason.as_str(),
        }
    }

    /// Whether the call ended in a success.
    pub fn is_success(&self) -> bool {
        matches!(self, CallOutcome::Succeeded | CallOutcome::Recovered)
    }
}

impl fmt::Display for CallOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallOutcome::Stopped(reason) => write!(f, "stopped: {reason}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// What the layer did for one logical call. In the response's extensions (HTTP) and in
/// [`RetryError::info`](crate::RetryError::info).
///
/// ```
/// use http::{Request, Response, StatusCode};
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use tower_retry_guard::{CallOutcome, RetryInfo, RetryLayer, StopReason};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// // A provider that keeps answering 503: the caller gets the last 503, and why it stopped.
/// let mut svc = ServiceBuilder::new().layer(RetryLayer::new()).service_fn(|_: Request<String>| async {
///     let mut res = Response::new(String::from("overloaded"));
///     *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
///     Ok::<_, std::io::Error>(res)
/// });
/// let res = svc.ready().await?.call(Request::new(String::new())).await?;
/// let info = res.extensions().get::<RetryInfo>().expect("always attached");
/// assert_eq!(info.attempts, 4);
/// assert!(matches!(info.outcome, CallOutcome::Stopped(StopReason::Exhausted { max_retries: 3 })));
/// assert_eq!(info.operation.as_ref().map(|o| o.as_str()), Some("GET /"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryInfo {
    /// Attempts made (1 when the first succeeded; 0 when nothing was sent).
    pub attempts: u32,
    /// Retries made (attempts - 1).
    pub retries: u32,
    /// Time slept between attempts.
    pub total_delay: Duration,
    /// What the retries sent cost, in the units of the cost budgets: the sum of each
    /// retry's [`Cost`](crate::budget::Cost) (or [`cost_fn`](crate::RetryLayer::cost_fn), or
    /// [`llm_cost`](crate::RetryLayer::llm_cost) estimate), as reserved (settlements do not
    /// change it); 0 when no retry was sent or no cost was known.
    pub retry_cost: u64,
    /// Time from the first attempt to the end.
    pub elapsed: Duration,
    /// The idempotency key sent on every attempt, if any.
    pub key: Option<IdempotencyKey>,
    /// The kind of the last failed attempt, if any.
    pub last_error: Option<ErrorKind>,
    /// How the call ended.
    pub outcome: CallOutcome,
    /// The operation's name; set when at least one attempt failed.
    pub operation: Option<Operation>,
    /// What the last attempt reserved from the cost budgets, and for whom.
    pub(crate) reservation: Option<Box<Reservation>>,
}

/// What the last attempt of a call reserved from the cost budgets, for a settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reservation {
    pub(crate) cost: u64,
    pub(crate) task: Option<String>,
    pub(crate) user: Option<String>,
}

impl RetryInfo {
    /// The info of a call stopped before anything was sent.
    pub(crate) fn refused(reason: StopReason) -> Self {
        RetryInfo {
            attempts: 0,
            retries: 0,
            total_delay: Duration::ZERO,
            retry_cost: 0,
            elapsed: Duration::ZERO,
            key: None,
            last_error: None,
            outcome: CallOutcome::Stopped(reason),
            operation: None,
            reservation: None,
        }
    }

    /// What the call's last attempt reserved from the cost budgets: its cost, when it was a
    /// retry whose cost was known; 0 otherwise (a first attempt draws nothing from the
    /// budgets). What the usage of its response settles: with [`RetryInfo::task`] and
    /// [`RetryInfo::user`], the arguments of [`Budgets::settle`](crate::Budgets::settle),
    /// which [`UsageBody`](crate::budget::UsageBody) calls for a streamed body.
    ///
    /// ```
    /// # use tower_retry_guard::{Budgets, RetryInfo};
    /// # async fn settle(info: &RetryInfo, budgets: &Budgets) -> Result<(), tower_retry_guard::budget::StoreError> {
    /// // The caller read the usage (a header, its parsed response) and priced it.
    /// let actual = 1_234;
    /// budgets.settle(info.task(), info.user(), info.reserved(), actual).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn reserved(&self) -> u64 {
        self.reservation.as_ref().map_or(0, |r| r.cost)
    }

    /// The task id the last attempt's reservation was drawn for ([`RetryInfo::reserved`]).
    pub fn task(&self) -> Option<&str> {
        self.reservation.as_ref().and_then(|r| r.task.as_deref())
    }

    /// The user id the last attempt's reservation was drawn for ([`RetryInfo::reserved`]).
    pub fn user(&self) -> Option<&str> {
        self.reservation.as_ref().and_then(|r| r.user.as_deref())
    }
}
