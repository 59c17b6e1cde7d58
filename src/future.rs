//! [`ResponseFuture`]: one logical call, as a state machine
//! (calling → deciding → acquiring → sleeping → ready → calling ...), under one deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::budget::{Scope, Verdict};
use crate::call::{CallState, Refusal, operation_of};
use crate::classify::{Classify, ErrorKind, Outcome};
use crate::decide::{BoxFuture, Next, deadline_reason, decide, refusal};
use crate::error::{RetryError, StopReason};
use crate::layer::{ChangeRequest, Shared};
use crate::report::{log_retry, stop, succeed};
use crate::request::RetryRequest;

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] future: F },
        Acquiring { verdict: BoxFuture<Verdict>, delay: Duration, decided: Instant },
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
    /// may box the budget store's answer and the backoff's timer.
    ///
    /// Nothing of the call runs past its `max_total_time`: the first time the call has to
    /// wait (an attempt in flight, the budget store, the inner service getting ready), a
    /// timer is armed at its deadline; when it fires, whatever runs is dropped (the attempt's
    /// future, its retry slot, the process ratio's share) and the call ends with
    /// [`StopReason::Deadline`]. A call answered at once never touches the timer.
    #[project = ResponseFutureProj]
    pub struct ResponseFuture<S, Req, C, H>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future>,
        #[pin]
        deadline: Option<Sleep>,
        service: S,
        shared: Arc<Shared<C, H>>,
        call: Option<CallState<Req>>,
        // Failure-path state, boxed so the success path moves a small future.
        pending: Option<Box<Result<S::Response, S::Error>>>,
        refused: Option<Refusal>,
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
            deadline: None,
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
            deadline: None,
            service,
            shared,
            call: None,
            pending: None,
            refused: Some(refused),
        }
    }
}

type Output<S, Req> = Result<<S as Service<Req>>::Response, RetryError<<S as Service<Req>>::Error>>;

impl<S, Req, C, H> Future for ResponseFuture<S, Req, C, H>
where
    S: Service<Req>,
    Req: RetryRequest,
    C: Classify<S::Response, S::Error>,
    H: ChangeRequest<Req, S::Response, S::Error>,
{
    type Output = Output<S, Req>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = match this.call.as_ref() {
            Some(c) if !c.span.is_none() => Some(c.span.clone().entered()),
            _ => None,
        };
        if let Some(deadline) = this.deadline.as_mut().as_pin_mut() {
            if deadline.poll(cx).is_ready() {
                return Poll::Ready(out_of_time(&mut this));
            }
        }
        let polled = step(&mut this, cx);
        if polled.is_pending() && this.deadline.is_none() {
            // The call waits for the first time: from now on its deadline bounds it.
            if let Some(call) = this.call.as_ref() {
                this.deadline
                    .set(Some(tokio::time::sleep_until(call.deadline)));
                if let Some(deadline) = this.deadline.as_mut().as_pin_mut() {
                    if deadline.poll(cx).is_ready() {
                        return Poll::Ready(out_of_time(&mut this));
                    }
                }
            }
        }
        polled
    }
}

/// The deadline fired while the call waited: drop what runs, stop on `Deadline`.
#[allow(clippy::result_large_err)] // the future's output type
fn out_of_time<S, Req, C, H>(this: &mut ResponseFutureProj<'_, S, Req, C, H>) -> Output<S, Req>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error>,
{
    let attempt_in_flight = matches!(this.state.as_mut().project(), StateProj::Calling { .. });
    // Dropped here: the attempt's future, or the store's answer (and its ratio share).
    this.state.set(State::Done);
    let shared = &**this.shared;
    let Some(call) = this.call.as_mut() else {
        unreachable!("a deadline is armed only for a call")
    };
    let kind = if attempt_in_flight {
        if call.in_retry {
            shared.layer.budgets.on_retry_result(false);
        }
        ErrorKind::Timeout
    } else {
        call.last_kind.unwrap_or(ErrorKind::Timeout)
    };
    // A failed attempt waiting for its retry is the answer; an attempt in flight has none.
    let result = this.pending.take().map(|r| *r);
    stop(shared, call, result, kind, deadline_reason(shared))
}

/// Moves the state machine as far as it goes; returns `Pending` only from a wait.
#[allow(clippy::result_large_err)] // the future's output type
fn step<S, Req, C, H>(
    this: &mut ResponseFutureProj<'_, S, Req, C, H>,
    cx: &mut Context<'_>,
) -> Poll<Output<S, Req>>
where
    S: Service<Req>,
    Req: RetryRequest,
    C: Classify<S::Response, S::Error>,
    H: ChangeRequest<Req, S::Response, S::Error>,
{
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
                // The attempt answered: its retry slot is free.
                call.slot = None;
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
                            call.operation = call.next.as_ref().map(|r| operation_of(shared, r));
                        }
                        let reason = if kind == ErrorKind::GaveUp {
                            StopReason::InnerGaveUp
                        } else {
                            StopReason::NotRetryable
                        };
                        this.state.set(State::Done);
                        return Poll::Ready(stop(shared, call, Some(result), kind, reason));
                    }
                    Outcome::Retry { kind, after } => {
                        if call.in_retry {
                            shared.layer.budgets.on_retry_result(false);
                        }
                        call.last_kind = Some(kind);
                        match decide(shared, call, &result, kind, after) {
                            Next::Stop(kind, reason) => {
                                this.state.set(State::Done);
                                return Poll::Ready(stop(shared, call, Some(result), kind, reason));
                            }
                            Next::Wait(delay, permit) => {
                                // Kept through the sleep: returned if the retry cannot be
                                // sent after all (no slot in flight, the deadline).
                                *this.pending = Some(Box::new(result));
                                call.permit = Some(permit);
                                start_wait(shared, call, delay, this.state.as_mut());
                            }
                            Next::Acquire(verdict, delay) => {
                                *this.pending = Some(Box::new(result));
                                this.state.set(State::Acquiring {
                                    verdict,
                                    delay,
                                    decided: Instant::now(),
                                });
                            }
                        }
                    }
                }
            }
            StateProj::Acquiring {
                verdict,
                delay,
                decided,
            } => {
                let verdict = ready!(verdict.as_mut().poll(cx));
                // The wait began when the retry was decided (and checked against the
                // deadline): the store's answer time is part of it, not added to it.
                let delay = delay.saturating_sub(decided.elapsed());
                let Some(call) = this.call.as_mut() else {
                    unreachable!("an acquiring future has its call state")
                };
                let shared = &**this.shared;
                let kind = call.last_kind.unwrap_or(ErrorKind::Other);
                let reason = match refusal(verdict) {
                    // A store slower than the time left: the retry would start too late (the
                    // permit, dropped, gives the ratio its share back).
                    Ok(_) if Instant::now() + delay >= call.deadline => deadline_reason(shared),
                    Ok(permit) => {
                        call.permit = Some(permit);
                        start_wait(shared, call, delay, this.state.as_mut());
                        continue;
                    }
                    Err(reason) => reason,
                };
                let result = this.pending.take().map(|r| *r);
                this.state.set(State::Done);
                return Poll::Ready(stop(shared, call, result, kind, reason));
            }
            StateProj::Sleeping { sleep } => {
                ready!(sleep.as_mut().poll(cx));
                this.state.set(State::Ready);
            }
            StateProj::Ready => {
                // Readiness first: a retry waiting for the service holds no slot in flight.
                let ready = ready!(this.service.poll_ready(cx));
                let Some(call) = this.call.as_mut() else {
                    unreachable!("a ready future has its call state")
                };
                let shared = &**this.shared;
                let kind = call.last_kind.unwrap_or(ErrorKind::Other);
                if let Err(e) = ready {
                    // The service broke before the retry: the call ends here, counted and
                    // logged like any other stop.
                    this.state.set(State::Done);
                    return Poll::Ready(stop(
                        shared,
                        call,
                        Some(Err(e)),
                        kind,
                        StopReason::NotReady,
                    ));
                }
                match shared.layer.budgets.take_slot() {
                    Ok(slot) => call.slot = slot,
                    Err(limit) => {
                        // Too many retries are being sent right now: this one is not (its
                        // ratio share goes back with the permit).
                        let result = this.pending.take().map(|r| *r);
                        this.state.set(State::Done);
                        let reason = StopReason::Budget {
                            scope: Scope::InFlight,
                            key: None,
                            limit,
                        };
                        return Poll::Ready(stop(shared, call, result, kind, reason));
                    }
                }
                if let Some(permit) = call.permit.take() {
                    permit.commit();
                }
                let Some(mut request) = call.next.take() else {
                    unreachable!("a retry is decided only with a copy of the request")
                };
                let names = &shared.layer.names;
                request.set_attempt(call.attempts, names);
                // Keep a copy for the attempt after this one, if one is allowed.
                if call.attempts < shared.layer.policy.max_retries() {
                    call.next = request.try_clone();
                }
                // Counted now, not when decided: a retry refused on the way (no slot in
                // flight, the service broke) was never sent, and its failed attempt is
                // counted once, by the stop.
                shared.layer.stats.record_retry(&call.op, kind, call.delay);
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

/// The retry is granted: say so, then sleep (or go straight on for a zero delay: tokio's
/// timer rounds every sleep up to its 1 ms tick).
fn start_wait<Req, C, H, F>(
    shared: &Shared<C, H>,
    call: &mut CallState<Req>,
    delay: Duration,
    mut state: Pin<&mut State<F>>,
) {
    call.total_delay += delay;
    call.delay = delay;
    log_retry(shared, call, delay);
    if delay.is_zero() {
        state.set(State::Ready);
    } else {
        state.set(State::Sleeping {
            sleep: Box::pin(tokio::time::sleep(delay)),
        });
    }
}
