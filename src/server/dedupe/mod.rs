//! [`DedupeLayer`] / [`Dedupe`]: one execution per key for any `tower::Service`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Layer, Service};

mod request;
mod state;

use self::state::{ScopedId, Shared, Slot, State};

pub use self::request::{DedupeError, KeyFn, ScopeFn};

use super::CatchUnwind;

#[derive(Debug, Clone, Copy)]
struct Config {
    ttl: Duration,
    cache_errors: bool,
    max_keys: usize,
    max_keys_per_scope: usize,
    sweep_every: Duration,
}

/// A layer that runs each keyed call of a service once: concurrent duplicates wait for the
/// first and share its result, later ones (within the TTL) get the kept result.
///
/// The first call runs in a task of its own, so a caller that gives up (drops its future)
/// does not cancel it: the result is kept for the retry. Requests without a key pass
/// through.
///
/// The service's response and error must be `Clone` (every duplicate gets a copy); map them
/// into an `Arc` first if they are not (`ServiceBuilder::map_response(Arc::new)`).
///
/// Defaults: results kept 24 h; errors shared only with concurrent duplicates, not kept
/// ([`DedupeLayer::cache_errors`]); at most 100 000 keys (more: [`DedupeError::Full`], the
/// call is not run), 25 000 per scope ([`DedupeLayer::scope`]: a key deduplicates only within
/// its scope, and one scope cannot take another's room; more: [`DedupeError::ScopeFull`]);
/// expired results swept every 60 s. State lives in memory and is shared by the
/// clones of one [`Dedupe`] (each [`Layer::layer`] call makes a new one).
#[derive(Debug, Clone)]
pub struct DedupeLayer<K, P = ()> {
    key: K,
    scope: P,
    config: Config,
}

impl<K> DedupeLayer<K> {
    /// A layer reading each request's key with `key`.
    pub fn new(key: K) -> Self {
        DedupeLayer {
            key,
            scope: (),
            config: Config {
                ttl: Duration::from_secs(24 * 60 * 60),
                cache_errors: false,
                max_keys: 100_000,
                max_keys_per_scope: 25_000,
                sweep_every: Duration::from_secs(60),
            },
        }
    }
}

impl<K, P> DedupeLayer<K, P> {
    /// Scopes keys by `scope` read from each request (a user, a tenant, a task): a key
    /// deduplicates only within its scope, and each scope holds at most
    /// [`max_keys_per_scope`](Self::max_keys_per_scope) keys, so one cannot take another's
    /// room.
    pub fn scope<P2>(self, scope: P2) -> DedupeLayer<K, P2> {
        DedupeLayer {
            key: self.key,
            scope,
            config: self.config,
        }
    }

    /// The most keys one scope holds at once (default 25 000; the shared scope counts as
    /// one). A new key beyond it is [`DedupeError::ScopeFull`], the call not run.
    pub fn max_keys_per_scope(mut self, max: usize) -> Self {
        self.config.max_keys_per_scope = max;
        self
    }

    /// How long a finished result is kept (default 24 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// Whether errors are kept for later duplicates too (default `false`: a later retry runs
    /// the call again, since a service error usually means no result was produced).
    pub fn cache_errors(mut self, cache: bool) -> Self {
        self.config.cache_errors = cache;
        self
    }

    /// The most keys tracked at once (default 100 000).
    pub fn max_keys(mut self, max: usize) -> Self {
        self.config.max_keys = max;
        self
    }

    /// How often expired results are swept from memory (default 60 s).
    pub fn sweep_every(mut self, every: Duration) -> Self {
        self.config.sweep_every = every;
        self
    }
}

impl<S, K: Clone, P: Clone> Layer<S> for DedupeLayer<K, P> {
    type Service = Dedupe<S, K, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Dedupe {
            inner,
            key: self.key.clone(),
            scope: self.scope.clone(),
            config: self.config,
            state: Arc::new(State {
                map: DashMap::new(),
                per_scope: DashMap::new(),
                next_id: AtomicU64::new(0),
                epoch: Instant::now(),
                last_sweep: AtomicU64::new(0),
            }),
        }
    }
}

/// The service made by [`DedupeLayer`]. Clones share their keys.
#[derive(Clone)]
pub struct Dedupe<S, K, P = ()> {
    inner: S,
    key: K,
    scope: P,
    config: Config,
    state: Arc<State>,
}

impl<S: fmt::Debug, K, P> fmt::Debug for Dedupe<S, K, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedupe")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("keys", &self.state.map.len())
            .finish_non_exhaustive()
    }
}

impl<S, K, P> Dedupe<S, K, P> {
    /// Keys tracked now (running or kept), expired ones not yet swept included.
    pub fn tracked_keys(&self) -> usize {
        self.state.map.len()
    }
}

/// The future of [`Dedupe`].
pub struct DedupeFuture<R, E> {
    inner: Pin<Box<dyn Future<Output = Result<R, DedupeError<E>>> + Send>>,
}

impl<R, E> fmt::Debug for DedupeFuture<R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupeFuture").finish_non_exhaustive()
    }
}

impl<R, E> Future for DedupeFuture<R, E> {
    type Output = Result<R, DedupeError<E>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

enum Action {
    Wait(watch::Receiver<Option<Shared>>),
    Ready(Shared),
    Lead(
        u64,
        watch::Sender<Option<Shared>>,
        watch::Receiver<Option<Shared>>,
    ),
    Full,
    ScopeFull(Option<Arc<str>>),
}

/// Removes a running slot unless disarmed: the call panicked or its task was dropped.
struct Guard {
    state: Arc<State>,
    key: ScopedId,
    id: u64,
    armed: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.armed {
            self.state.forget(&self.key, self.id);
        }
    }
}

impl<S, K, P, Req> Service<Req> for Dedupe<S, K, P>
where
    P: ScopeFn<Req>,
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Clone + Send + Sync + 'static,
    S::Error: Clone + Send + Sync + 'static,
    K: KeyFn<Req>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = DedupeError<S::Error>;
    type Future = DedupeFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(DedupeError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(key) = self.key.key(&req) else {
            let fut = self.inner.call(req);
            return DedupeFuture {
                inner: Box::pin(async move { fut.await.map_err(DedupeError::Inner) }),
            };
        };
        let scope: Option<Arc<str>> = self.scope.scope(&req).map(Arc::from);
        let key: ScopedId = (scope, key);
        let state = &self.state;
        let now = Instant::now();
        state.maybe_sweep(now, self.config.sweep_every);
        let mut full = state.map.len() >= self.config.max_keys;
        if full {
            // Expired results count until a sweep drops them: before refusing a key for want
            // of room, make room from them (at most once a second, so a map that is really
            // full is not scanned on every call).
            state.maybe_sweep(now, self.config.sweep_every.min(Duration::from_secs(1)));
            full = state.map.len() >= self.config.max_keys;
        }
        let lead = || {
            let (tx, rx) = watch::channel(None);
            let id = state.next_id.fetch_add(1, Ordering::Relaxed);
            (id, tx, rx)
        };
        let action = match state.map.entry(key.clone()) {
            MapEntry::Occupied(mut e) => match e.get() {
                Slot::Running { done, .. } => Action::Wait(done.clone()),
                Slot::Done { result, until } if *until > now => Action::Ready(result.clone()),
                Slot::Done { .. } => {
                    let (id, tx, rx) = lead();
                    e.insert(Slot::Running {
                        id,
                        done: rx.clone(),
                    });
                    Action::Lead(id, tx, rx)
                }
            },
            MapEntry::Vacant(_) if full => Action::Full,
            MapEntry::Vacant(v) if !state.count(&v.key().0, self.config.max_keys_per_scope) => {
                Action::ScopeFull(v.key().0.clone())
            }
            MapEntry::Vacant(v) => {
                let (id, tx, rx) = lead();
                v.insert(Slot::Running {
                    id,
                    done: rx.clone(),
                });
                Action::Lead(id, tx, rx)
            }
        };

        let inner = match action {
            Action::Full => {
                tracing::warn!(key = %key.1, "dedupe: too many keys tracked; call not run");
                return DedupeFuture {
                    inner: Box::pin(async { Err(DedupeError::Full) }),
                };
            }
            Action::ScopeFull(scope) => {
                let max = self.config.max_keys_per_scope;
                tracing::warn!(key = %key.1, scope = scope.as_deref(), max, "dedupe: the scope holds its share of keys; call not run");
                let scope = scope.map(|s| s.to_string());
                return DedupeFuture {
                    inner: Box::pin(async move { Err(DedupeError::ScopeFull { scope, max }) }),
                };
            }
            Action::Ready(shared) => {
                tracing::debug!(key = %key.1, "dedupe: replaying a kept result");
                Box::pin(async move { unshare::<S::Response, S::Error>(Some(shared)) })
                    as Pin<Box<dyn Future<Output = _> + Send>>
            }
            Action::Wait(rx) => {
                tracing::debug!(key = %key.1, "dedupe: waiting for the running call");
                Box::pin(wait::<S::Response, S::Error>(rx))
            }
            Action::Lead(id, tx, rx) => {
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let guard = Guard {
                    state: self.state.clone(),
                    key,
                    id,
                    armed: true,
                };
                let config = self.config;
                tokio::spawn(async move {
                    let mut guard = guard;
                    let Ok(result) = CatchUnwind::new(async move { inner.call(req).await }).await
                    else {
                        tracing::warn!(key = %guard.key.1, "dedupe: the call panicked; key released");
                        return; // the guard frees the key; `tx` dropped: waiters see Aborted
                    };
                    let keep = result.is_ok() || config.cache_errors;
                    let shared: Shared = Arc::new(result.map_err(DedupeError::Inner));
                    if keep {
                        if let Some(mut slot) = guard.state.map.get_mut(&guard.key) {
                            if matches!(*slot, Slot::Running { id: i, .. } if i == guard.id) {
                                *slot = Slot::Done {
                                    result: shared.clone(),
                                    until: crate::time::after(Instant::now(), config.ttl),
                                };
                                guard.armed = false;
                            }
                        }
                    }
                    drop(guard); // frees the key unless the result was kept
                    let _ = tx.send(Some(shared));
                });
                Box::pin(wait::<S::Response, S::Error>(rx))
            }
        };
        DedupeFuture { inner }
    }
}

async fn wait<R, E>(mut rx: watch::Receiver<Option<Shared>>) -> Result<R, DedupeError<E>>
where
    R: Clone + 'static,
    E: Clone + 'static,
{
    let shared = match rx.wait_for(Option::is_some).await {
        Ok(v) => v.clone(),
        Err(_) => None,
    };
    unshare(shared)
}

fn unshare<R, E>(shared: Option<Shared>) -> Result<R, DedupeError<E>>
where
    R: Clone + 'static,
    E: Clone + 'static,
{
    shared
        .as_deref()
        .and_then(|any| any.downcast_ref::<Result<R, DedupeError<E>>>())
        .cloned()
        .unwrap_or(Err(DedupeError::Aborted))
}
