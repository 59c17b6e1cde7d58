//! Read-only summaries of the stats: [`Window`], [`KindSnapshot`].

use crate::budget::Scope;

/// A windowed summary of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Window {
    /// Logical calls.
    pub calls: u64,
    /// Retries made.
    pub retries: u64,
    /// Calls that succeeded after a retry.
    pub recovered: u64,
    /// Calls that ended on a retryable failure (exhausted, deadline, denied...).
    pub failed: u64,
}

/// The totals of one operation and error kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct KindSnapshot {
    /// Failed attempts.
    pub failures: u64,
    /// Retries made after such a failure.
    pub retries: u64,
    /// What those retries cost, in the units of the cost budgets (where the cost was
    /// known: a [`Cost`](crate::budget::Cost) extension or the layer's `cost_fn`).
    pub retry_cost: u64,
    /// Calls that succeeded in the end.
    pub recovered: u64,
    /// Calls that ran out of attempts or time.
    pub exhausted: u64,
    /// Calls denied by a budget, per scope: see [`KindSnapshot::denied`].
    pub(crate) denied: [u64; Scope::COUNT],
    /// Calls not retried because the budget store could not be reached (budgets fail
    /// closed).
    pub store_unavailable: u64,
    /// Calls not retried for another reason.
    pub not_retried: u64,
    /// Streams that failed after their first content event had been delivered (never
    /// retried; counted by [`StreamGuardLayer`](crate::stream::StreamGuardLayer)).
    pub mid_stream_failures: u64,
}

impl KindSnapshot {
    /// Calls denied a retry by the budget of `scope`.
    pub fn denied(&self, scope: Scope) -> u64 {
        self.denied[scope.index()]
    }

    /// Calls denied by any budget (or an unavailable store).
    pub fn denied_total(&self) -> u64 {
        self.denied.iter().sum::<u64>() + self.store_unavailable
    }
}
