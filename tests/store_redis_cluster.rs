//! The Redis store on a real local Redis Cluster (six `redis-server --cluster-enabled yes` on
//! free loopback ports, or three masters alone, joined by `redis-cli --cluster create`,
//! stopped on drop): the same transcripts as the memory stores and one Redis, keys spread over
//! the masters, and a master killed mid-run.
//!
//! Needs `redis-server` and `redis-cli` on the PATH (`scripts/test.sh` installs them).
#![cfg(feature = "redis-cluster")]

mod redis_support;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt, service_fn};
use tower_retry_guard::budget::{
    BudgetStore, Budgets, Grant, Limit, MemoryStore, OnStoreError, Scope,
};
use tower_retry_guard::server::{
    Begin, Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryIdempotencyStore, Ownership,
};
use tower_retry_guard::{
    Backoff, CallOutcome, Jitter, RetryInfo, RetryLayer, RetryPolicy, StopReason,
};

use redis_support::cluster::{NODE_TIMEOUT_MS, RedisCluster};
use redis_support::suites::*;

/// Polls `probe` every 50 ms, up to `tries` times, until it succeeds.
async fn eventually<T, E: std::fmt::Debug, Fut: Future<Output = Result<T, E>>>(
    tries: u32,
    mut probe: impl FnMut() -> Fut,
) -> T {
    let mut last = None;
    for _ in 0..tries {
        match probe().await {
            Ok(v) => return v,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never succeeded; last error: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_semantics_are_the_same_on_a_redis_cluster() {
    let cluster = RedisCluster::shared();
    let store = cluster.store("suite-b:");
    assert!(store.is_cluster());
    let (memory, redis) = tokio::join!(budget_suite(MemoryStore::new()), budget_suite(store));
    assert_eq!(memory, EXPECTED_BUDGETS);
    assert_eq!(redis, EXPECTED_BUDGETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_semantics_are_the_same_on_a_redis_cluster() {
    let cluster = RedisCluster::shared();
    let (memory, redis) = tokio::join!(
        idempotency_suite(MemoryIdempotencyStore::new()),
        idempotency_suite(cluster.store("suite-i:"))
    );
    assert_eq!(memory, EXPECTED_IDEMPOTENCY);
    assert_eq!(redis, EXPECTED_IDEMPOTENCY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_decisions_over_two_slots_stay_all_or_nothing() {
    let cluster = RedisCluster::shared();
    let store = cluster.store("race:");
    // A task and a user in different slots: each decision is two script calls, and a
    // refusal gives the other draw back.
    let task = d(Scope::Task, "t", count(5, HOUR));
    let user = d(Scope::User, "u", count(3, HOUR));
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let (s, draws) = (store.clone(), [task.clone(), user.clone()]);
            tokio::spawn(async move { s.draw(&draws).await })
        })
        .collect();
    let mut granted = 0;
    for c in calls {
        match c.await.expect("a draw") {
            Ok(Grant::Granted) => granted += 1,
            Ok(Grant::Denied { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    // At most the user's limit. Fewer under a tight race is the protocol's conservative
    // side: a decision refused in one slot gives back what it took in the other, and a
    // draw that saw the other slot's key held by such a decision was refused meanwhile.
    assert!((1..=3).contains(&granted), "{granted} granted");
    // Exactly the granted decisions were charged, to the task and to the user: the
    // refused ones gave everything back.
    for (draw, limit, scope) in [(&task, 5, Scope::Task), (&user, 3, Scope::User)] {
        let alone = std::slice::from_ref(draw);
        for _ in granted..limit {
            assert_eq!(store.draw(alone).await, Ok(Grant::Granted), "{scope:?}");
        }
        assert!(
            matches!(store.draw(alone).await, Ok(Grant::Denied { scope: s, .. }) if s == scope),
            "{scope:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principal_cannot_fill_a_cluster_for_the_others() {
    let cluster = RedisCluster::shared();
    // 32 keys, 2 in each of the principal's 16 buckets.
    let store = cluster.store("share:").max_keys_per_principal(32);
    let fp = Fingerprint::from_u128(9);
    let mut claimed = 0;
    let mut refused = None;
    for i in 0..200 {
        match store
            .begin(&key(Some("hog"), &format!("k{i}")), &claim(fp, HOUR))
            .await
        {
            Ok(Begin::Claimed) => claimed += 1,
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("refused before 200 keys");
    assert!(
        refused.is_full() && refused.to_string().contains("\"hog\""),
        "{refused}"
    );
    assert!(
        (2..=32).contains(&claimed),
        "{claimed} keys before the first refusal"
    );
    assert_eq!(
        store
            .begin(&key(Some("alice"), "k0"), &claim(fp, HOUR))
            .await,
        Ok(Begin::Claimed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_script_calls_spread_over_the_three_masters() {
    let cluster = RedisCluster::start(3, 0);
    let store = cluster.store("spread:");
    let fp = Fingerprint::from_u128(3);
    // Idempotency keys of 20 principals and of the global scope; decisions of 200 tasks.
    for i in 0..600u32 {
        let principal = format!("tenant-{}", i % 20);
        let k = key((i % 3 != 0).then_some(principal.as_str()), &format!("k{i}"));
        let c = claim(fp, HOUR);
        assert_eq!(store.begin(&k, &c).await, Ok(Begin::Claimed));
        assert_eq!(
            store.complete(&k, &c, response(i), HOUR).await,
            Ok(Ownership::Held)
        );
        let draw = [
            d(Scope::Task, &format!("task-{}", i % 200), count(1000, HOUR)),
            d(Scope::User, &format!("user-{}", i % 20), count(1000, HOUR)),
        ];
        assert_eq!(store.draw(&draw).await, Ok(Grant::Granted));
    }
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let keys: Vec<usize> = masters
        .iter()
        .map(|&m| RedisCluster::keys(m, "spread:*").len())
        .collect();
    let calls: Vec<u64> = masters
        .iter()
        .map(|&m| RedisCluster::script_calls(m))
        .collect();
    eprintln!("keys per master: {keys:?}; script calls per master: {calls:?}");
    let (all_keys, all_calls) = (keys.iter().sum::<usize>(), calls.iter().sum::<u64>());
    assert!(all_keys >= 600 + 200 + 20, "{all_keys}");
    for (k, c) in keys.iter().zip(&calls) {
        assert!(*k * 2 <= all_keys, "a master holds {k} of {all_keys} keys");
        assert!(
            *c * 2 <= all_calls,
            "a master ran {c} of {all_calls} scripts"
        );
    }
}

// ---------------------------------------------------------------------------------------
// A master killed mid-run.

/// A provider that is down: every call gets a 503.
fn unavailable()
-> impl tower::Service<Request<String>, Response = Response<String>, Error = io::Error, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(|_req: Request<String>| async move {
        let mut res = Response::new(String::new());
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Ok::<_, io::Error>(res)
    })
}

type Effects = Arc<Mutex<HashMap<String, u32>>>;

async fn serve(store: tower_retry_guard::RedisStore, effects: Effects) -> SocketAddr {
    let handler = move |body: String| {
        let effects = effects.clone();
        async move {
            let n = {
                let mut map = effects.lock().unwrap_or_else(|e| e.into_inner());
                let n = map.entry(body.clone()).or_insert(0);
                *n += 1;
                *n
            };
            // Long enough for a master to die while handlers run.
            tokio::time::sleep(Duration::from_millis(400)).await;
            (StatusCode::CREATED, format!("sent {body} (run {n})"))
        }
    };
    let router = Router::new()
        .route("/emails", post(handler))
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

/// Posts `key` until the server answers 201 (first run or replay), at most for 30 s.
/// Answers the body and how many answers were 503 (store unavailable).
async fn post_until_done(
    client: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    key: String,
) -> (Bytes, u32) {
    let start = Instant::now();
    let mut unavailable = 0;
    while start.elapsed() < Duration::from_secs(30) {
        let req = Request::post(format!("http://{addr}/emails"))
            .header("idempotency-key", format!("\"{key}\""))
            .body(Full::new(Bytes::from(key.clone())))
            .expect("a request");
        if let Ok(res) = client.request(req).await {
            let status = res.status();
            let body = res.into_body().collect().await.map(|b| b.to_bytes());
            match (status, body) {
                (StatusCode::CREATED, Ok(body)) => return (body, unavailable),
                (StatusCode::SERVICE_UNAVAILABLE, _) => unavailable += 1,
                (StatusCode::CONFLICT, _) => {}
                (other, body) => panic!("{key}: unexpected {other}: {body:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{key}: no 201 within 30 s");
}

/// Keys sent in the failover test.
const KEYS: usize = 80;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_run_runs_no_handler_twice_and_overdraws_no_budget() {
    // Two replicas a master: the promoted one still has a replica to wait for.
    let mut cluster = RedisCluster::start(3, 2);
    let timeout = Duration::from_millis(250);
    let store = cluster.store("failover:").timeout(timeout);
    eventually(100, || store.ping()).await;

    // Provider side: keyed POSTs over real HTTP, each client retrying until it has a 201.
    // Claims and results count once a replica holds them (`WAIT`): none is lost with the
    // killed master, so no handler runs twice (without it, one in a few runs did).
    let effects: Effects = Arc::default();
    let provider = store
        .clone()
        .wait_for_replicas(1, Duration::from_millis(100));
    let addr = serve(provider, effects.clone()).await;
    let client = Client::builder(TokioExecutor::new()).build_http();
    // 80 keys, each sent by two clients at once (a retry racing its original), one key
    // every 40 ms: before, during and after the gap.
    let launcher = tokio::spawn(async move {
        let mut posts = Vec::new();
        for i in 0..KEYS {
            for _ in 0..2 {
                let key = format!("email-{i}");
                posts.push(tokio::spawn(post_until_done(client.clone(), addr, key)));
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        posts
    });

    // Client side: 24 tasks retrying a provider that is down, 3 retries per task, users
    // in other slots (split decisions), failing closed.
    let stop = Arc::new(AtomicBool::new(false));
    let gap_denials = Arc::new(AtomicU32::new(0));
    let layer = RetryLayer::new()
        .policy(
            RetryPolicy::builder()
                .max_retries(2)
                .backoff(Backoff::Constant(Duration::from_millis(5)))
                .jitter(Jitter::None)
                .build()
                .expect("a policy"),
        )
        .budgets(
            Budgets::default()
                .ratio(None)
                .in_flight(None)
                .per_task(Some(Limit::Count { max: 3, ttl: HOUR }))
                .per_user(Some(Limit::Rate {
                    tokens: 1000,
                    per: Duration::from_secs(1),
                    burst: 1000,
                }))
                .on_store_error(OnStoreError::FailClosed)
                .store(store.clone()),
        );
    let svc = layer.layer(unavailable());
    let callers: Vec<_> = (0..24)
        .map(|t| {
            let (svc, stop, gap) = (svc.clone(), stop.clone(), gap_denials.clone());
            tokio::spawn(async move {
                let mut retried = 0;
                while !stop.load(Ordering::SeqCst) {
                    let req = Request::get("/complete")
                        .header("x-task-id", format!("task-{t}"))
                        .header("x-user-id", format!("user-{}", t % 4))
                        .body(String::new())
                        .expect("a request");
                    let res = svc.clone().oneshot(req).await.expect("a response");
                    let info = res.extensions().get::<RetryInfo>().expect("retry info");
                    retried += info.attempts - 1;
                    if let CallOutcome::Stopped(StopReason::StoreUnavailable { .. }) = info.outcome
                    {
                        gap.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                retried
            })
        })
        .collect();

    // Kill (SIGKILL) a master while it holds in-flight claims.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let masters = cluster.masters();
    let victim = *masters
        .iter()
        .find(|&&m| !RedisCluster::keys(m, "failover:i:*").is_empty())
        .expect("a master holding claims");
    let replicas = cluster.replicas_of(victim);
    assert_eq!(replicas.len(), 2, "the victim's replicas");
    let other = *masters
        .iter()
        .find(|&&m| m != victim)
        .expect("another master");
    // A task id in the victim's slots, to time the recovery by.
    let probe = (0..10_000)
        .map(|i| format!("probe-{i}"))
        .find(|id| {
            RedisCluster::slot(other, &format!("{{task:{id}}}"))
                .and_then(|s| cluster.master_of_slot(other, s))
                == Some(victim)
        })
        .expect("a probe id in the victim's slots");
    let in_flight = RedisCluster::keys(victim, "failover:i:*").len();
    let killed = Instant::now();
    cluster.kill(victim);

    let promoted = tokio::task::spawn_blocking(move || {
        while killed.elapsed() < Duration::from_secs(20) {
            if replicas.iter().any(|&r| {
                redis_support::cluster::cli(r, &["ROLE"]).is_some_and(|r| r.starts_with("master"))
            }) {
                return killed.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the replica was not promoted within 20 s");
    });
    let probe_draw = [d(Scope::Task, &probe, count(u32::MAX, HOUR))];
    let mut failed_probes = 0;
    let recovered = loop {
        match store.draw(&probe_draw).await {
            Ok(Grant::Granted) => break killed.elapsed(),
            other => {
                assert!(other.is_err(), "{other:?}");
                failed_probes += 1;
            }
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "no recovery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let promoted = promoted.await.expect("the promotion watcher");
    eprintln!(
        "failover: {in_flight} claims on the killed master; replica promoted after {promoted:?}, \
         store answering again after {recovered:?} ({failed_probes} failed probes; node timeout \
         {NODE_TIMEOUT_MS} ms, store timeout {timeout:?})"
    );
    assert!(failed_probes > 0, "the gap was seen");
    assert!(
        recovered <= promoted + timeout + Duration::from_millis(250),
        "recovered after {recovered:?}, promoted after {promoted:?}"
    );

    // Every keyed request ends with a 201; every handler ran once.
    let mut answered_503 = 0;
    for p in launcher.await.expect("the launcher") {
        let (body, unavailable) = p.await.expect("a client");
        assert!(body.ends_with(b"(run 1)"), "{body:?}");
        answered_503 += unavailable;
    }
    let effects = effects.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(effects.len(), KEYS);
    let twice: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handlers run twice: {twice:?}");

    // Budgets: never more than 3 retries per task, whatever the gap did.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for (t, c) in callers.into_iter().enumerate() {
        let retried = c.await.expect("a caller");
        assert!(retried <= 3, "task-{t} retried {retried} times");
    }
    let gap = gap_denials.load(Ordering::SeqCst);
    eprintln!(
        "during the gap: {answered_503} keyed POSTs answered 503; {gap} retries refused (store unavailable, fail closed)"
    );
    assert!(gap > 0, "budget draws in the gap fail closed");
}

/// `wait_for_replicas` on a cluster: each claim waits for the replica of its own slot's
/// master, so a frozen replica holds up exactly the keys of its master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_for_the_replica_of_its_own_master() {
    let cluster = RedisCluster::start(3, 1);
    let store = cluster
        .store("wait:")
        .timeout(Duration::from_secs(2))
        .wait_for_replicas(1, Duration::from_millis(300));
    eventually(100, || store.ping()).await;
    let lease = Duration::from_secs(30);
    let fp = Fingerprint::of(&http::Method::POST, "/send", b"{}");

    // A claim with every replica healthy; find its master, then freeze that master's replica.
    let first = key(None, "first");
    let c1 = claim(fp, lease);
    assert!(matches!(store.begin(&first, &c1).await, Ok(Begin::Claimed)));
    let master = *cluster
        .masters()
        .iter()
        .find(|&&m| !RedisCluster::keys(m, "wait:i:*").is_empty())
        .expect("the first claim's master");
    let replica = cluster.replica_of(master).expect("its replica");
    let pid = cluster.pid(replica).expect("the replica's pid").to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");

    // The first key's result is not acknowledged; claims on the other masters still are,
    // claims on the frozen replica's master are not.
    let done = store.complete(&first, &c1, response(1), lease).await;
    assert!(done.is_err(), "{done:?}");
    let (mut held_up, mut counted) = (0, 0);
    for i in 0..24 {
        let name = format!("k{i}");
        let begun = store.begin(&key(None, &name), &claim(fp, lease)).await;
        let on_master = RedisCluster::keys(master, &format!("wait:i:*:{name}"));
        match begun {
            Ok(Begin::Claimed) => {
                assert!(
                    on_master.is_empty(),
                    "{name} counted on the frozen replica's master"
                );
                counted += 1;
            }
            Err(e) => {
                assert!(
                    !on_master.is_empty(),
                    "{name} held up on another master: {e}"
                );
                assert!(e.to_string().contains("0 of 1 replicas"), "{e}");
                held_up += 1;
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    signal("-CONT");
    assert!(
        held_up > 0 && counted > 0,
        "{held_up} held up, {counted} counted"
    );
    eventually(50, || async {
        match store.complete(&first, &c1, response(1), lease).await {
            Ok(Ownership::Held) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}
