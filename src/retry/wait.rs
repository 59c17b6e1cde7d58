//! A call between attempts: what the future does once an attempt answered, while it waits
//! (the budget store, the backoff, the service getting ready), and when the wait ends (the
//! retry is sent, or the call stops with its last failure).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tower::Service;

use super::call::Call;
use super::change::{ChangeRequest, RetryContext};
use super::config::Config;
use super::decide::{self, Decision};
use super::report::{attempt_span, log_retry, stop, succeed};
use crate::budget::{Acquire, RatioPermit, RetrySlot, Verdict};
use crate::classify::{Classify, ErrorKind, Outcome};
use crate::error::RetryError;
use crate::observe::{Reservation, StopReason};
use crate::request::{InvalidKey, RetryRequest};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A failed attempt whose retry is granted or being decided: the call, the failure it
/// returns if the retry does not happen, and the process ratio's share once granted.
pub(crate) struct Wait<Req, Res, E> {
    pub(crate) call: Call<Req>,
    failed: Result<Res, E>,
    kind: ErrorKind,
    permit: Option<RatioPermit>,
    /// The cost of the retry being decided, if known.
    cost: Option<u64>,
    /// What it reserves, and for whom, if its cost is known (for a settlement).
    reservation: Option<Box<Reservation>>,
    step: Step,
}

/// Where a waiting call is.
enum Step {
    /// The budget store decides; the wait began when the retry was decided.
    Acquiring(BoxFuture<Verdict>, Instant),
    Sleeping(Pin<Box<Sleep>>),
    /// Slept: the service must be ready, then the retry takes its slot and is sent.
    Ready,
}

/// How a wait ends.
pub(crate) enum End<E> {
    /// The call stops with its last failure.
    Stop(StopReason),
    /// The service broke before the retry: the call stops with that error.
    NotReady(E),
    /// The retry is sent, holding this slot.
    Send(Option<RetrySlot>),
}

/// What an answered attempt leads to.
pub(crate) enum Answered<Req, Res, E> {
    Done(Result<Res, RetryError<E>>),
    Wait(Box<Wait<Req, Res, E>>),
}

/// The attempt failed (`outcome`): stop, or decide a retry (the hook, then the budgets).
pub(crate) fn answered<Req, Res, E, C, H>(
    config: &Config<C, H>,
    mut call: Call<Req>,
    result: Result<Res, E>,
    outcome: Outcome,
) -> Answered<Req, Res, E>
where
    Req: RetryRequest,
    C: Classify<Res, E>,
    H: ChangeRequest<Req, Res, E>,
{
    // The attempt answered: its span ends here, before the retry's events (on the call's span).
    call.attempt_span = tracing::Span::none();
    if call.in_retry() {
        config.budgets.on_retry_result(false);
        refund_rejected(config, &mut call, &outcome);
    }
    // The attempt answered: its retry slot (if it was a retry) is free.
    call.failed(&config.policy).slot = None;
    let now = Instant::now();
    let (kind, delay, backoff) = match decide::decide(config, &call, outcome, now) {
        Decision::Succeed => return Answered::Done(succeed(config, &mut call, result, true)),
        Decision::Stop(kind, reason) => {
            return Answered::Done(stop(config, call, Some(result), kind, reason));
        }
        Decision::Retry {
            kind,
            delay,
            backoff,
        } => (kind, delay, backoff),
    };
    call.last_kind = Some(kind);
    let retried = call.failed(&config.policy);
    retried.backoff = backoff;
    retried.delay = delay;
    let retry = call.attempts;
    let (mut changed, mut task, mut user, mut cost) = (false, None, None, None);
    let mut rekeyed = false;
    if let Some(next) = call.next.as_mut() {
        // Stamped now, so that the hook sees what will be sent.
        if let Some(key) = &call.key {
            next.set_idempotency_key(key, &config.names);
        }
        next.set_attempt(retry, &config.names);
        let context = RetryContext { retry, kind };
        changed = config.change.change(next, &result, &context);
        // Stamped again: a hook that rebuilt the request (a fallback model) dropped them. A
        // hook that put another key in (or a second one) is not sent: the key of every
        // attempt is the call's. (A request type that does not read back the key it was
        // given answers `None`: nothing to compare.)
        if let Some(key) = &call.key {
            next.set_idempotency_key(key, &config.names);
            rekeyed = match next.idempotency_key(&config.names) {
                Ok(Some(k)) => k != *key,
                Ok(None) => false,
                Err(_) => true,
            };
        }
        next.set_attempt(retry, &config.names);
        task = next.task_id(&config.names);
        user = next.user_id(&config.names);
        // Only now, on the failure path: the success path never asks what a call costs.
        cost = cost_of(config, next);
    }
    if rekeyed {
        let reason = StopReason::InvalidKey(InvalidKey::changed_on_retry());
        return Answered::Done(stop(config, call, Some(result), kind, reason));
    }
    if let Some(reason) = decide::unchanged(kind, changed) {
        return Answered::Done(stop(config, call, Some(result), kind, reason));
    }
    let reservation = cost.map(|cost| {
        Box::new(Reservation {
            cost,
            task: task.clone(),
            user: user.clone(),
        })
    });
    let (step, permit) = match config.budgets.acquire(task, user, cost) {
        Acquire::Pending(verdict) => (Step::Acquiring(verdict, now), None),
        Acquire::Ready(verdict) => match decide::granted(verdict) {
            Ok(permit) => (start_wait(config, &mut call, delay, cost), Some(permit)),
            Err(reason) => return Answered::Done(stop(config, call, Some(result), kind, reason)),
        },
    };
    Answered::Wait(Box::new(Wait {
        call,
        failed: result,
        kind,
        permit,
        cost,
        reservation,
        step,
    }))
}

/// With [`Budgets::refund_refused`](crate::Budgets::refund_refused): a retry the provider
/// refused without running it (429, quota, 503/529 overload, 409, another 4xx) spent
/// nothing, so its cost reservation goes back to the cost budgets. The
/// refund is started before the next retry's draw (a store that answers at once, as the
/// memory store does, has it done by then; a remote store gets it first on its
/// connection), and finishes in the background: the call does not wait for it. A retry
/// that may have run (a 5xx, a timeout, a lost connection, an unusable output) keeps its
/// reservation: the safe side. The reservation is taken out of the call, so that
/// `RetryInfo::reserved` no longer offers it for a settlement.
fn refund_rejected<Req, C, H>(config: &Config<C, H>, call: &mut Call<Req>, outcome: &Outcome) {
    let rejected = matches!(
        outcome.kind(),
        Some(
            ErrorKind::RateLimited
                | ErrorKind::QuotaExhausted
                | ErrorKind::Overloaded
                | ErrorKind::Conflict
                | ErrorKind::ClientError
        )
    );
    if !rejected || !config.budgets.refunds_refused() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Some(reservation) = call.retried.as_mut().and_then(|r| r.reservation.take()) else {
        return;
    };
    let budgets = config.budgets.clone();
    let mut refund = Box::pin(async move {
        let Reservation { cost, task, user } = *reservation;
        if let Err(e) = budgets
            .settle(task.as_deref(), user.as_deref(), cost, 0)
            .await
        {
            tracing::debug!(target: "tower_retry_guard", error = %e, "refund of a refused retry's cost failed");
        }
    });
    // Polled once here, so it goes before the next draw; the rest (if any) in a task.
    if refund
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
        .is_pending()
    {
        runtime.spawn(refund);
    }
}

/// The cost of the next attempt: the request's own (its `Cost` extension), else the
/// layer's closure, else the layer's estimate from the body (an LLM request's).
fn cost_of<Req: RetryRequest, C, H>(config: &Config<C, H>, next: &Req) -> Option<u64> {
    next.cost()
        .or_else(|| config.cost_fn.as_ref().and_then(|f| f(&next.view())))
        .or_else(|| {
            let prices = config.llm_cost.as_ref()?;
            prices.estimate(&next.body_bytes()?)
        })
}

impl<Req, Res, E> Wait<Req, Res, E> {
    /// Waits for the store, the backoff and the service, in that order.
    pub(crate) fn poll_end<S, C, H>(
        &mut self,
        config: &Config<C, H>,
        service: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<End<E>>
    where
        S: Service<Req, Response = Res, Error = E>,
    {
        loop {
            match &mut self.step {
                Step::Acquiring(verdict, decided) => {
                    let verdict = ready!(verdict.as_mut().poll(cx));
                    let now = Instant::now();
                    // The store's answer time is part of the wait, not added to it.
                    let delay = self.call.delay().saturating_sub(now - *decided);
                    let policy = &config.policy;
                    // A refusal drops the permit: the ratio gets its share back.
                    match decide::granted(verdict).and_then(|permit| {
                        decide::in_time(policy, &self.call, delay, now).map(|()| permit)
                    }) {
                        Ok(permit) => {
                            self.permit = Some(permit);
                            self.step = start_wait(config, &mut self.call, delay, self.cost);
                        }
                        Err(reason) => return Poll::Ready(End::Stop(reason)),
                    }
                }
                Step::Sleeping(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    self.step = Step::Ready;
                }
                Step::Ready => {
                    // Readiness first: a retry waiting for the service holds no slot.
                    return Poll::Ready(match ready!(service.poll_ready(cx)) {
                        Err(e) => End::NotReady(e),
                        Ok(()) => match decide::slot(&config.budgets) {
                            Ok(slot) => End::Send(slot),
                            Err(reason) => End::Stop(reason),
                        },
                    });
                }
            }
        }
    }

    /// The call stops with its last failure (the deadline met it while it waited).
    pub(crate) fn give_up<C>(
        self,
        config: &Config<C, impl Sized>,
        reason: StopReason,
    ) -> Result<Res, RetryError<E>>
    where
        C: Classify<Res, E>,
    {
        stop(config, self.call, Some(self.failed), self.kind, reason)
    }

    /// The wait ended: the retry is sent (its attempt and the call), or the call stops.
    pub(crate) fn end<S, C, H>(
        self,
        config: &Config<C, H>,
        service: &mut S,
        end: End<E>,
        span: &tracing::Span,
    ) -> Resumed<S::Future, Req, Res, E>
    where
        S: Service<Req, Response = Res, Error = E>,
        Req: RetryRequest,
        C: Classify<Res, E>,
    {
        let Wait {
            mut call,
            failed,
            kind,
            permit,
            cost,
            reservation,
            ..
        } = self;
        let slot = match end {
            End::Send(slot) => slot,
            End::Stop(reason) => {
                return Resumed::Done(stop(config, call, Some(failed), kind, reason));
            }
            // Counted and logged like any other stop, with the readiness error.
            End::NotReady(e) => {
                let reason = decide::not_ready();
                return Resumed::Done(stop(config, call, Some(Err(e)), kind, reason));
            }
        };
        let request = match decide::copy(&mut call) {
            Ok(request) => request,
            Err(reason) => return Resumed::Done(stop(config, call, Some(failed), kind, reason)),
        };
        // Sent: the ratio's share is spent, and the failed answer will not be returned.
        if let Some(permit) = permit {
            permit.commit();
        }
        drop(failed);
        let delay = call.delay();
        let retried = call.failed(&config.policy);
        retried.slot = slot;
        let cost = cost.unwrap_or(0);
        retried.cost = retried.cost.saturating_add(cost);
        retried.reservation = reservation;
        // Keep a copy for the attempt after this one, if one is allowed.
        if call.attempts < config.policy.max_retries() {
            call.next = request.try_clone();
        }
        // Counted now, not when decided: a retry refused on the way was never sent.
        config
            .stats
            .record_retry(&call.op.handle, kind, delay, cost);
        call.attempt_span = attempt_span(span, &request, call.attempts, call.op.as_str());
        call.attempts += 1;
        let attempt = {
            let _entered = call.attempt_span.enter();
            service.call(request)
        };
        Resumed::Calling(attempt, call)
    }
}

/// A waiting call, once its wait ended.
pub(crate) enum Resumed<F, Req, Res, E> {
    /// The retry is in flight.
    Calling(F, Call<Req>),
    /// The call ended.
    Done(Result<Res, RetryError<E>>),
}

/// The retry is granted: say so, then sleep (or go straight on for a zero delay: tokio's
/// timer rounds every sleep up to its 1 ms tick).
fn start_wait<Req, C, H>(
    config: &Config<C, H>,
    call: &mut Call<Req>,
    delay: Duration,
    cost: Option<u64>,
) -> Step {
    let retried = call.failed(&config.policy);
    retried.total_delay += delay;
    retried.delay = delay;
    log_retry(config, call, delay, cost);
    if delay.is_zero() {
        Step::Ready
    } else {
        Step::Sleeping(Box::pin(tokio::time::sleep(delay)))
    }
}
