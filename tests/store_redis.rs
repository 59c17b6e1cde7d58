//! The Redis store against a real `redis-server` (started on a free loopback port, stopped on
//! drop): the same budget and idempotency semantics as the memory stores, shared by replicas,
//! and the behaviour when Redis dies and comes back.
//!
//! Needs `redis-server` on the PATH (`scripts/test.sh` installs it): without it these tests
//! fail, they are not skipped. Real time throughout (virtual time does not drive Redis); no
//! assertion depends on anything being fast, only on waits being long enough.
#![cfg(feature = "redis")]

mod redis_support;

use std::io;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt, service_fn};

use tower_retry_guard::budget::{
    BudgetStore, Budgets, Grant, Limit, MemoryStore, OnStoreError, Scope,
};
use tower_retry_guard::server::{
    Begin, Fingerprint, IDEMPOTENT_REPLAYED, IdempotencyLayer, IdempotencyStore,
    MemoryIdempotencyStore, Ownership,
};
use tower_retry_guard::{
    Backoff, CallOutcome, Jitter, RedisStore, RetryInfo, RetryLayer, RetryPolicy, StopReason,
};

use redis_support::server::*;
use redis_support::suites::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_semantics_are_the_same_in_memory_and_in_redis() {
    let server = RedisServer::start();
    let (memory, redis) = tokio::join!(
        budget_suite(MemoryStore::new()),
        budget_suite(server.store("suite:"))
    );
    assert_eq!(memory, EXPECTED_BUDGETS);
    assert_eq!(redis, EXPECTED_BUDGETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_semantics_are_the_same_in_memory_and_in_redis() {
    let server = RedisServer::start();
    let (memory, redis) = tokio::join!(
        idempotency_suite(MemoryIdempotencyStore::new()),
        idempotency_suite(server.store("suite:"))
    );
    assert_eq!(memory, EXPECTED_IDEMPOTENCY);
    assert_eq!(redis, EXPECTED_IDEMPOTENCY);
}

// ---------------------------------------------------------------------------------------
// Redis specifics: prefixes, malformed values, scripts flushed.

#[tokio::test]
async fn prefixes_separate_stores_and_malformed_values_are_errors() {
    let server = RedisServer::start();
    let a = server.store("a:");
    let b = server.store("b:");
    let t = [d(Scope::Task, "t", count(1, HOUR))];
    assert_eq!(a.draw(&t).await, Ok(Grant::Granted));
    assert!(matches!(a.draw(&t).await, Ok(Grant::Denied { .. })));
    assert_eq!(b.draw(&t).await, Ok(Grant::Granted));

    // Values written by someone else: errors, never panics.
    let answer = ask(server.port, "SET a:b:c:task:t garbage\r\n").expect("SET");
    assert!(answer.starts_with("+OK"), "{answer}");
    assert!(a.draw(&t).await.is_err());
    let k = key(None, "k");
    let fp = Fingerprint::from_u128(7);
    let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("\\x{b:02x}")).collect() };
    let fp_hex = hex(&fp.as_u128().to_be_bytes());
    for junk in [
        "SET a:i:g:k x".to_owned(),
        format!("HSET a:i:g:k s Z f \"{fp_hex}\""),
        format!("HSET a:i:g:k s F f \"{fp_hex}\" l soon"),
        "HSET a:i:g:k s F".to_owned(),
    ] {
        ask(server.port, "DEL a:i:g:k\r\n").expect("DEL");
        let answer = ask(server.port, &format!("{junk}\r\n")).expect("write junk");
        assert!(!answer.starts_with('-'), "{answer}");
        let begin = a.begin(&k, &claim(fp, HOUR)).await;
        assert!(
            begin.is_err() || begin == Ok(Begin::Mismatch),
            "{junk}: {begin:?}"
        );
    }
    // A finished entry whose fingerprint matches but whose response is truncated.
    ask(server.port, "DEL a:i:g:k\r\n").expect("DEL");
    let answer = ask(
        server.port,
        &format!("HSET a:i:g:k s D f \"{fp_hex}\" r \"\\x01\\x00\"\r\n"),
    )
    .expect("HSET");
    assert!(!answer.starts_with('-'), "{answer}");
    assert!(a.begin(&k, &claim(fp, HOUR)).await.is_err());

    // After SCRIPT FLUSH (as after a restart), the scripts are loaded again.
    let answer = ask(server.port, "SCRIPT FLUSH\r\n").expect("SCRIPT FLUSH");
    assert!(answer.starts_with("+OK"), "{answer}");
    assert_eq!(
        b.draw(&[d(Scope::Task, "fresh", count(1, HOUR))]).await,
        Ok(Grant::Granted)
    );
    assert_eq!(
        b.begin(&key(None, "fresh"), &claim(fp, HOUR)).await,
        Ok(Begin::Claimed)
    );
    b.ping().await.expect("ping");
}

// ---------------------------------------------------------------------------------------
// Replicas: two layers, two connections, one Redis.

/// A provider that is down: every call gets a 503. Counts calls.
fn unavailable(
    calls: Arc<AtomicU32>,
) -> impl tower::Service<Request<String>, Response = Response<String>, Error = io::Error, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |_req: Request<String>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::new(String::new());
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, io::Error>(res)
        }
    })
}

fn request(task: Option<&str>, user: Option<&str>) -> Request<String> {
    let mut b = Request::get("/complete");
    if let Some(t) = task {
        b = b.header("x-task-id", t);
    }
    if let Some(u) = user {
        b = b.header("x-user-id", u);
    }
    b.body(String::new()).expect("a request")
}

/// Two retries, 5 ms apart.
fn retries(n: u32) -> RetryPolicy {
    RetryPolicy::builder()
        .max_retries(n)
        .backoff(Backoff::Constant(Duration::from_millis(5)))
        .jitter(Jitter::None)
        .build()
        .expect("a policy")
}

fn info(res: &Response<String>) -> &RetryInfo {
    res.extensions().get::<RetryInfo>().expect("retry info")
}

/// Retries made by one call.
fn retried(res: &Response<String>) -> u32 {
    info(res).attempts - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_task_and_user_budgets_exactly() {
    let server = RedisServer::start();
    let per_user = Limit::Rate {
        tokens: 1,
        per: HOUR,
        burst: 4,
    };
    let replica = |store: RedisStore, calls: Arc<AtomicU32>| {
        let budgets = Budgets::default()
            .ratio(None)
            .per_user(Some(per_user))
            .store(store);
        RetryLayer::new()
            .policy(retries(2))
            .budgets(budgets)
            .layer(unavailable(calls))
    };
    let calls = Arc::new(AtomicU32::new(0));
    // Separate connections, as two processes would have.
    let a = replica(server.store("replicas:"), calls.clone());
    let b = replica(server.store("replicas:"), calls.clone());

    // One task, calls alternating between replicas: 5 retries in all (the default).
    let mut total = 0;
    for i in 0..6 {
        let r = if i % 2 == 0 { &a } else { &b };
        let res = r
            .clone()
            .oneshot(request(Some("task-1"), None))
            .await
            .expect("a response");
        total += retried(&res);
    }
    assert_eq!(total, 5);
    assert_eq!(calls.load(Ordering::SeqCst), 6 + 5);

    // One user, no task, concurrent calls on both replicas: a burst of 4 retries in all.
    let calls_before = calls.load(Ordering::SeqCst);
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let r = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { r.oneshot(request(None, Some("user-1"))).await })
        })
        .collect();
    let mut total = 0;
    let mut denied = 0;
    for h in handles {
        let res = h.await.expect("call task").expect("a response");
        total += retried(&res);
        if let CallOutcome::Stopped(StopReason::Budget { scope, .. }) = &info(&res).outcome {
            assert_eq!(*scope, Scope::User);
            denied += 1;
        }
    }
    assert_eq!(total, 4);
    assert!(denied >= 4, "{denied} calls stopped by the user budget");
    assert_eq!(calls.load(Ordering::SeqCst) - calls_before, 8 + 4);
}

// ---------------------------------------------------------------------------------------
// Provider side: two servers, one Redis.

#[derive(Clone, Default)]
struct App {
    effects: Arc<AtomicUsize>,
}

async fn send_email(State(app): State<App>, body: String) -> impl IntoResponse {
    // Slow enough for a concurrent duplicate to arrive while it runs.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = app.effects.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        [("x-email-id", format!("email-{n}"))],
        format!("sent {body} as email {n}"),
    )
}

async fn serve(app: App, store: RedisStore) -> SocketAddr {
    let router = Router::new()
        .route("/emails", post(send_email))
        .with_state(app)
        .layer(IdempotencyLayer::new(store));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn post_email(client: &HttpClient, addr: SocketAddr, key: &str) -> Reply {
    let req = Request::post(format!("http://{addr}/emails"))
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"hello")))
        .expect("a request");
    let res = client.request(req).await.expect("an answer");
    let (parts, body) = res.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("a body").to_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_behind_one_redis_run_a_duplicate_once() {
    let server = RedisServer::start();
    let app = App::default();
    let one = serve(app.clone(), server.store("servers:")).await;
    let two = serve(app.clone(), server.store("servers:")).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let key = "\"3b8e4f0c-5a6d-4f7e-8a9b-0c1d2e3f4a5b\"";

    // The same request reaches both servers at once (a retry after a lost response).
    let (a, b) = tokio::join!(post_email(&client, one, key), post_email(&client, two, key));
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::CREATED, StatusCode::CONFLICT]);
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
    let first = if a.status == StatusCode::CREATED {
        a
    } else {
        b
    };

    // Later duplicates, on either server, replay the stored response.
    for addr in [one, two] {
        let again = post_email(&client, addr, key).await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert_eq!(again.body, first.body);
        assert_eq!(
            again.headers.get("x-email-id"),
            first.headers.get("x-email-id")
        );
        assert_eq!(again.headers[IDEMPOTENT_REPLAYED], "true");
    }
    assert_eq!(app.effects.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------
// Redis dies mid-run, and comes back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_or_open_and_503_then_recovers() {
    let mut server = RedisServer::start();
    let port = server.port;
    let store = server.store("outage:");
    let layer = |on_error: OnStoreError, calls: Arc<AtomicU32>| {
        RetryLayer::new()
            .policy(retries(2))
            .budgets(
                Budgets::default()
                    .ratio(None)
                    .on_store_error(on_error)
                    .store(store.clone()),
            )
            .layer(unavailable(calls))
    };
    let closed_calls = Arc::new(AtomicU32::new(0));
    let open_calls = Arc::new(AtomicU32::new(0));
    let closed = layer(OnStoreError::FailClosed, closed_calls.clone());
    let open = layer(OnStoreError::FailOpen, open_calls.clone());
    let app = App::default();
    let addr = serve(app.clone(), store.clone()).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // Up: retries are drawn from Redis; the server runs keyed requests.
    let res = closed
        .clone()
        .oneshot(request(Some("up"), Some("u")))
        .await
        .expect("a response");
    assert_eq!(retried(&res), 2);
    let sent = post_email(&client, addr, "\"before\"").await;
    assert_eq!(sent.status, StatusCode::CREATED);

    server.kill();

    // Down, failing closed: no retry, and the reason says why.
    let res = closed
        .clone()
        .oneshot(request(Some("down"), Some("u")))
        .await
        .expect("a response");
    assert_eq!(info(&res).attempts, 1);
    match &info(&res).outcome {
        CallOutcome::Stopped(StopReason::StoreUnavailable { error }) => {
            assert!(!error.is_empty())
        }
        other => panic!("expected StoreUnavailable, got {other:?}"),
    }
    let reason = StopReason::StoreUnavailable {
        error: String::new(),
    };
    assert!(reason.to_string().contains("budget store unavailable"));
    // Down, failing open: retried as if granted.
    let res = open
        .clone()
        .oneshot(request(Some("down"), Some("u")))
        .await
        .expect("a response");
    assert_eq!(retried(&res), 2);
    // Down: the idempotency layer refuses to run a side effect it cannot deduplicate.
    let effects = app.effects.load(Ordering::SeqCst);
    let refused = post_email(&client, addr, "\"during\"").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.effects.load(Ordering::SeqCst), effects);

    // Back on the same port (empty: no persistence): the same store recovers by itself.
    let _server = RedisServer::start_on(port);
    let s = store.clone();
    eventually(100, || {
        let s = s.clone();
        async move { s.ping().await }
    })
    .await;
    let res = closed
        .clone()
        .oneshot(request(Some("after"), Some("u")))
        .await
        .expect("a response");
    assert_eq!(retried(&res), 2);
    let sent = post_email(&client, addr, "\"during\"").await;
    assert_eq!(sent.status, StatusCode::CREATED);
    let again = post_email(&client, addr, "\"during\"").await;
    assert_eq!(again.headers[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(app.effects.load(Ordering::SeqCst), effects + 1);
}

#[tokio::test]
async fn a_store_that_never_connected_errors_within_its_timeout() {
    // A port held by a listener that never answers (a free port could be taken by another
    // test's redis-server meanwhile): every call is an error, quickly, never a hang.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let store = RedisStore::new(&format!("redis://127.0.0.1:{port}/"))
        .expect("a lazy store")
        .timeout(Duration::from_millis(100));
    let t = [d(Scope::Task, "t", count(1, HOUR))];
    assert!(store.draw(&t).await.is_err());
    assert!(
        store
            .begin(&key(None, "k"), &claim(Fingerprint::from_u128(1), HOUR))
            .await
            .is_err()
    );
    assert!(store.ping().await.is_err());
    assert!(RedisStore::new("not a url").is_err());
}

#[test]
fn new_outside_a_runtime_is_an_error_not_a_panic() {
    assert!(RedisStore::new("redis://127.0.0.1:1/").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_is_a_timeout_not_a_hang_and_answers_resume() {
    let server = RedisServer::start();
    let store = server.store("frozen:").timeout(Duration::from_millis(100));
    let t = [d(Scope::Task, "t", count(2, HOUR))];
    assert_eq!(store.draw(&t).await, Ok(Grant::Granted));

    // SIGSTOP: the connection stays open, but nothing answers.
    let pid = server.child.as_ref().expect("running").id().to_string();
    let signal = |sig: &str| {
        let status = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let frozen = tokio::time::timeout(Duration::from_secs(10), store.draw(&t)).await;
    let answer = frozen.expect("the store's own timeout ends the call");
    let error = answer.expect_err("no answer is an error");
    assert!(error.to_string().contains("no answer within"), "{error}");
    signal("-CONT");

    // Resumed: the late answer to the abandoned call is discarded (it may or may not have
    // been applied in Redis: a timed-out draw counts as spent, never as refunded).
    let after = eventually(50, || {
        let store = store.clone();
        let t = t.clone();
        async move { store.draw(&t).await }
    })
    .await;
    assert!(matches!(after, Grant::Granted | Grant::Denied { .. }));
    assert!(matches!(
        store.draw(&t).await,
        Ok(Grant::Denied {
            scope: Scope::Task,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------
// The provider side with a frozen Redis: a started handler never runs again.

fn freeze(server: &RedisServer, sig: &str) {
    let pid = server.child.as_ref().expect("running").id().to_string();
    let status = Command::new("kill")
        .args([sig, &pid])
        .status()
        .expect("kill(1)");
    assert!(status.success(), "kill {sig} {pid}");
}

fn slow_email_router(store: RedisStore, effects: Arc<AtomicU32>, work: Duration) -> Router {
    let handler = move |body: String| {
        let effects = effects.clone();
        async move {
            let n = effects.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(work).await;
            (StatusCode::CREATED, format!("email {n}: {body}"))
        }
    };
    let layer = IdempotencyLayer::builder()
        .store(store)
        .lease(Duration::from_millis(300))
        .build()
        .expect("valid settings");
    Router::new().route("/emails", post(handler)).layer(layer)
}

async fn keyed(r: &Router, key: &str) -> Reply {
    let req = Request::post("/emails")
        .header("idempotency-key", key)
        .body(axum::body::Body::from("hello"))
        .expect("a request");
    let res = r.clone().oneshot(req).await.expect("an answer");
    let (parts, body) = res.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("a body").to_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_frozen_past_the_lease_never_reruns_a_started_handler() {
    let server = RedisServer::start();
    let store = server
        .store("frozen-lease:")
        .timeout(Duration::from_millis(100));
    let effects = Arc::new(AtomicU32::new(0));
    let r = slow_email_router(store, effects.clone(), Duration::from_millis(1500));

    let first = tokio::spawn({
        let r = r.clone();
        async move { keyed(&r, "k").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    freeze(&server, "-STOP");
    // Frozen for 700 ms, more than twice the 300 ms lease: every renewal fails.
    tokio::time::sleep(Duration::from_millis(700)).await;
    freeze(&server, "-CONT");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let during = keyed(&r, "k").await;
    let text = String::from_utf8_lossy(&during.body).into_owned();
    assert!(
        during.status == StatusCode::CONFLICT || text.contains("outcome-unknown"),
        "{} {text}",
        during.status
    );
    assert_eq!(effects.load(Ordering::SeqCst), 1);

    let original = first.await.expect("the first call");
    assert_eq!(original.status, StatusCode::CREATED);
    let again = eventually(20, || {
        let r = r.clone();
        async move {
            let reply = keyed(&r, "k").await;
            if reply.status == StatusCode::CREATED {
                Ok(reply)
            } else {
                Err(reply.status)
            }
        }
    })
    .await;
    assert_eq!(again.headers[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(again.body, original.body);
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_timed_out_in_a_frozen_redis_does_not_lock_the_key() {
    let server = RedisServer::start();
    let store = server
        .store("frozen-begin:")
        .timeout(Duration::from_millis(100));
    let effects = Arc::new(AtomicU32::new(0));
    let r = slow_email_router(store, effects.clone(), Duration::ZERO);

    freeze(&server, "-STOP");
    let refused = keyed(&r, "k").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(effects.load(Ordering::SeqCst), 0);
    // The claim script queued in the frozen Redis runs when it wakes; the layer's release by
    // token runs right after it, so the retry is not locked out for a lease.
    freeze(&server, "-CONT");
    let reply = eventually(20, || {
        let r = r.clone();
        async move {
            let reply = keyed(&r, "k").await;
            if reply.status == StatusCode::SERVICE_UNAVAILABLE {
                Err(reply.status)
            } else {
                Ok(reply)
            }
        }
    })
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    assert!(reply.headers.get(IDEMPOTENT_REPLAYED).is_none());
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principal_cannot_fill_redis_for_the_others() {
    let server = RedisServer::start();
    let store = server.store("share:").max_keys_per_principal(3);
    let fp = Fingerprint::from_u128(9);
    let mut hog = Vec::new();
    for i in 0..3 {
        let c = claim(fp, HOUR);
        let k = key(Some("hog"), &format!("k{i}"));
        assert_eq!(store.begin(&k, &c).await, Ok(Begin::Claimed));
        hog.push((k, c));
    }
    let refused = store
        .begin(&key(Some("hog"), "k3"), &claim(fp, HOUR))
        .await
        .expect_err("over its share");
    assert!(
        refused.is_full() && refused.to_string().contains("\"hog\""),
        "{refused}"
    );
    // Others are not affected; a replay of the hog's own keys still answers.
    assert_eq!(
        store
            .begin(&key(Some("alice"), "k0"), &claim(fp, HOUR))
            .await,
        Ok(Begin::Claimed)
    );
    assert_eq!(
        store.begin(&key(None, "k0"), &claim(fp, HOUR)).await,
        Ok(Begin::Claimed)
    );
    let (k0, c0) = &hog[0];
    assert_eq!(
        store.complete(k0, c0, response(1), HOUR).await,
        Ok(Ownership::Held)
    );
    assert!(matches!(
        store.begin(k0, &claim(fp, HOUR)).await,
        Ok(Begin::Done(_))
    ));
    // A released key frees its place in the share.
    let (k1, c1) = &hog[1];
    assert_eq!(store.release(k1, c1.token).await, Ok(Ownership::Held));
    assert_eq!(
        store.begin(&key(Some("hog"), "k3"), &claim(fp, HOUR)).await,
        Ok(Begin::Claimed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_killed_and_restarted_empty_mid_handler_never_reruns_it() {
    let mut server = RedisServer::start();
    let port = server.port;
    let store = server.store("killed:").timeout(Duration::from_millis(100));
    let effects = Arc::new(AtomicU32::new(0));
    let r = slow_email_router(store, effects.clone(), Duration::from_millis(1500));

    let first = tokio::spawn({
        let r = r.clone();
        async move { keyed(&r, "k").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // SIGKILL, then a new, empty Redis on the same port: every claim is gone.
    server.kill();
    let server = RedisServer::start_on(port);
    // The holder's next renewal claims the key again (the layer renews every 100 ms)...
    eventually(30, || async move {
        match ask(port, "EXISTS killed:i:g:k\r\n") {
            Ok(answer) if answer.starts_with(":1") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // ...so a retry waits instead of running the handler a second time.
    let during = keyed(&r, "k").await;
    assert_eq!(during.status, StatusCode::CONFLICT);
    assert_eq!(effects.load(Ordering::SeqCst), 1);

    // The result is written when the handler ends, and replayed.
    let original = first.await.expect("the first call");
    assert_eq!(original.status, StatusCode::CREATED);
    let again = keyed(&r, "k").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.headers[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(again.body, original.body);
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    drop(server);
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_id_shape_is_charged_in_redis_too() {
    let server = RedisServer::start();
    let budgets = Budgets::default()
        .ratio(None)
        .per_task(Some(Limit::Count { max: 1, ttl: HOUR }))
        .store(server.store("ids:"));
    let calls = Arc::new(AtomicU32::new(0));
    let svc = RetryLayer::new()
        .policy(retries(3))
        .budgets(budgets)
        .layer(unavailable(calls.clone()));
    let long = "t".repeat(10_000);
    for id in ["short", long.as_str(), "tâche-1", "", "a\tb"] {
        let mut req = request(None, None);
        req.headers_mut().insert(
            "x-task-id",
            HeaderValue::from_bytes(id.as_bytes()).expect("a header value"),
        );
        let first = svc.clone().oneshot(req).await.expect("a response");
        assert_eq!(retried(&first), 1, "{id:?}: its one retry");
        let mut again = request(None, None);
        again.headers_mut().insert(
            "x-task-id",
            HeaderValue::from_bytes(id.as_bytes()).expect("a header value"),
        );
        let second = svc.clone().oneshot(again).await.expect("a response");
        assert_eq!(retried(&second), 0, "{id:?}: charged, so no second retry");
    }
}

// ---------------------------------------------------------------------------------------
// Claims and results that must be on a replica before they count (`wait_for_replicas`).

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill(1)");
    assert!(status.success(), "kill {sig} {pid}");
}

/// Whether the server on `port` holds `key`.
fn holds(port: u16, key: &str) -> bool {
    ask(port, &format!("EXISTS {key}\r\n")).is_ok_and(|a| a.starts_with(":1"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_or_result_no_replica_holds_does_not_count() {
    let master = RedisServer::start();
    let replica = RedisServer::start_replica_of(master.port);
    let store = master
        .store("wait:")
        .timeout(Duration::from_secs(2))
        .wait_for_replicas(1, Duration::from_millis(300));
    let lease = Duration::from_secs(30);
    let fp = Fingerprint::of(&http::Method::POST, "/send", b"{}");

    // A healthy replica: the claim counts, and the replica holds it the moment it does.
    let k1 = key(None, "one");
    let c1 = claim(fp, lease);
    assert!(matches!(store.begin(&k1, &c1).await, Ok(Begin::Claimed)));
    assert!(
        holds(replica.port, "wait:i:g:one"),
        "claimed before the replica had it"
    );
    assert!(matches!(
        store.complete(&k1, &c1, response(1), lease).await,
        Ok(Ownership::Held)
    ));

    // A frozen replica: the master takes the claim, but no replica acknowledges it within
    // 300 ms, so it does not count (the layer then releases it and answers 503).
    signal(replica.pid(), "-STOP");
    let k2 = key(None, "two");
    let c2 = claim(fp, lease);
    let started = std::time::Instant::now();
    let begun = store.begin(&k2, &c2).await;
    let error = begun.expect_err("a claim no replica holds was counted");
    assert!(error.to_string().contains("0 of 1 replicas"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Same for a result: an error, so the layer writes it again while it holds the claim.
    let done = store.complete(&k1, &c1, response(1), lease).await;
    assert!(done.is_err(), "{done:?}");

    // The replica back: the result is written again and acknowledged.
    signal(replica.pid(), "-CONT");
    eventually(50, || async {
        match store.complete(&k1, &c1, response(1), lease).await {
            Ok(Ownership::Held) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(holds(replica.port, "wait:i:g:one"));

    // Off by default: the same frozen replica does not hold a claim up.
    signal(replica.pid(), "-STOP");
    let plain = master.store("plain:").timeout(Duration::from_secs(2));
    let k3 = key(None, "three");
    assert!(matches!(
        plain.begin(&k3, &claim(fp, lease)).await,
        Ok(Begin::Claimed)
    ));
    signal(replica.pid(), "-CONT");
}
