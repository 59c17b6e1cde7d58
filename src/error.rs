//! [`RetryError`]: why the layer stopped, with the inner error.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::budget::Scope;
use crate::classify::{AsError, ErrorKind};
use crate::observe::RetryInfo;
use crate::request::InvalidKey;

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

/// The error of [`Retry`](crate::Retry): why the layer stopped, what it did, and the inner
/// service's last error.
///
/// A failing *response* on the last attempt is not turned into an error: the caller gets
/// the response (the 503 with its body) and its [`RetryInfo`] in the extensions. A
/// `RetryError` comes from an inner error, or from a request refused before it was sent
/// (an invalid key), when [`RetryError::inner`] is `None`.
pub struct RetryError<E>(Box<Parts<E>>);

/// Boxed: an error is rare, and a small `Result` keeps the success path's moves small.
struct Parts<E> {
    reason: StopReason,
    info: RetryInfo,
    inner: Option<E>,
}

impl<E> RetryError<E> {
    pub(crate) fn new(reason: StopReason, info: RetryInfo, inner: Option<E>) -> Self {
        RetryError(Box::new(Parts {
            reason,
            info,
            inner,
        }))
    }

    /// Why the layer stopped.
    pub fn reason(&self) -> &StopReason {
        &self.0.reason
    }

    /// What the layer did: attempts, retries, total delay, key, last error kind.
    pub fn info(&self) -> &RetryInfo {
        &self.0.info
    }

    /// Attempts made (0 if the request was refused before it was sent).
    pub fn attempts(&self) -> u32 {
        self.0.info.attempts
    }

    /// Time slept between attempts.
    pub fn total_delay(&self) -> Duration {
        self.0.info.total_delay
    }

    /// The kind of the last failure, if any.
    pub fn kind(&self) -> Option<ErrorKind> {
        self.0.info.last_error
    }

    /// The inner service's last error.
    pub fn inner(&self) -> Option<&E> {
        self.0.inner.as_ref()
    }

    /// The inner service's last error, by value.
    pub fn into_inner(self) -> Option<E> {
        self.0.inner
    }

    /// The budget scope that denied the retry, if a budget did.
    pub fn budget_scope(&self) -> Option<Scope> {
        match self.0.reason {
            StopReason::Budget { scope, .. } => Some(scope),
            _ => None,
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for RetryError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryError")
            .field("reason", &self.0.reason)
            .field("info", &self.0.info)
            .field("inner", &self.0.inner)
            .finish()
    }
}

/// Says why the layer stopped, after how many attempts, of which operation. The inner error
/// is not repeated: it is the error's `source()`, which error reporters print next (as
/// `anyhow`'s `{:#}` and `tracing`'s error chains do).
impl<E> fmt::Display for RetryError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} after {} attempt{}",
            self.0.reason,
            self.0.info.attempts,
            if self.0.info.attempts == 1 { "" } else { "s" }
        )?;
        if let Some(op) = &self.0.info.operation {
            write!(f, " of `{op}`")?;
        }
        Ok(())
    }
}

impl<E: AsError + fmt::Debug + fmt::Display> StdError for RetryError<E> {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.0.inner {
            Some(e) => Some(e.as_error()),
            None => match &self.0.reason {
                StopReason::InvalidKey(k) => Some(k),
                _ => None,
            },
        }
    }
}
