//! The `on_retry` hook is user code: whatever it does to the request, a retry is sent with
//! the key of the first attempt (or not at all), and a hook or classifier that panics
//! leaks nothing from the budgets.

use std::io;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, Request, Response};
use tower::{Layer, Service, ServiceExt};
use tower_retry_guard::retry::RetryContext;
use tower_retry_guard::{
    Budgets, CallOutcome, ErrorKind, Outcome, RetryInfo, RetryLayer, RetryPolicy, StopReason,
};

type Seen = Arc<Mutex<Vec<HeaderMap>>>;

/// Answers 503 to the first request it sees, 200 after; keeps every request's headers.
fn flaky(
    seen: Seen,
) -> impl Service<
    Request<String>,
    Response = Response<String>,
    Error = io::Error,
    Future = std::future::Ready<Result<Response<String>, io::Error>>,
> + Clone {
    tower::service_fn(move |req: Request<String>| {
        let mut seen = seen.lock().unwrap();
        seen.push(req.headers().clone());
        let status = if seen.len() == 1 { 503 } else { 200 };
        std::future::ready(Ok(Response::builder()
            .status(status)
            .body(String::new())
            .unwrap()))
    })
}

fn post() -> Request<String> {
    Request::post("http://127.0.0.1/v1/tools/send_email")
        .body("{\"to\":\"a@example.com\"}".to_owned())
        .unwrap()
}

fn layer() -> RetryLayer {
    RetryLayer::new()
        .policy(RetryPolicy::builder().max_retries(2).build().unwrap())
        .budgets(Budgets::default())
}

#[tokio::test(start_paused = true)]
async fn a_hook_that_rebuilds_the_request_still_sends_the_calls_key() {
    let seen = Seen::default();
    // A fallback model: the hook builds a new request, without the headers of the old one.
    let l = layer().on_retry(
        |req: &mut Request<String>, _: &Result<Response<String>, io::Error>, _: &RetryContext| {
            *req = Request::post("http://127.0.0.1/v1/tools/send_email")
                .body("{\"to\":\"a@example.com\",\"model\":\"fallback\"}".to_owned())
                .unwrap();
            true
        },
    );
    let mut svc = l.layer(flaky(seen.clone()));
    let res = svc.ready().await.unwrap().call(post()).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let first = seen[0]
        .get("idempotency-key")
        .expect("the first attempt of a POST has a key");
    assert_eq!(
        seen[1].get("idempotency-key"),
        Some(first),
        "the retry of a side effect went out without the call's key"
    );
    assert_eq!(seen[1]["x-retry-count"], "1");
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(
        info.key.as_ref().map(|k| k.header_value()),
        Some(first),
        "the key reported is the key sent"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hook_that_changes_the_key_does_not_send_a_retry_under_another_key() {
    let seen = Seen::default();
    let l = layer().on_retry(
        |req: &mut Request<String>, _: &Result<Response<String>, io::Error>, _: &RetryContext| {
            req.headers_mut()
                .insert("idempotency-key", "\"another-key\"".parse().unwrap());
            true
        },
    );
    let budgets = Budgets::default();
    let mut svc = l.budgets(budgets.clone()).layer(flaky(seen.clone()));
    let res = svc.ready().await.unwrap().call(post()).await;
    let seen = seen.lock().unwrap().clone();
    let first = seen[0].get("idempotency-key").unwrap().clone();
    for (n, headers) in seen.iter().enumerate() {
        assert_eq!(
            headers.get("idempotency-key"),
            Some(&first),
            "attempt {n} was sent under another key than the call's"
        );
    }
    // Whatever the layer chose (restore the key, or stop), what it reports is what was sent.
    let info = match &res {
        Ok(r) => r.extensions().get::<RetryInfo>().unwrap().clone(),
        Err(e) => e.info().clone(),
    };
    assert_eq!(info.key.as_ref().map(|k| k.header_value()), Some(&first));
    assert_eq!(info.attempts as usize, seen.len());
    assert_eq!(budgets.active_calls(), Some(0));
    assert_eq!(budgets.retries_in_flight(), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_hook_leaks_no_active_call_nor_retry_slot() {
    let budgets = Budgets::default();
    let l = layer().budgets(budgets.clone()).on_retry(
        |_: &mut Request<String>, _: &Result<Response<String>, io::Error>, _: &RetryContext| {
            panic!("hook bug")
        },
    );
    let mut svc = l.layer(flaky(Seen::default()));
    let fut = svc.ready().await.unwrap().call(post());
    let joined = tokio::spawn(fut).await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(budgets.active_calls(), Some(0));
    assert_eq!(budgets.retries_in_flight(), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_classifier_leaks_no_active_call_nor_retry_slot() {
    let budgets = Budgets::default();
    let l = layer()
        .budgets(budgets.clone())
        .classify(|r: &Result<Response<String>, io::Error>| match r {
            Ok(res) if res.status() == 200 => panic!("classifier bug"),
            _ => Outcome::Retry {
                kind: ErrorKind::Overloaded,
                after: None,
            },
        });
    let mut svc = l.layer(flaky(Seen::default()));
    let fut = svc.ready().await.unwrap().call(post());
    let joined = tokio::spawn(fut).await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(budgets.active_calls(), Some(0));
    assert_eq!(budgets.retries_in_flight(), Some(0));
    // The layer still works afterwards.
    let l = layer().budgets(budgets.clone());
    let mut svc = l.layer(flaky(Seen::default()));
    let res = svc.ready().await.unwrap().call(post()).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.outcome, CallOutcome::Recovered);
    assert!(!matches!(
        info.outcome,
        CallOutcome::Stopped(StopReason::NotRetryable)
    ));
}
