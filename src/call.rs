//! One logical call: what is decided once, before the first attempt (side effect, key,
//! operation, deadline), and what it holds while it runs.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::CallBackoff;
use crate::budget::{ActiveCall, RatioPermit, RetrySlot};
use crate::classify::ErrorKind;
use crate::error::StopReason;
use crate::layer::Shared;
use crate::observe::{CallOutcome, OpHandle, OpKey, RetryInfo, default_operation};
use crate::request::{IdempotencyKey, Operation, RetryRequest, SideEffect};

/// The state of one logical call that is not tied to an attempt.
pub(crate) struct CallState<Req> {
    /// The copy the next attempt sends (stamped with the key; changed by the hook).
    pub(crate) next: Option<Req>,
    pub(crate) attempts: u32,
    pub(crate) started: Instant,
    /// `started + max_total_time`: nothing of the call runs past it.
    pub(crate) deadline: Instant,
    pub(crate) total_delay: Duration,
    /// The delay before the retry being prepared; counted in the stats once it is sent.
    pub(crate) delay: Duration,
    pub(crate) key: Option<IdempotencyKey>,
    pub(crate) side_effect: SideEffect,
    pub(crate) last_kind: Option<ErrorKind>,
    pub(crate) backoff: Option<CallBackoff>,
    /// The attempt in flight is a retry (feeds the adaptive ratio).
    pub(crate) in_retry: bool,
    /// The retry in flight's slot, freed when it answers or the call ends.
    pub(crate) slot: Option<RetrySlot>,
    /// The process ratio's share of a granted retry, until it is sent.
    pub(crate) permit: Option<RatioPermit>,
    /// Counts the call as active until it is dropped, a panicking inner `call` included.
    pub(crate) _active: ActiveCall,
    pub(crate) operation: Option<Operation>,
    pub(crate) op: OpHandle,
    pub(crate) span: tracing::Span,
}

/// Prepares a request for its first attempt: side effect, key, attempt header, the copy.
pub(crate) struct Prepared;

/// A request refused before it was sent (boxed: the success path moves less).
pub(crate) type Refusal = Box<(StopReason, RetryInfo)>;

impl Prepared {
    // Returns the request and its call state; the refusal is as large as a RetryError (the
    // future's own output), which is built from it.
    #[allow(clippy::new_ret_no_self, clippy::result_large_err)]
    pub(crate) fn new<Req: RetryRequest, C, H>(
        shared: &Shared<C, H>,
        mut request: Req,
    ) -> Result<(Req, CallState<Req>), Refusal> {
        let layer = &shared.layer;
        let side_effect = side_effect_of(shared, &request);
        let names = &layer.names;
        // One rule decides the key (`RetryRequest::idempotency_key`: header and extension
        // must agree), whatever the side effect; the closure and minting only for a
        // side-effecting request that carries none. The key chosen is stamped, so the key
        // reported is the key sent.
        let key = match request.idempotency_key(names) {
            Ok(Some(existing)) => Some(existing),
            Ok(None) if side_effect == SideEffect::SideEffecting => {
                match layer.key_fn.as_ref().and_then(|f| f(&request.view())) {
                    Some(derived) => Some(derived),
                    None if layer.mint_keys => Some(IdempotencyKey::generate()),
                    None => None,
                }
            }
            Ok(None) => None,
            Err(invalid) => {
                let operation = operation_of(shared, &request);
                let handle = layer.stats.handle(OpKey::of_name(operation.as_str()), || {
                    operation.as_str().to_owned()
                });
                let reason = StopReason::InvalidKey(invalid.clone());
                layer
                    .stats
                    .record_stop(&handle, ErrorKind::ClientError, &reason);
                tracing::warn!(
                    target: "tower_retry_guard",
                    operation = %operation,
                    error = %invalid,
                    "request refused before sending: invalid idempotency key"
                );
                let mut info = RetryInfo::refused(reason.clone());
                info.operation = Some(operation);
                return Err(Box::new((reason, info)));
            }
        };
        if let Some(key) = &key {
            request.set_idempotency_key(key, names);
        }
        request.set_attempt(0, names);
        let mut operation = None;
        let next = if layer.policy.max_retries() == 0 {
            None
        } else {
            let copy = request.try_clone();
            if copy.is_none() {
                operation = Some(warn_unclonable(shared, &request));
            }
            copy
        };
        // One clock read serves the deadline and the process ratio.
        let started = Instant::now();
        layer.budgets.on_call(started);
        let max = layer.policy.max_total_time();
        let deadline = started
            .checked_add(max)
            .unwrap_or_else(|| started + Duration::from_secs(86_400));
        let op = layer.stats.handle(op_key_of(shared, &request), || {
            operation_of(shared, &request).as_str().to_owned()
        });
        // No subscriber wants the span: skip building it (and the `log` fallback).
        let span = if tracing::enabled!(target: "tower_retry_guard", tracing::Level::INFO) {
            let span = tracing::info_span!(
                target: "tower_retry_guard",
                "retry_call",
                operation = tracing::field::Empty,
                method = request.view().method.map(|m| m.as_str()),
                side_effect = side_effect.as_str(),
                key = key.as_ref().map(|k| k.as_str()),
            );
            if !span.is_disabled() {
                span.record("operation", op.name());
            }
            span
        } else {
            tracing::Span::none()
        };
        let call = CallState {
            next,
            attempts: 1,
            started,
            deadline,
            total_delay: Duration::ZERO,
            delay: Duration::ZERO,
            key,
            side_effect,
            last_kind: None,
            backoff: None,
            in_retry: false,
            slot: None,
            permit: None,
            _active: layer.budgets.active_call(),
            operation,
            op,
            span,
        };
        Ok((request, call))
    }
}

impl<Req> CallState<Req> {
    /// What the call did so far, ending with `outcome`.
    pub(crate) fn info(&self, outcome: CallOutcome, now: Instant) -> RetryInfo {
        RetryInfo {
            attempts: self.attempts,
            retries: self.attempts.saturating_sub(1),
            total_delay: self.total_delay,
            elapsed: now.saturating_duration_since(self.started),
            key: self.key.clone(),
            last_error: self.last_kind,
            outcome,
            operation: self.operation.clone(),
        }
    }

    /// The operation's name for logs.
    pub(crate) fn operation_name(&self) -> &str {
        self.operation
            .as_ref()
            .map_or_else(|| self.op.name(), |o| o.as_str())
    }
}

fn side_effect_of<Req: RetryRequest, C, H>(shared: &Shared<C, H>, request: &Req) -> SideEffect {
    let view = request.view();
    if let Some(s) = view.extensions.and_then(|e| e.get::<SideEffect>()) {
        return *s;
    }
    if let Some(f) = &shared.layer.side_effect_fn {
        if let Some(s) = f(&view) {
            return s;
        }
    }
    request.side_effect()
}

/// The operation's name: the [`Operation`] extension (a route template), the layer's
/// closure, the request's own, or the method and path with ids collapsed.
pub(crate) fn operation_of<Req: RetryRequest, C, H>(
    shared: &Shared<C, H>,
    request: &Req,
) -> Operation {
    let view = request.view();
    if let Some(op) = view.extensions.and_then(|e| e.get::<Operation>()) {
        return op.clone();
    }
    if let Some(f) = &shared.layer.operation_fn {
        if let Some(op) = f(&view) {
            return op;
        }
    }
    if let Some(op) = request.operation() {
        return op;
    }
    match (view.method, view.uri) {
        (Some(m), Some(u)) => default_operation(m, u.path()),
        _ => Operation::from_static("call"),
    }
}

/// The stats key of a request, computed without formatting its name (the same chain as
/// [`operation_of`]).
fn op_key_of<Req: RetryRequest, C, H>(shared: &Shared<C, H>, request: &Req) -> OpKey {
    let view = request.view();
    if let Some(op) = view.extensions.and_then(|e| e.get::<Operation>()) {
        return OpKey::of_name(op.as_str());
    }
    if let Some(f) = &shared.layer.operation_fn {
        if let Some(op) = f(&view) {
            return OpKey::of_name(op.as_str());
        }
    }
    if let Some(op) = request.operation() {
        return OpKey::of_name(op.as_str());
    }
    match (view.method, view.uri) {
        (Some(m), Some(u)) => OpKey::of_method_path(m, u.path()),
        _ => OpKey::of_name("call"),
    }
}

/// Returns the operation's name: the request is gone once sent, and a failure must name it.
fn warn_unclonable<Req: RetryRequest, C, H>(shared: &Shared<C, H>, request: &Req) -> Operation {
    let operation = operation_of(shared, request);
    // Warn once per service, then at debug: a streaming endpoint would flood the logs.
    if !shared.warned_unclonable.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            target: "tower_retry_guard",
            operation = %operation,
            "retries are off for this request: it cannot be cloned (a streaming body?); \
             buffer the body to make it replayable (further occurrences are logged at debug)"
        );
    } else {
        tracing::debug!(
            target: "tower_retry_guard",
            operation = %operation,
            "retries are off for this request: it cannot be cloned"
        );
    }
    operation
}
