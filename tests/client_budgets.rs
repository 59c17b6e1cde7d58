//! Budgets: per task, per user, the process ratio, the memory store.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, ServiceExt, service_fn};
use tower_retry_guard::budget::{
    BudgetStore, Budgets, Draw, Grant, Limit, MemoryStore, RatioConfig, Scope,
};
use tower_retry_guard::{
    CallOutcome, ErrorKind, Outcome, RetryInfo, RetryLayer, RetryPolicy, StopReason,
};

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

fn request(path: &str, task: Option<&str>, user: Option<&str>) -> Request<String> {
    let mut b = Request::get(path);
    if let Some(t) = task {
        b = b.header("x-task-id", t);
    }
    if let Some(u) = user {
        b = b.header("x-user-id", u);
    }
    b.body(String::new()).unwrap()
}

fn retries(n: u32) -> RetryPolicy {
    RetryPolicy::builder()
        .max_retries(n)
        .seed(1)
        .build()
        .unwrap()
}

fn info(res: &Response<String>) -> &RetryInfo {
    res.extensions().get::<RetryInfo>().unwrap()
}

fn budget_stop(info: &RetryInfo) -> (Scope, Option<String>) {
    match &info.outcome {
        CallOutcome::Stopped(StopReason::Budget { scope, key, .. }) => (*scope, key.clone()),
        other => panic!("expected a budget stop, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn sixth_retry_of_a_task_is_denied_across_operations_and_layers() {
    let budgets = Budgets::default().ratio(None);
    let calls = Arc::new(AtomicU32::new(0));
    let a = RetryLayer::new()
        .policy(retries(2))
        .budgets(budgets.clone())
        .layer(unavailable(calls.clone()));
    let b = RetryLayer::new()
        .policy(retries(2))
        .budgets(budgets.clone())
        .layer(unavailable(calls.clone()));

    // Retries 1-2 (layer a), 3-4 (layer b), 5 (layer a), then the 6th is refused.
    let r = a
        .clone()
        .oneshot(request("/search", Some("t1"), None))
        .await
        .unwrap();
    assert_eq!(info(&r).attempts, 3);
    let r = b
        .clone()
        .oneshot(request("/fetch", Some("t1"), None))
        .await
        .unwrap();
    assert_eq!(info(&r).attempts, 3);
    let r = a
        .clone()
        .oneshot(request("/search", Some("t1"), None))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(info(&r).attempts, 2);
    assert_eq!(budget_stop(info(&r)), (Scope::Task, Some("t1".to_owned())));
    assert_eq!(calls.load(Ordering::SeqCst), 3 + 3 + 2);

    // Another task is not affected.
    let r = b
        .oneshot(request("/fetch", Some("t2"), None))
        .await
        .unwrap();
    assert_eq!(info(&r).attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn per_user_rate_refills_with_virtual_time() {
    let budgets = Budgets::default()
        .ratio(None)
        .per_task(None)
        .per_user(Some(Limit::Rate {
            tokens: 1,
            per: Duration::from_secs(10),
            burst: 2,
        }));
    let calls = Arc::new(AtomicU32::new(0));
    let svc = RetryLayer::new()
        .policy(retries(3))
        .budgets(budgets)
        .layer(unavailable(calls.clone()));

    // The burst: two retries, then the user's budget says no.
    let r = svc
        .clone()
        .oneshot(request("/x", None, Some("u1")))
        .await
        .unwrap();
    assert_eq!(info(&r).attempts, 3);
    assert_eq!(budget_stop(info(&r)), (Scope::User, Some("u1".to_owned())));
    let r = svc
        .clone()
        .oneshot(request("/x", None, Some("u1")))
        .await
        .unwrap();
    assert_eq!(info(&r).attempts, 1);

    // Ten seconds later, one token is back.
    tokio::time::advance(Duration::from_secs(10)).await;
    let r = svc
        .clone()
        .oneshot(request("/x", None, Some("u1")))
        .await
        .unwrap();
    assert_eq!(info(&r).attempts, 2);
    assert_eq!(budget_stop(info(&r)), (Scope::User, Some("u1".to_owned())));

    // The store directly: burst 2, then one token per 10 s.
    let store = MemoryStore::new();
    let d = [Draw {
        amount: 1,
        scope: Scope::User,
        key: "u2".to_owned(),
        limit: Limit::Rate {
            tokens: 1,
            per: Duration::from_secs(10),
            burst: 2,
        },
    }];
    assert_eq!(store.draw(&d).await, Ok(Grant::Granted));
    assert_eq!(store.draw(&d).await, Ok(Grant::Granted));
    assert_eq!(
        store.draw(&d).await,
        Ok(Grant::Denied {
            scope: Scope::User,
            retry_in: Some(Duration::from_secs(10)),
            left: Some(0),
        })
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(matches!(store.draw(&d).await, Ok(Grant::Denied { .. })));
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(store.draw(&d).await, Ok(Grant::Granted));
    assert!(matches!(store.draw(&d).await, Ok(Grant::Denied { .. })));
}

#[tokio::test(start_paused = true)]
async fn full_outage_with_many_callers_holds_the_ratio() {
    const CALLERS: u32 = 1_000;
    let calls = Arc::new(AtomicU32::new(0));
    let svc = RetryLayer::new().layer(unavailable(calls.clone()));
    let mut rng = SmallRng::seed_from_u64(3);
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let start = Duration::from_secs(100).mul_f64(rng.random::<f64>());
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(start).await;
            svc.oneshot(request("/x", None, None)).await
        }));
    }
    let mut by_ratio = 0;
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        if let CallOutcome::Stopped(StopReason::Budget {
            scope: Scope::Process,
            key: None,
            ..
        }) = info(&r).outcome
        {
            by_ratio += 1;
        }
    }
    let per_call = f64::from(calls.load(Ordering::SeqCst)) / f64::from(CALLERS);
    assert!(per_call <= 1.1, "{per_call} attempts per call");
    assert!(
        per_call >= 1.05,
        "the ratio lets some retries through: {per_call}"
    );
    assert!(by_ratio > 800, "{by_ratio} calls stopped by the ratio");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_draws_on_one_key_grant_exactly_the_limit() {
    let store = MemoryStore::new();
    let limit = Limit::Count {
        max: 1_000,
        ttl: Duration::from_secs(3600),
    };
    let granted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let store = store.clone();
        let granted = granted.clone();
        tasks.push(tokio::spawn(async move {
            let d = [Draw {
                amount: 1,
                scope: Scope::Task,
                key: "hot".to_owned(),
                limit,
            }];
            for _ in 0..250 {
                if store.draw(&d).await == Ok(Grant::Granted) {
                    granted.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(granted.load(Ordering::Relaxed), 1_000);
    assert_eq!(store.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_in_opposite_orders_neither_deadlock_nor_overdraw() {
    let store = MemoryStore::new();
    let limit = Limit::Count {
        max: 300,
        ttl: Duration::from_secs(3600),
    };
    let task = Draw {
        amount: 1,
        scope: Scope::Task,
        key: "t".to_owned(),
        limit,
    };
    let user = Draw {
        amount: 1,
        scope: Scope::User,
        key: "u".to_owned(),
        limit,
    };
    let granted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        let granted = granted.clone();
        let draws = if i % 2 == 0 {
            [task.clone(), user.clone()]
        } else {
            [user.clone(), task.clone()]
        };
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                if store.draw(&draws).await == Ok(Grant::Granted) {
                    granted.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("draws deadlocked");
    let granted = granted.load(Ordering::Relaxed);
    assert!(granted <= 300, "{granted} granted");
    // Nothing leaked from given-back draws: each key has exactly `300 - granted` left.
    let mut left = 0;
    while store.draw(std::slice::from_ref(&task)).await == Ok(Grant::Granted) {
        left += 1;
        assert!(left <= 300);
    }
    assert_eq!(granted + left, 300);
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_swept_after_their_ttl() {
    let store = MemoryStore::new();
    let limit = Limit::Count {
        max: 5,
        ttl: Duration::from_secs(60),
    };
    for i in 0..100_000 {
        let d = [Draw {
            amount: 1,
            scope: Scope::User,
            key: format!("user-{i}"),
            limit,
        }];
        assert_eq!(store.draw(&d).await, Ok(Grant::Granted));
    }
    assert_eq!(store.len(), 100_000);
    tokio::time::advance(Duration::from_secs(61)).await;
    // Draws on one live key sweep the map a partition at a time.
    let live = [Draw {
        amount: 1,
        scope: Scope::User,
        key: "live".to_owned(),
        limit: Limit::Rate {
            tokens: 1_000,
            per: Duration::from_secs(1),
            burst: 1_000,
        },
    }];
    for _ in 0..40 {
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(store.draw(&live).await, Ok(Grant::Granted));
    }
    assert!(store.len() <= 1, "{} keys left", store.len());
}

#[tokio::test(start_paused = true)]
async fn a_store_denial_refunds_the_process_ratio() {
    // The ratio's floor (3 attempts a window, less the calls, less every unpaid retry) allows
    // one retry to each of the first two calls; the task allows none.
    let budgets = Budgets::default()
        .per_task(Some(Limit::Count {
            max: 0,
            ttl: Duration::from_secs(60),
        }))
        .ratio(Some(
            RatioConfig::builder().ratio(0.0).floor(3).build().unwrap(),
        ));
    let calls = Arc::new(AtomicU32::new(0));
    let svc = RetryLayer::new()
        .policy(retries(1))
        .budgets(budgets)
        .layer(unavailable(calls.clone()));

    let r = svc
        .clone()
        .oneshot(request("/x", Some("t"), None))
        .await
        .unwrap();
    assert_eq!(budget_stop(info(&r)), (Scope::Task, Some("t".to_owned())));
    // The ratio's one retry was given back: a call without a task gets it.
    let r = svc
        .clone()
        .oneshot(request("/x", None, None))
        .await
        .unwrap();
    assert_eq!(info(&r).attempts, 2);
    assert!(matches!(
        info(&r).outcome,
        CallOutcome::Stopped(StopReason::Exhausted { .. })
    ));
    // That retry failed: the floor is spent (3 - 3 calls, and an unpaid retry), and the
    // ratio (0) says no.
    let r = svc.oneshot(request("/x", None, None)).await.unwrap();
    assert_eq!(budget_stop(info(&r)), (Scope::Process, None));
    assert_eq!(calls.load(Ordering::SeqCst), 1 + 2 + 1);
}

#[tokio::test(start_paused = true)]
async fn a_denial_surfaces_as_retry_error_naming_scope_and_key() {
    let budgets = Budgets::default().ratio(None).per_task(Some(Limit::Count {
        max: 1,
        ttl: Duration::from_secs(60),
    }));
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = RetryLayer::new()
        .policy(retries(3))
        .budgets(budgets)
        .classify(|r: &Result<Response<String>, io::Error>| match r {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Retry {
                kind: ErrorKind::Connect,
                after: None,
            },
        })
        .layer(service_fn(move |_req: Request<String>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<Response<String>, _>(io::Error::from(io::ErrorKind::ConnectionRefused)) }
        }));
    let err = svc
        .oneshot(request("/tool", Some("task-9"), None))
        .await
        .unwrap_err();
    assert_eq!(err.budget_scope(), Some(Scope::Task));
    assert!(matches!(
        err.reason(),
        StopReason::Budget { scope: Scope::Task, key: Some(k), .. } if k == "task-9"
    ));
    let text = err.to_string();
    assert!(text.contains("task") && text.contains("task-9"), "{text}");
    assert_eq!(err.attempts(), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(err.into_inner().is_some());
}

/// 1,000 calls fail at the same moment on two threads, with a ratio of 0.4: exactly 400
/// retries. Tower's `TpsBudget` at 0.4 allows 500 (1 / 0.4 truncated to 2), and its
/// read-then-subtract withdrawal can overdraw when threads race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overdraw_under_races_and_exact_fractions_unlike_tower() {
    const N: u32 = 1_000;
    let ratio = RatioConfig::builder()
        .ratio(0.4)
        .floor(0)
        .success_credit(0.0)
        .max_ratio(0.4)
        .window(Duration::from_secs(60))
        .build()
        .unwrap();
    let budgets = Budgets::none().ratio(Some(ratio));
    let calls = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(N as usize));
    let c = calls.clone();
    let svc = RetryLayer::new()
        .policy(
            RetryPolicy::builder()
                .max_retries(1)
                .backoff(tower_retry_guard::Backoff::exponential(
                    Duration::from_millis(1),
                    2.0,
                    Duration::from_millis(10),
                ))
                .build()
                .unwrap(),
        )
        .budgets(budgets)
        .layer(service_fn(move |_req: Request<String>| {
            let first = c.fetch_add(1, Ordering::SeqCst) < N;
            let barrier = barrier.clone();
            async move {
                // Every first attempt waits for all the others: the failures land together.
                if first {
                    barrier.wait().await;
                }
                let mut res = Response::new(String::new());
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                Ok::<_, io::Error>(res)
            }
        }));
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.oneshot(request("/x", None, None)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst) - N, 400, "retries granted");

    // Tower: the fraction is truncated.
    let tps = TpsBudget::new(Duration::from_secs(10), 0, 0.4);
    for _ in 0..N {
        tps.deposit();
    }
    let tower_granted = (0..N).filter(|_| tps.withdraw()).count();
    assert_eq!(tower_granted, 500, "tower's TpsBudget at 0.4");

    // Tower under races: reported, not asserted (whether threads collide is up to the OS).
    let mut overdrawn = 0;
    for _ in 0..20 {
        let tps = Arc::new(TpsBudget::new(Duration::from_secs(10), 0, 1.0));
        for _ in 0..100 {
            tps.deposit();
        }
        let start = Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let tps = tps.clone();
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    (0..200).filter(|_| tps.withdraw()).count()
                })
            })
            .collect();
        let got: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        overdrawn = overdrawn.max(got.saturating_sub(100));
    }
    eprintln!(
        "tower TpsBudget: at most {overdrawn} withdrawals beyond a balance of 100 in 20 runs"
    );
}
