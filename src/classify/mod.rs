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
//! - [`Classify::or_else`] to let a second classifier decide what the first calls a success
//!   (for example a body validator after the HTTP preset).
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
//! - [`HeaderNames::grpc`](crate::HeaderNames::grpc) stamps `grpc-previous-rpc-attempts` on
//!   retries (absent on the first attempt, `1` on the first retry);
//! - [`BufferRequestBodyLayer`](crate::BufferRequestBodyLayer) keeps the encoded request
//!   message (up to a limit) so it can be sent again; a larger request goes once, unretried
//!   (the layer warns: "cannot be cloned"). It reads the request body to its end before the
//!   first attempt: put this stack in front of unary and server-streaming calls, not in
//!   front of a client-streaming or bidirectional call whose request stream stays open.
//!
//! ```no_run
//! use tonic::body::Body;
//! use tonic::transport::Channel;
//! use tower::{BoxError, ServiceBuilder};
//! use tower_retry_guard::classify::Grpc;
//! use tower_retry_guard::{BufferRequestBodyLayer, BufferedBody, HeaderNames, RetryLayer, RetryPolicy};
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
//! use tower_retry_guard::{HeaderNames, RetryLayer};
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

mod error;
mod grpc;
mod http;

pub(crate) use self::error::is_gave_up;
pub use self::error::{AsError, Errors, classify_error};
pub use self::grpc::Grpc;
pub use self::http::{LlmHttp, is_quota_error, parse_retry_after, parse_retry_after_ms};

use std::fmt;
use std::time::Duration;

/// What an attempt's result means, as decided by a [`Classify`].
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

    /// Called once on the response the layer returns, to attach the call's
    /// [`RetryInfo`](crate::RetryInfo) (the HTTP preset puts it in the response's extensions).
    /// The default does nothing.
    fn attach(&self, response: &mut Res, info: crate::RetryInfo) {
        let _ = (response, info);
    }

    /// The same as [`Classify::or_else`]: `self`, or else `next` for what `self` calls a
    /// success (`LlmHttp.or(validate_output)`).
    fn or<N>(self, next: N) -> OrElse<Self, N>
    where
        Self: Sized,
        N: Classify<Res, E>,
    {
        OrElse { first: self, next }
    }

    /// Use `next` to classify what `self` calls a success (for example: the HTTP preset
    /// first, then a validator of the model's output).
    fn or_else<N>(self, next: N) -> OrElse<Self, N>
    where
        Self: Sized,
        N: Classify<Res, E>,
    {
        OrElse { first: self, next }
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

/// Two classifiers in a row: see [`Classify::or_else`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OrElse<A, B> {
    first: A,
    next: B,
}

impl<Res, E, A, B> Classify<Res, E> for OrElse<A, B>
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

    fn attach(&self, response: &mut Res, info: crate::RetryInfo) {
        self.first.attach(response, info);
    }
}
