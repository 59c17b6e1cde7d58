//! [`Call`]: what the guard knows about one guarded call; [`Attempt`]: what the closure gets.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::classify::ErrorKind;
use crate::request::{IdempotencyKey, SideEffect};

type OutputChange = Arc<dyn Fn(&Failure) -> Option<String> + Send + Sync>;

/// One logical call guarded by [`Guard::run`](crate::Guard::run): its operation name, side
/// effect, idempotency key, task and user.
///
/// A call is assumed [`SideEffect::SideEffecting`] unless marked otherwise: like a POST, it is
/// retried only with a key (its own, [`Call::key`] / [`Call::tool_call`], or one minted by the
/// guard, which the closure must pass on: [`Attempt::key`]).
///
/// ```
/// use tower_retry_guard::{Call, IdempotencyKey};
///
/// let call = Call::new("send_email").tool_call("ticket-4711", "call_8f2kq0XzL1");
/// let search = Call::new("search_docs").read_only().task("ticket-4711");
/// # let _ = (call, search);
/// ```
#[derive(Clone)]
pub struct Call {
    pub(crate) operation: Cow<'static, str>,
    pub(crate) side_effect: SideEffect,
    pub(crate) key: Option<IdempotencyKey>,
    pub(crate) task: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) cost: Option<u64>,
    pub(crate) on_output_failure: Option<OutputChange>,
}

impl Call {
    /// A call of `operation` (the name in stats, tracing events and errors).
    pub fn new(operation: impl Into<Cow<'static, str>>) -> Self {
        Call {
            operation: operation.into(),
            side_effect: SideEffect::SideEffecting,
            key: None,
            task: None,
            user: None,
            cost: None,
            on_output_failure: None,
        }
    }

    /// The call's side effect (default [`SideEffect::SideEffecting`]).
    pub fn side_effect(mut self, side_effect: SideEffect) -> Self {
        self.side_effect = side_effect;
        self
    }

    /// The call changes something (sends, writes, charges): retried only with a key.
    pub fn side_effecting(self) -> Self {
        self.side_effect(SideEffect::SideEffecting)
    }

    /// The call may run twice with the same effect as once (a PUT, a search with a
    /// request id): retried without a key.
    pub fn idempotent(self) -> Self {
        self.side_effect(SideEffect::Idempotent)
    }

    /// The call changes nothing (a read, an LLM completion): retried without a key.
    pub fn read_only(self) -> Self {
        self.side_effect(SideEffect::ReadOnly)
    }

    /// The call's idempotency key: the same on every attempt, instead of a minted one.
    pub fn key(mut self, key: IdempotencyKey) -> Self {
        self.key = Some(key);
        self
    }

    /// The call answers an LLM's tool call: its key is
    /// [`IdempotencyKey::from_tool_call`]`(task, tool_call_id)` and it counts against the
    /// task's budget.
    pub fn tool_call(self, task: &str, tool_call_id: &str) -> Self {
        self.key(IdempotencyKey::from_tool_call(task, tool_call_id))
            .task(task)
    }

    /// The task the call belongs to (for the per-task budget).
    pub fn task(mut self, task: impl Into<String>) -> Self {
        self.task = Some(task.into());
        self
    }

    /// The user the call is made for (for the per-user budget).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// What one attempt costs, in the units of the cost budgets
    /// ([`Budgets::task_cost`](crate::Budgets::task_cost)): a retry is sent only if its
    /// cost fits them.
    pub fn cost(mut self, cost: u64) -> Self {
        self.cost = Some(cost);
        self
    }

    /// What changes after an output failure ([`ErrorKind::OutputInvalid`]): called before
    /// such a retry with the failure; its answer reaches the next attempt as
    /// [`Attempt::change`] (the validation error to append, a fallback model, another
    /// temperature). `None`, or no hook at all, means nothing would change: the failure
    /// surfaces with [`StopReason::OutputUnchanged`](crate::StopReason::OutputUnchanged)
    /// instead of being retried with the same input.
    pub fn on_output_failure<F>(mut self, change: F) -> Self
    where
        F: Fn(&Failure) -> Option<String> + Send + Sync + 'static,
    {
        self.on_output_failure = Some(Arc::new(change));
        self
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("operation", &self.operation)
            .field("side_effect", &self.side_effect)
            .field("key", &self.key)
            .field("task", &self.task)
            .field("user", &self.user)
            .field("cost", &self.cost)
            .field("on_output_failure", &self.on_output_failure.is_some())
            .finish()
    }
}

/// Why the previous attempt failed, as the next attempt sees it ([`Attempt::previous`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failure {
    /// The failure's kind, as classified.
    pub kind: ErrorKind,
    /// The failed attempt's error, as text (`Display`); for a success that the classifier
    /// rejected (an output that did not validate), a sentence saying so.
    pub message: String,
    /// The retry about to be made (1 for the first).
    pub retry: u32,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind)
    }
}

/// One attempt of a guarded call, given to the closure: which attempt, its key, the time
/// left, and why the previous one failed.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub(crate) number: u32,
    pub(crate) key: Option<IdempotencyKey>,
    pub(crate) deadline: Instant,
    pub(crate) previous: Option<Arc<Failure>>,
    pub(crate) change: Option<Arc<str>>,
}

impl Attempt {
    /// The attempt's number: 1 for the first, 2 for the first retry.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Whether this attempt is a retry.
    pub fn is_retry(&self) -> bool {
        self.number > 1
    }

    /// The call's idempotency key, the same on every attempt: pass it to whatever performs
    /// the side effect (an `Idempotency-Key` header, a tool executor's dedupe). `None` for a
    /// call without one (a read-only call, or minting off).
    pub fn key(&self) -> Option<&IdempotencyKey> {
        self.key.as_ref()
    }

    /// When the call's total time ends: bound the attempt with it
    /// (`tokio::time::timeout_at(attempt.deadline(), ..)`), since a hanging closure is not
    /// cut by the guard.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The time left before [`Attempt::deadline`].
    pub fn time_left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Why the previous attempt failed (`None` on the first).
    pub fn previous(&self) -> Option<&Failure> {
        self.previous.as_deref()
    }

    /// The change [`Call::on_output_failure`] made for this attempt after an output failure,
    /// kept for the attempts after it.
    pub fn change(&self) -> Option<&str> {
        self.change.as_deref()
    }
}
