//! A request carrying two idempotency keys is ambiguous: the server answers 400, the client refuses it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http::{HeaderValue, Request, Response, StatusCode};
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_retry_guard::server::IdempotencyLayer;
use tower_retry_guard::{RetryLayer, StopReason};

fn two_keys<B>(mut req: Request<B>) -> Request<B> {
    let h = req.headers_mut();
    h.append("idempotency-key", HeaderValue::from_static("\"key-a\""));
    h.append("idempotency-key", HeaderValue::from_static("\"key-b\""));
    req
}

#[tokio::test]
async fn server_answers_400_to_two_idempotency_key_headers() {
    let runs = Arc::new(AtomicUsize::new(0));
    let seen = runs.clone();
    let app = Router::new()
        .route(
            "/emails",
            post(move || {
                seen.fetch_add(1, Ordering::SeqCst);
                async { "sent" }
            }),
        )
        .layer(IdempotencyLayer::memory());
    let res = app
        .clone()
        .oneshot(two_keys(
            Request::post("/emails").body(Body::from("hi")).unwrap(),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn client_refuses_a_side_effect_with_two_idempotency_key_headers() {
    let sent = Arc::new(AtomicUsize::new(0));
    let seen = sent.clone();
    let svc =
        ServiceBuilder::new()
            .layer(RetryLayer::new())
            .service_fn(move |_: Request<String>| {
                seen.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, BoxError>(Response::new(String::new())) }
            });
    let err = svc
        .oneshot(two_keys(
            Request::post("/emails").body(String::new()).unwrap(),
        ))
        .await
        .unwrap_err();
    assert!(matches!(err.reason(), StopReason::InvalidKey(_)), "{err}");
    assert_eq!(sent.load(Ordering::SeqCst), 0);
}
