//! The Redis store against a real `redis-server` (started on a free loopback port, stopped on
//! drop): the same budget and idempotency semantics as the memory stores, shared by replicas,
//! and the behaviour when Redis dies and comes back.
//!
//! Needs `redis-server` on the PATH (`scripts/test.sh` installs it): without it these tests
//! fail, they are not skipped. Real time throughout (virtual time does not drive Redis); no
//! assertion depends on anything being fast, only on waits being long enough.
#![cfg(feature = "redis")]

use std::fmt::Debug;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt, service_fn};
use tower_retry_guard::budget::RedisStore;
use tower_retry_guard::budget::{
    BudgetStore, Budgets, Draw, Grant, Limit, MemoryStore, OnStoreError, Scope,
};
use tower_retry_guard::server::{
    Begin, Claim, ClaimToken, Fingerprint, IDEMPOTENT_REPLAYED, IdempotencyLayer, IdempotencyStore,
    MemoryIdempotencyStore, Ownership, ScopedKey, Stored,
};
use tower_retry_guard::{
    Backoff, CallOutcome, IdempotencyKey, Jitter, RetryInfo, RetryLayer, RetryPolicy, StopReason,
};

// ---------------------------------------------------------------------------------------
// A redis-server of our own.

/// A `redis-server` child process on a loopback port; killed on drop.
struct RedisServer {
    child: Option<Child>,
    port: u16,
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

static STARTED: AtomicUsize = AtomicUsize::new(0);

impl RedisServer {
    /// Starts a server on a free port (a few tries, in case another test takes the port).
    fn start() -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            match RedisServer::try_start(free_port()) {
                Ok(s) => return s,
                Err(e) => last = e,
            }
        }
        panic!("could not start redis-server: {last}");
    }

    /// Starts a server on `port` (e.g. again after [`RedisServer::kill`]).
    fn start_on(port: u16) -> Self {
        let mut last = String::new();
        // The old server's socket may take a moment to be free.
        for _ in 0..20 {
            match RedisServer::try_start(port) {
                Ok(s) => return s,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not start redis-server on port {port}: {last}");
    }

    fn try_start(port: u16) -> Result<Self, String> {
        // A name unique to this server, to tell it from another test's server on the port.
        let tag = format!(
            "trg-{}-{}.rdb",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::SeqCst)
        );
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dbfilename", &tag])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                "redis-server is not installed (not on PATH): the Redis store tests need it. \
                 Run scripts/test.sh (it installs redis-server with apt-get) or install it \
                 yourself (apt-get install redis-server)."
            ),
            Err(e) => panic!("could not run redis-server: {e}"),
        };
        let mut server = RedisServer {
            child: Some(child),
            port,
        };
        // Up to 5 s for the server to answer, and to be ours.
        for _ in 0..100 {
            if let Some(c) = server.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    server.child = None;
                    return Err(format!("redis-server exited: {status}"));
                }
            }
            if let Ok(answer) = ask(port, "CONFIG GET dbfilename\r\n") {
                if answer.contains(&tag) {
                    return Ok(server);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("redis-server did not answer within 5 s".into())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn store(&self, prefix: &str) -> RedisStore {
        RedisStore::new(&self.url())
            .expect("a redis store")
            .prefix(prefix)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends an inline command and reads the answer (bounded by a timeout).
fn ask(port: u16, command: &str) -> io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(command.as_bytes())?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Polls `probe` every 100 ms, up to `tries` times, until it succeeds.
async fn eventually<F, Fut, T, E: Debug>(tries: u32, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut last = None;
    for _ in 0..tries {
        match probe().await {
            Ok(v) => return v,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never succeeded; last error: {last:?}");
}

// ---------------------------------------------------------------------------------------
// One suite of semantics, run against the memory stores and Redis.

fn d(scope: Scope, key: &str, limit: Limit) -> Draw {
    Draw {
        scope,
        key: key.to_owned(),
        limit,
    }
}

fn count(max: u32, ttl: Duration) -> Limit {
    Limit::Count { max, ttl }
}

const HOUR: Duration = Duration::from_secs(3600);

/// A grant as a stable line: the scope, and the wait rounded to whole seconds.
fn show(g: Result<Grant, impl Debug>) -> String {
    match g {
        Ok(Grant::Granted) => "granted".into(),
        Ok(Grant::Denied { scope, retry_in }) => match retry_in {
            Some(w) => format!("denied {scope} in {}s", w.as_secs_f64().round()),
            None => format!("denied {scope} never"),
        },
        Err(e) => format!("error {e:?}"),
    }
}

/// Budget scenarios; each draw's answer is one line of the transcript.
async fn budget_suite<S: BudgetStore>(s: S) -> Vec<String> {
    let mut out = Vec::new();
    let mut log = |what: &str, g| out.push(format!("{what}: {}", show(g)));

    // A count: 3 draws, the 4th refused until 1 h after the last.
    let t = [d(Scope::Task, "t1", count(3, HOUR))];
    for i in 1..=4 {
        log(&format!("count #{i}"), s.draw(&t).await);
    }
    log(
        "other task",
        s.draw(&[d(Scope::Task, "t2", count(3, HOUR))]).await,
    );
    // The same id in another scope is another key.
    log(
        "same id, user scope",
        s.draw(&[d(Scope::User, "t1", count(1, HOUR))]).await,
    );

    // All or nothing: the user refuses, so the task is not charged.
    let task = d(Scope::Task, "t3", count(2, HOUR));
    let user = d(Scope::User, "u3", count(1, HOUR));
    log("both", s.draw(&[task.clone(), user.clone()]).await);
    for i in 1..=3 {
        log(
            &format!("both again #{i}"),
            s.draw(&[task.clone(), user.clone()]).await,
        );
    }
    log("task alone", s.draw(std::slice::from_ref(&task)).await);
    log(
        "task alone again",
        s.draw(std::slice::from_ref(&task)).await,
    );

    // A rate: 1 a minute, bursts of 3.
    let rate = Limit::Rate {
        tokens: 1,
        per: Duration::from_secs(60),
        burst: 3,
    };
    let u = [d(Scope::User, "u4", rate)];
    for i in 1..=4 {
        log(&format!("rate #{i}"), s.draw(&u).await);
    }
    // A refused rate draw is not charged either.
    let t5 = d(Scope::Task, "t5", count(5, HOUR));
    log(
        "task + empty rate",
        s.draw(&[t5.clone(), u[0].clone()]).await,
    );
    log("task count untouched", s.draw(&[t5]).await);

    // Limits that never allow, or never refill.
    log(
        "count 0",
        s.draw(&[d(Scope::Task, "t6", count(0, HOUR))]).await,
    );
    let no_burst = Limit::Rate {
        tokens: 10,
        per: Duration::from_secs(1),
        burst: 0,
    };
    log("burst 0", s.draw(&[d(Scope::User, "u7", no_burst)]).await);
    let no_refill = Limit::Rate {
        tokens: 0,
        per: Duration::from_secs(1),
        burst: 2,
    };
    for i in 1..=3 {
        log(
            &format!("no refill #{i}"),
            s.draw(&[d(Scope::User, "u8", no_refill)]).await,
        );
    }

    // Expiry: a count is forgotten its ttl after the last draw; a rate refills.
    let short = [d(Scope::Task, "t9", count(1, Duration::from_millis(150)))];
    let fast = [d(
        Scope::User,
        "u9",
        Limit::Rate {
            tokens: 1,
            per: Duration::from_millis(150),
            burst: 1,
        },
    )];
    log("short count", s.draw(&short).await);
    log("fast rate", s.draw(&fast).await);
    log("short count again", s.draw(&short).await);
    log("fast rate again", s.draw(&fast).await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    log("short count after its ttl", s.draw(&short).await);
    log("fast rate after refill", s.draw(&fast).await);

    // Racing draws on one key: exactly the limit.
    let race = [d(Scope::Task, "race", count(5, HOUR))];
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            let race = race.clone();
            tokio::spawn(async move { s.draw(&race).await })
        })
        .collect();
    let mut granted = 0;
    for t in tasks {
        if t.await.expect("draw task") == Ok(Grant::Granted) {
            granted += 1;
        }
    }
    out.push(format!(
        "20 racing draws on a limit of 5: {granted} granted"
    ));
    out
}

const EXPECTED_BUDGETS: &[&str] = &[
    "count #1: granted",
    "count #2: granted",
    "count #3: granted",
    "count #4: denied task in 3600s",
    "other task: granted",
    "same id, user scope: granted",
    "both: granted",
    "both again #1: denied user in 3600s",
    "both again #2: denied user in 3600s",
    "both again #3: denied user in 3600s",
    "task alone: granted",
    "task alone again: denied task in 3600s",
    "rate #1: granted",
    "rate #2: granted",
    "rate #3: granted",
    "rate #4: denied user in 60s",
    "task + empty rate: denied user in 60s",
    "task count untouched: granted",
    "count 0: denied task never",
    "burst 0: denied user never",
    "no refill #1: granted",
    "no refill #2: granted",
    "no refill #3: denied user never",
    "short count: granted",
    "fast rate: granted",
    "short count again: denied task in 0s",
    "fast rate again: denied user in 0s",
    "short count after its ttl: granted",
    "fast rate after refill: granted",
    "20 racing draws on a limit of 5: 5 granted",
];

fn key(principal: Option<&str>, k: &str) -> ScopedKey {
    ScopedKey::new(principal, IdempotencyKey::new(k).expect("a valid key"))
}

fn response(n: u32) -> Stored {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.append("set-cookie", HeaderValue::from_static("a=1"));
    headers.append("set-cookie", HeaderValue::from_static("b=2"));
    headers.insert("x-order-id", HeaderValue::from(n));
    Stored {
        status: StatusCode::CREATED,
        headers,
        body: Bytes::from(format!("{{\"order\":{n}}}\0\u{ff}")),
    }
}

fn show_begin(b: Result<Begin, impl Debug>) -> String {
    match b {
        Ok(Begin::Claimed) => "claimed".into(),
        Ok(Begin::InFlight) => "in flight".into(),
        Ok(Begin::Mismatch) => "mismatch".into(),
        Ok(Begin::Abandoned) => "abandoned".into(),
        Ok(Begin::Done(s)) => {
            let order = s
                .headers
                .get("x-order-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            let same = s == response(order.parse().unwrap_or(0));
            format!("done: order {order}, identical {same}")
        }
        Err(_) => "error".into(),
    }
}

fn claim(fingerprint: Fingerprint, lease: Duration) -> Claim {
    Claim {
        token: ClaimToken::random(),
        fingerprint,
        lease,
        keep: HOUR,
        take_over: false,
    }
}

/// Idempotency scenarios; each answer is one line of the transcript.
async fn idempotency_suite<S: IdempotencyStore>(s: S) -> Vec<String> {
    let mut out = Vec::new();
    let fp = Fingerprint::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    let other = Fingerprint::from_u128(1);
    let lease = Duration::from_secs(60);
    let ttl = HOUR;

    let k = key(None, "k1");
    let first = claim(fp, lease);
    let second = claim(fp, lease);
    let mut line = |what: &str, answer: String| out.push(format!("{what}: {answer}"));
    line("begin", show_begin(s.begin(&k, &first).await));
    line("again", show_begin(s.begin(&k, &second).await));
    line(
        "other request",
        show_begin(s.begin(&k, &claim(other, lease)).await),
    );
    // Fencing: only the claim's own token completes it.
    line(
        "complete, another token",
        format!("{:?}", s.complete(&k, &second, response(7), ttl).await),
    );
    line(
        "complete",
        format!("{:?}", s.complete(&k, &first, response(1), ttl).await),
    );
    line("replay", show_begin(s.begin(&k, &second).await));
    line(
        "other request after",
        show_begin(s.begin(&k, &claim(other, lease)).await),
    );
    // Completing again (a retried write) is not an error and changes nothing; renewing or
    // releasing leaves a finished key alone.
    line(
        "complete again",
        format!("{:?}", s.complete(&k, &first, response(2), ttl).await),
    );
    line("renew done", format!("{:?}", s.renew(&k, &first).await));
    line(
        "release done",
        format!("{:?}", s.release(&k, first.token).await),
    );
    line("replay still first", show_begin(s.begin(&k, &second).await));

    // Principals scope keys.
    let a = key(Some("alice"), "shared");
    let b = key(Some("bob"), "shared");
    let alice = claim(fp, lease);
    line("alice", show_begin(s.begin(&a, &alice).await));
    line("bob", show_begin(s.begin(&b, &claim(other, lease)).await));
    line(
        "alice completes",
        format!("{:?}", s.complete(&a, &alice, response(3), ttl).await),
    );
    line(
        "bob still",
        show_begin(s.begin(&b, &claim(other, lease)).await),
    );

    // Release frees an in-flight key, by its own token only.
    let r = key(None, "k2");
    let held = claim(fp, lease);
    line("claim", show_begin(s.begin(&r, &held).await));
    line(
        "release, another token",
        format!("{:?}", s.release(&r, ClaimToken::random()).await),
    );
    line(
        "still held",
        show_begin(s.begin(&r, &claim(fp, lease)).await),
    );
    line("release", format!("{:?}", s.release(&r, held.token).await));
    line(
        "claim after release",
        show_begin(s.begin(&r, &claim(other, lease)).await),
    );
    // A key the store lost (a restart without persistence): its holder's renewal claims it
    // again and its completion writes it, so retries wait or replay rather than run again.
    let nope = key(None, "nope");
    let lost = claim(fp, lease);
    line(
        "release unknown",
        format!("{:?}", s.release(&nope, lost.token).await),
    );
    line(
        "renew a lost key",
        format!("{:?}", s.renew(&nope, &lost).await),
    );
    line(
        "while renewed",
        show_begin(s.begin(&nope, &claim(fp, lease)).await),
    );
    let gone = key(None, "gone");
    line(
        "complete a lost key",
        format!("{:?}", s.complete(&gone, &lost, response(9), ttl).await),
    );
    line(
        "replay a restored key",
        show_begin(s.begin(&gone, &claim(fp, lease)).await),
    );

    // Leases run out into "abandoned", never "free"; a renewal extends a lease; a late holder
    // nobody took over still completes; a take-over fences the old holder out.
    let short = Duration::from_millis(150);
    let l = key(None, "lease");
    let n = key(None, "renewed");
    let t = key(None, "ttl");
    let late = key(None, "late");
    let lapsed = claim(fp, short);
    let renewed = claim(fp, Duration::from_secs(1));
    let expiring = claim(fp, lease);
    let slow = claim(fp, short);
    line("short lease", show_begin(s.begin(&l, &lapsed).await));
    line("lease to renew", show_begin(s.begin(&n, &renewed).await));
    line(
        "renew",
        format!("{:?}", s.renew(&n, &Claim { lease, ..renewed }).await),
    );
    line("to expire", show_begin(s.begin(&t, &expiring).await));
    line(
        "complete short",
        format!("{:?}", s.complete(&t, &expiring, response(4), short).await),
    );
    line("slow holder", show_begin(s.begin(&late, &slow).await));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    line(
        "after the lease",
        show_begin(s.begin(&l, &claim(fp, lease)).await),
    );
    line(
        "after the lease, other request",
        show_begin(s.begin(&l, &claim(other, lease)).await),
    );
    let rescuer = Claim {
        take_over: true,
        ..claim(fp, lease)
    };
    line("take over", show_begin(s.begin(&l, &rescuer).await));
    line(
        "old holder renews",
        format!("{:?}", s.renew(&l, &lapsed).await),
    );
    line(
        "old holder completes",
        format!("{:?}", s.complete(&l, &lapsed, response(5), ttl).await),
    );
    line(
        "new holder completes",
        format!("{:?}", s.complete(&l, &rescuer, response(6), ttl).await),
    );
    line(
        "replay after take over",
        show_begin(s.begin(&l, &claim(fp, lease)).await),
    );
    line(
        "after the old lease, renewed",
        show_begin(s.begin(&n, &claim(fp, lease)).await),
    );
    line(
        "late holder completes",
        format!("{:?}", s.complete(&late, &slow, response(8), ttl).await),
    );
    line(
        "replay late",
        show_begin(s.begin(&late, &claim(fp, lease)).await),
    );
    line(
        "after the ttl",
        show_begin(s.begin(&t, &claim(other, lease)).await),
    );
    out
}

const EXPECTED_IDEMPOTENCY: &[&str] = &[
    "begin: claimed",
    "again: in flight",
    "other request: mismatch",
    "complete, another token: Ok(Lost)",
    "complete: Ok(Held)",
    "replay: done: order 1, identical true",
    "other request after: mismatch",
    "complete again: Ok(Held)",
    "renew done: Ok(Lost)",
    "release done: Ok(Lost)",
    "replay still first: done: order 1, identical true",
    "alice: claimed",
    "bob: claimed",
    "alice completes: Ok(Held)",
    "bob still: in flight",
    "claim: claimed",
    "release, another token: Ok(Lost)",
    "still held: in flight",
    "release: Ok(Held)",
    "claim after release: claimed",
    "release unknown: Ok(Lost)",
    "renew a lost key: Ok(Held)",
    "while renewed: in flight",
    "complete a lost key: Ok(Held)",
    "replay a restored key: done: order 9, identical true",
    "short lease: claimed",
    "lease to renew: claimed",
    "renew: Ok(Held)",
    "to expire: claimed",
    "complete short: Ok(Held)",
    "slow holder: claimed",
    "after the lease: abandoned",
    "after the lease, other request: mismatch",
    "take over: claimed",
    "old holder renews: Ok(Lost)",
    "old holder completes: Ok(Lost)",
    "new holder completes: Ok(Held)",
    "replay after take over: done: order 6, identical true",
    "after the old lease, renewed: in flight",
    "late holder completes: Ok(Held)",
    "replay late: done: order 8, identical true",
    "after the ttl: claimed",
];

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
    // Nothing listens on this port: every call is an error, quickly, never a hang.
    let port = free_port();
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
