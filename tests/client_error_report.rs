//! What an error reporter prints: the reason once, the inner error once (as the source); a
//! readiness failure is not a success.

mod common;

use std::error::Error as _;
use std::io;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service, ServiceExt};
use tower_retry_guard::{CallOutcome, RetryLayer, StopReason};

use common::{Erroring, get};

#[tokio::test(start_paused = true)]
async fn display_does_not_repeat_the_source() {
    let svc = RetryLayer::new().layer(Erroring::new(|| {
        io::Error::other("connection reset by peer")
    }));
    let err = svc.oneshot(get("/v1/models")).await.unwrap_err();
    let mut chain = vec![err.to_string()];
    let mut source = err.source();
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    let report = chain.join(": ");
    assert_eq!(
        report.matches("connection reset by peer").count(),
        1,
        "{report}"
    );
}

#[derive(Clone, Debug)]
struct NeverReady;

impl Service<Request<String>> for NeverReady {
    type Response = Response<String>;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Response<String>, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Err(io::Error::other("pool closed")))
    }

    fn call(&mut self, _: Request<String>) -> Self::Future {
        unreachable!("never ready")
    }
}

#[tokio::test(start_paused = true)]
async fn a_readiness_failure_is_not_reported_as_a_success() {
    let mut svc = RetryLayer::new().layer(NeverReady);
    let err = svc.ready().await.unwrap_err();
    assert_eq!(err.reason(), &StopReason::NotReady);
    assert_eq!(
        err.info().outcome,
        CallOutcome::Stopped(StopReason::NotReady)
    );
    assert!(!err.info().outcome.is_success());
    assert_eq!(err.attempts(), 0);
}
