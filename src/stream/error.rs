//! What a stream's failure was, before its first content ([`FirstTokenError`], retried) and
//! after it ([`MidStreamError`], never retried).

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use tower::BoxError;

use crate::classify::{ErrorKind, Outcome, classify_error};

/// Why a stream failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum StreamFailure {
    /// The body failed: the connection dropped, or the transport reported an error.
    Transport(BoxError),
    /// The provider sent an error event in the stream (OpenAI `{"error":{..}}`, Anthropic
    /// `event: error`).
    InBand(InBandError),
    /// No content arrived within the first-token timeout (counted from the request).
    FirstTokenTimeout(Duration),
}

impl StreamFailure {
    /// The cause as an [`ErrorKind`]: a transport error as [`Errors::classify_error`](crate::classify::Errors::classify_error) sees it (a
    /// drop it does not recognise is [`ErrorKind::Connect`]), an in-band error by its type,
    /// a first-token timeout as [`ErrorKind::Timeout`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            StreamFailure::Transport(e) => match classify_error(&**e) {
                Outcome::Retry { kind, .. } => kind,
                _ => ErrorKind::Connect,
            },
            StreamFailure::InBand(e) => e.kind(),
            StreamFailure::FirstTokenTimeout(_) => ErrorKind::Timeout,
        }
    }
}

impl fmt::Display for StreamFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamFailure::Transport(e) => write!(f, "the stream broke: {e}"),
            StreamFailure::InBand(e) => fmt::Display::fmt(e, f),
            StreamFailure::FirstTokenTimeout(d) => {
                write!(f, "no content within the first-token timeout ({d:?})")
            }
        }
    }
}

/// An error event the provider sent inside a stream, mapped to an [`ErrorKind`].
///
/// | the error's `type` / `code` | kind | retried before the first content |
/// |---|---|---|
/// | `insufficient_quota`, `billing_hard_limit_reached`, quota and credit markers | [`ErrorKind::QuotaExhausted`] | never |
/// | `invalid_request_error`, `authentication_error`, `permission_error`, `not_found_error`, `request_too_large`, `invalid_api_key`, `context_length_exceeded` | [`ErrorKind::ClientError`] | never |
/// | `rate_limit_error`, `rate_limit_exceeded`, `tokens`… (`rate_limit*`) | [`ErrorKind::RateLimited`] | yes |
/// | `overloaded_error`, `overloaded`, `service_unavailable` | [`ErrorKind::Overloaded`] | yes |
/// | `timeout`, `timeout_error` | [`ErrorKind::Timeout`] | yes |
/// | anything else (`api_error`, `server_error`, unknown) | [`ErrorKind::ServerError`] | yes |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InBandError {
    pub(crate) kind: ErrorKind,
    pub(crate) retryable: bool,
    /// The event's data, lossily decoded, at most a few KiB.
    pub(crate) data: Box<str>,
}

impl InBandError {
    /// What the error means.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether another attempt may fix it (not for quota and client errors).
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The error event's data as the provider sent it (at most a few KiB, lossily decoded).
    pub fn data(&self) -> &str {
        &self.data
    }
}

impl fmt::Display for InBandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = match self.data.char_indices().nth(300) {
            Some((i, _)) => &self.data[..i],
            None => &self.data,
        };
        write!(
            f,
            "the provider sent an error event ({}): {shown}",
            self.kind
        )
    }
}

impl StdError for InBandError {}

/// A streamed attempt failed before its first content event: nothing reached the caller,
/// so the retry layer may retry it (the error's [`Outcome`] says whether).
///
/// It reaches the retry layer's classifier inside the inner service's error;
/// [`Errors::classify_error`](crate::classify::Errors::classify_error) recognises it, so [`LlmHttp`](crate::LlmHttp) and
/// [`Errors`](crate::classify::Errors) retry it without configuration.
#[derive(Debug)]
pub struct FirstTokenError {
    pub(crate) cause: StreamFailure,
    pub(crate) bytes: u64,
}

impl FirstTokenError {
    /// Why the attempt failed.
    pub fn cause(&self) -> &StreamFailure {
        &self.cause
    }

    /// The bytes read (and held back) before the failure: comments, keep-alives, pings.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What the failure means for the retry layer: retryable, except an in-band quota or
    /// client error.
    pub fn outcome(&self) -> Outcome {
        let kind = self.cause.kind();
        match &self.cause {
            StreamFailure::InBand(e) if !e.retryable => Outcome::Fail { kind },
            _ => Outcome::retry(kind),
        }
    }
}

impl fmt::Display for FirstTokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "before the first content event: {}", self.cause)
    }
}

impl StdError for FirstTokenError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        source_of(&self.cause)
    }
}

/// A stream failed after its first content event had been delivered: never retried (that
/// would duplicate output). The body's error; downcast it from the body's `BoxError`, or
/// find it in any error's source chain with [`MidStreamError::find`].
///
/// The caller received every byte up to the failure, in order, exactly once.
#[derive(Debug)]
pub struct MidStreamError {
    pub(crate) events: u64,
    pub(crate) bytes: u64,
    pub(crate) cause: StreamFailure,
}

impl MidStreamError {
    /// Content events delivered before the failure (for a non-SSE stream: data frames).
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Bytes delivered before the failure (the whole body so far, held prefix included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Why the stream failed.
    pub fn cause(&self) -> &StreamFailure {
        &self.cause
    }

    /// The cause as an [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        self.cause.kind()
    }

    /// The first `MidStreamError` in `error`'s source chain (reqwest, for one, wraps a
    /// body's error in its own).
    pub fn find<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a MidStreamError> {
        let mut current = Some(error);
        // Bounded: a buggy cyclic chain must not hang us.
        for _ in 0..32 {
            let err = current?;
            if let Some(found) = err.downcast_ref::<MidStreamError>() {
                return Some(found);
            }
            current = err.source();
        }
        None
    }
}

impl fmt::Display for MidStreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the stream failed after {} content events ({} bytes) had been delivered; not retried: {}",
            self.events, self.bytes, self.cause
        )
    }
}

impl StdError for MidStreamError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        source_of(&self.cause)
    }
}

fn source_of(cause: &StreamFailure) -> Option<&(dyn StdError + 'static)> {
    match cause {
        StreamFailure::Transport(e) => Some(&**e),
        StreamFailure::InBand(e) => Some(e),
        StreamFailure::FirstTokenTimeout(_) => None,
    }
}
