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
//! - [`Grpc`]: gRPC calls (tonic channels): `grpc-status` `UNAVAILABLE` retried, with
//!   `grpc-retry-pushback-ms` as the hint (see [gRPC](#grpc-tonic) below);
//! - any closure `Fn(&Result<Res, E>) -> Outcome`;
//! - [`Classify::or`] to let a second classifier decide what the first calls a success
//!   (for example a body validator after the HTTP preset); the [`RetryInfo`] reaches the
//!   response through whichever of the two attaches it.
//!
//! # gRPC (tonic)
//!
//! A tonic `Channel` is a `tower::Service<http::Request<tonic::body::Body>>`, so the layer
//! goes under any generated client. Three pieces make gRPC calls retryable, as gRPC's own
//! retry design (A6) retries them:
//!
//! - [`Grpc`] classifies the trailers-only responses of calls that failed before their first
//!   message (`UNAVAILABLE`; `RESOURCE_EXHAUSTED` only with a pushback; a negative
//!   `grpc-retry-pushback-ms` stops);
//! - [`HeaderNames::grpc`](crate::request::HeaderNames::grpc) stamps `grpc-previous-rpc-attempts` on
//!   retries (absent on the first attempt, `1` on the first retry);
//! - [`BufferRequestBodyLayer`](crate::body::BufferRequestBodyLayer) keeps the encoded request
//!   message (up to a limit) so it can be sent again; a larger request goes once, unretried
//!   (the layer warns: "cannot be cloned"). It reads the request body before the first
//!   attempt, and stops waiting when the stream stalls (100 ms by default): a
//!   client-streaming or bidirectional call whose request stream stays open goes once,
//!   unbuffered and unretried, rather than hang.
//!
//! ```no_run
//! use tonic::body::Body;
//! use tonic::transport::Channel;
//! use tower::{BoxError, ServiceBuilder};
//! use tower_retry_guard::classify::Grpc;
//! use tower_retry_guard::body::{BufferRequestBodyLayer, BufferedBody};
//! use tower_retry_guard::request::HeaderNames;
//! use tower_retry_guard::{RetryLayer, RetryPolicy};
//!
//! # async fn run() -> Result<(), BoxError> {
//! let channel = Channel::from_static("http://127.0.0.1:50051").connect().await?;
//! let retry = RetryLayer::new()
//!     .classify(Grpc::new())
//!     .header_names(HeaderNames::grpc())
//!     .policy(RetryPolicy::builder().max_retries(4).build()?); // A6: at most 5 attempts
//! let channel = ServiceBuilder::new()
//!     .layer(BufferRequestBodyLayer::new(64 * 1024))
//!     .layer(retry)
//!     .map_request(|req: http::Request<BufferedBody<Body>>| req.map(Body::new))
//!     .map_err(BoxError::from)
//!     .service(channel);
//! // A generated client takes it as it is (`GreeterClient::new(channel)`), as does tonic's own:
//! let mut client = tonic::client::Grpc::new(channel);
//! client.ready().await?;
//! # Ok(()) }
//! ```
//!
//! **Which calls are retried.** A gRPC call is an HTTP POST, so it is
//! [`SideEffect::SideEffecting`](crate::SideEffect): the layer's rule holds, it is retried
//! only with an idempotency key. By default the layer mints one and sends it as
//! `idempotency-key` metadata, the same on every attempt. `UNAVAILABLE` does not prove that
//! the server did nothing (a handler may return it after its side effect, when a backend of
//! its own fails), so the key is what lets the server run the call once. A server that does
//! not deduplicate on that key gets A6's rule instead: the service owner names the methods
//! that are safe to repeat, and nothing else is retried:
//!
//! ```
//! use tower_retry_guard::classify::Grpc;
//! use tower_retry_guard::request::HeaderNames;
//! use tower_retry_guard::RetryLayer;
//!
//! let retry = RetryLayer::new()
//!     .classify(Grpc::new())
//!     .header_names(HeaderNames::grpc())
//!     // A whole service (ending with '/') or one method.
//!     .side_effect_fn(Grpc::idempotent_methods(["/shop.Catalog/", "/shop.Orders/Get"]))
//!     .idempotency_keys(false); // other methods: side-effecting without a key, not retried
//! # let _ = retry;
//! ```
//!
//! The call's deadline covers all its attempts (A6): keep the policy's
//! [`max_total_time`](crate::RetryPolicyBuilder::max_total_time) within the deadline the
//! client sets (`grpc-timeout`, which the layer does not shorten on retries).

mod as_error;
mod error;
mod grpc;
mod http;
mod kind;

pub use self::as_error::AsError;
pub use self::error::Errors;
pub(crate) use self::error::is_gave_up;
pub use self::grpc::Grpc;
pub use self::http::LlmHttp;
pub use self::kind::{ErrorKind, Outcome};

/// Retry at one layer only: a failing response that already carries an inner retry layer's
/// [`RetryInfo`](crate::RetryInfo) is that layer's final answer, not retried again here.
pub(crate) fn unless_inner_gave_up(outcome: Outcome, extensions: &::http::Extensions) -> Outcome {
    if !matches!(outcome, Outcome::Success) && extensions.get::<crate::RetryInfo>().is_some() {
        Outcome::Fail {
            kind: ErrorKind::GaveUp,
        }
    } else {
        outcome
    }
}

/// Crate-internal shorthand for [`Errors::classify_error`].
pub(crate) fn classify_error(error: &(dyn std::error::Error + 'static)) -> Outcome {
    Errors::classify_error(error)
}

use crate::observe::RetryInfo;

/// Decides what an attempt's result means.
///
/// Called by the layer once after every attempt, with the attempt's result, before anything
/// else is decided. It must be cheap and must not block: it runs on the success path.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot classify a `Result<{Res}, {E}>`",
    note = "the `LlmHttp` preset classifies `http::Response<B>` (and `reqwest::Response` with the `reqwest` feature) with an error that implements `AsError` (`BoxError`, `io::Error`, ...): add `.map_err(BoxError::from)` under the retry layer",
    note = "any closure `Fn(&Result<Res, E>) -> Outcome` is a classifier too"
)]
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

    /// The HTTP status of an attempt's response, if the result is one: recorded as
    /// `http.response.status_code` on the attempt's span. Called only when a tracing
    /// subscriber records that span (never on an untraced success path); the default knows
    /// none.
    fn status_code(&self, result: &Result<Res, E>) -> Option<u16> {
        let _ = result;
        None
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

    fn status_code(&self, result: &Result<Res, E>) -> Option<u16> {
        self.first
            .status_code(result)
            .or_else(|| self.next.status_code(result))
    }
}
