//! What a store is asked and answers: [`Scope`], [`Limit`], [`Draw`], [`Grant`].

use std::fmt;
use std::time::Duration;

/// Which budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Scope {
    /// Every call that carries the same task id.
    Task,
    /// Every call made for the same user id.
    User,
    /// Every call through the layers that share one [`Budgets`](super::Budgets) (the process-wide ratio).
    Process,
    /// Retries pending at once, against calls active at once ([`InFlightCap`](super::InFlightCap)).
    InFlight,
    /// The cost of the retries of every call that carries the same task id
    /// ([`Budgets::task_cost`](super::Budgets::task_cost)).
    TaskCost,
    /// The cost of the retries made for the same user id
    /// ([`Budgets::user_cost_rate`](super::Budgets::user_cost_rate)).
    UserCost,
}

impl Scope {
    /// How many scopes there are.
    pub(crate) const COUNT: usize = 6;

    /// The scope's place in per-scope counters.
    pub(crate) const fn index(self) -> usize {
        match self {
            Scope::Task => 0,
            Scope::User => 1,
            Scope::Process => 2,
            Scope::InFlight => 3,
            Scope::TaskCost => 4,
            Scope::UserCost => 5,
        }
    }

    /// A short, stable name: `task`, `user`, `process`, `in_flight`, `task_cost`,
    /// `user_cost`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Task => "task",
            Scope::User => "user",
            Scope::Process => "process",
            Scope::InFlight => "in_flight",
            Scope::TaskCost => "task_cost",
            Scope::UserCost => "user_cost",
        }
    }

    /// The scope whose ids this one is keyed by (`task` for `task_cost`): on a Redis
    /// cluster, a task's count and cost share a slot.
    #[cfg(feature = "redis")]
    pub(crate) const fn id_scope(self) -> Scope {
        match self {
            Scope::TaskCost => Scope::Task,
            Scope::UserCost => Scope::User,
            other => other,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A limit on one key of a scope. [`Limit::Count`] and [`Limit::Rate`] count retries (a
/// draw takes one); [`Limit::Cost`] and [`Limit::CostRate`] count units of cost (a draw
/// takes its [`Draw::amount`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// At most `max` draws; the count is forgotten `ttl` after the key's last draw.
    Count {
        /// Draws allowed.
        max: u32,
        /// How long an idle count is kept.
        ttl: Duration,
    },
    /// A token bucket: `tokens` every `per`, holding at most `burst`. An idle key is
    /// forgotten once its bucket is full again.
    Rate {
        /// Tokens added every `per`.
        tokens: u32,
        /// The refill period.
        per: Duration,
        /// The bucket's size (and the starting balance).
        burst: u32,
    },
    /// At most `max` units of cost; the sum is forgotten `ttl` after the key's last draw.
    Cost {
        /// Units allowed.
        max: u64,
        /// How long an idle sum is kept.
        ttl: Duration,
    },
    /// A token bucket of cost units: `units` every `per`, holding at most `burst`. An idle
    /// key is forgotten once its bucket is full again.
    CostRate {
        /// Units added every `per`.
        units: u64,
        /// The refill period.
        per: Duration,
        /// The bucket's size in units (and the starting balance).
        burst: u64,
    },
}

impl Limit {
    /// Whether a draw on this limit takes its amount (cost) rather than one retry.
    pub const fn is_cost(&self) -> bool {
        matches!(self, Limit::Cost { .. } | Limit::CostRate { .. })
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Limit::Count { max, ttl } => write!(f, "at most {max} retries, kept {ttl:?}"),
            Limit::Rate { tokens, per, burst } => {
                write!(f, "{tokens} retries per {per:?}, burst {burst}")
            }
            Limit::Cost { max, ttl } => {
                write!(f, "at most {max} units of retry cost, kept {ttl:?}")
            }
            Limit::CostRate { units, per, burst } => {
                write!(f, "{units} units of retry cost per {per:?}, burst {burst}")
            }
        }
    }
}

/// One draw of one retry from one scope's key.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    /// The scope.
    pub scope: Scope,
    /// The key within the scope (a task or user id).
    pub key: String,
    /// The limit for the key.
    pub limit: Limit,
    /// The units a cost limit ([`Limit::Cost`], [`Limit::CostRate`]) takes; a count or
    /// rate limit takes one retry whatever this says (use `1`).
    pub amount: u64,
}

impl Draw {
    /// A draw of one retry (`amount` 1).
    pub fn one(scope: Scope, key: impl Into<String>, limit: Limit) -> Self {
        Draw {
            scope,
            key: key.into(),
            limit,
            amount: 1,
        }
    }
}

/// A store's answer to a set of draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Every draw was taken.
    Granted,
    /// A draw was refused, and none was taken.
    Denied {
        /// The first scope that refused.
        scope: Scope,
        /// When it may allow a draw again, if known.
        retry_in: Option<Duration>,
        /// What the refusing key had left, in its limit's units (retries or cost units),
        /// if known.
        left: Option<u64>,
    },
}
