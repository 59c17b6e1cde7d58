//! Two retry layers stacked must not multiply attempts: the outer recognises that the inner
//! gave up (a failing response that carries a `RetryInfo`, or the inner's `RetryError`).

mod common;

use std::io;
use std::sync::{Arc, Mutex};

use common::{Erroring, Scripted, get, post, send};
use http::{Request, Response};
use tower::{BoxError, ServiceBuilder, service_fn};
use tower_retry_guard::{
    Budgets, CallOutcome, ErrorKind, RetryError, RetryInfo, RetryLayer, StopReason,
};

fn layer() -> RetryLayer {
    RetryLayer::new().budgets(Budgets::none())
}

fn refused() -> BoxError {
    Box::new(io::Error::from(io::ErrorKind::ConnectionRefused))
}

#[tokio::test(start_paused = true)]
async fn stacked_layers_over_503_make_4_attempts_not_16() {
    let outer = layer();
    let outer_stats = outer.stats();
    let inner_layer = layer();
    let inner_stats = inner_layer.stats();
    let inner = Scripted::always(503);
    let mut svc = ServiceBuilder::new()
        .layer(outer)
        .layer(inner_layer)
        .service(inner.clone());
    let res = send(&mut svc, get("/v1/models")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(inner.count(), 4);
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert!(matches!(info.outcome, CallOutcome::Stopped(_)), "{info:?}");

    // The inner layer did the retrying; the outer saw one attempt that the inner gave up on.
    let inner_kind = inner_stats.kind("GET /v1/models", ErrorKind::Overloaded);
    assert_eq!((inner_kind.retries, inner_kind.exhausted), (3, 1));
    assert_eq!(outer_stats.totals("GET /v1/models").retries, 0);
    assert_eq!(
        outer_stats
            .kind("GET /v1/models", ErrorKind::GaveUp)
            .not_retried,
        1
    );
}

#[tokio::test(start_paused = true)]
async fn stacked_layers_keep_the_inner_layers_account() {
    // The response must say what really happened: 4 attempts, retries exhausted (or 3
    // attempts, recovered), not the outer's single attempt.
    let mut down = ServiceBuilder::new()
        .layer(layer())
        .layer(layer())
        .service(Scripted::always(503));
    let res = send(&mut down, get("/x")).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.attempts, 4, "{info:?}");
    assert_eq!(
        info.outcome,
        CallOutcome::Stopped(StopReason::Exhausted { max_retries: 3 })
    );

    let mut flaky = ServiceBuilder::new()
        .layer(layer())
        .layer(layer())
        .service(Scripted::new(|n| if n < 2 { 503 } else { 200 }));
    let res = send(&mut flaky, get("/x")).await.unwrap();
    assert_eq!(res.status(), 200);
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.attempts, 3, "{info:?}");
    assert_eq!(info.outcome, CallOutcome::Recovered);
}

#[tokio::test(start_paused = true)]
async fn stacked_layers_send_one_key_on_every_attempt() {
    let keys = Arc::new(Mutex::new(Vec::new()));
    let seen = keys.clone();
    let inner = service_fn(move |req: Request<String>| {
        seen.lock()
            .unwrap()
            .push(req.headers().get("idempotency-key").cloned());
        async { Ok::<_, io::Error>(Response::builder().status(503).body(String::new()).unwrap()) }
    });
    let mut svc = ServiceBuilder::new()
        .layer(layer())
        .layer(layer())
        .service(inner);
    send(&mut svc, post("/v1/emails")).await.unwrap();
    let keys = keys.lock().unwrap();
    assert_eq!(keys.len(), 4);
    assert!(keys[0].is_some());
    assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
}

#[tokio::test(start_paused = true)]
async fn stacked_layers_over_box_errors_make_4_attempts() {
    let inner = Erroring::new(refused);
    let outer = layer();
    let outer_stats = outer.stats();
    let mut svc = ServiceBuilder::new()
        .layer(outer)
        .layer(layer())
        .service(inner.clone());
    // The outer's error is a RetryError around the inner's RetryError<BoxError>.
    let err: RetryError<RetryError<BoxError>> = send(&mut svc, get("/x")).await.unwrap_err();
    assert_eq!(inner.count(), 4);
    assert_eq!(err.reason(), &StopReason::InnerGaveUp);
    assert_eq!(err.attempts(), 1);
    assert_eq!(err.kind(), Some(ErrorKind::GaveUp));
    let inner_err = err.inner().expect("the inner layer's error");
    assert_eq!(
        inner_err.reason(),
        &StopReason::Exhausted { max_retries: 3 }
    );
    assert_eq!(inner_err.attempts(), 4);
    assert_eq!(inner_err.kind(), Some(ErrorKind::Connect));
    // The source chain reaches the transport error.
    let source = std::error::Error::source(&err).expect("inner RetryError");
    let io = std::error::Error::source(source)
        .and_then(|e| e.downcast_ref::<io::Error>())
        .expect("the io error");
    assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
    assert_eq!(outer_stats.totals("GET /x").retries, 0);
}

#[tokio::test(start_paused = true)]
async fn stacked_layers_with_errors_boxed_in_between() {
    // A common stack: the inner's error boxed into a BoxError before the outer sees it.
    let inner = Erroring::new(refused);
    let mut svc = ServiceBuilder::new()
        .layer(layer())
        .map_err(|e: RetryError<BoxError>| -> BoxError { Box::new(e) })
        .layer(layer())
        .service(inner.clone());
    let err = send(&mut svc, get("/x")).await.unwrap_err();
    assert_eq!(inner.count(), 4);
    assert_eq!(err.reason(), &StopReason::InnerGaveUp);

    let inner = Erroring::new(|| io::Error::from(io::ErrorKind::TimedOut));
    let mut svc = ServiceBuilder::new()
        .layer(layer())
        .map_err(|e: RetryError<io::Error>| -> BoxError { Box::new(e) })
        .layer(layer())
        .service(inner.clone());
    let err = send(&mut svc, get("/x")).await.unwrap_err();
    assert_eq!(inner.count(), 4);
    assert_eq!(err.reason(), &StopReason::InnerGaveUp);
}

#[tokio::test(start_paused = true)]
async fn a_single_layer_over_box_errors_still_retries() {
    // The guard against stacking must not stop a plain BoxError from being retried.
    let inner = Erroring::new(refused);
    let mut svc = ServiceBuilder::new().layer(layer()).service(inner.clone());
    let err = send(&mut svc, get("/x")).await.unwrap_err();
    assert_eq!(inner.count(), 4);
    assert_eq!(err.reason(), &StopReason::Exhausted { max_retries: 3 });
}
