//! What the layer tells: [`RetryInfo`] on every response and error ([`CallOutcome`]), the
//! shared [`RetryStats`] (`stats.rs`), and the operation names they are kept under
//! (`operation.rs`: low cardinality by default, a bounded number tracked).

use std::fmt;
use std::time::Duration;

use crate::classify::ErrorKind;
use crate::error::StopReason;
use crate::request::{IdempotencyKey, Operation};

mod health;
mod operation;
mod snapshot;
mod stats;

pub(crate) use self::operation::{OpKey, default_operation};
pub(crate) use self::stats::OpHandle;
pub use self::stats::{
    DEFAULT_MAX_OPERATIONS, Health, KindSnapshot, OVERFLOW_OPERATION, RetryStats, Window,
};

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
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryInfo {
    /// Attempts made (1 when the first succeeded; 0 when nothing was sent).
    pub attempts: u32,
    /// Retries made (attempts - 1).
    pub retries: u32,
    /// Time slept between attempts.
    pub total_delay: Duration,
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
}

impl RetryInfo {
    /// The info of a call stopped before anything was sent.
    pub(crate) fn refused(reason: StopReason) -> Self {
        RetryInfo {
            attempts: 0,
            retries: 0,
            total_delay: Duration::ZERO,
            elapsed: Duration::ZERO,
            key: None,
            last_error: None,
            outcome: CallOutcome::Stopped(reason),
            operation: None,
        }
    }
}
