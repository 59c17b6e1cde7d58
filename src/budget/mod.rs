//! Retry budgets: per task, per user, and a process-wide retry ratio, in a shared store.
//!
//! Per-operation bounds (attempts, total time) live in [`RetryPolicy`](crate::RetryPolicy).
//! The budgets here span calls:
//!
//! | scope | default | where it lives |
//! |---|---|---|
//! | [`Scope::Task`] | 5 retry events per task id, forgotten 1 h after the task's last retry | the [`BudgetStore`] |
//! | [`Scope::User`] | 60 retries a minute per user id, bursts of 10 | the [`BudgetStore`] |
//! | [`Scope::InFlight`] | retries being sent at once <= max(3, 20% of active calls) ([`InFlightCap`]) | this process |
//! | [`Scope::TaskCost`] | off; [`Budgets::task_cost`]: at most N units of retry cost per task id | the [`BudgetStore`] |
//! | [`Scope::UserCost`] | off; [`Budgets::user_cost_rate`]: N units of retry cost per period per user id | the [`BudgetStore`] |
//! | [`Scope::Process`] | retries <= 10% of calls over 10 s while retries fail, up to 150% while they succeed ([`RatioConfig`]) | this process |
//!
//! A request without a task id (or user id) is not charged to that scope. A request that
//! carries one is always charged, whatever its shape (long, UTF-8, empty, control
//! characters): long or unusual ids under a bounded digest (the `budget::ids` module).
//!
//! The decision order on a failed attempt: local checks first (attempts, deadline, key), then
//! the process ratio (an atomic), then the task and user draws in **one** store call, all or
//! nothing. The process ratio's share is held by a guard until the retry is sent, and given
//! back if it is not (a store denial, no slot in flight, the deadline, a caller who gave up):
//! nothing is drawn from it unless the retry really happens. A task or user draw is spent when
//! granted: a call whose future is dropped while it sleeps before the retry keeps that retry
//! counted (not refunding keeps a task that cancels and re-issues calls from escaping its
//! budget).

mod cost;
mod draw;
mod ids;
mod in_flight;
mod json;
mod llm;
mod memory;
mod permit;
mod ratio;
mod ratio_config;
mod ring;
mod slot;
mod usage_body;

pub use self::cost::Cost;
use self::cost::describe_denial;
pub(crate) use self::cost::{bucket, left_in_bucket};
pub use self::draw::{Draw, Grant, Limit, Scope};
pub(crate) use self::ids::budget_key;
use self::in_flight::InFlight;
pub use self::in_flight::InFlightCap;
pub use self::llm::LlmCost;
pub use self::memory::MemoryStore;
pub(crate) use self::permit::{ActiveCall, RatioPermit, RetrySlot};
pub(crate) use self::ratio::RetryRatio;
pub use self::ratio_config::{RatioConfig, RatioConfigBuilder};
pub use self::usage_body::UsageBody;
pub use crate::store::StoreError;

// The rule of the process ratio is documented on `RetryRatio`'s module (`ratio.rs`) and
// summed up on `RatioConfig`'s fields.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Where task and user budgets live: [`MemoryStore`] in one process, `RedisStore` (feature
/// `redis`) across processes.
///
/// Called only after a failed attempt that the local checks would retry.
pub trait BudgetStore: Clone + Send + Sync + 'static {
    /// Takes every draw or none: if any draw's key is at its limit, nothing is taken and the
    /// first refusing scope is returned. One call is one round trip for a remote store.
    fn draw(&self, draws: &[Draw]) -> impl Future<Output = Result<Grant, StoreError>> + Send;

    /// Gives back each cost draw's amount, granted earlier: the retries cost less than was
    /// reserved ([`Budgets::settle`]). Only [`Limit::Cost`] and [`Limit::CostRate`] draws
    /// are settled; each key on its own (an adjustment, not a decision). The default says
    /// the store cannot settle.
    fn refund(&self, draws: &[Draw]) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = draws;
        async { Err(StoreError::new("this budget store cannot settle costs")) }
    }

    /// Takes each cost draw's amount on top of what was granted, past the limit if need be
    /// (it was spent): the retries cost more than was reserved ([`Budgets::settle`]). As
    /// [`BudgetStore::refund`] otherwise.
    fn charge(&self, draws: &[Draw]) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = draws;
        async { Err(StoreError::new("this budget store cannot settle costs")) }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The object-safe face of a [`BudgetStore`]: the layer is not generic over its store, and a
/// boxed future is paid only after a failure.
trait DynStore: Send + Sync + 'static {
    fn draw(&self, draws: Vec<Draw>) -> BoxFuture<Result<Grant, StoreError>>;
    /// `refund`: [`BudgetStore::refund`], else [`BudgetStore::charge`].
    fn settle(&self, draws: Vec<Draw>, refund: bool) -> BoxFuture<Result<(), StoreError>>;
}

impl<S: BudgetStore> DynStore for S {
    fn draw(&self, draws: Vec<Draw>) -> BoxFuture<Result<Grant, StoreError>> {
        let store = self.clone();
        Box::pin(async move { store.draw(&draws).await })
    }

    fn settle(&self, draws: Vec<Draw>, refund: bool) -> BoxFuture<Result<(), StoreError>> {
        let store = self.clone();
        Box::pin(async move {
            if refund {
                store.refund(&draws).await
            } else {
                store.charge(&draws).await
            }
        })
    }
}

/// What to do when the store cannot be reached in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStoreError {
    /// Do not retry (the default): a budget that cannot be checked is not spent.
    #[default]
    FailClosed,
    /// Retry as if the store had granted the draw.
    FailOpen,
}

/// The retry budgets a layer draws from. Clone it to share budgets between layers: clones
/// share the process ratio and the store.
///
/// ```
/// use std::time::Duration;
/// use tower_retry_guard::budget::{Limit, MemoryStore, OnStoreError};
/// use tower_retry_guard::{Budgets, RetryLayer};
///
/// // At most 2 retries per task (the `x-task-id` header or a `TaskId` extension), 30 a
/// // minute per user, the default process ratio; one store shared by both layers.
/// let budgets = Budgets::default()
///     .per_task(Some(Limit::Count { max: 2, ttl: Duration::from_secs(600) }))
///     .per_user(Some(Limit::Rate { tokens: 30, per: Duration::from_secs(60), burst: 5 }))
///     .store(MemoryStore::new())
///     .on_store_error(OnStoreError::FailClosed);
/// let chat = RetryLayer::new().budgets(budgets.clone());
/// let tools = RetryLayer::new().budgets(budgets);
/// # let _ = (chat, tools);
/// ```
#[derive(Clone)]
pub struct Budgets {
    per_task: Option<Limit>,
    per_user: Option<Limit>,
    task_cost: Option<Limit>,
    user_cost: Option<Limit>,
    ratio: Option<Arc<RetryRatio>>,
    in_flight: Option<Arc<InFlight>>,
    store: Arc<dyn DynStore>,
    on_store_error: OnStoreError,
    store_timeout: Duration,
    refund_refused: bool,
}

impl fmt::Debug for Budgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budgets")
            .field("per_task", &self.per_task)
            .field("per_user", &self.per_user)
            .field("task_cost", &self.task_cost)
            .field("user_cost", &self.user_cost)
            .field("ratio", &self.ratio)
            .field("on_store_error", &self.on_store_error)
            .field("store_timeout", &self.store_timeout)
            .field("refund_refused", &self.refund_refused)
            .finish_non_exhaustive()
    }
}

impl Default for Budgets {
    /// Per task 5, per user 60/min (burst 10), the adaptive process ratio, in a new
    /// [`MemoryStore`]; fail closed; 250 ms store timeout.
    fn default() -> Self {
        Budgets {
            per_task: Some(Budgets::DEFAULT_PER_TASK),
            per_user: Some(Budgets::DEFAULT_PER_USER),
            task_cost: None,
            user_cost: None,
            ratio: Some(Arc::new(RetryRatio::new(RatioConfig::default()))),
            in_flight: Some(Arc::new(InFlight::new(InFlightCap::default()))),
            store: Arc::new(MemoryStore::new()),
            on_store_error: OnStoreError::default(),
            store_timeout: Duration::from_millis(250),
            refund_refused: false,
        }
    }
}

impl Budgets {
    /// The default per-task limit: 5 retry events per task, kept 1 h after the last.
    pub const DEFAULT_PER_TASK: Limit = Limit::Count {
        max: 5,
        ttl: Duration::from_secs(3600),
    };

    /// The default per-user limit: 60 retries a minute, bursts of 10.
    pub const DEFAULT_PER_USER: Limit = Limit::Rate {
        tokens: 60,
        per: Duration::from_secs(60),
        burst: 10,
    };

    /// No budgets but the policy's own bounds.
    pub fn none() -> Self {
        Budgets {
            per_task: None,
            per_user: None,
            ratio: None,
            in_flight: None,
            ..Budgets::default()
        }
    }

    /// The per-task limit (`None` turns the scope off).
    pub fn per_task(mut self, limit: Option<Limit>) -> Self {
        self.per_task = limit;
        self
    }

    /// The per-user limit (`None` turns the scope off).
    pub fn per_user(mut self, limit: Option<Limit>) -> Self {
        self.per_user = limit;
        self
    }

    /// The process ratio (`None` turns it off).
    pub fn ratio(mut self, config: Option<RatioConfig>) -> Self {
        self.ratio = config.map(|c| Arc::new(RetryRatio::new(c)));
        self
    }

    /// The cap on retries in flight (`None` turns it off; default 20% of active calls, at
    /// least 3).
    pub fn in_flight(mut self, cap: Option<InFlightCap>) -> Self {
        self.in_flight = cap.map(|c| Arc::new(InFlight::new(c)));
        self
    }

    /// Where task and user budgets live.
    pub fn store<S: BudgetStore>(mut self, store: S) -> Self {
        self.store = Arc::new(store);
        self
    }

    /// What to do when the store fails or times out (default: fail closed).
    pub fn on_store_error(mut self, behaviour: OnStoreError) -> Self {
        self.on_store_error = behaviour;
        self
    }

    /// How long one store call may take (default 250 ms).
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// Retries in flight now (granted and not yet answered), if the cap is on.
    pub fn retries_in_flight(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|f| f.retrying())
    }

    /// Logical calls active now (started, not yet dropped), if the in-flight cap is on.
    pub fn active_calls(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|f| f.active())
    }

    /// A logical call started: a deposit into the process ratio (one atomic). The clock
    /// reading serves the deadline too.
    #[inline]
    pub(crate) fn on_call(&self, now: tokio::time::Instant) {
        if let Some(r) = &self.ratio {
            r.deposit_at(now);
        }
    }

    /// The call is active (for the in-flight cap) until the guard is dropped.
    #[inline]
    pub(crate) fn active_call(&self) -> ActiveCall {
        ActiveCall::new(self.in_flight.as_ref())
    }

    /// Takes a retry-in-flight slot once the inner service is ready for the retry; the
    /// error says the limit. Held until the guard is dropped (`None`: no cap).
    pub(crate) fn take_slot(&self) -> Result<Option<RetrySlot>, String> {
        match &self.in_flight {
            Some(f) => RetrySlot::try_take(f).map(Some).ok_or_else(|| f.describe()),
            None => Ok(None),
        }
    }

    /// A retried attempt ended: feeds the adaptive ratio.
    pub(crate) fn on_retry_result(&self, succeeded: bool) {
        if let Some(r) = &self.ratio {
            r.record_retry_result(succeeded);
        }
    }

    /// Asks every budget for one retry costing `cost` (if known; cost scopes charge only a
    /// retry whose cost is known). `Ready` when no store call is needed.
    pub(crate) fn acquire(
        &self,
        task: Option<String>,
        user: Option<String>,
        cost: Option<u64>,
    ) -> Acquire {
        let permit = match &self.ratio {
            Some(r) if !r.try_withdraw() => {
                return Acquire::Ready(Verdict::Denied {
                    scope: Scope::Process,
                    key: None,
                    limit: r.describe(),
                });
            }
            Some(r) => RatioPermit::withdrawn(r.clone()),
            None => RatioPermit::none(),
        };
        let draws = self.draws(task, user, cost);
        if draws.is_empty() {
            return Acquire::Ready(Verdict::Granted(permit));
        }
        let store = self.store.clone();
        let timeout = self.store_timeout;
        let on_error = self.on_store_error;
        Acquire::Pending(Box::pin(async move {
            let keys: Vec<(Scope, String, Limit, u64)> = draws
                .iter()
                .map(|d| (d.scope, d.key.clone(), d.limit, d.amount))
                .collect();
            let answer = tokio::time::timeout(timeout, store.draw(draws)).await;
            // A refusal drops `permit`: the process ratio gets its retry back.
            match answer {
                Ok(Ok(Grant::Granted)) => Verdict::Granted(permit),
                Ok(Ok(Grant::Denied {
                    scope,
                    retry_in,
                    left,
                })) => {
                    let (key, limit) = keys
                        .into_iter()
                        .find(|(s, ..)| *s == scope)
                        .map(|(_, k, l, n)| (Some(k), describe_denial(scope, l, n, retry_in, left)))
                        .unwrap_or((None, String::new()));
                    Verdict::Denied { scope, key, limit }
                }
                Ok(Err(e)) => store_failure(on_error, e.to_string(), permit),
                Err(_) => store_failure(on_error, format!("no answer within {timeout:?}"), permit),
            }
        }))
    }
}

fn store_failure(on_error: OnStoreError, error: String, permit: RatioPermit) -> Verdict {
    match on_error {
        OnStoreError::FailOpen => Verdict::Granted(permit),
        // Dropping the permit gives the ratio its retry back.
        OnStoreError::FailClosed => Verdict::StoreUnavailable(error),
    }
}

/// The budgets' answer to one retry.
#[derive(Debug)]
pub(crate) enum Verdict {
    Granted(RatioPermit),
    Denied {
        scope: Scope,
        key: Option<String>,
        limit: String,
    },
    StoreUnavailable(String),
}

pub(crate) enum Acquire {
    Ready(Verdict),
    Pending(BoxFuture<Verdict>),
}
