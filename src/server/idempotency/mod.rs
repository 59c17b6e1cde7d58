//! [`IdempotencyLayer`] / [`Idempotency`]: the Idempotency-Key semantics for HTTP servers.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tower::{Layer, Service};

use super::body::IdempotencyBody;
use super::memory::MemoryIdempotencyStore;
use super::store::IdempotencyStore;
use tower::BoxError;

pub use self::builder::IdempotencyLayerBuilder;
/// Shared with the function-level dedupe (`crate::guard`): one way to keep and end a claim.
pub(crate) use self::claim::{LeaseKeeper, release_later};
pub use self::unknown::UnknownOutcome;

mod admit;
mod builder;
mod claim;
mod record;
mod respond;
mod run;
mod unknown;

/// `Idempotent-Replayed`: set to `true` on a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// `Idempotency-Key`: the default request header carrying the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Put this in a response's extensions to have the layer release the key instead of storing
/// the response: the handler tells it that nothing happened and a retry may run (say, it
/// refused the request before any side effect because it is overloaded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReleaseKey;

/// What to do with a response that cannot be stored: its body is larger than the limit (or it
/// failed while being read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OversizedResponse {
    /// The default. The first client gets the response as it is; the store keeps a marker
    /// that replays `500 Internal Server Error` (with `Idempotent-Replayed: true` and a
    /// problem body saying the result was too large to keep). The request ran; a retry with
    /// the same key must not run it again, and this is the only choice that guarantees it.
    #[default]
    ReplayError,
    /// The first client gets the response as it is; the key is released (with a warning), so
    /// a retry runs the request again. Only for handlers that are idempotent anyway.
    Release,
}

type PrincipalFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;
/// 529: "overloaded", as Anthropic answers.
const OVERLOADED: u16 = 529;

#[derive(Clone)]
struct Config {
    header: HeaderName,
    required: Vec<Method>,
    ttl: Duration,
    lease: Duration,
    max_claim_time: Duration,
    max_request_body: usize,
    max_response_body: usize,
    store_server_errors: bool,
    release_statuses: Vec<StatusCode>,
    oversized: OversizedResponse,
    principal: Option<PrincipalFn>,
    principal_required: bool,
    unknown: UnknownOutcome,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            header: IDEMPOTENCY_KEY,
            required: vec![Method::POST, Method::PATCH],
            ttl: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(60),
            max_claim_time: Duration::from_secs(10 * 60),
            max_request_body: 1 << 20,
            max_response_body: 1 << 20,
            store_server_errors: true,
            release_statuses: [429, 503, OVERLOADED]
                .into_iter()
                .filter_map(|s| StatusCode::from_u16(s).ok())
                .collect(),
            oversized: OversizedResponse::ReplayError,
            principal: None,
            principal_required: false,
            unknown: UnknownOutcome::refuse(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("header", &self.header)
            .field("required", &self.required)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("max_claim_time", &self.max_claim_time)
            .field("max_request_body", &self.max_request_body)
            .field("max_response_body", &self.max_response_body)
            .field("store_server_errors", &self.store_server_errors)
            .field("release_statuses", &self.release_statuses)
            .field("oversized", &self.oversized)
            .field("principal", &self.principal.is_some())
            .field("principal_required", &self.principal_required)
            .field("unknown", &self.unknown)
            .finish()
    }
}

/// A layer that makes requests with an `Idempotency-Key` run once (the IETF
/// Idempotency-Key draft's semantics). See the [module docs](super) for the rules.
///
/// Defaults: header `Idempotency-Key`; a key required on `POST` and `PATCH`; results kept
/// 24 h; claims leased for 60 s (renewed while the handler runs and its response streams,
/// for at most 10 min); request bodies up to 1 MiB; responses up to 1 MiB stored; 429, 503
/// and 529 release the key (nothing was processed: the client's retry runs it), other 5xx
/// are stored; [`OversizedResponse::ReplayError`]; [`UnknownOutcome::refuse`]; one global
/// scope. [`IdempotencyLayer::builder`] changes them.
///
/// ```
/// use std::time::Duration;
/// use tower_retry_guard::server::{IdempotencyLayer, MemoryIdempotencyStore};
///
/// let layer = IdempotencyLayer::builder()
///     .store(MemoryIdempotencyStore::new())
///     .ttl(Duration::from_secs(24 * 3600))
///     .principal(|parts| {
///         let user = parts.headers.get("x-tenant")?.to_str().ok()?;
///         Some(user.to_owned())
///     })
///     .principal_required()
///     .build()
///     .expect("valid settings");
/// # let _ = layer;
///
/// // A setting that cannot work is refused, by name.
/// let bad = IdempotencyLayer::builder().lease(Duration::ZERO).build();
/// assert_eq!(bad.unwrap_err().setting(), "lease");
/// ```
#[derive(Clone, Debug)]
pub struct IdempotencyLayer<St = MemoryIdempotencyStore> {
    store: St,
    config: Arc<Config>,
}

impl IdempotencyLayer<MemoryIdempotencyStore> {
    /// A layer with a new [`MemoryIdempotencyStore`] and the defaults.
    pub fn memory() -> Self {
        IdempotencyLayer::new(MemoryIdempotencyStore::new())
    }

    /// A builder, over a new [`MemoryIdempotencyStore`] until [`store`](IdempotencyLayerBuilder::store) names another.
    pub fn builder() -> IdempotencyLayerBuilder<MemoryIdempotencyStore> {
        IdempotencyLayerBuilder::new(MemoryIdempotencyStore::new())
    }
}

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// A layer over `store`, with the defaults.
    pub fn new(store: St) -> Self {
        IdempotencyLayer {
            store,
            config: Arc::new(Config::default()),
        }
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }
}

impl<S, St: Clone> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
///
/// A keyed request's body is read whole (to fingerprint it) and handed on rebuilt from
/// [`Bytes`], so the request body type must implement `From<Bytes>` (axum's `Body`,
/// `http_body_util::Full<Bytes>`, ...); under a bare hyper server, map `Incoming` into one of
/// those first. Responses are [`IdempotencyBody`]: replays and the layer's own answers
/// buffered; the handler's response relayed frame by frame as it is produced (recorded on the
/// way for replays, up to the storage limit), so a streamed (SSE) response reaches the client
/// as fast as without the layer.
#[derive(Clone, Debug)]
pub struct Idempotency<S, St = MemoryIdempotencyStore> {
    inner: S,
    store: St,
    config: Arc<Config>,
}

type BoxResponseFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<IdempotencyBody<B>>, E>> + Send>>;

/// The future of [`Idempotency`].
pub struct ResponseFuture<B, E> {
    inner: BoxResponseFuture<B, E>,
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<IdempotencyBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<S, St, B, ResBody> Service<Request<B>> for Idempotency<S, St>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<IdempotencyBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            inner: Box::pin(admit::handle(
                inner,
                self.store.clone(),
                self.config.clone(),
                req,
            )),
        }
    }
}
