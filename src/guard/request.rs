//! The adapter that puts a function on the layer's engine: a request type carrying the
//! call's metadata ([`CallRequest`]) and the change hook that hands the previous failure to
//! the next attempt ([`GuardChange`]).

use std::fmt::Display;
use std::sync::Arc;

use tokio::time::Instant;

use super::call::{Attempt, Call, Failure};
use crate::classify::ErrorKind;
use crate::request::{
    HeaderNames, IdempotencyKey, InvalidKey, Operation, RetryRequest, SideEffect,
};
use crate::retry::{ChangeRequest, RetryContext};

/// What every attempt of one call shares.
struct Meta {
    call: Call,
    operation: Operation,
    deadline: Instant,
}

/// One attempt's request, as the engine sees it: cloned for each attempt (two reference
/// counts), stamped with the key and the attempt number, changed by [`GuardChange`].
#[derive(Clone)]
pub(crate) struct CallRequest {
    meta: Arc<Meta>,
    key: Option<IdempotencyKey>,
    attempt: u32,
    previous: Option<Arc<Failure>>,
    change: Option<Arc<str>>,
}

impl CallRequest {
    pub(crate) fn new(call: Call, deadline: Instant) -> Self {
        let operation = Operation(call.operation.clone());
        CallRequest {
            // A key given for a call that is not side-effecting still reaches the closure
            // (the engine only stamps keys on side effects).
            key: call.key.clone(),
            meta: Arc::new(Meta {
                call,
                operation,
                deadline,
            }),
            attempt: 0,
            previous: None,
            change: None,
        }
    }

    /// What the closure gets for this attempt.
    pub(crate) fn attempt(self) -> Attempt {
        Attempt {
            number: self.attempt + 1,
            key: self.key,
            deadline: self.meta.deadline,
            previous: self.previous,
            change: self.change,
        }
    }
}

impl RetryRequest for CallRequest {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }

    fn side_effect(&self) -> SideEffect {
        self.meta.call.side_effect
    }

    fn idempotency_key(&self, _: &HeaderNames) -> Result<Option<IdempotencyKey>, InvalidKey> {
        // A `Call`'s key is an `IdempotencyKey`: valid by construction.
        Ok(self.meta.call.key.clone())
    }

    fn set_idempotency_key(&mut self, key: &IdempotencyKey, _: &HeaderNames) {
        self.key = Some(key.clone());
    }

    fn set_attempt(&mut self, attempt: u32, _: &HeaderNames) {
        self.attempt = attempt;
    }

    fn operation(&self) -> Option<Operation> {
        Some(self.meta.operation.clone())
    }

    fn task_id(&self, _: &HeaderNames) -> Option<String> {
        self.meta.call.task.clone()
    }

    fn user_id(&self, _: &HeaderNames) -> Option<String> {
        self.meta.call.user.clone()
    }

    fn cost(&self) -> Option<u64> {
        self.meta.call.cost
    }
}

/// The engine's change hook for guarded calls: records the failure for the next attempt
/// and, after an output failure, asks the call's [`Call::on_output_failure`] for a change.
/// No change: the engine surfaces the failure (`OutputUnchanged`), as for the layer.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GuardChange;

impl<T, E: Display> ChangeRequest<CallRequest, T, E> for GuardChange {
    fn change(
        &self,
        request: &mut CallRequest,
        failed: &Result<T, E>,
        context: &RetryContext,
    ) -> bool {
        let message = match failed {
            Err(e) => e.to_string(),
            Ok(_) => String::from("the output was rejected by the classifier"),
        };
        let failure = Failure {
            kind: context.kind,
            message,
            retry: context.retry,
        };
        let mut changed = false;
        if context.kind == ErrorKind::OutputInvalid {
            let change = request
                .meta
                .call
                .on_output_failure
                .as_ref()
                .and_then(|hook| hook(&failure));
            if let Some(change) = change {
                request.change = Some(Arc::from(change));
                changed = true;
            }
        }
        request.previous = Some(Arc::new(failure));
        changed
    }
}
