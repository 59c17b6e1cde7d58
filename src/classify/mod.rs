//! Deciding, after each attempt, whether the call succeeded, may be retried, or failed.
//!
//! A [`Classify`] is called once per attempt with the attempt's result and answers an
//! [`Outcome`]. It never decides *whether the retry happens* — attempts, deadline, side
//! effects and budgets are the layer's business — only what the result means.
//!
//! Built in:
//! - [`LlmHttp`]: the preset for LLM provider APIs over HTTP (status codes,
//!   `x-should-retry`, `retry-after-ms`, `Retry-After`), with [`Errors`] for transport errors;
//! - [`Errors`]: timeouts and connection failures are retryable, anything else fails;
//! - any closure `Fn(&Result<Res, E>) -> Outcome`;
//! - [`Classify::or`] to let a second classifier decide what the first calls a success
//!   (for example a body validator after the HTTP preset); the [`RetryInfo`] reaches the
//!   response through whichever of the two attaches it.

mod as_error;
mod error;
mod http;
mod kind;

pub use self::as_error::AsError;
pub use self::error::Errors;
pub use self::http::LlmHttp;
pub use self::kind::{ErrorKind, Outcome};

use crate::observe::RetryInfo;

/// Decides what an attempt's result means.
///
/// Called by the layer once after every attempt, with the attempt's result, before anything
/// else is decided. It must be cheap and must not block: it runs on the success path.
pub trait Classify<Res, E> {
    /// Classifies one attempt's result.
    fn classify(&self, result: &Result<Res, E>) -> Outcome;

    /// Called once on the response the layer returns, to attach the call's [`RetryInfo`]
    /// (the HTTP preset puts it in the response's extensions). Returns the info if this
    /// classifier does not attach it, so that a combination ([`Classify::or`]) hands it to
    /// the next; the default attaches nothing and returns it.
    fn attach(&self, response: &mut Res, info: RetryInfo) -> Option<RetryInfo> {
        let _ = response;
        Some(info)
    }

    /// `self`, then `next` for what `self` calls a success: `LlmHttp.or(validate_output)`
    /// retries on the status first, then on the body. Either order keeps the
    /// [`RetryInfo`]: `self` attaches it, else `next`.
    fn or<N>(self, next: N) -> Or<Self, N>
    where
        Self: Sized,
        N: Classify<Res, E>,
    {
        Or { first: self, next }
    }
}

impl<Res, E, F> Classify<Res, E> for F
where
    F: Fn(&Result<Res, E>) -> Outcome,
{
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        self(result)
    }
}

/// Two classifiers in a row: see [`Classify::or`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Or<A, B> {
    first: A,
    next: B,
}

impl<Res, E, A, B> Classify<Res, E> for Or<A, B>
where
    A: Classify<Res, E>,
    B: Classify<Res, E>,
{
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        match self.first.classify(result) {
            Outcome::Success => self.next.classify(result),
            other => other,
        }
    }

    fn attach(&self, response: &mut Res, info: RetryInfo) -> Option<RetryInfo> {
        let info = self.first.attach(response, info)?;
        self.next.attach(response, info)
    }
}
