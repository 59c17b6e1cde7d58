//! [`Outcome`] and [`ErrorKind`]: what a classifier answers, and the cause it names.

use std::fmt;
use std::time::Duration;

/// What an attempt's result means, as decided by a [`Classify`](super::Classify).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The call succeeded: return the result.
    Success,
    /// The call failed in a way that another attempt may fix.
    Retry {
        /// Why it failed.
        kind: ErrorKind,
        /// The server's wait hint (`Retry-After`, `retry-after-ms`), if it sent a valid one.
        /// The layer waits at least this long, and gives up at once when the hint is longer
        /// than [`RetryPolicy`](crate::RetryPolicy)'s maximum or the deadline.
        after: Option<Duration>,
    },
    /// The call failed in a way another attempt will not fix: return the result.
    Fail {
        /// Why it failed.
        kind: ErrorKind,
    },
}

impl Outcome {
    /// A retryable outcome without a server hint.
    pub const fn retry(kind: ErrorKind) -> Self {
        Outcome::Retry { kind, after: None }
    }

    /// The error kind, if the outcome is not a success.
    pub const fn kind(&self) -> Option<ErrorKind> {
        match self {
            Outcome::Success => None,
            Outcome::Retry { kind, .. } | Outcome::Fail { kind } => Some(*kind),
        }
    }
}

/// The cause of a failed attempt: the label of stats, tracing events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorKind {
    /// 429: the provider's rate limit.
    RateLimited,
    /// The account is out of quota or over its spend limit (a 429 that waiting won't fix).
    QuotaExhausted,
    /// 529 or 503: the provider is overloaded or unavailable.
    Overloaded,
    /// 500, 502 and other 5xx.
    ServerError,
    /// 408, 504, or a timeout error (tower's `Elapsed`, `io::ErrorKind::TimedOut`).
    Timeout,
    /// 409: a conflicting concurrent request (a lock, or a duplicate still in flight).
    Conflict,
    /// The connection could not be made or was lost (refused, reset, aborted).
    Connect,
    /// The response arrived but the model's output is unusable (did not validate).
    /// Retried only with a change to the request ([`RetryLayer::on_retry`](crate::RetryLayer::on_retry)).
    OutputInvalid,
    /// 4xx other than the above: the request is wrong, retrying cannot fix it.
    ClientError,
    /// An inner retry layer already gave up on this result: not retried again.
    GaveUp,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Every kind, in display order.
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::RateLimited,
        ErrorKind::QuotaExhausted,
        ErrorKind::Overloaded,
        ErrorKind::ServerError,
        ErrorKind::Timeout,
        ErrorKind::Conflict,
        ErrorKind::Connect,
        ErrorKind::OutputInvalid,
        ErrorKind::ClientError,
        ErrorKind::GaveUp,
        ErrorKind::Other,
    ];

    /// A short, stable, snake_case name (used in tracing fields and metric labels).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::QuotaExhausted => "quota_exhausted",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Connect => "connect",
            ErrorKind::OutputInvalid => "output_invalid",
            ErrorKind::ClientError => "client_error",
            ErrorKind::GaveUp => "gave_up",
            ErrorKind::Other => "other",
        }
    }

    /// Index into [`ErrorKind::ALL`].
    pub(crate) const fn index(self) -> usize {
        match self {
            ErrorKind::RateLimited => 0,
            ErrorKind::QuotaExhausted => 1,
            ErrorKind::Overloaded => 2,
            ErrorKind::ServerError => 3,
            ErrorKind::Timeout => 4,
            ErrorKind::Conflict => 5,
            ErrorKind::Connect => 6,
            ErrorKind::OutputInvalid => 7,
            ErrorKind::ClientError => 8,
            ErrorKind::GaveUp => 9,
            ErrorKind::Other => 10,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
