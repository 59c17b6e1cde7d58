//! The cap on retries in flight (Envoy: 20% of active requests, at least 3).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::budget::{InFlightCap, Scope};
use tower_retry_guard::{
    Budgets, CallOutcome, Jitter, RetryInfo, RetryLayer, RetryPolicy, StopReason,
};

fn get() -> Request<String> {
    Request::get("/v1/models").body(String::new()).unwrap()
}

/// Every call's first attempt fails with 503 after 10 ms; later attempts succeed.
fn first_attempt_fails()
-> impl Service<Request<String>, Response = Response<String>, Error = BoxError, Future = impl Send>
+ Clone {
    tower::service_fn(|req: Request<String>| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let first = req.headers().get("x-retry-count").is_some_and(|v| v == "0");
        let status = if first {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        Ok::<_, BoxError>(Response::builder().status(status).body(String::new())?)
    })
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_failures_gets_at_most_the_cap_of_retries_at_once() {
    let budgets = Budgets::none().in_flight(Some(InFlightCap::new(0.2, 3).unwrap()));
    // No jitter: the ten retries are sent at the same instant.
    let policy = RetryPolicy::builder().jitter(Jitter::None).build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().policy(policy).budgets(budgets.clone()))
        .service(first_attempt_fails());
    // 10 calls fail together: max(3, 20% of 10) = 3 retries may be in flight.
    let calls: Vec<_> = (0..10).map(|_| svc.clone().oneshot(get())).collect();
    let results = futures_join(calls).await;
    let mut recovered = 0;
    let mut denied = 0;
    for res in results {
        let res = res.unwrap();
        let info = res.extensions().get::<RetryInfo>().unwrap();
        match &info.outcome {
            CallOutcome::Recovered => recovered += 1,
            CallOutcome::Stopped(StopReason::Budget { scope, limit, .. }) => {
                assert_eq!(*scope, Scope::InFlight);
                assert!(limit.contains("retries in flight"), "{limit}");
                denied += 1;
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(recovered, 3);
    assert_eq!(denied, 7);
    // Everything is given back once the calls are over.
    assert_eq!(budgets.retries_in_flight(), Some(0));
    assert_eq!(budgets.active_calls(), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_its_retry_is_in_flight_gives_its_slot_back() {
    let budgets = Budgets::none().in_flight(Some(InFlightCap::new(0.0, 1).unwrap()));
    let attempts = Arc::new(AtomicU32::new(0));
    let a = attempts.clone();
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().budgets(budgets.clone()))
        .service_fn(move |_: Request<String>| {
            let n = a.fetch_add(1, Ordering::SeqCst);
            async move {
                // The first attempt fails at once; the retry hangs for a second.
                if n == 1 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let status = if n == 0 { 503 } else { 200 };
                Ok::<_, BoxError>(Response::builder().status(status).body(String::new())?)
            }
        });
    let call = svc.ready().await.unwrap().call(get());
    // The retry is sent after 50-100 ms and is still in flight at 500 ms.
    let abandoned = tokio::time::timeout(Duration::from_millis(500), call).await;
    assert!(abandoned.is_err(), "the retry was still in flight");
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(budgets.retries_in_flight(), Some(0));
    assert_eq!(budgets.active_calls(), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_retry_in_flight_is_counted_until_it_answers() {
    let budgets = Budgets::none().in_flight(Some(InFlightCap::new(0.0, 1).unwrap()));
    let attempts = Arc::new(AtomicU32::new(0));
    let a = attempts.clone();
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().budgets(budgets.clone()))
        .service_fn(move |_: Request<String>| {
            let n = a.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 1 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let status = if n == 0 { 503 } else { 200 };
                Ok::<_, BoxError>(Response::builder().status(status).body(String::new())?)
            }
        });
    let call = tokio::spawn(svc.ready().await.unwrap().call(get()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(budgets.retries_in_flight(), Some(1));
    assert_eq!(budgets.active_calls(), Some(1));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(budgets.retries_in_flight(), Some(0));
    assert_eq!(budgets.active_calls(), Some(0));
}

#[tokio::test(start_paused = true)]
async fn the_cap_can_be_turned_off() {
    let budgets = Budgets::none().in_flight(None);
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().budgets(budgets.clone()))
        .service(first_attempt_fails());
    let calls: Vec<_> = (0..10).map(|_| svc.clone().oneshot(get())).collect();
    for res in futures_join(calls).await {
        assert_eq!(res.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(budgets.retries_in_flight(), None);
}

/// Joins futures on the current task (no extra dependency).
async fn futures_join<F: std::future::Future + Send + 'static>(futures: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
