//! [`RetryLayer`]: the builder of [`Retry`] services; each gets an `Arc<Config>`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tower::Layer;

use super::config::Config;
use super::service::Retry;
use crate::budget::{Budgets, LlmCost};
use crate::classify::LlmHttp;
use crate::observe::RetryStats;
use crate::policy::RetryPolicy;
use crate::request::{HeaderNames, IdempotencyKey, Operation, RequestView, SideEffect};

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
                cost_fn: None,
                llm_cost: None,
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

    /// A hook that changes the request before each retry: see [`ChangeRequest`](super::ChangeRequest). Without
    /// one, an output failure ([`ErrorKind::OutputInvalid`](crate::ErrorKind::OutputInvalid)) is never retried.
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

    /// What one attempt of a request costs, in the units of the cost budgets
    /// ([`Budgets::task_cost`], [`Budgets::user_cost_rate`]): tokens, micro-dollars. Called
    /// only when a retry is considered, never on the success path; a
    /// [`Cost`](crate::budget::Cost) extension on the request wins. `None`: the cost is
    /// unknown, and the retry is not charged to the cost budgets.
    pub fn cost_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&RequestView<'_>) -> Option<u64> + Send + Sync + 'static,
    {
        self.config.cost_fn = Some(Arc::new(f));
        self
    }

    /// Estimates what one attempt of an LLM request costs from its JSON body (the model,
    /// the body's size, `max_tokens`; see [`LlmCost`]), when neither the request's
    /// [`Cost`](crate::budget::Cost) extension nor [`cost_fn`](RetryLayer::cost_fn) knew.
    /// Read only when a retry is considered, from the copy the retry would send
    /// ([`RetryRequest::body_bytes`](crate::RetryRequest::body_bytes)); a body the layer
    /// cannot see, not JSON, too long, or of a model without a price has no estimate.
    /// Settle the reservation with the response's usage: [`UsageBody`](crate::budget::UsageBody).
    pub fn llm_cost(mut self, prices: LlmCost) -> Self {
        self.config.llm_cost = Some(prices);
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

impl<C, H> RetryLayer<C, H> {
    /// The config a service of this layer reads.
    pub(crate) fn into_config(self) -> Config<C, H> {
        self.config
    }
}
