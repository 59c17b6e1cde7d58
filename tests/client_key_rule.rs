//! The key reported is the key sent: one rule decides it, and an invalid key on the request
//! is an error before the first attempt.

mod common;

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use tower::{BoxError, Layer, ServiceExt};
use tower_retry_guard::{IdempotencyKey, RetryInfo, RetryLayer, StopReason};

type Sent = Arc<Mutex<Vec<Option<String>>>>;

fn recording() -> (
    Sent,
    impl tower::Service<
        Request<String>,
        Response = Response<String>,
        Error = BoxError,
        Future = impl Send,
    > + Clone,
) {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let s = sent.clone();
    let svc = tower::service_fn(move |req: Request<String>| {
        let key = req
            .headers()
            .get("idempotency-key")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let n = {
            let mut sent = s.lock().unwrap();
            sent.push(key);
            sent.len()
        };
        async move {
            let status = if n == 1 { 503 } else { 200 };
            Ok::<_, BoxError>(Response::builder().status(status).body(String::new())?)
        }
    });
    (sent, svc)
}

#[tokio::test(start_paused = true)]
async fn an_extension_and_a_different_header_are_refused_before_sending() {
    let (sent, svc) = recording();
    let mut req = Request::post("/tools/send_email")
        .header("idempotency-key", "has space")
        .body(String::new())
        .unwrap();
    req.extensions_mut()
        .insert(IdempotencyKey::new("ext-key").unwrap());
    let err = RetryLayer::new().layer(svc).oneshot(req).await.unwrap_err();
    assert!(matches!(err.reason(), StopReason::InvalidKey(_)), "{err}");
    assert_eq!(err.attempts(), 0);
    assert!(sent.lock().unwrap().is_empty(), "nothing was sent");
}

#[tokio::test(start_paused = true)]
async fn an_extension_and_the_same_header_agree() {
    let (_, svc) = recording();
    let mut req = Request::post("/tools/send_email")
        .header("idempotency-key", "ext-key")
        .body(String::new())
        .unwrap();
    req.extensions_mut()
        .insert(IdempotencyKey::new("ext-key").unwrap());
    let res = RetryLayer::new().layer(svc).oneshot(req).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.key.as_ref().map(|k| k.as_str()), Some("ext-key"));
}

#[tokio::test(start_paused = true)]
async fn the_extension_key_is_the_one_sent_on_every_attempt() {
    let (sent, svc) = recording();
    let mut req = Request::post("/tools/send_email")
        .body(String::new())
        .unwrap();
    req.extensions_mut()
        .insert(IdempotencyKey::new("ext-key").unwrap());
    let res = RetryLayer::new()
        .idempotency_key_fn(|_| IdempotencyKey::new("from-closure").ok())
        .layer(svc)
        .oneshot(req)
        .await
        .unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.attempts, 2);
    assert_eq!(info.key.as_ref().map(|k| k.as_str()), Some("ext-key"));
    let sent = sent.lock().unwrap();
    assert_eq!(sent.len(), 2);
    for key in sent.iter() {
        assert_eq!(
            key.as_deref(),
            Some("\"ext-key\""),
            "the reported key is the key sent"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_invalid_key_header_is_refused_whatever_the_method() {
    for method in [http::Method::GET, http::Method::POST, http::Method::PUT] {
        let (sent, svc) = recording();
        let req = Request::builder()
            .method(method.clone())
            .uri("/v1/models")
            .header("idempotency-key", "has space")
            .body(String::new())
            .unwrap();
        let err = RetryLayer::new().layer(svc).oneshot(req).await.unwrap_err();
        assert!(
            matches!(err.reason(), StopReason::InvalidKey(_)),
            "{method}: {err}"
        );
        assert!(
            sent.lock().unwrap().is_empty(),
            "{method}: nothing was sent"
        );
    }
}
