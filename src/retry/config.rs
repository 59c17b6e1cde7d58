//! [`Config`]: what every call of one service reads, built once by the layer.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::budget::{Budgets, LlmCost};
use crate::observe::RetryStats;
use crate::policy::RetryPolicy;
use crate::request::{HeaderNames, IdempotencyKey, Operation, RequestView, SideEffect};

pub(crate) type SideEffectFn = Arc<dyn Fn(&RequestView<'_>) -> Option<SideEffect> + Send + Sync>;
pub(crate) type OperationFn = Arc<dyn Fn(&RequestView<'_>) -> Option<Operation> + Send + Sync>;
pub(crate) type CostFn = Arc<dyn Fn(&RequestView<'_>) -> Option<u64> + Send + Sync>;
pub(crate) type KeyFn = Arc<dyn Fn(&RequestView<'_>) -> Option<IdempotencyKey> + Send + Sync>;

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
    /// What an attempt costs; called only when a retry is considered.
    pub(crate) cost_fn: Option<CostFn>,
    /// The estimate of an LLM request's cost from its body, after `cost_fn`.
    pub(crate) llm_cost: Option<LlmCost>,
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
            cost_fn: self.cost_fn.clone(),
            llm_cost: self.llm_cost.clone(),
            info_on_success: self.info_on_success,
            stats: self.stats.clone(),
            // Each service warns once.
            warned_unclonable: AtomicBool::new(false),
        }
    }
}

impl<C, H> Config<C, H> {
    /// The same settings with another classifier or change hook.
    pub(crate) fn map<C2, H2>(self, f: impl FnOnce(C, H) -> (C2, H2)) -> Config<C2, H2> {
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
            cost_fn: self.cost_fn,
            llm_cost: self.llm_cost,
            info_on_success: self.info_on_success,
            stats: self.stats,
            warned_unclonable: self.warned_unclonable,
        }
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
