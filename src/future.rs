//! [`ResponseFuture`]: one logical call, as a state machine
//! (calling → deciding → acquiring → sleeping → ready → calling ...).

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::backoff::CallBackoff;
use crate::budget::{Acquire, Verdict};
use crate::classify::{Classify, ErrorKind, Outcome};
use crate::error::{RetryError, StopReason};
use crate::layer::{ChangeRequest, RetryContext, Shared};
use crate::observe::{CallOutcome, OpHandle, OpKey, RetryInfo};
use crate::request::{IdempotencyKey, Operation, RetryRequest, SideEffect};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The state of one logical call that is not tied to an attempt.
pub(crate) struct CallState<Req> {
    /// The copy the next attempt sends (stamped with the key; changed by the hook).
    next: Option<Req>,
    attempts: u32,
    started: Instant,
    total_delay: Duration,
    key: Option<IdempotencyKey>,
    side_effect: SideEffect,
    last_kind: Option<ErrorKind>,
    backoff: Option<CallBackoff>,
    /// The attempt in flight is a retry (feeds the adaptive ratio).
    in_retry: bool,
    /// Holds a retry-in-flight slot: from just before the retry is sent until it answers.
    slot: bool,
    operation: Option<Operation>,
    op: OpHandle,
    span: tracing::Span,
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
        let mut key = None;
        if side_effect == SideEffect::SideEffecting {
            match request.idempotency_key(names) {
                Ok(Some(existing)) => {
                    request.set_idempotency_key(&existing, names);
                    key = Some(existing);
                }
                Ok(None) => {
                    // The layer's closure names the key, or the layer mints one.
                    let chosen = match layer.key_fn.as_ref().and_then(|f| f(&request.view())) {
                        Some(derived) => Some(derived),
                        None if layer.mint_keys => Some(IdempotencyKey::generate()),
                        None => None,
                    };
                    if let Some(chosen) = chosen {
                        request.set_idempotency_key(&chosen, names);
                        key = Some(chosen);
                    }
                }
                Err(invalid) => {
                    let operation = operation_of(shared, &request);
                    let handle = layer.stats.handle(OpKey::of_name(operation.as_str()), || {
                        operation.as_str().to_owned()
                    });
                    layer.stats.record_stop(
                        &handle,
                        ErrorKind::ClientError,
                        &StopReason::InvalidKey(invalid.clone()),
                    );
                    tracing::warn!(
                        target: "tower_retry_guard",
                        operation = %operation,
                        error = %invalid,
                        "request refused before sending: invalid idempotency key"
                    );
                    let mut info = RetryInfo::empty();
                    info.operation = Some(operation);
                    let reason = StopReason::InvalidKey(invalid);
                    info.outcome = CallOutcome::Stopped(reason.clone());
                    return Err(Box::new((reason, info)));
                }
            }
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
            total_delay: Duration::ZERO,
            key,
            side_effect,
            last_kind: None,
            backoff: None,
            in_retry: false,
            slot: false,
            operation,
            op,
            span,
        };
        Ok((request, call))
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
        (Some(m), Some(u)) => Operation(Cow::Owned(format!("{m} {}", u.path()))),
        _ => Operation::from_static("call"),
    }
}

/// The stats key of a request, computed without formatting its name.
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

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] future: F },
        Acquiring { verdict: BoxFuture<Verdict>, delay: Duration },
        Sleeping { sleep: Pin<Box<Sleep>> },
        Ready,
        Refused,
        Done,
    }
}

pin_project! {
    /// The future of [`Retry`](crate::Retry): one logical call, all its attempts.
    ///
    /// An unboxed state machine. The success path allocates nothing of its own; a failure
    /// may box the budget store's answer.
    pub struct ResponseFuture<S, Req, C, H>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future>,
        service: S,
        shared: Arc<Shared<C, H>>,
        call: Option<CallState<Req>>,
        // Failure-path state, boxed so the success path moves a small future.
        pending: Option<Box<Result<S::Response, S::Error>>>,
        refused: Option<Refusal>,
    }
    impl<S, Req, C, H> PinnedDrop for ResponseFuture<S, Req, C, H>
    where
        S: Service<Req>,
    {
        fn drop(this: Pin<&mut Self>) {
            // Finished or abandoned (the caller gave up while it slept): the call is no
            // longer active, and a retry slot it held is free.
            let this = this.project();
            if let Some(call) = this.call.as_ref() {
                this.shared.layer.budgets.on_call_end(call.slot);
            }
        }
    }
}

impl<S, Req, C, H> ResponseFuture<S, Req, C, H>
where
    S: Service<Req>,
{
    pub(crate) fn calling(
        future: S::Future,
        service: S,
        shared: Arc<Shared<C, H>>,
        call: CallState<Req>,
    ) -> Self {
        ResponseFuture {
            state: State::Calling { future },
            service,
            shared,
            call: Some(call),
            pending: None,
            refused: None,
        }
    }

    pub(crate) fn refused(service: S, shared: Arc<Shared<C, H>>, refused: Refusal) -> Self {
        ResponseFuture {
            state: State::Refused,
            service,
            shared,
            call: None,
            pending: None,
            refused: Some(refused),
        }
    }
}

/// What to do after a failed attempt.
enum Next {
    Stop(ErrorKind, StopReason),
    Wait(Duration),
    Acquire(BoxFuture<Verdict>, Duration),
}

impl<S, Req, C, H> Future for ResponseFuture<S, Req, C, H>
where
    S: Service<Req>,
    Req: RetryRequest,
    C: Classify<S::Response, S::Error>,
    H: ChangeRequest<Req, S::Response, S::Error>,
{
    type Output = Result<S::Response, RetryError<S::Error>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = match this.call.as_ref() {
            Some(c) if !c.span.is_none() => Some(c.span.clone().entered()),
            _ => None,
        };
        // Bounded: each turn either returns or moves the state forward; a call makes at most
        // `MAX_RETRIES_LIMIT + 1` attempts.
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future } => {
                    let result = ready!(future.poll(cx));
                    let Some(call) = this.call.as_mut() else {
                        unreachable!("a calling future has its call state")
                    };
                    let shared = &**this.shared;
                    if call.slot {
                        shared.layer.budgets.release_slot();
                        call.slot = false;
                    }
                    match shared.layer.classify.classify(&result) {
                        Outcome::Success => {
                            if call.in_retry {
                                shared.layer.budgets.on_retry_result(true);
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(succeed(shared, call, result));
                        }
                        Outcome::Fail { kind } => {
                            if call.in_retry {
                                shared.layer.budgets.on_retry_result(false);
                            }
                            if call.operation.is_none() {
                                call.operation =
                                    call.next.as_ref().map(|r| operation_of(shared, r));
                            }
                            let reason = if kind == ErrorKind::GaveUp {
                                StopReason::InnerGaveUp
                            } else {
                                StopReason::NotRetryable
                            };
                            this.state.set(State::Done);
                            return Poll::Ready(stop(shared, call, result, kind, reason));
                        }
                        Outcome::Retry { kind, after } => {
                            if call.in_retry {
                                shared.layer.budgets.on_retry_result(false);
                            }
                            call.last_kind = Some(kind);
                            match decide(shared, call, &result, kind, after) {
                                Next::Stop(kind, reason) => {
                                    this.state.set(State::Done);
                                    return Poll::Ready(stop(shared, call, result, kind, reason));
                                }
                                Next::Wait(delay) => {
                                    // Kept through the sleep: returned if the retry cannot
                                    // be sent after all (no slot in flight).
                                    *this.pending = Some(Box::new(result));
                                    start_wait(shared, call, delay, this.state.as_mut());
                                }
                                Next::Acquire(verdict, delay) => {
                                    *this.pending = Some(Box::new(result));
                                    this.state.set(State::Acquiring { verdict, delay });
                                }
                            }
                        }
                    }
                }
                StateProj::Acquiring { verdict, delay } => {
                    let verdict = ready!(verdict.as_mut().poll(cx));
                    let delay = *delay;
                    let Some(call) = this.call.as_mut() else {
                        unreachable!("an acquiring future has its call state")
                    };
                    let shared = &**this.shared;
                    let kind = call.last_kind.unwrap_or(ErrorKind::Other);
                    let reason = match verdict {
                        Verdict::Granted => None,
                        Verdict::Denied { scope, key, limit } => {
                            Some(StopReason::Budget { scope, key, limit })
                        }
                        Verdict::StoreUnavailable(error) => {
                            Some(StopReason::StoreUnavailable { error })
                        }
                    };
                    if reason.is_none() {
                        start_wait(shared, call, delay, this.state.as_mut());
                        continue;
                    }
                    let result = this.pending.take().map(|r| *r);
                    match (reason, result) {
                        (None, _) => unreachable!("handled above"),
                        (Some(reason), Some(result)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(stop(shared, call, result, kind, reason));
                        }
                        (Some(_), None) => unreachable!("a denied retry has its failed result"),
                    }
                }
                StateProj::Sleeping { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    let Some(call) = this.call.as_mut() else {
                        unreachable!("a ready future has its call state")
                    };
                    if !call.slot {
                        let budgets = &this.shared.layer.budgets;
                        if let Err(limit) = budgets.take_slot() {
                            // Too many retries are being sent right now: this one is not,
                            // and gives its share of the process ratio back.
                            budgets.refund_process();
                            let kind = call.last_kind.unwrap_or(ErrorKind::Other);
                            let Some(result) = this.pending.take().map(|r| *r) else {
                                unreachable!("a retry keeps its failed result until sent")
                            };
                            this.state.set(State::Done);
                            return Poll::Ready(stop(
                                this.shared,
                                call,
                                result,
                                kind,
                                StopReason::Budget {
                                    scope: crate::budget::Scope::InFlight,
                                    key: None,
                                    limit,
                                },
                            ));
                        }
                        call.slot = true;
                    }
                    if let Err(e) = ready!(this.service.poll_ready(cx)) {
                        let Some(call) = this.call.as_mut() else {
                            unreachable!("a ready future has its call state")
                        };
                        // The service broke before the retry: the call ends here, counted
                        // and logged like any other stop.
                        let kind = call.last_kind.unwrap_or(ErrorKind::Other);
                        this.state.set(State::Done);
                        return Poll::Ready(stop(
                            this.shared,
                            call,
                            Err(e),
                            kind,
                            StopReason::NotRetryable,
                        ));
                    }
                    let Some(call) = this.call.as_mut() else {
                        unreachable!("a ready future has its call state")
                    };
                    let Some(mut request) = call.next.take() else {
                        unreachable!("a retry is decided only with a copy of the request")
                    };
                    let names = &this.shared.layer.names;
                    request.set_attempt(call.attempts, names);
                    // Keep a copy for the attempt after this one, if one is allowed.
                    if call.attempts < this.shared.layer.policy.max_retries() {
                        call.next = request.try_clone();
                    }
                    call.attempts += 1;
                    call.in_retry = true;
                    *this.pending = None;
                    let future = this.service.call(request);
                    this.state.set(State::Calling { future });
                }
                StateProj::Refused => {
                    let Some((reason, info)) = this.refused.take().map(|r| *r) else {
                        unreachable!("a refused future has its reason")
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(Err(RetryError::new(reason, info, None)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// The local checks, the change hook, the delay, then the budgets.
fn decide<Req, Res, E, C, H>(
    shared: &Shared<C, H>,
    call: &mut CallState<Req>,
    result: &Result<Res, E>,
    kind: ErrorKind,
    after: Option<Duration>,
) -> Next
where
    Req: RetryRequest,
    H: ChangeRequest<Req, Res, E>,
{
    let layer = &shared.layer;
    let policy = &layer.policy;
    let retries = call.attempts - 1;
    if retries >= policy.max_retries() {
        return Next::Stop(
            kind,
            StopReason::Exhausted {
                max_retries: policy.max_retries(),
            },
        );
    }
    let Some(next) = call.next.as_mut() else {
        return Next::Stop(kind, StopReason::NotCloneable);
    };
    if call.operation.is_none() {
        call.operation = Some(operation_of(shared, next));
    }
    if call.side_effect == SideEffect::SideEffecting && call.key.is_none() {
        let operation = call
            .operation
            .as_ref()
            .map(|o| o.as_str().to_owned())
            .unwrap_or_default();
        return Next::Stop(kind, StopReason::SideEffectWithoutKey { operation });
    }
    let retry = retries + 1;
    let changed = layer
        .change
        .change(next, result, &RetryContext { retry, kind });
    if kind == ErrorKind::OutputInvalid && !changed {
        return Next::Stop(kind, StopReason::OutputUnchanged);
    }
    let backoff = call
        .backoff
        .get_or_insert_with(|| policy.call_backoff())
        .next_delay(&policy.backoff(), policy.jitter(), retry);
    let elapsed = call.started.elapsed();
    let remaining = policy.max_total_time().saturating_sub(elapsed);
    let mut delay = backoff;
    if let Some(hint) = after {
        if hint > policy.max_retry_after() {
            return Next::Stop(
                kind,
                StopReason::HintTooLong {
                    hint,
                    max: policy.max_retry_after(),
                },
            );
        }
        if hint >= remaining {
            return Next::Stop(
                kind,
                StopReason::HintTooLong {
                    hint,
                    max: remaining,
                },
            );
        }
        delay = delay.max(hint);
    }
    if delay >= remaining {
        return Next::Stop(
            kind,
            StopReason::Deadline {
                max_total_time: policy.max_total_time(),
            },
        );
    }
    let task = next.task_id(&layer.names);
    let user = next.user_id(&layer.names);
    match layer.budgets.acquire(task, user) {
        Acquire::Ready(Verdict::Granted) => Next::Wait(delay),
        Acquire::Ready(Verdict::Denied { scope, key, limit }) => {
            Next::Stop(kind, StopReason::Budget { scope, key, limit })
        }
        Acquire::Ready(Verdict::StoreUnavailable(error)) => {
            Next::Stop(kind, StopReason::StoreUnavailable { error })
        }
        Acquire::Pending(verdict) => Next::Acquire(verdict, delay),
    }
}

/// The retry is granted: say so, then sleep (or go straight on for a zero delay: tokio's
/// timer rounds every sleep up to its 1 ms tick).
fn start_wait<Req, C, H, F>(
    shared: &Shared<C, H>,
    call: &mut CallState<Req>,
    delay: Duration,
    mut state: Pin<&mut State<F>>,
) {
    call.total_delay += delay;
    let operation = call
        .operation
        .as_ref()
        .map(|o| o.as_str())
        .unwrap_or("call");
    let kind = call.last_kind.unwrap_or(ErrorKind::Other);
    let policy = &shared.layer.policy;
    shared.layer.stats.record_retry(&call.op, kind, delay);
    tracing::warn!(
        target: "tower_retry_guard",
        operation,
        attempt = call.attempts + 1,
        retry = call.attempts,
        "http.request.resend_count" = call.attempts,
        error_kind = kind.as_str(),
        delay_ms = delay.as_millis() as u64,
        retries_left = policy.max_retries().saturating_sub(call.attempts),
        time_left_ms = policy
            .max_total_time()
            .saturating_sub(call.started.elapsed() + delay)
            .as_millis() as u64,
        key = call.key.as_ref().map(|k| k.as_str()),
        "retrying"
    );
    if delay.is_zero() {
        state.set(State::Ready);
    } else {
        state.set(State::Sleeping {
            sleep: Box::pin(tokio::time::sleep(delay)),
        });
    }
}

fn info_of<Req>(call: &CallState<Req>, outcome: CallOutcome, now: Instant) -> RetryInfo {
    RetryInfo {
        attempts: call.attempts,
        retries: call.attempts.saturating_sub(1),
        total_delay: call.total_delay,
        elapsed: now.saturating_duration_since(call.started),
        key: call.key.clone(),
        last_error: call.last_kind,
        outcome,
        operation: call.operation.clone(),
    }
}

#[allow(clippy::result_large_err)] // the future's output type
fn succeed<Req, Res, E, C, H>(
    shared: &Shared<C, H>,
    call: &mut CallState<Req>,
    result: Result<Res, E>,
) -> Result<Res, RetryError<E>>
where
    C: Classify<Res, E>,
{
    let recovered = call.attempts > 1;
    // One clock read serves the stats window and the info's elapsed time.
    let now = Instant::now();
    shared
        .layer
        .stats
        .record_success(&call.op, now, if recovered { call.last_kind } else { None });
    match result {
        Ok(mut response) => {
            if recovered {
                let operation = call
                    .operation
                    .as_ref()
                    .map(|o| o.as_str())
                    .unwrap_or("call");
                tracing::info!(
                    target: "tower_retry_guard",
                    operation,
                    attempts = call.attempts,
                    outcome = "recovered",
                    total_delay_ms = call.total_delay.as_millis() as u64,
                    "succeeded after {} retries",
                    call.attempts - 1
                );
            }
            if recovered || shared.layer.info_on_success {
                let outcome = if recovered {
                    CallOutcome::Recovered
                } else {
                    CallOutcome::Succeeded
                };
                let info = info_of(call, outcome, now);
                shared.layer.classify.attach(&mut response, info);
            }
            Ok(response)
        }
        // A classifier that calls an error a success: pass it through, unwrapped in a
        // RetryError that says so.
        Err(e) => {
            let info = info_of(call, CallOutcome::Stopped(StopReason::NotRetryable), now);
            Err(RetryError::new(StopReason::NotRetryable, info, Some(e)))
        }
    }
}

#[allow(clippy::result_large_err)] // the future's output type
fn stop<Req, Res, E, C, H>(
    shared: &Shared<C, H>,
    call: &mut CallState<Req>,
    result: Result<Res, E>,
    kind: ErrorKind,
    reason: StopReason,
) -> Result<Res, RetryError<E>>
where
    C: Classify<Res, E>,
{
    call.last_kind = Some(kind);
    if call.operation.is_none() {
        // The call ended before a retry was considered (retries off, not retryable): name it
        // from its stats entry, made when the call started.
        call.operation = Some(Operation(Cow::Owned(call.op.name().to_owned())));
    }
    shared.layer.stats.record_stop(&call.op, kind, &reason);
    let operation = call
        .operation
        .as_ref()
        .map(|o| o.as_str())
        .unwrap_or("call");
    if call.attempts > 1 || reason != StopReason::NotRetryable {
        tracing::warn!(
            target: "tower_retry_guard",
            operation,
            attempts = call.attempts,
            error_kind = kind.as_str(),
            outcome = reason.as_str(),
            total_delay_ms = call.total_delay.as_millis() as u64,
            "gave up: {reason}"
        );
    } else {
        tracing::debug!(
            target: "tower_retry_guard",
            operation,
            error_kind = kind.as_str(),
            "not retryable"
        );
    }
    let info = info_of(call, CallOutcome::Stopped(reason.clone()), Instant::now());
    match result {
        Ok(mut response) => {
            shared.layer.classify.attach(&mut response, info);
            Ok(response)
        }
        Err(e) => Err(RetryError::new(reason, info, Some(e))),
    }
}
