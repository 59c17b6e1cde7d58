//! Classifying errors returned by the inner service (transport failures).

use std::error::Error as StdError;
use std::io;

use super::{AsError, Classify, ErrorKind, Outcome};

pub(crate) fn is_gave_up(err: &(dyn StdError + 'static)) -> bool {
    // The common shapes of an inner layer's error as seen by an outer one (boxed between
    // them): over the error types `AsError` knows, so that a client's own error (hyper-util,
    // reqwest) left unmapped inside does not make the outer layer retry again.
    let known = err.is::<crate::RetryError<Box<dyn StdError + Send + Sync>>>()
        || err.is::<crate::RetryError<io::Error>>()
        || err.is::<crate::RetryError<tower::timeout::error::Elapsed>>();
    #[cfg(feature = "hyper-util")]
    let known = known || err.is::<crate::RetryError<hyper_util::client::legacy::Error>>();
    #[cfg(feature = "reqwest")]
    let known = known || err.is::<crate::RetryError<reqwest::Error>>();
    known
}

/// The error classifier: see [`Errors::classify_error`]. Successes (`Ok`) are successes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Errors;

impl Errors {
    /// Classifies a transport error by walking its source chain.
    ///
    /// Retryable: tower's timeout `Elapsed`, `io::ErrorKind::TimedOut` (→ [`ErrorKind::Timeout`]);
    /// connection refused, reset, aborted, not connected, broken pipe, unexpected EOF, and
    /// hyper's "connection closed before the message completed" and "request canceled"
    /// (→ [`ErrorKind::Connect`]). An error an inner retry layer of this crate already gave up on
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
}

impl<Res, E: AsError> Classify<Res, E> for Errors {
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) if e.gave_up() => Outcome::Fail {
                kind: ErrorKind::GaveUp,
            },
            Err(e) => Errors::classify_error(e.as_error()),
        }
    }
}
