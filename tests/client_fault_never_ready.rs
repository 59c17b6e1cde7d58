//! An inner service that never becomes ready (a saturated pool, a concurrency limit held by
//! hung calls): the caller waiting for the layer to be ready is bounded by the policy's
//! total time too, and gets `Deadline`, not a hang; the layer is not broken for good (its
//! `poll_ready` does not fail, which would fail a `Buffer` in front of it).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service, ServiceExt};
use tower_retry_guard::{RetryLayer, RetryPolicy, StopReason};

/// Pending from `poll_ready` until `ready_at` (never, for `None`); counts the calls.
struct SlowToBeReady {
    ready_at: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    calls: Arc<AtomicU32>,
}

impl SlowToBeReady {
    fn new(ready_at: Option<Instant>, calls: Arc<AtomicU32>) -> Self {
        SlowToBeReady {
            ready_at,
            timer: None,
            calls,
        }
    }
}

impl Clone for SlowToBeReady {
    fn clone(&self) -> Self {
        SlowToBeReady::new(self.ready_at, self.calls.clone())
    }
}

impl Service<Request<String>> for SlowToBeReady {
    type Response = Response<String>;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Response<String>, io::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        let Some(at) = self.ready_at else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        timer.as_mut().poll(cx).map(Ok)
    }

    fn call(&mut self, _: Request<String>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Response::new(String::new())))
    }
}

fn layer(total: Duration) -> RetryLayer {
    RetryLayer::new().policy(
        RetryPolicy::builder()
            .max_total_time(total)
            .build()
            .unwrap(),
    )
}

fn get() -> Request<String> {
    Request::get("http://127.0.0.1/v1/models")
        .body(String::new())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_service_never_ready_ends_at_the_total_time() {
    let calls = Arc::new(AtomicU32::new(0));
    let svc = layer(Duration::from_secs(2)).layer(SlowToBeReady::new(None, calls.clone()));
    let started = Instant::now();
    let waited = tokio::time::timeout(Duration::from_secs(3600), svc.oneshot(get())).await;
    let err = waited
        .expect("the caller hung on a service that never became ready")
        .unwrap_err();
    assert!(
        started.elapsed() <= Duration::from_millis(2001),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err.reason(), StopReason::Deadline { .. }), "{err}");
    assert_eq!(err.attempts(), 0);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_service_ready_in_time_is_called() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = layer(Duration::from_secs(2)).layer(SlowToBeReady::new(
        Some(Instant::now() + Duration::from_millis(1500)),
        calls.clone(),
    ));
    let res = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(res.status(), 200);
    // Ready again at once afterwards: the wait for readiness starts afresh each time.
    tokio::time::advance(Duration::from_secs(5)).await;
    svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_service_ready_too_late_refuses_one_call_then_works_again() {
    let calls = Arc::new(AtomicU32::new(0));
    let started = Instant::now();
    let mut svc = layer(Duration::from_secs(2)).layer(SlowToBeReady::new(
        Some(started + Duration::from_secs(3)),
        calls.clone(),
    ));
    // Not an error from `poll_ready`: the call is refused, nothing sent.
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    assert!(matches!(err.reason(), StopReason::Deadline { .. }), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let res = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
