//! [`Retry`]: the service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::time::Sleep;
use tower::Service;

use super::call::Call;
use super::change::ChangeRequest;
use super::config::Config;
use super::decide;
use super::future::ResponseFuture;
use super::report::{attempt_span, refused, span};
use crate::classify::Classify;
use crate::error::RetryError;
use crate::observe::RetryInfo;
use crate::request::RetryRequest;

/// Retries calls to `S`; built by [`RetryLayer`](crate::RetryLayer).
///
/// `S` must be `Clone` (as for tower's retry): the ready service takes the first attempt, a
/// clone the retries, each polled ready first.
///
/// Waiting for `S` to be ready is bounded too: once `S` has not been ready for the policy's
/// `max_total_time`, `poll_ready` answers ready and the next call ends at once with
/// [`StopReason::Deadline`](crate::StopReason::Deadline), nothing sent (as tower's
/// `LoadShed` does: an error from `poll_ready` would fail a `Buffer` in front for good).
pub struct Retry<S, C, H> {
    inner: S,
    config: Arc<Config<C, H>>,
    /// Armed (boxed) only once `inner` answers `Pending`: the wait for readiness ends at the
    /// total time.
    not_ready: Option<Pin<Box<Sleep>>>,
    /// The wait ran out: the next call is refused without reaching `inner`.
    out_of_time: bool,
}

impl<S: Clone, C, H> Clone for Retry<S, C, H> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            config: self.config.clone(),
            not_ready: None,
            out_of_time: false,
        }
    }
}

impl<S: fmt::Debug, C, H> fmt::Debug for Retry<S, C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("layer", &self.config)
            .finish()
    }
}

impl<S, C, H> Retry<S, C, H> {
    pub(crate) fn new(inner: S, config: Arc<Config<C, H>>) -> Self {
        Retry {
            inner,
            config,
            not_ready: None,
            out_of_time: false,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, by value.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req, C, H> Service<Req> for Retry<S, C, H>
where
    S: Service<Req> + Clone,
    Req: RetryRequest,
    C: Classify<S::Response, S::Error>,
    H: ChangeRequest<Req, S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = RetryError<S::Error>;
    type Future = ResponseFuture<S, Req, C, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let Poll::Ready(ready) = self.inner.poll_ready(cx) {
            self.not_ready = None;
            self.out_of_time = false;
            return Poll::Ready(ready.map_err(|e| {
                let reason = decide::not_ready();
                RetryError::new(reason.clone(), RetryInfo::refused(reason), Some(e))
            }));
        }
        // A service that never gets ready (a pool or a concurrency limit held by hung calls)
        // must not hold the caller past the total time.
        if !self.out_of_time {
            let total = self.config.policy.max_total_time();
            let timer = self
                .not_ready
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(total)));
            ready!(timer.as_mut().poll(cx));
            self.not_ready = None;
            self.out_of_time = true;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Req) -> Self::Future {
        if std::mem::take(&mut self.out_of_time) {
            // `inner` never got ready within the total time: nothing is sent.
            let reason = decide::deadline(&self.config.policy);
            let refusal = Box::new((reason.clone(), RetryInfo::refused(reason)));
            return ResponseFuture::refused(refusal, self.inner.clone(), self.config.clone());
        }
        // The ready service takes the first attempt; a clone, polled ready again, the retries.
        match Call::start(&self.config, &mut request) {
            Ok(mut call) => {
                let span = span(&call, &request);
                self.config.stats.record_original_attempt(&call.op.handle);
                let attempt = if span.is_none() {
                    self.inner.call(request)
                } else {
                    call.attempt_span = attempt_span(&span, &request, 0, call.op.as_str());
                    // Entered while the inner service builds its future: its own spans (a
                    // `TraceLayer`, a client's) nest under the attempt.
                    let _entered = call.attempt_span.enter();
                    self.inner.call(request)
                };
                let (service, config) = (self.inner.clone(), self.config.clone());
                ResponseFuture::calling(attempt, call, span, service, config)
            }
            Err(call) => {
                let refusal = refused(&self.config, &call.op, call.invalid);
                ResponseFuture::refused(refusal, self.inner.clone(), self.config.clone())
            }
        }
    }
}
