//! Classifying errors returned by the inner service (transport failures).

use std::error::Error as StdError;
use std::io;

use super::{Classify, ErrorKind, Outcome};

/// Errors the built-in classifiers can look into.
///
/// A blanket implementation over `std::error::Error` is impossible next to the one for
/// `tower::BoxError` (`Box<dyn Error + Send + Sync>` does not implement `Error`), so the
/// common error types are listed here. For another error type, implement this trait (one
/// line: `fn as_error(&self) -> &(dyn Error + 'static) { self }`) or classify with a closure
/// that calls [`classify_error`].
#[diagnostic::on_unimplemented(
    message = "the retry layer cannot classify errors of type `{Self}`",
    note = "map the inner service's error into `tower::BoxError` (`ServiceBuilder::new().layer(retry).map_err(BoxError::from).service(client)`), implement `AsError` for it (one line), or give the layer a classifier closure",
    note = "hyper-util's legacy client error implements it with the `hyper-util` feature; reqwest's with the `reqwest` feature"
)]
pub trait AsError {
    /// The error as a `std::error::Error` trait object whose source chain can be walked.
    fn as_error(&self) -> &(dyn StdError + 'static);

    /// Whether an inner retry layer of this crate already gave up on this error.
    fn gave_up(&self) -> bool {
        false
    }
}

impl AsError for Box<dyn StdError + Send + Sync> {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        &**self
    }
}

impl AsError for Box<dyn StdError + Send> {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        &**self
    }
}

impl AsError for Box<dyn StdError> {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        &**self
    }
}

impl AsError for io::Error {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        self
    }
}

impl AsError for tower::timeout::error::Elapsed {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        self
    }
}

#[cfg(feature = "hyper-util")]
impl AsError for hyper_util::client::legacy::Error {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        self
    }
}

#[cfg(feature = "reqwest")]
impl AsError for reqwest::Error {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        self
    }
}

impl<E: AsError + std::fmt::Debug + std::fmt::Display + 'static> AsError for crate::RetryError<E> {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        self
    }

    fn gave_up(&self) -> bool {
        true
    }
}

/// Classifies a transport error by walking its source chain.
///
/// Retryable: tower's timeout `Elapsed`, `io::ErrorKind::TimedOut` (→ [`ErrorKind::Timeout`]);
/// connection refused, reset, aborted, not connected, broken pipe, unexpected EOF, and
/// hyper's "connection closed before the message completed" and "request canceled"
/// (→ [`ErrorKind::Connect`]). A stream guard's [`FirstTokenError`](crate::stream::FirstTokenError)
/// is classified by its own [`outcome`](crate::stream::FirstTokenError::outcome); a
/// [`MidStreamError`](crate::stream::MidStreamError) is never retried. An error an inner retry layer of this crate already gave up on
/// fails with [`ErrorKind::GaveUp`]. Anything else fails with [`ErrorKind::Other`].
pub fn classify_error(error: &(dyn StdError + 'static)) -> Outcome {
    // Bounded: source chains are short, but a buggy cyclic chain must not hang us.
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    let mut depth = 0;
    while let Some(err) = current {
        if depth >= 32 {
            break;
        }
        // A stream guard's verdict: it read the stream, it knows.
        if let Some(stream) = err.downcast_ref::<crate::stream::FirstTokenError>() {
            return stream.outcome();
        }
        if let Some(stream) = err.downcast_ref::<crate::stream::MidStreamError>() {
            return Outcome::Fail {
                kind: stream.kind(),
            };
        }
        if is_gave_up(err) {
            return Outcome::Fail {
                kind: ErrorKind::GaveUp,
            };
        }
        if err.is::<tower::timeout::error::Elapsed>() {
            return Outcome::retry(ErrorKind::Timeout);
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::TimedOut => return Outcome::retry(ErrorKind::Timeout),
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::NotConnected
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => return Outcome::retry(ErrorKind::Connect),
                _ => {}
            }
        }
        // hyper (behind hyper-util's client, reqwest, axum...): a connection that closed
        // before the response was complete is the incident's "lost response"; a request
        // canceled before it was sent never reached the server. Both are safe to retry
        // (a side-effecting request still needs its key).
        if let Some(he) = err.downcast_ref::<hyper::Error>() {
            if he.is_timeout() {
                return Outcome::retry(ErrorKind::Timeout);
            }
            if he.is_incomplete_message() || he.is_canceled() {
                return Outcome::retry(ErrorKind::Connect);
            }
        }
        #[cfg(feature = "reqwest")]
        if let Some(re) = err.downcast_ref::<reqwest::Error>() {
            if re.is_timeout() {
                return Outcome::retry(ErrorKind::Timeout);
            }
            if re.is_connect() {
                return Outcome::retry(ErrorKind::Connect);
            }
        }
        current = err.source();
        depth += 1;
    }
    Outcome::Fail {
        kind: ErrorKind::Other,
    }
}

pub(crate) fn is_gave_up(err: &(dyn StdError + 'static)) -> bool {
    // The common shapes of an inner layer's error as seen by an outer one.
    err.is::<crate::RetryError<Box<dyn StdError + Send + Sync>>>()
        || err.is::<crate::RetryError<io::Error>>()
        || err.is::<crate::RetryError<tower::timeout::error::Elapsed>>()
}

/// The error classifier: see [`classify_error`]. Successes (`Ok`) are successes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Errors;

impl<Res, E: AsError> Classify<Res, E> for Errors {
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) if e.gave_up() => Outcome::Fail {
                kind: ErrorKind::GaveUp,
            },
            Err(e) => classify_error(e.as_error()),
        }
    }
}
