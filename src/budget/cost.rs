//! Cost budgets: what a retry costs ([`Cost`]), and limits on the cost of the retries of a
//! task ([`Budgets::task_cost`]) and of a user ([`Budgets::user_cost_rate`]).
//!
//! Counting retries does not bound what they cost: one retry of a 200k-token prompt costs
//! more than a hundred retries of a short one. A cost limit counts units (tokens,
//! micro-dollars: the caller's, integers only) instead of retries. The cost of a retry is
//! learnt only once a retry is considered (never on the success path): the request's
//! [`Cost`] extension, else the layer's [`cost_fn`](crate::RetryLayer::cost_fn), else the
//! layer's estimate of an LLM request from its body ([`llm_cost`](crate::RetryLayer::llm_cost),
//! [`LlmCost`](super::LlmCost)). A retry whose cost is unknown is not charged to the cost
//! scopes (as a request without a task id is not charged to the task scope).
//!
//! A reservation is a worst case; once the response says what the retry really cost, settle
//! the difference: [`Budgets::settle`] with the call's [`RetryInfo`](crate::RetryInfo)
//! (`reserved()`, `task()`, `user()`), or [`UsageBody`](super::UsageBody), which reads the
//! `usage` of an LLM response as it streams and settles at its end.
//!
//! The cost draws go with the count draws into the same single store call, all or nothing:
//! a retry is sent only if its cost fits every cost limit, and a refusal says which one and
//! how much it had left.

use std::borrow::Cow;
use std::time::Duration;

use super::{Budgets, Draw, Limit, Scope, StoreError, budget_key};

/// What one attempt of a request costs, in the caller's units (tokens, micro-dollars).
/// A request extension, read only when a retry of the request is considered.
///
/// ```
/// use tower_retry_guard::budget::Cost;
///
/// let mut request = http::Request::new(String::from("a long prompt"));
/// // The prompt's tokens plus `max_tokens`, as the caller estimates them.
/// request.extensions_mut().insert(Cost(12_000));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Cost(pub u64);

impl Budgets {
    /// Retries of one task (its id as for [`Budgets::per_task`]) may spend at most `max`
    /// units of cost; the sum is forgotten `ttl` after the task's last retry. Off by
    /// default. Checked beside the count limit, in the same store call.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_retry_guard::{Budgets, RetryLayer};
    ///
    /// // 50k tokens of retries per task, 1M tokens of retries a minute per user.
    /// let budgets = Budgets::default()
    ///     .task_cost(50_000, Duration::from_secs(3600))
    ///     .user_cost_rate(1_000_000, Duration::from_secs(60));
    /// let layer = RetryLayer::new()
    ///     .budgets(budgets)
    ///     .cost_fn(|view| view.headers.and_then(|h| h.get("x-prompt-tokens"))
    ///         .and_then(|v| v.to_str().ok()?.parse().ok()));
    /// # let _ = layer;
    /// ```
    pub fn task_cost(self, max: u64, ttl: Duration) -> Self {
        self.task_cost_limit(Some(Limit::Cost { max, ttl }))
    }

    /// The retries of one user may spend `units` of cost every `per` (a token bucket of
    /// `units`, starting full). Off by default.
    pub fn user_cost_rate(self, units: u64, per: Duration) -> Self {
        self.user_cost_limit(Some(Limit::CostRate {
            units,
            per,
            burst: units,
        }))
    }

    /// Gives back the cost reservation of a retry the provider refused without running it
    /// (a 429, out of quota, 503/529, 409 or another 4xx: the providers bill nothing for
    /// it), before the next retry is drawn; a retry that may have run (a 500, a timeout, a
    /// lost connection, an unusable output) keeps its reservation. Off by default: the
    /// cost limits then bound the cost of every retry sent, refused or not.
    ///
    /// With it, `RetryInfo::reserved` offers nothing more to settle for a refused last
    /// retry, and `RetryInfo::retry_cost` and the stats still count what each retry
    /// reserved when it was sent.
    pub fn refund_refused(mut self, refund: bool) -> Self {
        self.refund_refused = refund;
        self
    }

    /// Whether refused retries give their cost back ([`Budgets::refund_refused`]).
    pub(crate) fn refunds_refused(&self) -> bool {
        self.refund_refused
    }

    /// The per-task cost limit, any [`Limit`] (`None` turns it off). A count or rate limit
    /// here counts retries, as [`Budgets::per_task`] does.
    pub fn task_cost_limit(mut self, limit: Option<Limit>) -> Self {
        self.task_cost = limit;
        self
    }

    /// The per-user cost limit, any [`Limit`] (`None` turns it off).
    pub fn user_cost_limit(mut self, limit: Option<Limit>) -> Self {
        self.user_cost = limit;
        self
    }

    /// Settles the cost of retries once it is known. `reserved` is what was drawn for them
    /// (a call's [`RetryInfo::retry_cost`](crate::RetryInfo::retry_cost)), `actual` what
    /// they really cost (the `usage` of their responses, read by the caller): less, and
    /// the difference goes back to the task's and the user's cost budgets; more, and it is
    /// charged, past the limit if need be (it was spent: the next retries see it). Nothing
    /// to do (equal, no cost limit, no id) is no store call.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_retry_guard::Budgets;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_retry_guard::budget::StoreError> {
    /// let budgets = Budgets::none().task_cost(10_000, Duration::from_secs(3600));
    /// // A retry was reserved at 8,000 tokens (prompt + max_tokens); its usage said 2,500.
    /// budgets.settle(Some("task-1"), None, 8_000, 2_500).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// The store's, or its silence past [`Budgets::store_timeout`]: the budgets stay as
    /// drawn (a reservation is the worst case, so a failed refund errs on the safe side).
    pub async fn settle(
        &self,
        task: Option<&str>,
        user: Option<&str>,
        reserved: u64,
        actual: u64,
    ) -> Result<(), StoreError> {
        // `true`: a refund of the difference; `false`: a charge of it.
        let (refund, amount) = match actual.cmp(&reserved) {
            std::cmp::Ordering::Equal => return Ok(()),
            std::cmp::Ordering::Less => (true, reserved - actual),
            std::cmp::Ordering::Greater => (false, actual - reserved),
        };
        let mut draws = self.draws(
            task.map(str::to_owned),
            user.map(str::to_owned),
            Some(amount),
        );
        draws.retain(|d| matches!(d.scope, Scope::TaskCost | Scope::UserCost) && d.limit.is_cost());
        if draws.is_empty() {
            return Ok(());
        }
        let timeout = self.store_timeout;
        match tokio::time::timeout(timeout, self.store.settle(draws, refund)).await {
            Ok(answer) => answer,
            Err(_) => Err(StoreError::new(format!(
                "no answer to a cost settlement within {timeout:?}"
            ))),
        }
    }

    /// The store draws of one retry: task and its cost, user and its cost.
    pub(crate) fn draws(
        &self,
        task: Option<String>,
        user: Option<String>,
        cost: Option<u64>,
    ) -> Vec<Draw> {
        let mut draws = Vec::new();
        for (id, (scope, limit), (cost_scope, cost_limit)) in [
            (
                task,
                (Scope::Task, self.per_task),
                (Scope::TaskCost, self.task_cost),
            ),
            (
                user,
                (Scope::User, self.per_user),
                (Scope::UserCost, self.user_cost),
            ),
        ] {
            let Some(id) = id else { continue };
            // Any id is charged; an unusual one under its bounded digest.
            let key = match budget_key(&id) {
                Cow::Borrowed(_) => id,
                Cow::Owned(digest) => digest,
            };
            let cost_draw = match (cost_limit, cost) {
                (Some(limit), Some(amount)) => Some(Draw {
                    scope: cost_scope,
                    key: key.clone(),
                    limit,
                    amount: if limit.is_cost() { amount } else { 1 },
                }),
                _ => None,
            };
            if let Some(limit) = limit {
                draws.push(Draw::one(scope, key, limit));
            }
            draws.extend(cost_draw);
        }
        draws
    }
}

/// A denial in words: how full, the limit, when it frees up, how to change it.
pub(super) fn describe_denial(
    scope: Scope,
    limit: Limit,
    amount: u64,
    retry_in: Option<Duration>,
    left: Option<u64>,
) -> String {
    let full = match (limit, left) {
        (Limit::Count { max, .. }, left) => {
            let used = max.saturating_sub(left.map_or(0, |l| u32::try_from(l).unwrap_or(max)));
            format!("{used} of {max} used")
        }
        (Limit::Rate { .. }, _) => "no token left".to_owned(),
        (Limit::Cost { .. } | Limit::CostRate { .. }, Some(left)) => {
            format!("this retry costs {amount} units, {left} left")
        }
        (Limit::Cost { .. } | Limit::CostRate { .. }, None) => {
            format!("this retry costs {amount} units, more than is left")
        }
    };
    let again = match retry_in {
        Some(d) => format!("; next in {d:.1?}"),
        None => String::new(),
    };
    let setter = match scope {
        Scope::TaskCost => "task_cost",
        Scope::UserCost => "user_cost_rate",
        Scope::User => "per_user",
        _ => "per_task",
    };
    format!("{full}: {limit}{again}; change it with `Budgets::{setter}`")
}

/// A token bucket of `units` every `per` (in some time unit), `burst` deep, as GCRA times
/// in that unit: the time one draw of `amount` moves the arrival time, and the tolerance.
/// One unit takes `per / units` rounded up (at least one tick): the burst is exact, and the
/// refill never faster than the rate (a rate above one unit per tick is held to it). Both
/// at most `cap`.
pub(crate) fn bucket(units: u64, per: u64, burst: u64, amount: u64, cap: u64) -> (u64, u64) {
    let Some(tick) = unit_time(units, per) else {
        // Never refills.
        return (cap, if burst == 0 { 0 } else { cap });
    };
    (
        amount.saturating_mul(tick).min(cap),
        burst.saturating_mul(tick).min(cap),
    )
}

/// The time one unit takes to refill (`None`: never).
fn unit_time(units: u64, per: u64) -> Option<u64> {
    (units > 0).then(|| per.div_ceil(units).max(1))
}

/// The units left in a bucket whose arrival time is `used` ahead of now.
pub(crate) fn left_in_bucket(units: u64, per: u64, tolerance: u64, used: u64) -> u64 {
    unit_time(units, per).map_or(0, |tick| tolerance.saturating_sub(used) / tick)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_against_the_caller() {
        // 3 units a second: 333_333_334 ns per unit, rounded up; the burst holds 3 exactly.
        assert_eq!(
            bucket(3, 1_000_000_000, 3, 1, u64::MAX),
            (333_333_334, 1_000_000_002)
        );
        assert_eq!(bucket(0, 1, 5, 1, 100), (100, 100));
        assert_eq!(bucket(u64::MAX, u64::MAX, u64::MAX, u64::MAX, 7), (7, 7));
        assert_eq!(
            left_in_bucket(3, 1_000_000_000, 1_000_000_002, 333_333_334),
            2
        );
        assert_eq!(left_in_bucket(0, 5, 1, 0), 0);
    }
}
