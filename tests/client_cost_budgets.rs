//! Cost budgets through the layer: what a retry costs is learnt only when a retry is
//! considered, drawn from the task's and the user's cost limits, reported in `RetryInfo`,
//! the stats and the denial. Virtual time throughout.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::Layer;
use tower_retry_guard::budget::{Budgets, Cost, Scope};
use tower_retry_guard::{CallOutcome, RetryInfo, RetryLayer, RetryPolicy, StopReason};

use common::{Scripted, secs, send};

fn request(task: &str, user: Option<&str>, cost: Option<u64>) -> Request<String> {
    let mut b = Request::get("/v1/chat").header("x-task-id", task);
    if let Some(u) = user {
        b = b.header("x-user-id", u);
    }
    let mut req = b.body(String::new()).unwrap();
    if let Some(c) = cost {
        req.extensions_mut().insert(Cost(c));
    }
    req
}

fn retries(n: u32) -> RetryPolicy {
    RetryPolicy::builder()
        .max_retries(n)
        .max_total_time(secs(60))
        .seed(7)
        .build()
        .unwrap()
}

fn info(res: &Response<String>) -> &RetryInfo {
    res.extensions().get::<RetryInfo>().unwrap()
}

/// Only the cost scopes: no count budget, no ratio, no in-flight cap in the way.
fn cost_only() -> Budgets {
    Budgets::none()
}

#[tokio::test(start_paused = true)]
async fn retry_denied_by_the_task_cost_budget_names_it_and_what_was_left() {
    let layer = RetryLayer::new()
        .policy(retries(3))
        .budgets(cost_only().task_cost(1_000, secs(3600)));
    let stats = layer.stats();
    let inner = Scripted::always(503);
    let mut svc = layer.layer(inner.clone());

    let res = send(&mut svc, request("t1", None, Some(600)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let info = info(&res);
    // The first retry (600) fits the 1000; the second (600 of 400 left) does not.
    assert_eq!((inner.count(), info.retries, info.retry_cost), (2, 1, 600));
    let CallOutcome::Stopped(StopReason::Budget { scope, key, limit }) = &info.outcome else {
        panic!("expected a budget stop, got {:?}", info.outcome);
    };
    assert_eq!((*scope, key.as_deref()), (Scope::TaskCost, Some("t1")));
    assert!(limit.contains("costs 600 units, 400 left"), "{limit}");
    assert!(limit.contains("Budgets::task_cost"), "{limit}");
    let reason = StopReason::Budget {
        scope: *scope,
        key: key.clone(),
        limit: limit.clone(),
    };
    assert!(
        reason
            .to_string()
            .starts_with("task_cost retry budget `t1` exhausted")
    );

    // A cheaper call of the same task still fits what is left; the stats see both.
    let res = send(&mut svc, request("t1", None, Some(400)))
        .await
        .unwrap();
    let cheaper = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!((cheaper.retries, cheaper.retry_cost), (1, 400));
    let totals = stats.totals("GET /v1/chat");
    assert_eq!(totals.retries, 2);
    assert_eq!(totals.retry_cost, 1_000);
    assert_eq!(totals.denied(Scope::TaskCost), 2);
    assert_eq!(totals.denied(Scope::Task), 0);
    let table = stats.to_string();
    assert!(
        table.contains("retry cost") && table.contains("1000  (units of the cost budgets"),
        "{table}"
    );
}

#[tokio::test(start_paused = true)]
async fn cost_is_computed_only_when_a_retry_is_considered() {
    let asked = Arc::new(AtomicU32::new(0));
    let counter = asked.clone();
    let layer = RetryLayer::new()
        .policy(retries(3))
        .budgets(cost_only().task_cost(10_000, secs(3600)))
        .cost_fn(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Some(250)
        });
    // Successes: the closure is never called.
    let mut ok = layer.layer(Scripted::always(200));
    for _ in 0..10 {
        let res = send(&mut ok, request("t", None, None)).await.unwrap();
        assert_eq!(info(&res).retry_cost, 0);
    }
    assert_eq!(asked.load(Ordering::SeqCst), 0);

    // One failure, then a success: asked once, for the one retry.
    let mut flaky = layer.layer(Scripted::new(|n| if n == 0 { 503 } else { 200 }));
    let res = send(&mut flaky, request("t", None, None)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!((info(&res).retries, info(&res).retry_cost), (1, 250));
    assert_eq!(asked.load(Ordering::SeqCst), 1);

    // A `Cost` extension wins over the closure (which is then not asked).
    let mut flaky = layer.layer(Scripted::new(|n| if n == 0 { 503 } else { 200 }));
    let res = send(&mut flaky, request("t", None, Some(40)))
        .await
        .unwrap();
    assert_eq!(info(&res).retry_cost, 40);
    assert_eq!(asked.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retry_of_unknown_cost_is_not_charged_to_cost_budgets() {
    let layer = RetryLayer::new()
        .policy(retries(2))
        .budgets(cost_only().task_cost(0, secs(3600)));
    let mut svc = layer.layer(Scripted::always(503));
    let res = send(&mut svc, request("t", None, None)).await.unwrap();
    let info = info(&res);
    assert_eq!((info.retries, info.retry_cost), (2, 0));
    assert!(matches!(
        info.outcome,
        CallOutcome::Stopped(StopReason::Exhausted { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn user_cost_rate_refills_with_time() {
    // 1000 units a minute per user, across tasks.
    let layer = RetryLayer::new()
        .policy(retries(1))
        .budgets(cost_only().user_cost_rate(1_000, Duration::from_secs(60)));
    let mut svc = layer.layer(Scripted::always(503));
    let send_one = |task: &'static str| request(task, Some("alice"), Some(700));

    let res = send(&mut svc, send_one("a")).await.unwrap();
    assert_eq!(info(&res).retry_cost, 700);
    let res = send(&mut svc, send_one("b")).await.unwrap();
    let CallOutcome::Stopped(StopReason::Budget { scope, limit, .. }) = &info(&res).outcome else {
        panic!("expected a budget stop, got {:?}", info(&res).outcome);
    };
    assert_eq!(*scope, Scope::UserCost);
    assert!(limit.contains("costs 700 units, 300 left"), "{limit}");
    assert!(limit.contains("next in"), "{limit}");
    // 400 units refill in 24 s.
    tokio::time::advance(secs(25)).await;
    let res = send(&mut svc, send_one("c")).await.unwrap();
    assert_eq!(info(&res).retry_cost, 700);
}

#[tokio::test(start_paused = true)]
async fn count_and_cost_limits_are_drawn_together() {
    // 5 retries per task by count, 1000 units by cost: cheap retries hit the count, an
    // expensive one the cost; a refusal by either takes nothing from the other.
    let layer = RetryLayer::new().policy(retries(1)).budgets(
        cost_only()
            .per_task(Some(Budgets::DEFAULT_PER_TASK))
            .task_cost(1_000, secs(3600)),
    );
    let stats = layer.stats();
    let mut svc = layer.layer(Scripted::always(503));
    let big = send(&mut svc, request("t", None, Some(1_001)))
        .await
        .unwrap();
    assert!(matches!(
        &info(&big).outcome,
        CallOutcome::Stopped(StopReason::Budget {
            scope: Scope::TaskCost,
            ..
        })
    ));
    for _ in 0..5 {
        let res = send(&mut svc, request("t", None, Some(100))).await.unwrap();
        assert_eq!(info(&res).retries, 1);
    }
    let sixth = send(&mut svc, request("t", None, Some(100))).await.unwrap();
    assert!(matches!(
        &info(&sixth).outcome,
        CallOutcome::Stopped(StopReason::Budget {
            scope: Scope::Task,
            ..
        })
    ));
    let totals = stats.totals("GET /v1/chat");
    assert_eq!(totals.retry_cost, 500);
    assert_eq!(
        (totals.denied(Scope::TaskCost), totals.denied(Scope::Task)),
        (1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn reserve_then_settle_from_the_real_cost() {
    // Retries are reserved at their worst case (prompt + max_tokens); once the caller
    // knows what they cost (the responses' `usage`), it settles the difference.
    let budgets = cost_only()
        .task_cost(1_000, secs(3600))
        .user_cost_rate(1_000, secs(3600));
    let layer = RetryLayer::new()
        .policy(retries(1))
        .budgets(budgets.clone());
    let mut svc = layer.layer(Scripted::per_call(
        |_, attempt| if attempt == 0 { 503 } else { 200 },
    ));

    let res = send(&mut svc, request("t", Some("u"), Some(900)))
        .await
        .unwrap();
    let reserved = info(&res).retry_cost;
    assert_eq!(reserved, 900);
    // Only 100 left: a second retry of 900 would be refused...
    let denied = send(&mut svc, request("t", Some("u"), Some(900)))
        .await
        .unwrap();
    assert!(matches!(
        &info(&denied).outcome,
        CallOutcome::Stopped(StopReason::Budget { .. })
    ));
    // ...but the first one really cost 150: 750 back to the task and the user.
    budgets
        .settle(Some("t"), Some("u"), reserved, 150)
        .await
        .unwrap();
    let res = send(&mut svc, request("t", Some("u"), Some(850)))
        .await
        .unwrap();
    assert_eq!(
        (res.status(), info(&res).retries, info(&res).retry_cost),
        (StatusCode::OK, 1, 850)
    );
    // A retry that cost more than reserved is charged, past the limit: the next is refused.
    budgets.settle(Some("t"), None, 0, 500).await.unwrap();
    let res = send(&mut svc, request("t", None, Some(1))).await.unwrap();
    let CallOutcome::Stopped(StopReason::Budget { scope, limit, .. }) = &info(&res).outcome else {
        panic!("expected a budget stop, got {:?}", info(&res).outcome);
    };
    assert_eq!(*scope, Scope::TaskCost);
    assert!(limit.contains("0 left"), "{limit}");
    // Nothing to settle: no store call, no error.
    Budgets::none().settle(Some("t"), None, 5, 1).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_guarded_call_draws_its_cost_too() {
    use tower_retry_guard::{Call, Guard};
    let guard = Guard::new(
        RetryLayer::new()
            .policy(retries(3))
            .budgets(cost_only().task_cost(1_000, secs(3600))),
    );
    let attempts = AtomicU32::new(0);
    let attempts_ref = &attempts;
    let err = guard
        .run(
            Call::new("summarize").read_only().task("t").cost(600),
            |_| async move {
                attempts_ref.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(std::io::Error::from(std::io::ErrorKind::TimedOut))
            },
        )
        .await
        .unwrap_err();
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(err.info().retry_cost, 600);
    assert!(matches!(
        err.reason(),
        StopReason::Budget {
            scope: Scope::TaskCost,
            ..
        }
    ));
}
