//! Hung or waiting retries do not starve the in-flight cap; a panicking inner `call` leaves
//! no active call counted.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_retry_guard::budget::InFlightCap;
use tower_retry_guard::{Budgets, CallOutcome, Jitter, RetryInfo, RetryLayer, RetryPolicy};

use common::get;

fn policy(total: Duration) -> RetryPolicy {
    RetryPolicy::builder()
        .max_total_time(total)
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

/// First attempt of every call: 503. Retries of `/hang`: never answer. Others: 200.
fn hang_on_retry()
-> impl Service<Request<String>, Response = Response<String>, Error = BoxError, Future = impl Send>
+ Clone {
    tower::service_fn(|req: Request<String>| async move {
        let first = req.headers().get("x-retry-count").is_some_and(|v| v == "0");
        if !first && req.uri().path() == "/hang" {
            std::future::pending::<()>().await;
        }
        let status = if first { 503 } else { 200 };
        Ok::<_, BoxError>(Response::builder().status(status).body(String::new())?)
    })
}

#[tokio::test(start_paused = true)]
async fn hung_retries_give_their_slots_back_at_the_deadline() {
    let budgets = Budgets::none().in_flight(Some(InFlightCap::new(0.0, 3).unwrap()));
    let svc = RetryLayer::new()
        .policy(policy(Duration::from_secs(1)))
        .budgets(budgets.clone())
        .layer(hang_on_retry());
    let hung: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("/hang"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(budgets.retries_in_flight(), Some(3), "all three slots held");
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Past their deadline the hung calls ended and gave their slots back.
    assert_eq!(budgets.retries_in_flight(), Some(0));
    for h in hung {
        assert!(h.await.unwrap().is_err());
    }
    let res = svc.oneshot(get("/healthy")).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.outcome, CallOutcome::Recovered);
}

/// A service that is ready only once `open` is set; answers 503 to first attempts.
#[derive(Clone, Default)]
struct Gate {
    open: Arc<AtomicBool>,
    waiting: Arc<std::sync::Mutex<Option<std::task::Waker>>>,
}

impl Gate {
    fn set(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
        if let Some(w) = self.waiting.lock().unwrap().take() {
            w.wake();
        }
    }
}

impl Service<Request<String>> for Gate {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<String>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.open.load(Ordering::SeqCst) {
            Poll::Ready(Ok(()))
        } else {
            *self.waiting.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn call(&mut self, req: Request<String>) -> Self::Future {
        let first = req.headers().get("x-retry-count").is_some_and(|v| v == "0");
        let status = if first { 503 } else { 200 };
        std::future::ready(
            Response::builder()
                .status(status)
                .body(String::new())
                .map_err(Into::into),
        )
    }
}

#[tokio::test(start_paused = true)]
async fn retries_waiting_for_readiness_hold_no_slot() {
    let budgets = Budgets::none().in_flight(Some(InFlightCap::new(0.0, 1).unwrap()));
    let layer = RetryLayer::new()
        .policy(policy(Duration::from_secs(5)))
        .budgets(budgets.clone());
    let gate = Gate::default();
    gate.set(true);
    let gated = layer.layer(gate.clone());
    // The first attempt goes through; then the gate closes before the retry.
    let waiting = tokio::spawn(gated.oneshot(get("/slow")));
    tokio::task::yield_now().await;
    gate.set(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        budgets.retries_in_flight(),
        Some(0),
        "waiting for readiness holds no slot"
    );
    // Another service sharing the budgets gets the one slot.
    let healthy = layer.layer(hang_on_retry());
    let res = healthy.oneshot(get("/ok")).await.unwrap();
    assert_eq!(
        res.extensions().get::<RetryInfo>().unwrap().outcome,
        CallOutcome::Recovered
    );
    gate.set(true);
    let res = waiting.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
}

#[derive(Clone)]
struct Panics;

impl Service<Request<String>> for Panics {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<String>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<String>) -> Self::Future {
        panic!("the inner service panicked in call")
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inner_call_leaves_no_active_call() {
    let budgets = Budgets::default();
    let attempts = Arc::new(AtomicU32::new(0));
    let mut svc = RetryLayer::new().budgets(budgets.clone()).layer(Panics);
    let a = attempts.clone();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.fetch_add(1, Ordering::SeqCst);
        drop(svc.call(get("/x")));
    }));
    assert!(caught.is_err());
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(budgets.active_calls(), Some(0));
}
