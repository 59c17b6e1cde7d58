//! [`ResponseFuture`]: one logical call as a state machine — calling; after a failed
//! attempt, waiting (the budget store, the backoff, the service getting ready: `wait.rs`);
//! calling again — in which every state owns its data and one deadline bounds them all.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::Service;

use super::call::Call;
use super::change::ChangeRequest;
use super::config::Config;
use super::decide;
use super::report::{Refusal, attempt_answered, attempt_failed, stop, succeed};
use super::wait::{Answered, Resumed, Wait, answered};
use crate::classify::{Classify, ErrorKind, Outcome};
use crate::error::RetryError;
use crate::request::RetryRequest;

pin_project! {
    #[project = StateProj]
    #[project_replace = StateOwn]
    enum State<F, Req, Res, E> {
        // An attempt in flight.
        Calling { #[pin] attempt: F, call: Call<Req> },
        // Between attempts (boxed: the success path moves a small future).
        Waiting { wait: Box<Wait<Req, Res, E>> },
        // Refused before anything was sent (an invalid key).
        Refused { refusal: Refusal },
        Done,
    }
}

pin_project! {
    /// The future of [`Retry`](crate::Retry): one logical call, all its attempts.
    ///
    /// An unboxed state machine. A call answered at once allocates nothing of its own; a
    /// call that waits boxes its deadline's timer (once), and a failure boxes the waiting
    /// call, and may box the budget store's answer and the backoff's timer.
    ///
    /// Nothing of the call runs past its `max_total_time`: the first time the call has to
    /// wait (an attempt in flight, the budget store, the inner service getting ready), a
    /// timer is armed at its deadline; when it fires, whatever runs is dropped (the attempt's
    /// future, its retry slot, the process ratio's share) and the call ends with
    /// [`StopReason::Deadline`](crate::StopReason::Deadline). A call answered at once never
    /// touches the timer.
    pub struct ResponseFuture<S, Req, C, H>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future, Req, S::Response, S::Error>,
        // Boxed, and armed only once the call waits: a call answered at once never
        // allocates it, and the future stays small to move.
        deadline: Option<Pin<Box<Sleep>>>,
        span: tracing::Span,
        service: S,
        config: Arc<Config<C, H>>,
    }
}

type Output<S, Req> = Result<<S as Service<Req>>::Response, RetryError<<S as Service<Req>>::Error>>;
type StateOf<S, Req> = State<
    <S as Service<Req>>::Future,
    Req,
    <S as Service<Req>>::Response,
    <S as Service<Req>>::Error,
>;

impl<S: Service<Req>, Req, C, H> ResponseFuture<S, Req, C, H> {
    pub(crate) fn calling(
        attempt: S::Future,
        call: Call<Req>,
        span: tracing::Span,
        service: S,
        config: Arc<Config<C, H>>,
    ) -> Self {
        let state = State::Calling { attempt, call };
        ResponseFuture {
            state,
            deadline: None,
            span,
            service,
            config,
        }
    }

    pub(crate) fn refused(refusal: Refusal, service: S, config: Arc<Config<C, H>>) -> Self {
        ResponseFuture {
            state: State::Refused { refusal },
            deadline: None,
            span: tracing::Span::none(),
            service,
            config,
        }
    }
}

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
        let _entered = (!this.span.is_none()).then(|| this.span.enter());
        let config = &**this.config;
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(out_of_time::<S, Req, C, H>(config, this.state));
            }
        }
        let waited = this.deadline.is_some();
        let polled = step::<S, Req, C, H>(
            config,
            this.service,
            this.state.as_mut(),
            this.span,
            waited,
            cx,
        );
        if polled.is_pending() && !waited {
            // The call waits for the first time: from now on its deadline bounds it.
            let at = match this.state.as_mut().project() {
                StateProj::Calling { call, .. } => call.deadline,
                StateProj::Waiting { wait } => wait.call.deadline,
                StateProj::Refused { .. } | StateProj::Done => return polled,
            };
            let deadline = this.deadline.insert(Box::pin(tokio::time::sleep_until(at)));
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(out_of_time::<S, Req, C, H>(config, this.state));
            }
        }
        polled
    }
}

/// Moves the state machine as far as it goes; `Pending` only from a wait.
fn step<S, Req, C, H>(
    config: &Config<C, H>,
    service: &mut S,
    mut state: Pin<&mut StateOf<S, Req>>,
    span: &tracing::Span,
    waited: bool,
    cx: &mut Context<'_>,
) -> Poll<Output<S, Req>>
where
    S: Service<Req>,
    Req: RetryRequest,
    C: Classify<S::Response, S::Error>,
    H: ChangeRequest<Req, S::Response, S::Error>,
{
    // Bounded: each turn returns or moves the state forward; a call makes at most
    // `RetryPolicy::MAX_RETRIES_LIMIT + 1` attempts.
    loop {
        let next = match state.as_mut().project() {
            StateProj::Calling { attempt, call } => {
                let result = if call.attempt_span.is_none() {
                    ready!(attempt.poll(cx))
                } else {
                    let _entered = call.attempt_span.enter();
                    ready!(attempt.poll(cx))
                };
                let outcome = config.classify.classify(&result);
                attempt_answered(&call.attempt_span, &config.classify, &result, &outcome);
                if let Outcome::Success = outcome {
                    // The success path moves nothing: the call is read in place. The attempt's
                    // span ends first (the final event is on the call's span).
                    if !call.attempt_span.is_none() {
                        call.attempt_span = tracing::Span::none();
                    }
                    let output = succeed(config, call, result, waited);
                    state.set(State::Done);
                    return Poll::Ready(output);
                }
                // The attempt is spent: take the call out of the state.
                let StateOwn::Calling { call, .. } = state.as_mut().project_replace(State::Done)
                else {
                    continue;
                };
                match answered(config, call, result, outcome) {
                    Answered::Done(output) => return Poll::Ready(output),
                    Answered::Wait(wait) => State::Waiting { wait },
                }
            }
            StateProj::Waiting { wait } => {
                let end = ready!(wait.poll_end(config, service, cx));
                let StateOwn::Waiting { wait } = state.as_mut().project_replace(State::Done) else {
                    continue;
                };
                match wait.end(config, service, end, span) {
                    Resumed::Calling(attempt, call) => State::Calling { attempt, call },
                    Resumed::Done(output) => return Poll::Ready(output),
                }
            }
            StateProj::Refused { .. } => match state.as_mut().project_replace(State::Done) {
                StateOwn::Refused { refusal } => return Poll::Ready(Err(refused(refusal))),
                _ => continue,
            },
            StateProj::Done => panic!("ResponseFuture polled after completion"),
        };
        state.set(next);
    }
}

/// The deadline fired while the call waited: drop what runs, stop on `Deadline`.
fn out_of_time<S, Req, C, H>(
    config: &Config<C, H>,
    state: Pin<&mut StateOf<S, Req>>,
) -> Output<S, Req>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error>,
{
    let reason = decide::deadline(&config.policy);
    // Dropped here: the attempt's future, or the store's answer (and the ratio's share).
    match state.project_replace(State::Done) {
        StateOwn::Calling { call, .. } => {
            attempt_failed(&call.attempt_span, ErrorKind::Timeout);
            // An attempt in flight has no answer.
            if call.in_retry() {
                config.budgets.on_retry_result(false);
            }
            stop(config, call, None, ErrorKind::Timeout, reason)
        }
        StateOwn::Waiting { wait } => wait.give_up(config, reason),
        StateOwn::Refused { refusal } => Err(refused(refusal)),
        StateOwn::Done => panic!("ResponseFuture polled after completion"),
    }
}

fn refused<E>(refusal: Refusal) -> RetryError<E> {
    let (reason, info) = *refusal;
    RetryError::new(reason, info, None)
}
