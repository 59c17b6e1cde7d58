//! [`RetryError`]: why the layer stopped, with the inner error.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::budget::Scope;
use crate::classify::{AsError, ErrorKind};
use crate::observe::{RetryInfo, StopReason};

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

/// An error this layer gave up on: an outer retry layer of this crate does not retry it again.
impl<E: AsError + fmt::Debug + fmt::Display + 'static> AsError for RetryError<E> {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        self
    }

    fn gave_up(&self) -> bool {
        true
    }
}
