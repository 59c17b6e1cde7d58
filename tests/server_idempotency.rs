//! IdempotencyLayer over a real axum server and a real HTTP client, plus a few in-process
//! checks with virtual time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;
use tower::{Service, ServiceExt};
use tower_retry_guard::budget::StoreError;
use tower_retry_guard::server::{
    Begin, Claim, ClaimToken, Fingerprint, IDEMPOTENT_REPLAYED, IdempotencyLayer, IdempotencyStore,
    OversizedResponse, Ownership, ReleaseKey, ScopedKey, Stored,
};

#[derive(Clone, Default)]
struct App {
    effects: Arc<AtomicUsize>,
    /// When set, the handler tells `started` and waits for `gate` before its side effect.
    gated: Arc<AtomicBool>,
    started: Arc<Notify>,
    gate: Arc<Notify>,
    panic_once: Arc<AtomicBool>,
}

async fn create(State(app): State<App>, headers: HeaderMap, body: String) -> impl IntoResponse {
    if app.gated.load(Ordering::SeqCst) {
        app.started.notify_one();
        app.gate.notified().await;
    }
    if app.panic_once.swap(false, Ordering::SeqCst) {
        panic!("handler bug");
    }
    let n = app.effects.fetch_add(1, Ordering::SeqCst) + 1;
    let user = headers
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    (
        StatusCode::CREATED,
        [
            ("x-order-id", format!("order-{n}")),
            ("content-type", "application/json".into()),
        ],
        format!(r#"{{"order":{n},"user":"{user}","echo":"{body}"}}"#),
    )
}

async fn fail(State(app): State<App>) -> impl IntoResponse {
    let n = app.effects.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::INTERNAL_SERVER_ERROR, format!("failed {n}"))
}

async fn overloaded(State(app): State<App>) -> impl IntoResponse {
    app.effects.fetch_add(1, Ordering::SeqCst);
    let mut res = (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
    res.extensions_mut().insert(ReleaseKey);
    res
}

async fn big(State(app): State<App>) -> impl IntoResponse {
    app.effects.fetch_add(1, Ordering::SeqCst);
    vec![b'x'; 4096]
}

fn router(app: App, layer: IdempotencyLayer) -> Router {
    Router::new()
        .route("/orders", post(create).get(|| async { "list" }))
        .route("/orders/{id}", post(create))
        .route("/fail", post(fail))
        .route("/overloaded", post(overloaded))
        .route("/big", post(big))
        .with_state(app)
        .layer(layer)
}

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::builder()
        .principal(|parts| {
            parts
                .headers
                .get("x-user")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .build()
        .expect("valid settings")
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn replayed(&self) -> bool {
        self.headers
            .get(IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v == "true")
    }
}

fn request(
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    user: Option<&str>,
    body: &str,
) -> Request<Full<Bytes>> {
    let mut b = Request::post(format!("http://{addr}{path}"));
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    if let Some(u) = user {
        b = b.header("x-user", u);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Reply {
    let res = client.request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn replay_is_identical_and_marked() {
    let app = App::default();
    let addr = serve(router(app.clone(), layer())).await;
    let c = client();
    let key = "\"6f1c2a9e-1b7d-4c1e-9a55-0d8a3f6c2b11\"";

    let first = send(&c, request(addr, "/orders", Some(key), None, "mail")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());

    let again = send(&c, request(addr, "/orders", Some(key), None, "mail")).await;
    assert_eq!(again.status, first.status);
    assert_eq!(again.body, first.body);
    assert!(again.replayed());
    for name in ["x-order-id", "content-type", "content-length"] {
        assert_eq!(again.headers.get(name), first.headers.get(name), "{name}");
    }
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);

    // A bare-token key (no quotes) names the same key.
    let bare = send(
        &c,
        request(
            addr,
            "/orders",
            Some("6f1c2a9e-1b7d-4c1e-9a55-0d8a3f6c2b11"),
            None,
            "mail",
        ),
    )
    .await;
    assert!(bare.replayed());
    assert_eq!(bare.body, first.body);
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_duplicates_run_once() {
    let app = App {
        gated: Arc::new(AtomicBool::new(true)),
        ..App::default()
    };
    let addr = serve(router(app.clone(), layer())).await;
    let c = client();

    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let c = c.clone();
        set.spawn(
            async move { send(&c, request(addr, "/orders", Some("burst-1"), None, "x")).await },
        );
    }
    // Let the handler finish once it has started; later duplicates find it running or done.
    app.started.notified().await;
    app.gated.store(false, Ordering::SeqCst);
    app.gate.notify_one();

    let (mut fresh, mut replayed, mut conflicts) = (0, 0, 0);
    let mut body = None;
    while let Some(reply) = set.join_next().await {
        let reply = reply.unwrap();
        match reply.status {
            StatusCode::CREATED if reply.replayed() => replayed += 1,
            StatusCode::CREATED => fresh += 1,
            StatusCode::CONFLICT => {
                assert_eq!(reply.headers["retry-after"], "1");
                conflicts += 1;
                continue;
            }
            other => panic!("unexpected status {other}"),
        }
        let b = body.get_or_insert_with(|| reply.body.clone());
        assert_eq!(*b, reply.body);
    }
    assert_eq!(fresh, 1);
    assert_eq!(fresh + replayed + conflicts, 100);
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn same_key_other_request_is_422() {
    let app = App::default();
    let addr = serve(router(app.clone(), layer())).await;
    let c = client();
    let first = send(&c, request(addr, "/orders", Some("k-422"), None, "a")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let other_body = send(&c, request(addr, "/orders", Some("k-422"), None, "b")).await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    let other_path = send(&c, request(addr, "/orders/7", Some("k-422"), None, "a")).await;
    assert_eq!(other_path.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        other_path.headers["content-type"],
        "application/problem+json"
    );
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn missing_or_malformed_key_is_400() {
    let app = App::default();
    let addr = serve(router(app.clone(), layer())).await;
    let c = client();

    let missing = send(&c, request(addr, "/orders", None, None, "a")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&missing.body).contains("idempotency-key"));

    for bad in ["\"has space\"", "\"unterminated", "a\"b", &"k".repeat(300)] {
        let reply = send(&c, request(addr, "/orders", Some(bad), None, "a")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(reply.headers["content-type"], "application/problem+json");
        assert!(String::from_utf8_lossy(&reply.body).contains("invalid idempotency key"));
    }
    assert_eq!(app.effects.load(Ordering::SeqCst), 0);

    // Safe methods need no key.
    let get = Request::get(format!("http://{addr}/orders"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let list = send(&c, get).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body, "list");
}

#[tokio::test]
async fn principals_do_not_share_keys() {
    let app = App::default();
    let addr = serve(router(app.clone(), layer())).await;
    let c = client();
    let a = send(
        &c,
        request(addr, "/orders", Some("shared"), Some("alice"), "a"),
    )
    .await;
    let b = send(
        &c,
        request(addr, "/orders", Some("shared"), Some("bob"), "b"),
    )
    .await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert!(!b.replayed());
    assert!(String::from_utf8_lossy(&b.body).contains("\"user\":\"bob\""));
    let a2 = send(
        &c,
        request(addr, "/orders", Some("shared"), Some("alice"), "a"),
    )
    .await;
    assert!(a2.replayed());
    assert_eq!(a2.body, a.body);
    assert_eq!(app.effects.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hangup_mid_handler_then_retry_gets_original() {
    let app = App {
        gated: Arc::new(AtomicBool::new(true)),
        ..App::default()
    };
    let addr = serve(router(app.clone(), layer())).await;

    // A raw connection we can cut.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn_task = tokio::spawn(conn);
    let call = tokio::spawn(async move {
        sender
            .send_request(request(addr, "/orders", Some("hangup"), None, "mail"))
            .await
    });
    app.started.notified().await;
    call.abort();
    conn_task.abort();
    let _ = call.await;
    let _ = conn_task.await; // the socket is closed now

    // The handler goes on and finishes; its result is kept for the retry.
    app.gated.store(false, Ordering::SeqCst);
    app.gate.notify_one();

    let c = client();
    let mut retry = None;
    for _ in 0..500 {
        let reply = send(&c, request(addr, "/orders", Some("hangup"), None, "mail")).await;
        if reply.status != StatusCode::CONFLICT {
            retry = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let retry = retry.expect("the first request never finished");
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.headers["x-order-id"], "order-1");
    assert!(String::from_utf8_lossy(&retry.body).contains("\"order\":1"));
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn panic_releases_the_key() {
    let app = App {
        panic_once: Arc::new(AtomicBool::new(true)),
        ..App::default()
    };
    let addr = serve(router(app.clone(), layer())).await;
    let c = client();
    let first = send(&c, request(addr, "/orders", Some("boom"), None, "a")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    let retry = send(&c, request(addr, "/orders", Some("boom"), None, "a")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

// ---- in process (no sockets) ----

async fn call(app: &Router, path: &str, key: &str, body: &'static str) -> Response<Body> {
    let req = Request::post(path)
        .header("idempotency-key", key)
        .body(Body::from(body))
        .unwrap();
    app.clone().oneshot(req).await.unwrap()
}

async fn body_of(res: Response<Body>) -> Bytes {
    axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn results_expire_after_ttl() {
    let app = App::default();
    let r = router(
        app.clone(),
        IdempotencyLayer::builder()
            .ttl(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    assert!(
        !call(&r, "/orders", "ttl", "a")
            .await
            .headers()
            .contains_key(IDEMPOTENT_REPLAYED)
    );
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(
        call(&r, "/orders", "ttl", "a")
            .await
            .headers()
            .contains_key(IDEMPOTENT_REPLAYED)
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(
        !call(&r, "/orders", "ttl", "a")
            .await
            .headers()
            .contains_key(IDEMPOTENT_REPLAYED)
    );
    assert_eq!(app.effects.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_slow_handler_keeps_its_claim_past_the_lease() {
    let app = App::default();
    let effects = app.effects.clone();
    let r = Router::new()
        .route(
            "/slow",
            post(move || {
                let effects = effects.clone();
                async move {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    format!("done {}", effects.fetch_add(1, Ordering::SeqCst) + 1)
                }
            }),
        )
        .layer(
            IdempotencyLayer::builder()
                .lease(Duration::from_secs(3))
                .build()
                .unwrap(),
        );
    let first = tokio::spawn({
        let r = r.clone();
        async move { body_of(call(&r, "/slow", "slow", "").await).await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Past the lease, but renewed: still in flight, not claimed by the duplicate.
    assert_eq!(
        call(&r, "/slow", "slow", "").await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(first.await.unwrap(), "done 1");
    let again = call(&r, "/slow", "slow", "").await;
    assert_eq!(again.headers()[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(body_of(again).await, "done 1");
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn dropped_future_does_not_cancel_the_handler() {
    let app = App {
        gated: Arc::new(AtomicBool::new(true)),
        ..App::default()
    };
    let r = router(app.clone(), IdempotencyLayer::memory());
    let mut svc = r.clone();
    let req = Request::post("/orders")
        .header("idempotency-key", "drop")
        .body(Body::from("a"))
        .unwrap();
    let fut = ServiceExt::<Request<Body>>::ready(&mut svc)
        .await
        .unwrap()
        .call(req);
    let waiter = tokio::spawn(fut);
    app.started.notified().await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    app.gated.store(false, Ordering::SeqCst);
    app.gate.notify_one();
    let mut replay = None;
    for _ in 0..1000 {
        let res = call(&r, "/orders", "drop", "a").await;
        if res.status() != StatusCode::CONFLICT {
            replay = Some(res);
            break;
        }
        tokio::task::yield_now().await;
    }
    let replay = replay.expect("handler never finished");
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn server_errors_are_stored_by_default_and_release_on_request() {
    let app = App::default();
    let r = router(app.clone(), IdempotencyLayer::memory());
    assert_eq!(
        call(&r, "/fail", "e", "").await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let again = call(&r, "/fail", "e", "").await;
    assert_eq!(again.headers()[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(body_of(again).await, "failed 1");

    // ReleaseKey: the handler says nothing happened.
    assert_eq!(
        call(&r, "/overloaded", "o", "").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let again = call(&r, "/overloaded", "o", "").await;
    assert!(!again.headers().contains_key(IDEMPOTENT_REPLAYED));
    assert_eq!(app.effects.load(Ordering::SeqCst), 3);

    // store_server_errors(false): every 5xx releases the key.
    let app = App::default();
    let r = router(
        app.clone(),
        IdempotencyLayer::builder()
            .store_server_errors(false)
            .build()
            .unwrap(),
    );
    call(&r, "/fail", "e", "").await;
    let again = call(&r, "/fail", "e", "").await;
    assert_eq!(body_of(again).await, "failed 2");
}

#[tokio::test]
async fn oversized_response_is_answered_once_then_replays_500() {
    let app = App::default();
    let r = router(
        app.clone(),
        IdempotencyLayer::builder()
            .max_response_body(1024)
            .build()
            .unwrap(),
    );
    let first = call(&r, "/big", "big", "").await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(body_of(first).await.len(), 4096);
    let again = call(&r, "/big", "big", "").await;
    assert_eq!(again.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(again.headers()[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);

    let r = router(
        app.clone(),
        IdempotencyLayer::builder()
            .max_response_body(1024)
            .on_oversized_response(OversizedResponse::Release)
            .build()
            .unwrap(),
    );
    assert_eq!(body_of(call(&r, "/big", "big", "").await).await.len(), 4096);
    assert_eq!(body_of(call(&r, "/big", "big", "").await).await.len(), 4096);
    assert_eq!(app.effects.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn large_request_body_is_413() {
    let app = App::default();
    let r = router(
        app.clone(),
        IdempotencyLayer::builder()
            .max_request_body(8)
            .build()
            .unwrap(),
    );
    let res = call(&r, "/orders", "big-req", "0123456789").await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.effects.load(Ordering::SeqCst), 0);
}

#[derive(Clone)]
struct BrokenStore;

impl IdempotencyStore for BrokenStore {
    async fn begin(&self, _: &ScopedKey, _: &Claim) -> Result<Begin, StoreError> {
        Err(StoreError::new("down"))
    }
    async fn complete(
        &self,
        _: &ScopedKey,
        _: &Claim,
        _: Stored,
        _: Duration,
    ) -> Result<Ownership, StoreError> {
        Err(StoreError::new("down"))
    }
    async fn renew(&self, _: &ScopedKey, _: &Claim) -> Result<Ownership, StoreError> {
        Err(StoreError::new("down"))
    }
    async fn release(&self, _: &ScopedKey, _: ClaimToken) -> Result<Ownership, StoreError> {
        Err(StoreError::new("down"))
    }
}

#[tokio::test]
async fn store_failure_is_503_and_nothing_runs() {
    let app = App::default();
    let r = Router::new()
        .route("/orders", post(create))
        .with_state(app.clone())
        .layer(IdempotencyLayer::new(BrokenStore));
    let res = call(&r, "/orders", "k", "a").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(app.effects.load(Ordering::SeqCst), 0);
}

#[test]
fn fingerprint_covers_method_path_and_body() {
    use http::Method;
    let base = Fingerprint::of(&Method::POST, "/a", b"x");
    assert_eq!(base, Fingerprint::of(&Method::POST, "/a", b"x"));
    assert_ne!(base, Fingerprint::of(&Method::PATCH, "/a", b"x"));
    assert_ne!(base, Fingerprint::of(&Method::POST, "/b", b"x"));
    assert_ne!(base, Fingerprint::of(&Method::POST, "/a", b"y"));
    // Length prefixes: moving bytes between parts changes the hash.
    assert_ne!(
        Fingerprint::of(&Method::POST, "/ab", b""),
        Fingerprint::of(&Method::POST, "/a", b"b")
    );
}
