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

use super::body::{BoxError, IdempotencyBody};
use super::config::ConfigError;
use super::memory::MemoryIdempotencyStore;
use super::store::{IdempotencyStore, ScopedKey};

mod admit;
mod respond;
mod run;

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
type RecoveryFn =
    Arc<dyn Fn(&ScopedKey) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// What to do when a retry finds that the first request with its key started and never
/// finished: its lease ran out without a result (its process died, or lost the store for a
/// whole lease), so whether its side effect happened is unknown.
///
/// The default, [`UnknownOutcome::refuse`], is the safe one: the request is not run again,
/// and the retry gets `500` with a problem of type `urn:tower-retry-guard:outcome-unknown`
/// and `Idempotent-Replayed: true` (a client's retry layer stops there). Stripe and
/// brandur's "recovery points" go further by making the handler itself resumable; this
/// layer cannot know how far a handler got, so re-running is the user's explicit choice:
/// [`UnknownOutcome::rerun`] always, or [`UnknownOutcome::ask`] per key (say, after
/// checking the side effect's own record: was the email sent?).
#[derive(Clone)]
pub struct UnknownOutcome(Recovery);

#[derive(Clone)]
enum Recovery {
    Refuse,
    Rerun,
    Ask(RecoveryFn),
}

impl UnknownOutcome {
    /// Never run it again (the default).
    pub fn refuse() -> Self {
        UnknownOutcome(Recovery::Refuse)
    }

    /// Run it again (the retry takes the claim over): only for handlers whose side effect is
    /// idempotent on its own.
    pub fn rerun() -> Self {
        UnknownOutcome(Recovery::Rerun)
    }

    /// Ask `decide` for each such key: `true` runs the request again, `false` refuses it.
    pub fn ask<F, Fut>(decide: F) -> Self
    where
        F: Fn(&ScopedKey) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        UnknownOutcome(Recovery::Ask(Arc::new(move |key| Box::pin(decide(key)))))
    }

    pub(super) async fn allows_rerun(&self, key: &ScopedKey) -> bool {
        match &self.0 {
            Recovery::Refuse => false,
            Recovery::Rerun => true,
            Recovery::Ask(decide) => decide(key).await,
        }
    }
}

impl Default for UnknownOutcome {
    fn default() -> Self {
        UnknownOutcome::refuse()
    }
}

impl fmt::Debug for UnknownOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Recovery::Refuse => "UnknownOutcome::Refuse",
            Recovery::Rerun => "UnknownOutcome::Rerun",
            Recovery::Ask(_) => "UnknownOutcome::Ask",
        })
    }
}

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

/// The shortest lease: renewals every third of it must reach the store in time.
const MIN_LEASE: Duration = Duration::from_millis(100);
/// The longest TTL (a year).
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// The largest body read or stored (1 GiB).
const MAX_BODY: usize = 1 << 30;

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
        IdempotencyLayerBuilder {
            store: MemoryIdempotencyStore::new(),
            config: Config::default(),
        }
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

/// Builds an [`IdempotencyLayer`]; [`build`](Self::build) checks the settings.
#[derive(Debug)]
pub struct IdempotencyLayerBuilder<St> {
    store: St,
    config: Config,
}

impl<St> IdempotencyLayerBuilder<St> {
    /// Where keys live (default: a new [`MemoryIdempotencyStore`]).
    pub fn store<St2: IdempotencyStore>(self, store: St2) -> IdempotencyLayerBuilder<St2> {
        IdempotencyLayerBuilder {
            store,
            config: self.config,
        }
    }

    /// The request header carrying the key (default `Idempotency-Key`).
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.config.header = name;
        self
    }

    /// The methods whose requests must carry a key (default `POST`, `PATCH`); others get 400
    /// without one. A key on another unsafe method (`PUT`, `DELETE`, ...) is honoured too;
    /// a key on a safe method (`GET`, `HEAD`, ...) is ignored, so naming one is an error.
    pub fn require_key_for(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.required = methods.into_iter().collect();
        self
    }

    /// How long a finished result (or the record of a claim) is kept (default 24 h, as
    /// Stripe keeps keys; at least the lease, at most a year).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// How long a claim holds without a renewal (default 60 s, at least 100 ms). The layer
    /// renews it every third of it while the handler runs and its response streams. A claim
    /// whose lease runs out (its process died, or lost the store for a whole lease) is
    /// abandoned: see [`UnknownOutcome`]; it is never simply claimed again.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// The longest a claim is renewed (default 10 min): a handler still running after it
    /// loses its claim to [`UnknownOutcome`], and a response still streaming after it is
    /// relayed to its end but not recorded (retries get a "not replayable" answer), so no
    /// key is held forever by a stream that never ends.
    pub fn max_claim_time(mut self, max: Duration) -> Self {
        self.config.max_claim_time = max;
        self
    }

    /// The largest request body read to fingerprint a keyed request (default 1 MiB, at most
    /// 1 GiB); a larger one gets 413.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.config.max_request_body = bytes;
        self
    }

    /// The largest response body stored (default 1 MiB, at most 1 GiB); see
    /// [`OversizedResponse`]. Responses are relayed to the client as they are produced,
    /// whatever their size.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.config.max_response_body = bytes;
        self
    }

    /// Whether 5xx responses (other than the [`release_statuses`](Self::release_statuses))
    /// are stored and replayed (default `true`).
    ///
    /// As Stripe does once execution began: a handler that failed with 500 may have done part
    /// of its side effects, and running it again could do them twice. A handler that knows it
    /// did nothing can say so per response with [`ReleaseKey`]. With `false`, every 5xx
    /// releases the key and a retry runs the request again.
    pub fn store_server_errors(mut self, store: bool) -> Self {
        self.config.store_server_errors = store;
        self
    }

    /// The statuses that mean "not processed, try again" and release the key instead of
    /// being stored (default 429, 503 and 529), so the client's retry gets a fresh attempt
    /// rather than the replayed refusal.
    pub fn release_statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.config.release_statuses = statuses.into_iter().collect();
        self
    }

    /// What to do with a response too large to store (default
    /// [`OversizedResponse::ReplayError`]).
    pub fn on_oversized_response(mut self, what: OversizedResponse) -> Self {
        self.config.oversized = what;
        self
    }

    /// What to do when a retry finds its first request abandoned (default
    /// [`UnknownOutcome::refuse`]).
    pub fn on_unknown_outcome(mut self, what: UnknownOutcome) -> Self {
        self.config.unknown = what;
        self
    }

    /// Scopes keys by principal (a user, an API key, a tenant) read from the request: a key
    /// replays only responses of the same principal. `None` is the global scope (shared by
    /// every request without a principal), unless [`principal_required`](Self::principal_required).
    pub fn principal<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config.principal = Some(Arc::new(f));
        self
    }

    /// Refuses a keyed request whose principal cannot be read with 401, instead of putting
    /// it in the global scope. Needs [`principal`](Self::principal).
    pub fn principal_required(mut self) -> Self {
        self.config.principal_required = true;
        self
    }

    /// The layer, or the first setting that cannot work.
    pub fn build(self) -> Result<IdempotencyLayer<St>, ConfigError> {
        let c = &self.config;
        let err =
            |setting, problem: &str| Err(ConfigError::new("idempotency layer", setting, problem));
        if c.lease < MIN_LEASE {
            return err(
                "lease",
                &format!(
                    "is {:?}: a claim must hold at least {MIN_LEASE:?} (it is renewed every third of it)",
                    c.lease
                ),
            );
        }
        if c.ttl < c.lease || c.ttl > MAX_TTL {
            return err(
                "ttl",
                &format!(
                    "is {:?}: it must be at least the lease ({:?}) and at most a year",
                    c.ttl, c.lease
                ),
            );
        }
        if c.max_claim_time < c.lease {
            return err(
                "max_claim_time",
                &format!(
                    "is {:?}: it must be at least the lease ({:?})",
                    c.max_claim_time, c.lease
                ),
            );
        }
        if c.max_request_body > MAX_BODY {
            return err("max_request_body", "is over 1 GiB");
        }
        if c.max_response_body > MAX_BODY {
            return err("max_response_body", "is over 1 GiB");
        }
        if let Some(m) = c.required.iter().find(|m| m.is_safe()) {
            return err(
                "require_key_for",
                &format!("names {m}, a safe method: keys on safe methods are ignored"),
            );
        }
        if c.principal_required && c.principal.is_none() {
            return err(
                "principal_required",
                "needs a `principal` function to read the principal with",
            );
        }
        Ok(IdempotencyLayer {
            store: self.store,
            config: Arc::new(self.config),
        })
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
