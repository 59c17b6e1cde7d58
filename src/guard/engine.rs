//! [`Guard`]: a [`RetryLayer`]'s engine around a closure.

use std::error::Error as StdError;
use std::fmt;
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;
use tower::Service;

use super::call::{Attempt, Call};
use super::request::{CallRequest, GuardChange};
use super::rules::ErrorRules;
use crate::budget::Budgets;
use crate::classify::{Classify, Outcome};
use crate::error::RetryError;
use crate::observe::RetryStats;
use crate::policy::RetryPolicy;
use crate::retry::Retry;
use crate::retry::RetryLayer;
use crate::retry::config::Config;

/// Guards async functions and agent tools with a [`RetryLayer`]'s discipline: the same
/// policy, budgets, keys, stats and tracing, run by the same engine as the layer's
/// [`Retry`] service.
///
/// `C` classifies the closure's results (default [`ErrorRules`]: timeouts and connection
/// errors retried, plus the types named with [`Guard::retry_on`]). Cheap to clone: clones
/// share the configuration, the stats and the budgets.
///
/// ```
/// use std::time::Duration;
/// use tower_retry_guard::{Call, Guard, RetryLayer, RetryPolicy};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let guard = Guard::new(RetryLayer::new().policy(RetryPolicy::builder().max_retries(2).build()?));
/// let answer = guard
///     .run(Call::new("lookup").read_only(), |attempt| async move {
///         if attempt.number() == 1 {
///             Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
///         } else {
///             Ok(42)
///         }
///     })
///     .await?;
/// assert_eq!(answer, 42);
/// assert_eq!(guard.stats().totals("lookup").recovered, 1);
/// # Ok(())
/// # }
/// ```
pub struct Guard<C = ErrorRules> {
    shared: Arc<Config<C, GuardChange>>,
}

impl<C> Clone for Guard<C> {
    fn clone(&self) -> Self {
        Guard {
            shared: self.shared.clone(),
        }
    }
}

impl Default for Guard {
    fn default() -> Self {
        Guard::new(RetryLayer::new())
    }
}

impl Guard {
    /// A guard with `layer`'s policy, budgets, stats, header names and key minting.
    ///
    /// The layer's classifier, `on_retry` hook and per-request closures are for HTTP
    /// requests and are not used: a guard classifies with [`ErrorRules`] (or
    /// [`Guard::classify`]) and changes inputs with [`Call::on_output_failure`].
    pub fn new<C0, H0>(layer: RetryLayer<C0, H0>) -> Self {
        let mut config = layer
            .into_config()
            .map(|_, _| (ErrorRules::new(), GuardChange));
        config.side_effect_fn = None;
        config.operation_fn = None;
        config.key_fn = None;
        config.cost_fn = None;
        Guard::build(config)
    }

    /// Retries errors that are, or are caused by, an `X` (see [`ErrorRules::retry_on`]).
    pub fn retry_on<X: StdError + 'static>(self) -> Self {
        self.with_rules(ErrorRules::retry_on::<X>)
    }

    /// Retries errors for which `predicate` is `true` (see [`ErrorRules::retry_on_fn`]).
    pub fn retry_on_fn<F>(self, predicate: F) -> Self
    where
        F: Fn(&(dyn StdError + 'static)) -> bool + Send + Sync + 'static,
    {
        self.with_rules(|rules| rules.retry_on_fn(predicate))
    }

    /// Errors that are, or are caused by, an `X` are output failures: retried only with a
    /// change (see [`ErrorRules::output_invalid_on`]).
    pub fn output_invalid_on<X: StdError + 'static>(self) -> Self {
        self.with_rules(ErrorRules::output_invalid_on::<X>)
    }

    /// Never retries errors that are, or are caused by, an `X` (see [`ErrorRules::fail_on`]).
    pub fn fail_on<X: StdError + 'static>(self) -> Self {
        self.with_rules(ErrorRules::fail_on::<X>)
    }

    /// Adds a rule of its own (see [`ErrorRules::rule`]).
    pub fn rule<F>(self, rule: F) -> Self
    where
        F: Fn(&(dyn StdError + 'static)) -> Option<Outcome> + Send + Sync + 'static,
    {
        self.with_rules(|rules| rules.rule(rule))
    }

    fn with_rules(self, add: impl FnOnce(ErrorRules) -> ErrorRules) -> Self {
        let rules = add(self.shared.classify.clone());
        self.classify(rules)
    }
}

impl<C> Guard<C> {
    fn build(config: Config<C, GuardChange>) -> Self {
        Guard {
            shared: Arc::new(config),
        }
    }

    /// Classifies the closure's results with `classify` instead: a [`Classify`] or a
    /// closure `Fn(&Result<T, E>) -> Outcome` (to reject an `Ok` output that does not
    /// validate, or for an error type that is not [`AsError`](crate::classify::AsError)).
    pub fn classify<C2>(self, classify: C2) -> Guard<C2> {
        let c = &self.shared;
        Guard::build(Config {
            policy: c.policy.clone(),
            classify,
            change: GuardChange,
            budgets: c.budgets.clone(),
            names: c.names.clone(),
            mint_keys: c.mint_keys,
            side_effect_fn: None,
            operation_fn: None,
            key_fn: None,
            cost_fn: None,
            llm_cost: None,
            info_on_success: c.info_on_success,
            stats: c.stats.clone(),
            warned_unclonable: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The stats every guarded call is recorded in (shared with the layer it came from).
    pub fn stats(&self) -> RetryStats {
        self.shared.stats.clone()
    }

    /// The budgets retries are drawn from.
    pub fn budgets(&self) -> &Budgets {
        &self.shared.budgets
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.shared.policy
    }

    /// Runs `f` for `call`, retried as the layer retries a request: `f` is called once per
    /// attempt with the [`Attempt`] (its number, the call's key, the time left, the previous
    /// failure), and its result is classified.
    ///
    /// The result is `f`'s last `Ok`, or a [`RetryError`] that says why the guard stopped
    /// (exhausted, deadline, budget, not retryable, side effect without key, output
    /// unchanged) with `f`'s last error inside. A classifier that rejects an `Ok` on the
    /// last attempt returns it as it is, as the layer returns a failing response.
    ///
    /// Total time is total: an attempt still running at the policy's `max_total_time` is
    /// dropped and the call stops with [`StopReason::Deadline`](crate::StopReason::Deadline)
    /// (the same engine as the layer). [`Attempt::deadline`] tells `f` how long it has.
    pub async fn run<F, Fut, T, E>(&self, call: Call, f: F) -> Result<T, RetryError<E>>
    where
        F: Fn(Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
        E: Display,
    {
        let deadline = Instant::now() + self.shared.policy.max_total_time();
        let f = &f;
        let service = FnService(move |request: CallRequest| f(request.attempt()));
        let mut retry = Retry::new(service, self.shared.clone());
        // A function is always ready; the engine polls it again before each retry.
        std::future::poll_fn(|cx| retry.poll_ready(cx)).await?;
        retry.call(CallRequest::new(call, deadline)).await
    }
}

impl<C> fmt::Debug for Guard<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("config", &self.shared)
            .finish()
    }
}

impl<C, H> RetryLayer<C, H> {
    /// A [`Guard`] for async functions and tools with this layer's policy, budgets, stats
    /// and key minting (see [`Guard::new`]).
    pub fn guard(self) -> Guard {
        Guard::new(self)
    }
}

/// A function as a `Service` that is always ready (tower's `service_fn`, without its
/// `util` feature).
#[derive(Clone)]
struct FnService<F>(F);

impl<F, Fut, T, E> Service<CallRequest> for FnService<F>
where
    F: FnMut(CallRequest) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    type Response = T;
    type Error = E;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), E>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: CallRequest) -> Fut {
        (self.0)(request)
    }
}
