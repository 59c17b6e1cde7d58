//! [`RetryLayer`]: the configuration, and the `tower::Layer` that builds [`Retry`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tower::Layer;

use crate::budget::Budgets;
use crate::classify::{ErrorKind, LlmHttp};
use crate::observe::RetryStats;
use crate::policy::RetryPolicy;
use crate::request::{HeaderNames, IdempotencyKey, Operation, RequestView, SideEffect};
use crate::service::Retry;

/// Changes a request before it is retried.
///
/// Called before every retry, after the local checks passed and before any budget is drawn,
/// with the copy that the next attempt will send and the failed result. Its answer matters
/// for output failures ([`ErrorKind::OutputInvalid`]): `false` means "nothing changed", and the
/// failure surfaces instead of being retried unchanged. For other failures the answer is
/// ignored (the request may be changed all the same, e.g. to a fallback model).
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
#[derive(Debug, Clone, Copy, Default)]
pub struct NoChange;

impl<Req, Res, E> ChangeRequest<Req, Res, E> for NoChange {
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

type SideEffectFn = Arc<dyn Fn(&RequestView<'_>) -> Option<SideEffect> + Send + Sync>;
type OperationFn = Arc<dyn Fn(&RequestView<'_>) -> Option<Operation> + Send + Sync>;
type KeyFn = Arc<dyn Fn(&RequestView<'_>) -> Option<IdempotencyKey> + Send + Sync>;

/// Retries calls with discipline: bounded, backed off, keyed, budgeted, visible.
///
/// `C` classifies results (default: [`LlmHttp`]); `H` changes a request before a retry
/// (default: [`NoChange`]).
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_retry_guard::{RetryLayer, RetryPolicy};
///
/// let policy = RetryPolicy::builder().max_retries(2).build()?;
/// let layer = RetryLayer::new().policy(policy);
/// let svc = ServiceBuilder::new()
///     .layer(layer)
///     .service_fn(|req: http::Request<String>| async move {
///         Ok::<_, std::io::Error>(http::Response::new(req.into_body()))
///     });
/// # let _ = svc;
/// # Ok::<(), tower_retry_guard::PolicyError>(())
/// ```
#[derive(Clone)]
pub struct RetryLayer<C = LlmHttp, H = NoChange> {
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
            policy: RetryPolicy::default(),
            classify: LlmHttp,
            change: NoChange,
            budgets: Budgets::default(),
            names: HeaderNames::default(),
            mint_keys: true,
            side_effect_fn: None,
            operation_fn: None,
            key_fn: None,
            info_on_success: true,
            stats: RetryStats::new(),
        }
    }
}

impl<C, H> RetryLayer<C, H> {
    /// The per-operation policy.
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The classifier: a [`Classify`](crate::Classify) or a closure
    /// `Fn(&Result<Res, E>) -> Outcome`.
    pub fn classify<C2>(self, classify: C2) -> RetryLayer<C2, H> {
        RetryLayer {
            policy: self.policy,
            classify,
            change: self.change,
            budgets: self.budgets,
            names: self.names,
            mint_keys: self.mint_keys,
            side_effect_fn: self.side_effect_fn,
            operation_fn: self.operation_fn,
            key_fn: self.key_fn,
            info_on_success: self.info_on_success,
            stats: self.stats,
        }
    }

    /// A hook that changes the request before each retry: see [`ChangeRequest`]. Without
    /// one, an output failure ([`ErrorKind::OutputInvalid`]) is never retried.
    pub fn on_retry<H2>(self, change: H2) -> RetryLayer<C, H2> {
        RetryLayer {
            policy: self.policy,
            classify: self.classify,
            change,
            budgets: self.budgets,
            names: self.names,
            mint_keys: self.mint_keys,
            side_effect_fn: self.side_effect_fn,
            operation_fn: self.operation_fn,
            key_fn: self.key_fn,
            info_on_success: self.info_on_success,
            stats: self.stats,
        }
    }

    /// The budgets (share one `Budgets` between layers by cloning it).
    pub fn budgets(mut self, budgets: Budgets) -> Self {
        self.budgets = budgets;
        self
    }

    /// The header names for the key, the attempt number, the task and user ids.
    pub fn header_names(mut self, names: HeaderNames) -> Self {
        self.names = names;
        self
    }

    /// Whether the layer mints an idempotency key for side-effecting requests that have
    /// none (default `true`). With `false`, such requests are never retried.
    pub fn idempotency_keys(mut self, mint: bool) -> Self {
        self.mint_keys = mint;
        self
    }

    /// Decides the side effect of a request for this layer; `None` falls back to the
    /// request's own (its extension, or its method). A [`SideEffect`] extension on the
    /// request wins over this closure.
    pub fn side_effect_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&RequestView<'_>) -> Option<SideEffect> + Send + Sync + 'static,
    {
        self.side_effect_fn = Some(Arc::new(f));
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
        self.key_fn = Some(Arc::new(f));
        self
    }

    /// Names the operation of a request (for stats, tracing, errors); `None` falls back to
    /// the method and path. An [`Operation`] extension on the request wins.
    pub fn operation_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&RequestView<'_>) -> Option<Operation> + Send + Sync + 'static,
    {
        self.operation_fn = Some(Arc::new(f));
        self
    }

    /// Where this layer records its [`RetryStats`] (share one between layers by cloning it).
    pub fn stats(mut self, stats: RetryStats) -> Self {
        self.stats = stats;
        self
    }

    /// This layer's stats (a shared handle: read it while the service runs).
    pub fn retry_stats(&self) -> RetryStats {
        self.stats.clone()
    }

    /// Whether a response that succeeded at the first attempt also carries a
    /// [`RetryInfo`](crate::RetryInfo) extension (default `true`). Turning it off saves the
    /// extension's allocations on the success path; responses after a retry, or returned
    /// after the layer gave up, always carry it.
    pub fn info_on_success(mut self, attach: bool) -> Self {
        self.info_on_success = attach;
        self
    }
}

impl<S, C: Clone, H: Clone> Layer<S> for RetryLayer<C, H> {
    type Service = Retry<S, C, H>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(
            inner,
            Arc::new(Shared {
                layer: self.clone(),
                warned_unclonable: AtomicBool::new(false),
            }),
        )
    }
}

impl<C, H> fmt::Debug for RetryLayer<C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.policy)
            .field("budgets", &self.budgets)
            .field("names", &self.names)
            .field("mint_keys", &self.mint_keys)
            .finish_non_exhaustive()
    }
}

/// What every call of one service shares.
pub(crate) struct Shared<C, H> {
    pub(crate) layer: RetryLayer<C, H>,
    pub(crate) warned_unclonable: AtomicBool,
}
