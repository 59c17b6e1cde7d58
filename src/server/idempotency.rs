//! [`IdempotencyLayer`] / [`Idempotency`]: the Idempotency-Key semantics for HTTP servers.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::{Layer, Service};

use super::CatchUnwind;
use super::body::{BoxError, IdempotencyBody};
use super::store::{
    Begin, Fingerprint, IdempotencyStore, MemoryIdempotencyStore, ScopedKey, Stored,
};
use crate::request::IdempotencyKey;

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

#[derive(Clone)]
struct Config {
    header: HeaderName,
    required: Vec<Method>,
    ttl: Duration,
    lease: Duration,
    max_request_body: usize,
    max_response_body: usize,
    store_server_errors: bool,
    oversized: OversizedResponse,
    principal: Option<PrincipalFn>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("header", &self.header)
            .field("required", &self.required)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("max_request_body", &self.max_request_body)
            .field("max_response_body", &self.max_response_body)
            .field("store_server_errors", &self.store_server_errors)
            .field("oversized", &self.oversized)
            .field("principal", &self.principal.is_some())
            .finish()
    }
}

/// A layer that makes requests with an `Idempotency-Key` run once (the IETF
/// Idempotency-Key draft's semantics). See the [module docs](super) for the rules.
///
/// Defaults: header `Idempotency-Key`; a key required on `POST` and `PATCH`; results kept
/// 24 h; claims leased for 60 s (renewed while the handler runs); request bodies up to 1 MiB; responses up to 1 MiB
/// stored; 5xx responses stored; [`OversizedResponse::ReplayError`]; one global scope.
#[derive(Clone, Debug)]
pub struct IdempotencyLayer<St = MemoryIdempotencyStore> {
    store: St,
    config: Arc<Config>,
}

impl IdempotencyLayer<MemoryIdempotencyStore> {
    /// A layer with a new [`MemoryIdempotencyStore`].
    pub fn memory() -> Self {
        IdempotencyLayer::new(MemoryIdempotencyStore::new())
    }
}

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// A layer over `store`, with the defaults.
    pub fn new(store: St) -> Self {
        IdempotencyLayer {
            store,
            config: Arc::new(Config {
                header: IDEMPOTENCY_KEY,
                required: vec![Method::POST, Method::PATCH],
                ttl: Duration::from_secs(24 * 60 * 60),
                lease: Duration::from_secs(60),
                max_request_body: 1 << 20,
                max_response_body: 1 << 20,
                store_server_errors: true,
                oversized: OversizedResponse::ReplayError,
                principal: None,
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The request header carrying the key (default `Idempotency-Key`).
    pub fn header_name(self, name: HeaderName) -> Self {
        self.with(|c| c.header = name)
    }

    /// The methods whose requests must carry a key (default `POST`, `PATCH`); others get 400
    /// without one. A key on another unsafe method (`PUT`, `DELETE`, ...) is honoured too;
    /// a key on a safe method (`GET`, `HEAD`, ...) is ignored.
    pub fn require_key_for(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with(|c| c.required = methods)
    }

    /// How long a finished result is kept (default 24 h, as Stripe keeps keys).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|c| c.ttl = ttl)
    }

    /// How long a claim holds without a result or a renewal (default 60 s). The layer renews
    /// the lease every third of it while the handler runs, so only a claim whose process died
    /// (or lost the store for a whole lease) runs out and may be claimed by a retry. (A handler
    /// that panics releases its claim at once.)
    pub fn lease(self, lease: Duration) -> Self {
        self.with(|c| c.lease = lease)
    }

    /// The largest request body read to fingerprint a keyed request (default 1 MiB); a larger
    /// one gets 413.
    pub fn max_request_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_request_body = bytes)
    }

    /// The largest response body stored (default 1 MiB); see [`OversizedResponse`].
    pub fn max_response_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_response_body = bytes)
    }

    /// Whether 5xx responses are stored and replayed (default `true`).
    ///
    /// As Stripe does once execution began: a handler that failed with 500 may have done part
    /// of its side effects, and running it again could do them twice. A handler that knows it
    /// did nothing can say so per response with [`ReleaseKey`]. With `false`, every 5xx
    /// releases the key and a retry runs the request again.
    pub fn store_server_errors(self, store: bool) -> Self {
        self.with(|c| c.store_server_errors = store)
    }

    /// What to do with a response too large to store (default
    /// [`OversizedResponse::ReplayError`]).
    pub fn on_oversized_response(self, what: OversizedResponse) -> Self {
        self.with(|c| c.oversized = what)
    }

    /// Scopes keys by principal (a user, an API key, a tenant) read from the request: a key
    /// replays only responses of the same principal. `None` is the global scope.
    pub fn principal<F>(self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        let f: PrincipalFn = Arc::new(f);
        self.with(|c| c.principal = Some(f))
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
/// those first. Responses are [`IdempotencyBody`]: stored and replayed ones buffered, the rest
/// streamed from the handler.
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
            inner: Box::pin(handle(inner, self.store.clone(), self.config.clone(), req)),
        }
    }
}

async fn handle<S, St, B, ResBody>(
    mut inner: S,
    store: St,
    config: Arc<Config>,
    req: Request<B>,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    // Two key headers are ambiguous: malformed (400), not "the first one".
    let key_header = crate::request::single_header(req.headers(), &config.header);
    let key = match key_header {
        _ if req.method().is_safe() => None,
        Err(e) => {
            let detail = format!("the `{}` header is not valid: {e}", config.header);
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "Idempotency key malformed",
                &detail,
            ));
        }
        Ok(key_header) => match key_header {
            None if config.required.contains(req.method()) => {
                let detail = format!(
                    "{} requests need an `{}` header (a unique string, such as a UUID, sent again unchanged on every retry)",
                    req.method(),
                    config.header
                );
                return Ok(problem(
                    StatusCode::BAD_REQUEST,
                    "Idempotency key missing",
                    &detail,
                ));
            }
            None => None,
            Some(value) => match IdempotencyKey::from_header(value) {
                Ok(key) => Some(key),
                Err(e) => {
                    let detail = format!("the `{}` header is not valid: {e}", config.header);
                    return Ok(problem(
                        StatusCode::BAD_REQUEST,
                        "Idempotency key malformed",
                        &detail,
                    ));
                }
            },
        },
    };
    let Some(key) = key else {
        let res = inner.call(req).await?;
        return Ok(res.map(IdempotencyBody::stream));
    };

    let (parts, body) = req.into_parts();
    let principal = config.principal.as_ref().and_then(|f| f(&parts));
    let key = ScopedKey::new(principal.as_deref(), key);
    let bytes = match Limited::new(body, config.max_request_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            let detail = format!(
                "requests with an idempotency key may carry at most {} bytes",
                config.max_request_body
            );
            return Ok(problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large",
                &detail,
            ));
        }
        Err(e) => {
            let detail = format!("the request body could not be read: {e}");
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "Request body unreadable",
                &detail,
            ));
        }
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let fingerprint = Fingerprint::of(&parts.method, path, &bytes);

    // From here on, everything runs in a task of its own: a client that hangs up drops this
    // future, not the claim nor the handler, which runs to the end and has its result stored.
    let req = Request::from_parts(parts, B::from(bytes));
    let task = tokio::spawn(claim_and_run(inner, store, config, key, fingerprint, req));
    match task.await {
        Ok(result) => result,
        // Only when the runtime shuts down (panics are caught in the task).
        Err(e) => {
            tracing::error!(error = %e, "idempotent request task failed");
            Ok(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Request aborted",
                "the request was aborted",
            ))
        }
    }
}

async fn claim_and_run<S, St, B, ResBody>(
    inner: S,
    store: St,
    config: Arc<Config>,
    key: ScopedKey,
    fingerprint: Fingerprint,
    req: Request<B>,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    St: IdempotencyStore,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    match store.begin(&key, fingerprint, config.lease).await {
        Ok(Begin::Claimed) => {}
        Ok(Begin::InFlight) => {
            let mut res = problem(
                StatusCode::CONFLICT,
                "Request in progress",
                "a request with this idempotency key is still being processed; retry later",
            );
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Ok(res);
        }
        Ok(Begin::Mismatch) => {
            return Ok(problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency key reused",
                "this idempotency key was used for a different request (method, path or body); use a new key for a new request",
            ));
        }
        Ok(Begin::Done(stored)) => {
            tracing::debug!(key = %key.key(), status = stored.status.as_u16(), "idempotent replay");
            return Ok(replay(stored));
        }
        Err(e) => {
            tracing::warn!(key = %key.key(), error = %e, "idempotency store failed; refusing the request");
            let mut res = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Idempotency store unavailable",
                "the request was not processed because its idempotency key could not be checked; retry later",
            );
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Ok(res);
        }
    }

    run(inner, store, config, key, req).await
}

enum Collected<B> {
    Whole {
        parts: http::response::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    },
    TooLarge {
        parts: http::response::Parts,
        prefix: Bytes,
        rest: Pin<Box<B>>,
    },
    Failed {
        parts: http::response::Parts,
        error: BoxError,
    },
}

async fn collect<B>(res: Response<B>, limit: usize) -> Collected<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = res.into_parts();
    let mut body = Box::pin(body);
    let mut buf = BytesMut::new();
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Err(e) => {
                return Collected::Failed {
                    parts,
                    error: e.into(),
                };
            }
            Ok(frame) => match frame.into_data() {
                Ok(data) => {
                    if buf.len().saturating_add(data.len()) > limit {
                        buf.extend_from_slice(&data);
                        return Collected::TooLarge {
                            parts,
                            prefix: buf.freeze(),
                            rest: body,
                        };
                    }
                    buf.extend_from_slice(&data);
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers.get_or_insert_with(HeaderMap::new).extend(t);
                    }
                }
            },
        }
    }
    Collected::Whole {
        parts,
        body: buf.freeze(),
        trailers,
    }
}

async fn run<S, St, B, ResBody>(
    mut inner: S,
    store: St,
    config: Arc<Config>,
    key: ScopedKey,
    req: Request<B>,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    St: IdempotencyStore,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let limit = config.max_response_body;
    let handler = CatchUnwind::new(async move {
        let res = inner.call(req).await?;
        Ok(collect(res, limit).await)
    });
    // Keep the claim alive while the handler runs: renew the lease every third of it, so a
    // slow handler never looks abandoned (only a dead process stops renewing).
    let every = (config.lease / 3).max(Duration::from_millis(10));
    let mut renewals = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut handler = std::pin::pin!(handler);
    // Ends when the handler does; each turn is one lease renewal.
    let outcome = loop {
        tokio::select! {
            out = &mut handler => break out,
            _ = renewals.tick() => {
                if let Err(e) = store.renew(&key, config.lease).await {
                    tracing::warn!(key = %key.key(), error = %e, "could not renew an idempotency lease");
                }
            }
        }
    };

    let collected = match outcome {
        Ok(Ok(collected)) => collected,
        Ok(Err(e)) => {
            release(&store, &key, "the inner service failed").await;
            return Err(e);
        }
        Err(_panic) => {
            release(&store, &key, "the handler panicked").await;
            return Ok(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal server error",
                "the request failed; it may be retried with the same idempotency key",
            ));
        }
    };

    match collected {
        Collected::Whole {
            parts,
            body,
            trailers,
        } => {
            let keep = parts.extensions.get::<ReleaseKey>().is_none()
                && (config.store_server_errors || !parts.status.is_server_error());
            if keep {
                let stored = Stored {
                    status: parts.status,
                    headers: storable_headers(&parts.headers),
                    body: body.clone(),
                };
                if let Err(e) = store.complete(&key, stored, config.ttl).await {
                    tracing::error!(key = %key.key(), error = %e, "could not store an idempotent response");
                }
            } else {
                release(&store, &key, "the response is not to be stored").await;
            }
            Ok(Response::from_parts(
                parts,
                IdempotencyBody::with_trailers(body, trailers),
            ))
        }
        Collected::TooLarge {
            parts,
            prefix,
            rest,
        } => {
            let why = format!(
                "the response (status {}) was larger than the {} bytes kept",
                parts.status.as_u16(),
                limit
            );
            unstorable(&store, &config, &key, &why).await;
            Ok(Response::from_parts(
                parts,
                IdempotencyBody::boxed(prefix, rest),
            ))
        }
        Collected::Failed { parts, error } => {
            let why = format!(
                "the response (status {}) failed while being read: {error}",
                parts.status.as_u16()
            );
            unstorable(&store, &config, &key, &why).await;
            Ok(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal server error",
                "the response failed while being produced",
            ))
        }
    }
}

async fn release<St: IdempotencyStore>(store: &St, key: &ScopedKey, why: &str) {
    tracing::debug!(key = %key.key(), why, "releasing idempotency key");
    if let Err(e) = store.release(key).await {
        tracing::error!(key = %key.key(), error = %e, "could not release an idempotency key; it is held until its lease ends");
    }
}

async fn unstorable<St: IdempotencyStore>(store: &St, config: &Config, key: &ScopedKey, why: &str) {
    match config.oversized {
        OversizedResponse::ReplayError => {
            tracing::warn!(key = %key.key(), why, "response not stored; retries with this key get 500");
            let marker = problem_stored(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Result not available",
                &format!(
                    "the request with this idempotency key was processed, but its result cannot be replayed: {why}. It will not be processed again with this key."
                ),
            );
            if let Err(e) = store.complete(key, marker, config.ttl).await {
                tracing::error!(key = %key.key(), error = %e, "could not store an idempotency marker");
            }
        }
        OversizedResponse::Release => {
            tracing::warn!(key = %key.key(), why, "response not stored; key released, a retry will run the request again");
            release(store, key, why).await;
        }
    }
}

fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        IDEMPOTENT_REPLAYED,
    ] {
        out.remove(name);
    }
    out
}

fn replay<B>(stored: Stored) -> Response<IdempotencyBody<B>> {
    let mut res = Response::new(IdempotencyBody::full(stored.body));
    *res.status_mut() = stored.status;
    *res.headers_mut() = stored.headers;
    res.headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    res
}

fn problem_stored(status: StatusCode, title: &str, detail: &str) -> Stored {
    let body = format!(
        r#"{{"type":"about:blank","title":"{}","status":{},"detail":"{}"}}"#,
        json_escape(title),
        status.as_u16(),
        json_escape(detail)
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    Stored {
        status,
        headers,
        body: Bytes::from(body),
    }
}

/// An RFC 9457 problem response.
fn problem<B>(status: StatusCode, title: &str, detail: &str) -> Response<IdempotencyBody<B>> {
    let stored = problem_stored(status, title, detail);
    let mut res = Response::new(IdempotencyBody::full(stored.body));
    *res.status_mut() = status;
    *res.headers_mut() = stored.headers;
    res
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_json() {
        assert_eq!(json_escape("a\"b\\c\n"), "a\\\"b\\\\c\\u000a");
    }
}
