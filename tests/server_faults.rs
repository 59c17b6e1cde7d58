//! The provider side under faults: a handler that started for a key never starts again for
//! it because the store stalled, a write failed, a call timed out or a lease ran out; keyed
//! streams are relayed as produced; one tenant cannot lock out another; the two halves'
//! defaults compose.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_retry_guard::budget::StoreError;
use tower_retry_guard::server::{
    Begin, Claim, ClaimToken, IDEMPOTENT_REPLAYED, IdempotencyLayer, IdempotencyStore,
    MemoryIdempotencyStore, Ownership, ScopedKey, Stored, UnknownOutcome,
};
use tower_retry_guard::{RetryLayer, RetryPolicy};

// ---- a store with faults on demand ----

/// Wraps the memory store; each counter makes that many of the next calls fail.
#[derive(Clone, Default)]
struct Faulty {
    inner: MemoryIdempotencyStore,
    /// `begin` runs, then reports a failure (as a timed-out call whose script ran late).
    begin_runs_then_fails: Arc<AtomicU32>,
    /// `complete` fails without writing.
    complete_fails: Arc<AtomicU32>,
    /// Every `renew` fails while set (a store stalled for longer than the lease).
    renew_fails: Arc<AtomicBool>,
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl IdempotencyStore for Faulty {
    async fn begin(&self, key: &ScopedKey, claim: &Claim) -> Result<Begin, StoreError> {
        let answer = self.inner.begin(key, claim).await;
        if take(&self.begin_runs_then_fails) {
            return Err(StoreError::new("timed out (but ran)"));
        }
        answer
    }
    async fn complete(
        &self,
        key: &ScopedKey,
        claim: &Claim,
        stored: Stored,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        if take(&self.complete_fails) {
            return Err(StoreError::new("write failed"));
        }
        self.inner.complete(key, claim, stored, ttl).await
    }
    async fn renew(&self, key: &ScopedKey, claim: &Claim) -> Result<Ownership, StoreError> {
        if self.renew_fails.load(Ordering::SeqCst) {
            return Err(StoreError::new("stalled"));
        }
        self.inner.renew(key, claim).await
    }
    async fn release(&self, key: &ScopedKey, token: ClaimToken) -> Result<Ownership, StoreError> {
        self.inner.release(key, token).await
    }
}

// ---- an app that counts its side effects ----

#[derive(Clone, Default)]
struct App {
    effects: Arc<AtomicU32>,
    /// How long the handler works.
    work: Arc<Mutex<Duration>>,
}

async fn send_email(State(app): State<App>, body: String) -> impl IntoResponse {
    let n = app.effects.fetch_add(1, Ordering::SeqCst) + 1;
    let work = *app.work.lock().unwrap();
    tokio::time::sleep(work).await;
    (StatusCode::CREATED, format!("email {n}: {body}"))
}

fn router<St: IdempotencyStore>(app: &App, layer: IdempotencyLayer<St>) -> Router {
    Router::new()
        .route("/emails", post(send_email))
        .with_state(app.clone())
        .layer(layer)
}

fn post_with(key: &str, principal: Option<&str>) -> Request<Body> {
    let mut req = Request::post("/emails").header("idempotency-key", key);
    if let Some(p) = principal {
        req = req.header("x-tenant", p);
    }
    req.body(Body::from("hello")).unwrap()
}

async fn call(r: &Router, key: &str) -> (StatusCode, HeaderMap, Bytes) {
    let res = r.clone().oneshot(post_with(key, None)).await.unwrap();
    let (parts, body) = res.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn replayed(headers: &HeaderMap) -> bool {
    headers
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|v| v == "true")
}

fn faulty_layer(store: &Faulty, lease: Duration) -> IdempotencyLayer<Faulty> {
    IdempotencyLayer::builder()
        .store(store.clone())
        .lease(lease)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_failed_result_write_keeps_the_claim_and_is_written_again() {
    let store = Faulty::default();
    store.complete_fails.store(3, Ordering::SeqCst);
    let app = App::default();
    let r = router(&app, faulty_layer(&store, Duration::from_secs(60)));

    let (status, _, body) = call(&r, "k").await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::CREATED, &b"email 1: hello"[..])
    );
    // The write failed: a retry now finds the claim held (409), not a free key.
    let (status, _, _) = call(&r, "k").await;
    assert_eq!(status, StatusCode::CONFLICT);
    // The layer writes again with backoff; then the retry gets the result.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, headers, again) = call(&r, "k").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers));
    assert_eq!(again, body);
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_begin_that_failed_but_ran_late_does_not_lock_the_key() {
    let store = Faulty::default();
    store.begin_runs_then_fails.store(1, Ordering::SeqCst);
    let app = App::default();
    let r = router(&app, faulty_layer(&store, Duration::from_secs(60)));

    let (status, headers, _) = call(&r, "k").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(app.effects.load(Ordering::SeqCst), 0);
    // The claim the failed call made is released by its token: the retry runs, well
    // within the 60 s lease it would otherwise hold.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, headers, body) = call(&r, "k").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed(&headers));
    assert_eq!(&body[..], b"email 1: hello");
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_store_stalled_past_the_lease_never_reruns_the_handler() {
    let store = Faulty::default();
    store.renew_fails.store(true, Ordering::SeqCst);
    let app = App::default();
    *app.work.lock().unwrap() = Duration::from_secs(3);
    let r = router(&app, faulty_layer(&store, Duration::from_millis(300)));

    let first = tokio::spawn({
        let r = r.clone();
        async move { call(&r, "k").await }
    });
    // The lease ran out (no renewal got through) while the handler works: the retry is
    // told the outcome is unknown, and does not run the handler again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, headers, body) = call(&r, "k").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(replayed(&headers), "a client's retry layer stops at it");
    assert!(String::from_utf8_lossy(&body).contains("outcome-unknown"));
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);

    // The holder is alive after all: its result is written under its token and replayed.
    let (status, _, original) = first.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, again) = call(&r, "k").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers));
    assert_eq!(again, original);
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_outcome_is_run_again_only_when_the_recovery_says_so() {
    let store = Faulty::default();
    store.renew_fails.store(true, Ordering::SeqCst);
    let app = App::default();
    *app.work.lock().unwrap() = Duration::from_secs(3);
    let asked = Arc::new(AtomicU32::new(0));
    let layer = IdempotencyLayer::builder()
        .store(store.clone())
        .lease(Duration::from_millis(300))
        .on_unknown_outcome(UnknownOutcome::ask({
            let asked = asked.clone();
            move |key: &ScopedKey| {
                asked.fetch_add(1, Ordering::SeqCst);
                let rerun = key.key().as_str() == "checked-not-sent";
                async move { rerun }
            }
        }))
        .build()
        .unwrap();
    let r = router(&app, layer);
    for key in ["checked-not-sent", "maybe-sent"] {
        let r2 = r.clone();
        tokio::spawn(async move { call(&r2, key).await });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, headers, _) = call(&r, "maybe-sent").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(replayed(&headers));
    assert_eq!(app.effects.load(Ordering::SeqCst), 2);
    // The hook checked the effect's own record and chose to run it again.
    let rerun = tokio::spawn({
        let r = r.clone();
        async move { call(&r, "checked-not-sent").await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(app.effects.load(Ordering::SeqCst), 3);
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    assert_eq!(rerun.await.unwrap().0, StatusCode::CREATED);
}

#[tokio::test(start_paused = true)]
async fn a_short_lease_still_deduplicates_a_slow_handler() {
    let app = App::default();
    *app.work.lock().unwrap() = Duration::from_secs(2);
    let layer = IdempotencyLayer::builder()
        .lease(Duration::from_millis(100))
        .build()
        .unwrap();
    let r = router(&app, layer);
    let first = tokio::spawn({
        let r = r.clone();
        async move { call(&r, "k").await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(call(&r, "k").await.0, StatusCode::CONFLICT);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

#[test]
fn settings_that_turn_deduplication_off_are_refused() {
    for (lease, setting) in [
        (Duration::ZERO, "lease"),
        (Duration::from_millis(5), "lease"),
    ] {
        let e = IdempotencyLayer::builder()
            .lease(lease)
            .build()
            .unwrap_err();
        assert_eq!(e.setting(), setting);
        assert!(e.to_string().contains("lease"), "{e}");
    }
    let e = IdempotencyLayer::builder()
        .ttl(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert_eq!(e.setting(), "ttl");
    let e = IdempotencyLayer::builder()
        .principal_required()
        .build()
        .unwrap_err();
    assert_eq!(e.setting(), "principal_required");
    let e = IdempotencyLayer::builder()
        .require_key_for([http::Method::GET])
        .build()
        .unwrap_err();
    assert_eq!(e.setting(), "require_key_for");
}

// ---- streams ----

/// A response body fed by a channel: the handler's producer task sends the events.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// A handler streaming `n` server-sent events, one every `every`; `done` is set once the
/// last one is produced; with `open`, the stream stays open after them.
fn sse_router(
    layer: IdempotencyLayer,
    effects: Arc<AtomicU32>,
    n: usize,
    every: Duration,
    done: Arc<AtomicBool>,
    open: bool,
) -> Router {
    let handler = move || {
        let (effects, done) = (effects.clone(), done.clone());
        async move {
            effects.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                for i in 0..n {
                    tokio::time::sleep(every).await;
                    if i + 1 == n {
                        done.store(true, Ordering::SeqCst);
                    }
                    if tx
                        .send(Bytes::from(format!("data: token {i}\n\n")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if open {
                    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::new(ChannelBody(rx)))
                .unwrap()
        }
    };
    Router::new().route("/chat", post(handler)).layer(layer)
}

fn chat(key: &str) -> Request<Body> {
    Request::post("/chat")
        .header("idempotency-key", key)
        .body(Body::from("{\"stream\":true}"))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_keyed_stream_is_relayed_as_produced_and_replayed_whole() {
    let effects = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let every = Duration::from_millis(100);
    let r = sse_router(
        IdempotencyLayer::memory(),
        effects.clone(),
        50,
        every,
        done.clone(),
        false,
    );
    let start = tokio::time::Instant::now();
    let res = r.clone().oneshot(chat("s")).await.unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: token 0\n\n");
    // The first token arrives while the handler is still producing the rest (5 s of them).
    assert!(!done.load(Ordering::SeqCst), "the stream was buffered");
    println!("first token after {:?} (virtual)", start.elapsed());
    let mut all = first.to_vec();
    while let Some(frame) = body.frame().await {
        all.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    assert!(done.load(Ordering::SeqCst));
    // The retry gets the whole stream back, replayed; the handler ran once.
    let again = r.clone().oneshot(chat("s")).await.unwrap();
    assert!(replayed(again.headers()));
    assert_eq!(again.headers()["content-type"], "text/event-stream");
    let replay = again.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(replay, all);
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_stays_open_ends_its_claim_at_the_maximum_claim_time() {
    let effects = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let layer = IdempotencyLayer::builder()
        .max_claim_time(Duration::from_secs(120))
        .build()
        .unwrap();
    let r = sse_router(
        layer,
        effects.clone(),
        2,
        Duration::from_millis(10),
        done,
        true,
    );
    let res = r.clone().oneshot(chat("open")).await.unwrap();
    let mut body = res.into_body();
    assert!(body.frame().await.is_some());
    // While it streams, a retry is told to wait.
    let during = r.clone().oneshot(chat("open")).await.unwrap();
    assert_eq!(during.status(), StatusCode::CONFLICT);
    // Past the maximum claim time the key is not held forever: retries get a final
    // "completed, not replayable" answer, never a second run.
    tokio::time::sleep(Duration::from_secs(121)).await;
    let after = r.clone().oneshot(chat("open")).await.unwrap();
    assert_eq!(after.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(replayed(after.headers()));
    let text = after.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("result-not-replayable"));
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    // The client's stream was not cut.
    assert!(body.frame().await.is_some());
}

// ---- fairness, principals, keys ----

fn tenant_layer(store: MemoryIdempotencyStore) -> IdempotencyLayer {
    IdempotencyLayer::builder()
        .store(store)
        .principal(|parts| {
            let t = parts.headers.get("x-tenant")?.to_str().ok()?;
            Some(t.to_owned())
        })
        .principal_required()
        .build()
        .unwrap()
}

#[tokio::test]
async fn one_tenant_filling_its_share_does_not_lock_out_another() {
    let store = MemoryIdempotencyStore::builder()
        .max_total(100, 1 << 20)
        .max_per_principal(3, 1 << 20)
        .build()
        .unwrap();
    let app = App::default();
    let r = router(&app, tenant_layer(store));
    for i in 0..3 {
        let res = r
            .clone()
            .oneshot(post_with(&format!("k{i}"), Some("hog")))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    let full = r
        .clone()
        .oneshot(post_with("k3", Some("hog")))
        .await
        .unwrap();
    assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
    let text = full.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("idempotency-store-full"), "{text}");
    assert!(text.contains("hog"), "says for whom: {text}");
    assert!(!text.contains("could not be checked"), "{text}");
    let other = r
        .clone()
        .oneshot(post_with("k0", Some("alice")))
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::CREATED);
    assert_eq!(app.effects.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_keyed_request_without_a_principal_is_401_when_one_is_required() {
    let app = App::default();
    let r = router(&app, tenant_layer(MemoryIdempotencyStore::new()));
    let res = r.clone().oneshot(post_with("k", None)).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.effects.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_utf8_key_is_refused_naming_the_right_character() {
    let app = App::default();
    let r = router(&app, IdempotencyLayer::memory());
    let req = Request::post("/emails")
        .header(
            "idempotency-key",
            http::HeaderValue::from_bytes("café".as_bytes()).unwrap(),
        )
        .body(Body::from("hello"))
        .unwrap();
    let res = r.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let text = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("'é'"), "{text}");
    assert!(!text.contains('Ã'), "{text}");
}

// ---- the two halves together ----

#[tokio::test(start_paused = true)]
async fn a_503_releases_the_key_so_the_clients_retry_runs_fresh() {
    let calls = Arc::new(AtomicU32::new(0));
    let sent = Arc::new(AtomicU32::new(0));
    let handler = {
        let (calls, sent) = (calls.clone(), sent.clone());
        move || {
            let (calls, sent) = (calls.clone(), sent.clone());
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    return (StatusCode::SERVICE_UNAVAILABLE, "busy".to_owned());
                }
                let n = sent.fetch_add(1, Ordering::SeqCst) + 1;
                (StatusCode::CREATED, format!("email {n}"))
            }
        }
    };
    let server = Router::new()
        .route("/emails", post(handler))
        .layer(IdempotencyLayer::memory());
    let server = server
        .map_request(|req: Request<String>| req.map(Body::from))
        .map_err(|e: Infallible| -> BoxError { match e {} });
    let mut client = RetryLayer::new()
        .policy(RetryPolicy::builder().seed(7).build().unwrap())
        .layer(server);
    let req = Request::post("http://127.0.0.1/emails")
        .body("hello".to_owned())
        .unwrap();
    let res = client.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(!replayed(res.headers()));
    let text = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"email 1");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(sent.load(Ordering::SeqCst), 1);
}

// ---- everything at once, over real HTTP ----

/// A store whose every call may stall (0–150 ms, past the 100 ms lease), fail before it
/// acts, or act and then report a failure (seeded).
#[derive(Clone)]
struct Chaos {
    inner: MemoryIdempotencyStore,
    rng: Arc<Mutex<rand::rngs::StdRng>>,
}

enum Fault {
    None,
    Before,
    After,
}

impl Chaos {
    async fn fault(&self) -> Fault {
        let (stall, roll) = {
            use rand::Rng;
            let mut rng = self.rng.lock().unwrap();
            let stall = if rng.random_bool(0.1) {
                Duration::from_millis(rng.random_range(0..150))
            } else {
                Duration::ZERO
            };
            (stall, rng.random_range(0..100u32))
        };
        tokio::time::sleep(stall).await;
        match roll {
            0..5 => Fault::Before,
            5..10 => Fault::After,
            _ => Fault::None,
        }
    }
}

macro_rules! chaos {
    ($self:ident, $call:expr) => {{
        match $self.fault().await {
            Fault::Before => Err(StoreError::new("chaos: failed")),
            Fault::After => {
                let _ = $call.await;
                Err(StoreError::new("chaos: timed out after acting"))
            }
            Fault::None => $call.await,
        }
    }};
}

impl IdempotencyStore for Chaos {
    async fn begin(&self, key: &ScopedKey, claim: &Claim) -> Result<Begin, StoreError> {
        chaos!(self, self.inner.begin(key, claim))
    }
    async fn complete(
        &self,
        key: &ScopedKey,
        claim: &Claim,
        stored: Stored,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        chaos!(self, self.inner.complete(key, claim, stored.clone(), ttl))
    }
    async fn renew(&self, key: &ScopedKey, claim: &Claim) -> Result<Ownership, StoreError> {
        chaos!(self, self.inner.renew(key, claim))
    }
    async fn release(&self, key: &ScopedKey, token: ClaimToken) -> Result<Ownership, StoreError> {
        chaos!(self, self.inner.release(key, token))
    }
}

#[tokio::test]
async fn a_thousand_keyed_requests_under_store_faults_and_hangups_run_each_effect_once() {
    // Local tasks: the client's futures need not be `Send`.
    tokio::task::LocalSet::new()
        .run_until(thousand_requests())
        .await;
}

async fn thousand_requests() {
    use rand::{Rng, SeedableRng};
    let chaos = Chaos {
        inner: MemoryIdempotencyStore::new(),
        rng: Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(12))),
    };
    let effects: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handler = {
        let effects = effects.clone();
        move |headers: HeaderMap| {
            let effects = effects.clone();
            async move {
                let key = headers["idempotency-key"]
                    .to_str()
                    .unwrap_or("?")
                    .to_owned();
                let n = {
                    let mut map = effects.lock().unwrap();
                    let n = map.entry(key.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                tokio::time::sleep(Duration::from_millis(u64::from(n) * 3)).await;
                (StatusCode::CREATED, format!("{key} effect {n}"))
            }
        }
    };
    let layer = IdempotencyLayer::builder()
        .store(chaos)
        .lease(Duration::from_millis(100))
        .build()
        .unwrap();
    let app = Router::new().route("/emails", post(handler)).layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let client = tower::ServiceBuilder::new()
        .layer(RetryLayer::new())
        .map_err(BoxError::from)
        .service(http);

    let mut rng = rand::rngs::StdRng::seed_from_u64(34);
    let plans: Vec<(String, u64)> = (0..1000)
        .map(|i| {
            // One call in ten hangs up after 0–20 ms (the lost response), then sends again.
            let hangup = if rng.random_bool(0.1) {
                rng.random_range(1..20)
            } else {
                0
            };
            (format!("\"key-{i}\""), hangup)
        })
        .collect();
    let outcomes = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in plans.chunks(20) {
        let chunk = chunk.to_vec();
        let (client, outcomes) = (client.clone(), outcomes.clone());
        tasks.spawn_local(async move {
            for (key, hangup) in chunk {
                // Bounded: a caller gives up after 10 logical calls.
                for round in 0..10u64 {
                    let req = Request::post(format!("http://{addr}/emails"))
                        .header("idempotency-key", key.as_str())
                        .body(http_body_util::Full::new(Bytes::from_static(b"hi")))
                        .unwrap();
                    let call = client.clone().oneshot(req);
                    let res = if hangup > 0 && round == 0 {
                        match tokio::time::timeout(Duration::from_millis(hangup), call).await {
                            Ok(res) => res,
                            Err(_) => continue, // hung up; send again
                        }
                    } else {
                        call.await
                    };
                    let Ok(res) = res else { continue };
                    let status = res.status();
                    let text = res.into_body().collect().await.map(|b| b.to_bytes());
                    let text = String::from_utf8_lossy(&text.unwrap_or_default()).into_owned();
                    let outcome = if status == StatusCode::CREATED {
                        Some(text)
                    } else if text.contains("outcome-unknown") {
                        Some("unknown".to_owned())
                    } else {
                        None // 409 or 503 after the client's retries: send again
                    };
                    if let Some(outcome) = outcome {
                        outcomes.lock().unwrap().insert(key.clone(), outcome);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50 * (round + 1))).await;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}

    let effects = effects.lock().unwrap();
    let outcomes = outcomes.lock().unwrap();
    let twice: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "side effects run twice: {twice:?}");
    let (mut results, mut unknown) = (0, 0);
    for (key, _) in &plans {
        match outcomes.get(key).map(String::as_str) {
            Some("unknown") => unknown += 1,
            Some(text) => {
                assert_eq!(
                    text,
                    format!("{key} effect 1"),
                    "a result that is not the effect's"
                );
                results += 1;
            }
            None => panic!("{key}: no result, replay or 'outcome unknown'"),
        }
    }
    println!(
        "1000 keyed requests under faults: {results} results or replays, {unknown} 'outcome unknown', {} effects, 0 run twice",
        effects.len()
    );
}

/// Time to first byte of a keyed SSE response over real HTTP, with and without the layer
/// (printed, not asserted: the behaviour asserted is that the first token arrives while the
/// handler is still producing the rest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_sse_stream_over_http_reaches_the_client_as_it_is_produced() {
    async fn serve(app: Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }
    let every = Duration::from_millis(5);
    let effects = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let bare = Router::new().merge(sse_router_bare(effects.clone(), every, done.clone()));
    let guarded = sse_router(
        IdempotencyLayer::memory(),
        effects.clone(),
        50,
        every,
        done.clone(),
        false,
    );
    let (bare, guarded) = (serve(bare).await, serve(guarded).await);
    let http: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut times = [Vec::new(), Vec::new()];
    for round in 0..5 {
        for (i, addr) in [bare, guarded].into_iter().enumerate() {
            done.store(false, Ordering::SeqCst);
            let req = Request::post(format!("http://{addr}/chat"))
                .header("idempotency-key", format!("\"ttfb-{round}\""))
                .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            let start = std::time::Instant::now();
            let res = http.request(req).await.unwrap();
            let mut body = res.into_body();
            let first = body.frame().await.unwrap().unwrap();
            times[i].push(start.elapsed());
            assert!(first.is_data());
            assert!(!done.load(Ordering::SeqCst), "the stream was buffered");
            while body.frame().await.is_some() {}
        }
    }
    for t in &mut times {
        t.sort();
    }
    println!(
        "keyed SSE, time to first byte over HTTP (median of 5): bare {:?}, through IdempotencyLayer {:?}",
        times[0][2], times[1][2]
    );
}

fn sse_router_bare(effects: Arc<AtomicU32>, every: Duration, done: Arc<AtomicBool>) -> Router {
    let handler = move || {
        let (effects, done) = (effects.clone(), done.clone());
        async move {
            effects.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                for i in 0..50 {
                    tokio::time::sleep(every).await;
                    if i + 1 == 50 {
                        done.store(true, Ordering::SeqCst);
                    }
                    if tx
                        .send(Bytes::from(format!("data: token {i}\n\n")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::new(ChannelBody(rx)))
                .unwrap()
        }
    };
    Router::new().route("/chat", post(handler))
}
