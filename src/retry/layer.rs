//! [`RetryLayer`]: the builder, and the [`Config`] it hands every call of a service.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tower::Layer;

use super::service::Retry;
use crate::budget::Budgets;
use crate::classify::{ErrorKind, LlmHttp};
use crate::observe::RetryStats;
use crate::policy::RetryPolicy;
use crate::request::{HeaderNames, IdempotencyKey, Operation, RequestView, SideEffect};

/// Changes a request before it is retried.
///
/// Called before every retry, once the local checks passed (retries left, a copy, a key for
/// a side effect, a delay within the hint cap and the deadline) and before any budget is
/// drawn, with the copy that the next attempt will send (its key and attempt number already
/// stamped) and the failed result. Its answer matters for output failures
/// ([`ErrorKind::OutputInvalid`]): `false` means "nothing changed", and the failure
/// surfaces instead of being retried unchanged. For other failures the answer is ignored
/// (the request may be changed all the same, e.g. to a fallback model).
///
/// Implemented by closures `Fn(&mut Req, &Result<Res, E>, &RetryContext) -> bool`, and by
/// `()`, the default: no change, so output failures surface at once.
pub trait ChangeRequest<Req, Res, E> {
    /// Changes `request` for retry number `context.retry`; `true` if it changed.
    fn change(&self, request: &mut Req, failed: &Result<Res, E>, context: &RetryContext) -> bool;
}

/// The context of a retry, for [`ChangeRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryContext {
    /// The retry about to be made (1 for the first).
    pub retry: u32,
    /// Why the last attempt failed.
    pub kind: ErrorKind,
}

/// No change hook: output failures surface at once.
impl<Req, Res, E> ChangeRequest<Req, Res, E> for () {
    fn change(&self, _: &mut Req, _: &Result<Res, E>, _: &RetryContext) -> bool {
        false
    }
}

impl<Req, Res, E, F> ChangeRequest<Req, Res, E> for F
where
    F: Fn(&mut Req, &Result<Res, E>, &RetryContext) -> bool,
{
    fn change(&self, request: &mut Req, failed: &Result<Res, E>, context: &RetryContext) -> bool {
        self(request, failed, context)
    }
}

pub(crate) type SideEffectFn = Arc<dyn Fn(&RequestView<'_>) -> Option<SideEffect> + Send + Sync>;
pub(crate) type OperationFn = Arc<dyn Fn(&RequestView<'_>) -> Option<Operation> + Send + Sync>;
pub(crate) type KeyFn = Arc<dyn Fn(&RequestView<'_>) -> Option<IdempotencyKey> + Send + Sync>;

/// Retries calls with discipline: bounded, backed off, keyed, budgeted, visible.
///
/// `C` classifies results (default: [`LlmHttp`]); `H` changes a request before a retry
/// (default `()`: no change). Cloning a layer shares its [`Budgets`] and [`RetryStats`].
///
/// ```
/// use std::time::Duration;
/// use http::{Request, Response, StatusCode};
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use tower_retry_guard::{Budgets, RetryInfo, RetryLayer, RetryPolicy};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let layer = RetryLayer::new()
///     .policy(RetryPolicy::builder().max_retries(2).build()?)
///     .budgets(Budgets::default());
/// let stats = layer.stats();
/// let mut failures = 1;
/// let mut svc = ServiceBuilder::new().layer(layer).service_fn(move |_: Request<String>| {
///     let status = if failures > 0 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
///     failures -= 1;
///     async move { Ok::<_, std::io::Error>(Response::builder().status(status).body(String::new()).unwrap_or_default()) }
/// });
/// let response = svc.ready().await?.call(Request::new(String::new())).await?;
/// assert_eq!(response.status(), StatusCode::OK);
/// assert_eq!(response.extensions().get::<RetryInfo>().map(|i| i.retries), Some(1));
/// assert_eq!(stats.calls("GET /"), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RetryLayer<C = LlmHttp, H = ()> {
    config: Config<C, H>,
}

/// What every call of one service reads: the layer's settings, resolved once.
pub(crate) struct Config<C, H> {
    pub(crate) policy: RetryPolicy,
    pub(crate) classify: C,
    pub(crate) change: H,
    pub(crate) budgets: Budgets,
    pub(crate) names: HeaderNames,
    pub(crate) mint_keys: bool,
    pub(crate) side_effect_fn: Option<SideEffectFn>,
    pub(crate) operation_fn: Option<OperationFn>,
    pub(crate) key_fn: Option<KeyFn>,
    pub(crate) info_on_success: bool,
    pub(crate) stats: RetryStats,
    /// The "cannot be cloned" warning was given (once per service).
    pub(crate) warned_unclonable: AtomicBool,
}

impl<C: Clone, H: Clone> Clone for Config<C, H> {
    fn clone(&self) -> Self {
        Config {
            policy: self.policy.clone(),
            classify: self.classify.clone(),
            change: self.change.clone(),
            budgets: self.budgets.clone(),
            names: self.names.clone(),
            mint_keys: self.mint_keys,
            side_effect_fn: self.side_effect_fn.clone(),
            operation_fn: self.operation_fn.clone(),
            key_fn: self.key_fn.clone(),
            info_on_success: self.info_on_success,
            stats: self.stats.clone(),
            // Each service warns once.
            warned_unclonable: AtomicBool::new(false),
        }
    }
}

impl<C, H> Config<C, H> {
    /// The same settings with another classifier or change hook.
    fn map<C2, H2>(self, f: impl FnOnce(C, H) -> (C2, H2)) -> Config<C2, H2> {
        let (classify, change) = f(self.classify, self.change);
        Config {
            policy: self.policy,
            classify,
            change,
            budgets: self.budgets,
            names: self.names,
            mint_keys: self.mint_keys,
            side_effect_fn: self.side_effect_fn,
            operation_fn: self.operation_fn,
            key_fn: self.key_fn,
            info_on_success: self.info_on_success,
            stats: self.stats,
            warned_unclonable: self.warned_unclonable,
        }
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        RetryLayer::new()
    }
}

impl RetryLayer {
    /// The defaults: [`RetryPolicy::default`], the [`LlmHttp`] classifier, keys minted for
    /// side-effecting requests, default [`Budgets`] in a new memory store.
    pub fn new() -> Self {
        RetryLayer {
            config: Config {
                policy: RetryPolicy::default(),
                classify: LlmHttp,
                change: (),
                budgets: Budgets::default(),
                names: HeaderNames::default(),
                mint_keys: true,
                side_effect_fn: None,
                operation_fn: None,
                key_fn: None,
                info_on_success: true,
                stats: RetryStats::new(),
                warned_unclonable: AtomicBool::new(false),
            },
        }
    }
}

impl<C, H> RetryLayer<C, H> {
    /// The per-call policy: attempts, total time, backoff.
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.config.policy = policy;
        self
    }

    /// The classifier: a [`Classify`](crate::Classify) or a closure
    /// `Fn(&Result<Res, E>) -> Outcome`.
    pub fn classify<C2>(self, classify: C2) -> RetryLayer<C2, H> {
        RetryLayer {
            config: self.config.map(|_, change| (classify, change)),
        }
    }

    /// A hook that changes the request before each retry: see [`ChangeRequest`]. Without
    /// one, an output failure ([`ErrorKind::OutputInvalid`]) is never retried.
    pub fn on_retry<H2>(self, change: H2) -> RetryLayer<C, H2> {
        RetryLayer {
            config: self.config.map(|classify, _| (classify, change)),
        }
    }

    /// The budgets (share one `Budgets` between layers by cloning it).
    pub fn budgets(mut self, budgets: Budgets) -> Self {
        self.config.budgets = budgets;
        self
    }

    /// The header names for the key, the attempt number, the task and user ids.
    pub fn header_names(mut self, names: HeaderNames) -> Self {
        self.config.names = names;
        self
    }

    /// Whether the layer mints an idempotency key for side-effecting requests that have
    /// none (default `true`). With `false`, such requests are never retried.
    pub fn idempotency_keys(mut self, mint: bool) -> Self {
        self.config.mint_keys = mint;
        self
    }

    /// Decides the side effect of a request for this layer; `None` falls back to the
    /// request's own (its method, for HTTP). A [`SideEffect`] extension on the request wins
    /// over this closure.
    pub fn side_effect_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&RequestView<'_>) -> Option<SideEffect> + Send + Sync + 'static,
    {
        self.config.side_effect_fn = Some(Arc::new(f));
        self
    }

    /// Derives the idempotency key of a side-effecting request that carries none (the
    /// `idempotency_key=lambda req: req.idempotency_key` of retry decorators): for example
    /// from an agent's tool-call id in an extension. A key in the request's own header or
    /// extension wins; `None` lets the layer mint one (if minting is on).
    pub fn idempotency_key_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&RequestView<'_>) -> Option<IdempotencyKey> + Send + Sync + 'static,
    {
        self.config.key_fn = Some(Arc::new(f));
        self
    }

    /// Names the operation of a request (for stats, tracing, errors); `None` falls back to
    /// the request's own name, else the method and path. An [`Operation`] extension on the
    /// request wins.
    pub fn operation_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&RequestView<'_>) -> Option<Operation> + Send + Sync + 'static,
    {
        self.config.operation_fn = Some(Arc::new(f));
        self
    }

    /// Records into these [`RetryStats`] (share one between layers by cloning it).
    pub fn with_stats(mut self, stats: RetryStats) -> Self {
        self.config.stats = stats;
        self
    }

    /// This layer's stats (a shared handle: read it while the service runs).
    pub fn stats(&self) -> RetryStats {
        self.config.stats.clone()
    }

    /// Whether a response that succeeded at the first attempt also carries a
    /// [`RetryInfo`](crate::RetryInfo) extension (default `true`). Turning it off saves the
    /// extension's allocations on the success path; responses after a retry, or returned
    /// after the layer gave up, always carry it.
    pub fn info_on_success(mut self, attach: bool) -> Self {
        self.config.info_on_success = attach;
        self
    }
}

impl<S, C: Clone, H: Clone> Layer<S> for RetryLayer<C, H> {
    type Service = Retry<S, C, H>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(inner, Arc::new(self.config.clone()))
    }
}

impl<C, H> fmt::Debug for RetryLayer<C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl<C, H> fmt::Debug for Config<C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.policy)
            .field("budgets", &self.budgets)
            .field("names", &self.names)
            .field("mint_keys", &self.mint_keys)
            .field("info_on_success", &self.info_on_success)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
impl<C: Clone, H: Clone> RetryLayer<C, H> {
    /// The config a service of this layer reads.
    pub(crate) fn into_config(self) -> Config<C, H> {
        self.config
    }
}
