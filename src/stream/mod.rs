//! Streamed LLM responses: retried before the first token, never after, and always visible.
//!
//! Most LLM traffic is streamed (server-sent events), and providers fail inside the stream:
//! a `200` followed by Anthropic's `event: error` (`overloaded_error`) or OpenAI's
//! `{"error": ...}` event, a connection that drops before the first delta, a provider that
//! accepts the request and then sends nothing. [`StreamGuardLayer`], placed *inside*
//! [`RetryLayer`](crate::RetryLayer), moves an attempt's commit point from its headers to its
//! first *content* event:
//!
//! - **Before it**, the layer holds what arrived (comments such as `: keep-alive`, `ping`
//!   events, empty lines, configured preamble events: only that prefix is buffered) and
//!   turns a failure into a [`FirstTokenError`] that the retry layer's classifier retries
//!   under the usual rules (bounds, backoff, the same idempotency key, budgets, stats): a
//!   dropped connection or body error ([`ErrorKind::Connect`](crate::ErrorKind)), an in-band
//!   error event (mapped by [`InBandError`]: overloaded and rate limits are retried, quota and
//!   invalid requests are not), and a time-to-first-token timeout
//!   ([`StreamGuardLayer::first_token_timeout`], [`ErrorKind::Timeout`](crate::ErrorKind)).
//! - **After it**, the held prefix and then the rest of the stream go to the caller as they
//!   arrive, and nothing is retried (that would duplicate output). A failure reaches the
//!   caller as a [`MidStreamError`] in the body (how many events and bytes were delivered,
//!   and the cause) and is counted in [`RetryStats`] as a mid-stream failure of the
//!   operation ([`KindSnapshot::mid_stream_failures`](crate::observe::KindSnapshot)).
//!
//! Only successful (2xx) responses are guarded: a `text/event-stream` response is read as
//! server-sent events; with [`StreamGuardLayer::chunked_streams`], any other response
//! without a `Content-Length` is guarded with its first byte as the commit point. Everything
//! else passes through.
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower_retry_guard::RetryLayer;
//! use tower_retry_guard::stream::StreamGuardLayer;
//!
//! let retry = RetryLayer::new();
//! let guard = StreamGuardLayer::new()
//!     .first_token_timeout(Duration::from_secs(20))
//!     .stats(retry.stats()); // mid-stream failures next to the retries
//! let client = ServiceBuilder::new()
//!     .layer(retry) // outside: decides and retries
//!     .layer(guard) // inside: finds the commit point of each attempt
//!     .service_fn(|req: http::Request<String>| async move {
//!         Ok::<_, std::io::Error>(http::Response::new(req.into_body()))
//!     });
//! # let _ = client;
//! ```
//!
//! For reqwest (feature `reqwest`), the layer wraps a `reqwest::Client` the same way: the
//! response stays a `reqwest::Response`, whose body errors carry the [`MidStreamError`] in
//! their source chain ([`MidStreamError::find`]).

mod body;
mod error;
mod future;
#[cfg(feature = "reqwest")]
mod reqwest;
mod sse;

pub use self::body::GuardedBody;
pub use self::error::{FirstTokenError, InBandError, MidStreamError, StreamFailure};
pub use self::future::ResponseFuture;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tower::{BoxError, Layer, Service};

use self::body::{OpName, Recorder};
use crate::observe::RetryStats;
use crate::request::{Operation, RequestView};

type OperationFn = Arc<dyn Fn(&RequestView<'_>) -> Option<Operation> + Send + Sync>;

/// The default cap of the held prefix: 64 KiB.
pub const DEFAULT_MAX_PREFIX: usize = 64 * 1024;

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) first_token_timeout: Option<Duration>,
    pub(crate) max_prefix: usize,
    pub(crate) chunked: bool,
    pub(crate) preamble: Arc<[Box<str>]>,
    stats: Option<RetryStats>,
    operation_fn: Option<OperationFn>,
}

/// Finds each streamed attempt's commit point (its first content event) and makes failures
/// before it retryable; see the [module docs](self). Place it inside the retry layer.
#[derive(Clone)]
pub struct StreamGuardLayer {
    config: Arc<Config>,
}

impl Default for StreamGuardLayer {
    fn default() -> Self {
        StreamGuardLayer::new()
    }
}

impl StreamGuardLayer {
    /// No first-token timeout, a 64 KiB prefix cap, SSE responses only, no stats.
    pub fn new() -> Self {
        StreamGuardLayer {
            config: Arc::new(Config {
                first_token_timeout: None,
                max_prefix: DEFAULT_MAX_PREFIX,
                chunked: false,
                preamble: Arc::from(Vec::new()),
                stats: None,
                operation_fn: None,
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        // Copied only when a clone of the layer shares it.
        let config = Arc::make_mut(&mut self.config);
        f(config);
        self
    }

    /// Fails an attempt whose first content event has not arrived within `timeout` of the
    /// request being sent (headers included) with a retryable
    /// [`ErrorKind::Timeout`](crate::ErrorKind). Distinct from a per-attempt timeout (which
    /// would also cut a long answer mid-way); it applies to every call through the layer, so
    /// put the layer on streaming calls, or pick a bound that non-streamed calls meet too.
    pub fn first_token_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.first_token_timeout = Some(timeout))
    }

    /// The most bytes held while waiting for the first content event (default
    /// [`DEFAULT_MAX_PREFIX`]). Past it the stream is committed as it is (and warned about):
    /// memory stays bounded whatever a server sends before its content.
    pub fn max_prefix(self, bytes: usize) -> Self {
        self.with(|c| c.max_prefix = bytes)
    }

    /// Also guards successful responses that are not `text/event-stream` and have no
    /// `Content-Length` (chunked streams of any format): the first data byte is the commit
    /// point (default `false`).
    pub fn chunked_streams(self, guard: bool) -> Self {
        self.with(|c| c.chunked = guard)
    }

    /// An SSE event name that is held like a keep-alive rather than counted as content, for
    /// providers that open with bookkeeping events: with `"message_start"` and
    /// `"content_block_start"`, an Anthropic stream commits at its first delta, and an
    /// `overloaded_error` right after `message_start` is still retried.
    pub fn preamble_event(self, name: impl Into<String>) -> Self {
        let name: Box<str> = name.into().into_boxed_str();
        self.with(|c| {
            let mut names: Vec<Box<str>> = c.preamble.iter().cloned().collect();
            names.push(name);
            c.preamble = Arc::from(names);
        })
    }

    /// Where mid-stream failures are counted: pass the retry layer's
    /// ([`RetryLayer::stats`](crate::RetryLayer::stats)) so they appear next to
    /// its retries, per operation.
    pub fn stats(self, stats: RetryStats) -> Self {
        self.with(|c| c.stats = Some(stats))
    }

    /// Names the operation of a request for the stats, as
    /// [`RetryLayer::operation_fn`](crate::RetryLayer::operation_fn) does (give both the same
    /// closure). An [`Operation`] extension on the request wins; the default is the method
    /// and path.
    pub fn operation_fn<F>(self, f: F) -> Self
    where
        F: Fn(&RequestView<'_>) -> Option<Operation> + Send + Sync + 'static,
    {
        self.with(|c| c.operation_fn = Some(Arc::new(f)))
    }
}

impl fmt::Debug for StreamGuardLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamGuardLayer")
            .field("first_token_timeout", &self.config.first_token_timeout)
            .field("max_prefix", &self.config.max_prefix)
            .field("chunked_streams", &self.config.chunked)
            .field("preamble", &self.config.preamble)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for StreamGuardLayer {
    type Service = StreamGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StreamGuard {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service of [`StreamGuardLayer`].
#[derive(Clone)]
pub struct StreamGuard<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for StreamGuard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamGuard")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> StreamGuard<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, by value.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The recorder of a request's mid-stream failures (`None` without stats). The name is
    /// kept unformatted: only a failure formats it.
    fn recorder(&self, view: &RequestView<'_>) -> Option<Recorder> {
        let stats = self.config.stats.as_ref()?;
        let named = view
            .extensions
            .and_then(|e| e.get::<Operation>().cloned())
            .or_else(|| self.config.operation_fn.as_ref().and_then(|f| f(view)));
        let operation = match (named, view.method, view.uri) {
            (Some(op), _, _) => OpName::Named(op),
            (None, Some(m), Some(u)) => OpName::MethodPath(m.clone(), u.clone()),
            (None, _, _) => OpName::Named(Operation::from_static("call")),
        };
        Some(Recorder {
            stats: stats.clone(),
            operation,
        })
    }
}

/// A response the guard can look into: its headers and a body to read.
///
/// Implemented for `http::Response<B>` and, with the `reqwest` feature, for
/// `reqwest::Response`. Sealed: the guard's conversions are its own business.
pub trait StreamResponse: sealed::Sealed + Sized {
    /// The body read to the commit point.
    type Body;
    /// What the conversion to `http::Response` keeps aside (reqwest's URL).
    #[doc(hidden)]
    type Extra;
    /// The response handed to the caller.
    type Output;
    /// Splits into an `http::Response` and what is kept aside.
    #[doc(hidden)]
    fn into_http(self) -> (Response<Self::Body>, Self::Extra);
    /// Rebuilds the caller's response around the guarded body.
    #[doc(hidden)]
    fn finish(response: Response<GuardedBody<Self::Body>>, extra: Self::Extra) -> Self::Output;
}

mod sealed {
    pub trait Sealed {}
    impl<B> Sealed for http::Response<B> {}
    #[cfg(feature = "reqwest")]
    impl Sealed for reqwest::Response {}
}

impl<B> StreamResponse for Response<B> {
    type Body = B;
    type Extra = ();
    type Output = Response<GuardedBody<B>>;

    fn into_http(self) -> (Response<B>, ()) {
        (self, ())
    }

    fn finish(response: Response<GuardedBody<B>>, _: ()) -> Self::Output {
        response
    }
}

impl<S, ReqB, B> Service<Request<ReqB>> for StreamGuard<S>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Response = Response<GuardedBody<B>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, Response<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let recorder = self.recorder(&RequestView {
            method: Some(request.method()),
            uri: Some(request.uri()),
            headers: Some(request.headers()),
            extensions: Some(request.extensions()),
        });
        ResponseFuture::new(self.inner.call(request), self.config.clone(), recorder)
    }
}
