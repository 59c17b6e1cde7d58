//! The retry layer in the stacks users have: timeouts, limits, ServiceBuilder, streaming
//! bodies, error bodies, real HTTP clients.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::body::{BufferErrorBodyLayer, BufferRequestBodyLayer};
use tower_retry_guard::{
    Budgets, CallOutcome, ErrorKind, RetryError, RetryInfo, RetryLayer, RetryPolicy, StopReason,
};

fn layer() -> RetryLayer {
    RetryLayer::new().budgets(Budgets::none())
}

#[tokio::test(start_paused = true)]
async fn timeout_inside_is_per_attempt_and_retried() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mut svc = ServiceBuilder::new()
        .layer(layer())
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(1)))
        .service_fn(move |_: Request<String>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                Ok::<_, BoxError>(Response::new(String::from("ok")))
            }
        });
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(Request::get("/v1/models").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.last_error, Some(ErrorKind::Timeout));
}

#[tokio::test(start_paused = true)]
async fn total_deadline_outside_cuts_the_whole_call() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let policy = RetryPolicy::builder()
        .max_total_time(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
            250,
        )))
        .layer(layer().policy(policy))
        .service_fn(move |_: Request<String>| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, BoxError>(Response::builder().status(503).body(String::new()).unwrap())
            }
        });
    let start = tokio::time::Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Request::get("/").body(String::new()).unwrap())
        .await
        .unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>());
    assert!(start.elapsed() <= Duration::from_millis(260));
    // 100 ms then 200 ms backoff (equal jitter: 50-100, 100-200): at most 3 attempts in 250 ms.
    assert!((2..=3).contains(&calls.load(Ordering::SeqCst)));
}

#[tokio::test(start_paused = true)]
async fn concurrency_limit_inside_and_rate_limit_outside() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mut svc = ServiceBuilder::new()
        // RateLimit is not Clone: it goes outside the retry layer (it limits logical calls).
        .rate_limit(100, Duration::from_secs(1))
        .layer(layer())
        // ConcurrencyLimit is Clone (a shared semaphore): inside, it limits attempts.
        .concurrency_limit(2)
        .service_fn(move |_: Request<String>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                let status = if n.is_multiple_of(2) { 503 } else { 200 };
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(status)
                        .body(String::new())
                        .unwrap(),
                )
            }
        });
    for _ in 0..5 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(Request::get("/").body(String::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 10);
}

type Boxed = BoxBody<Bytes, Infallible>;

#[tokio::test(start_paused = true)]
async fn buffered_body_within_limit_is_retried_with_same_bytes() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let mut svc = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new(1024))
        .layer(layer())
        .service_fn(
            move |req: Request<tower_retry_guard::body::BufferedBody<Boxed>>| {
                let s = s.clone();
                async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    let mut seen = s.lock().unwrap();
                    seen.push(body);
                    let status = if seen.len() == 1 { 503 } else { 200 };
                    Ok::<_, BoxError>(
                        Response::builder()
                            .status(status)
                            .body(String::new())
                            .unwrap(),
                    )
                }
            },
        );
    let body: Boxed = Full::new(Bytes::from_static(b"{\"prompt\":\"hi\"}")).boxed();
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(Request::put("/doc").body(body).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], seen[1]);
    assert_eq!(&seen[0][..], b"{\"prompt\":\"hi\"}");
}

#[tokio::test(start_paused = true)]
async fn body_over_the_limit_goes_through_once_without_retry() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mut svc = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new(8))
        .layer(layer())
        .service_fn(
            move |req: Request<tower_retry_guard::body::BufferedBody<Boxed>>| {
                c.fetch_add(1, Ordering::SeqCst);
                async move {
                    // The whole body arrives, prefix and rest.
                    let body = req.into_body().collect().await?.to_bytes();
                    assert_eq!(body.len(), 100);
                    Ok::<_, BoxError>(Response::builder().status(503).body(String::new()).unwrap())
                }
            },
        );
    let body: Boxed = Full::new(Bytes::from(vec![b'x'; 100])).boxed();
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(Request::put("/doc").body(body).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.outcome, CallOutcome::Stopped(StopReason::NotCloneable));
}

fn too_many(body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(429)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn quota_429_is_not_retried_but_rate_limit_429_is() {
    let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
    let rate = r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
    for (body, expected_calls, kind) in [
        (quota, 1, ErrorKind::QuotaExhausted),
        (rate, 4, ErrorKind::RateLimited),
    ] {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let mut svc = ServiceBuilder::new()
            .layer(layer())
            .layer(BufferErrorBodyLayer::new(64 * 1024))
            .service_fn(move |_: Request<String>| {
                c.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, BoxError>(too_many(body)) }
            });
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(
                Request::post("/v1/chat/completions")
                    .extension(tower_retry_guard::SideEffect::Idempotent)
                    .body(String::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(calls.load(Ordering::SeqCst), expected_calls);
        assert_eq!(
            res.extensions().get::<RetryInfo>().unwrap().last_error,
            Some(kind)
        );
        // The body is handed back intact.
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], body.as_bytes());
    }
}

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}")
}

fn flaky_router(hits: Arc<AtomicU32>) -> axum::Router {
    axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |headers: http::HeaderMap| {
            let n = hits.fetch_add(1, Ordering::SeqCst);
            async move {
                let key = headers
                    .get("idempotency-key")
                    .map(|v| v.to_str().unwrap_or_default().to_owned())
                    .unwrap_or_default();
                match n {
                    0 => (
                        StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after-ms", "20")],
                        key,
                    ),
                    1 => (
                        StatusCode::from_u16(529).unwrap(),
                        [("x-ignored", "1")],
                        key,
                    ),
                    _ => (StatusCode::OK, [("x-ignored", "1")], key),
                }
            }
        }),
    )
}

/// One chat completion through `svc`, which must answer.
async fn post_completion<S, B>(svc: &mut S, base: &str) -> http::Response<B>
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
{
    let request = Request::post(format!("{base}/v1/chat/completions"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    svc.ready().await.unwrap().call(request).await.unwrap()
}

#[tokio::test]
async fn hyper_util_client_against_a_real_server() {
    let hits = Arc::new(AtomicU32::new(0));
    let base = serve(flaky_router(hits.clone())).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut svc = ServiceBuilder::new()
        .layer(layer())
        .map_err(BoxError::from)
        .service(client);
    let res = post_completion(&mut svc, &base).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    let info = res.extensions().get::<RetryInfo>().unwrap().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    // The server saw the key the layer minted, on the last attempt too.
    let key = info.key.unwrap();
    assert_eq!(&body[..], format!("\"{}\"", key.as_str()).as_bytes());
}

#[tokio::test]
async fn connection_refused_is_retried_then_reported() {
    // Bind then drop: the port is (very likely) closed.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let policy = RetryPolicy::builder()
        .backoff(tower_retry_guard::Backoff::Constant(Duration::from_millis(
            5,
        )))
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(layer().policy(policy))
        .map_err(BoxError::from)
        .service(client);
    let err: RetryError<BoxError> = svc
        .ready()
        .await
        .unwrap()
        .call(
            Request::get(format!("http://{addr}/"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::Connect));
    assert_eq!(err.attempts(), 4);
    assert!(matches!(err.reason(), StopReason::Exhausted { .. }));
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_client_against_a_real_server() {
    let hits = Arc::new(AtomicU32::new(0));
    let base = serve(flaky_router(hits.clone())).await;
    let client = reqwest::Client::new();
    let mut svc = ServiceBuilder::new().layer(layer()).service(client.clone());
    let req = client
        .post(format!("{base}/v1/chat/completions"))
        .body("{}")
        .build()
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), reqwest::StatusCode::OK);
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    let info = res.extensions().get::<RetryInfo>().unwrap().clone();
    assert_eq!(info.attempts, 3);
    let body = res.text().await.unwrap();
    assert_eq!(body, format!("\"{}\"", info.key.unwrap().as_str()));
}

/// With the `hyper-util` feature, the legacy client's error is classified as it is: no
/// `map_err` under the layer.
#[cfg(feature = "hyper-util")]
#[tokio::test]
async fn hyper_util_client_needs_no_map_err() {
    let hits = Arc::new(AtomicU32::new(0));
    let base = serve(flaky_router(hits.clone())).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut svc = ServiceBuilder::new().layer(layer()).service(client);
    let res = post_completion(&mut svc, &base).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}
