//! Rule 6, "Visible": the final outcome of every call is recorded in `RetryStats` (per
//! operation and error kind) and attached to the response or error as `RetryInfo`; the
//! stats alone tell "spiking and recovering" from "spiking and failing".

mod common;

use std::borrow::Cow;
use std::io;
use std::time::Duration;

use common::{Erroring, Scripted, get, post, send};
use tower::ServiceBuilder;
use tower_retry_guard::budget::{Limit, Scope};
use tower_retry_guard::{
    Budgets, CallOutcome, ErrorKind, Health, Operation, RetryInfo, RetryLayer, RetryPolicy,
    RetryStats, StopReason,
};

fn layer() -> RetryLayer {
    RetryLayer::new().budgets(Budgets::none())
}

/// `/flaky` fails its first attempt with a 503, `/down` always answers 500, `/bad` 400,
/// anything else 200.
fn by_path() -> Scripted {
    Scripted::per_call(|path, attempt| match path {
        "/flaky" if attempt == 0 => 503,
        "/down" => 500,
        "/bad" => 400,
        _ => 200,
    })
}

#[tokio::test(start_paused = true)]
async fn counts_per_operation_and_error_kind() {
    let layer = layer();
    let stats = layer.stats();
    let inner = by_path();
    let mut svc = ServiceBuilder::new().layer(layer).service(inner.clone());
    for _ in 0..3 {
        assert_eq!(send(&mut svc, get("/flaky")).await.unwrap().status(), 200);
    }
    for _ in 0..2 {
        assert_eq!(send(&mut svc, get("/down")).await.unwrap().status(), 500);
    }
    for _ in 0..5 {
        send(&mut svc, get("/ok")).await.unwrap();
    }
    assert_eq!(send(&mut svc, get("/bad")).await.unwrap().status(), 400);
    assert_eq!(inner.count(), 3 * 2 + 2 * 4 + 5 + 1);

    assert_eq!(
        stats.operations(),
        ["GET /bad", "GET /down", "GET /flaky", "GET /ok"]
    );

    assert_eq!(stats.calls("GET /flaky"), 3);
    let flaky = stats.kind("GET /flaky", ErrorKind::Overloaded);
    assert_eq!(flaky.failures, 3);
    assert_eq!(flaky.retries, 3);
    assert_eq!(flaky.recovered, 3);
    assert_eq!(flaky.exhausted, 0);
    assert_eq!(flaky.denied_total(), 0);
    assert_eq!(stats.totals("GET /flaky"), flaky);

    assert_eq!(stats.calls("GET /down"), 2);
    let down = stats.kind("GET /down", ErrorKind::ServerError);
    assert_eq!(down.failures, 8, "every failed attempt counts");
    assert_eq!(down.retries, 6);
    assert_eq!(down.recovered, 0);
    assert_eq!(down.exhausted, 2);
    assert_eq!(
        stats.kind("GET /down", ErrorKind::Overloaded),
        Default::default(),
        "kinds are kept apart"
    );

    assert_eq!(stats.calls("GET /ok"), 5);
    assert_eq!(stats.totals("GET /ok"), Default::default());

    assert_eq!(stats.calls("GET /bad"), 1);
    let bad = stats.kind("GET /bad", ErrorKind::ClientError);
    assert_eq!(bad.failures, 1);
    assert_eq!(bad.not_retried, 1);
    assert_eq!(bad.retries, 0);

    assert_eq!(stats.calls("GET /nothing"), 0);
    assert_eq!(stats.totals("GET /nothing"), Default::default());

    let minute = stats.last_minute("GET /down");
    assert_eq!(
        (
            minute.calls,
            minute.retries,
            minute.recovered,
            minute.failed
        ),
        (2, 6, 0, 2)
    );
    let minute = stats.last_minute("GET /flaky");
    assert_eq!(
        (
            minute.calls,
            minute.retries,
            minute.recovered,
            minute.failed
        ),
        (3, 3, 3, 0)
    );
    let minute = stats.last_minute("GET /bad");
    assert_eq!(
        minute.failed, 0,
        "a client error is not an upstream failure"
    );
}

#[tokio::test(start_paused = true)]
async fn operation_names_from_extension_closure_and_method_path() {
    let layer = layer().operation_fn(|view| {
        let path = view.uri?.path();
        path.strip_prefix("/tools/")
            .map(|tool| Operation(Cow::Owned(format!("tool:{tool}"))))
    });
    let stats = layer.stats();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(Scripted::per_call(
            |_, attempt| {
                if attempt == 0 { 503 } else { 200 }
            },
        ));

    // The extension wins over the closure.
    let mut req = post("/tools/search");
    req.extensions_mut().insert(Operation::from_static("chat"));
    let res = send(&mut svc, req).await.unwrap();
    assert_eq!(
        res.extensions().get::<RetryInfo>().unwrap().operation,
        Some(Operation::from_static("chat"))
    );
    // The closure.
    let res = send(&mut svc, post("/tools/send_email")).await.unwrap();
    assert_eq!(
        res.extensions().get::<RetryInfo>().unwrap().operation,
        Some(Operation(Cow::Borrowed("tool:send_email")))
    );
    // The closure declines: method and path, without the query.
    let res = send(&mut svc, post("/v1/messages?beta=true"))
        .await
        .unwrap();
    assert_eq!(
        res.extensions().get::<RetryInfo>().unwrap().operation,
        Some(Operation(Cow::Borrowed("POST /v1/messages")))
    );
    // The default name of a first-try success is found by name too (its entry is keyed by
    // a hash of method and path, looked up by a hash of the name).
    let mut ok = ServiceBuilder::new()
        .layer(RetryLayer::new().with_stats(stats.clone()))
        .service(Scripted::always(200));
    send(&mut ok, get("/v1/models")).await.unwrap();

    assert_eq!(
        stats.operations(),
        [
            "GET /v1/models",
            "POST /v1/messages",
            "chat",
            "tool:send_email"
        ]
    );
    for name in ["chat", "tool:send_email", "POST /v1/messages"] {
        assert_eq!(stats.calls(name), 1, "{name}");
        assert_eq!(
            stats.kind(name, ErrorKind::Overloaded).recovered,
            1,
            "{name}"
        );
    }
    assert_eq!(stats.calls("GET /v1/models"), 1);
    assert_eq!(stats.calls("tool:search"), 0);
}

/// Runs `calls` calls of `GET {path}` through `svc`.
async fn run(
    svc: &mut tower_retry_guard::Retry<Scripted, tower_retry_guard::LlmHttp, ()>,
    path: &str,
    calls: u32,
) {
    for _ in 0..calls {
        send(svc, get(path)).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn the_three_verdicts() {
    let layer = layer();
    let stats = layer.stats();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(Scripted::per_call(|path, attempt| match path {
            "/recovering" if attempt == 0 => 503,
            "/failing" => 503,
            _ => 200,
        }));
    assert_eq!(stats.health("GET /healthy"), Health::Healthy, "no calls");
    run(&mut svc, "/healthy", 20).await;
    run(&mut svc, "/recovering", 20).await;
    run(&mut svc, "/failing", 5).await;
    assert_eq!(stats.health("GET /healthy"), Health::Healthy);
    assert_eq!(stats.health("GET /recovering"), Health::UnstableRecovering);
    assert_eq!(stats.health("GET /failing"), Health::Failing);

    // A failing upstream that starts recovering: failures still outnumber recoveries.
    let w = stats.last_minute("GET /failing");
    assert_eq!((w.calls, w.retries, w.failed, w.recovered), (5, 15, 5, 0));

    let table = stats.to_string();
    for needle in [
        "GET /healthy",
        "GET /recovering",
        "GET /failing",
        "unstable but recovering",
        "failing",
        "healthy",
        "overloaded",
    ] {
        assert!(table.contains(needle), "`{needle}` missing from\n{table}");
    }
    let line = |op: &str| {
        table
            .lines()
            .find(|l| l.starts_with(op))
            .unwrap_or_else(|| panic!("no row for {op} in\n{table}"))
            .to_owned()
    };
    assert!(line("GET /recovering").contains("unstable but recovering"));
    assert!(line("GET /failing").contains("failing"));
    assert!(line("GET /healthy").contains("healthy"));
    assert!(!line("GET /healthy").contains("unstable"));
}

#[tokio::test(start_paused = true)]
async fn a_few_recovered_retries_are_still_healthy() {
    let layer = layer();
    let stats = layer.stats();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(Scripted::new(|n| if n == 0 { 503 } else { 200 }));
    run(&mut svc, "/x", 100).await;
    let w = stats.last_minute("GET /x");
    assert_eq!((w.calls, w.retries, w.recovered), (100, 1, 1));
    assert_eq!(stats.health("GET /x"), Health::Healthy, "1% retries");
}

#[tokio::test(start_paused = true)]
async fn windows_age_out() {
    let layer = layer();
    let stats = layer.stats();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(Scripted::per_call(
            |_, attempt| {
                if attempt == 0 { 503 } else { 200 }
            },
        ));
    run(&mut svc, "/x", 5).await;
    let fresh = stats.last_minute("GET /x");
    assert_eq!((fresh.calls, fresh.retries, fresh.recovered), (5, 5, 5));
    assert_eq!(stats.health("GET /x"), Health::UnstableRecovering);

    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(stats.last_minute("GET /x"), Default::default());
    assert_eq!(stats.last_ten_minutes("GET /x"), fresh);
    assert_eq!(
        stats.health("GET /x"),
        Health::Healthy,
        "nothing in the last minute"
    );

    // New calls land in the current bucket, next to the old ones in the ten minutes.
    run(&mut svc, "/x", 1).await;
    assert_eq!(stats.last_minute("GET /x").calls, 1);
    assert_eq!(stats.last_ten_minutes("GET /x").calls, 6);

    tokio::time::advance(Duration::from_secs(10 * 60)).await;
    assert_eq!(stats.last_minute("GET /x"), Default::default());
    assert_eq!(stats.last_ten_minutes("GET /x"), Default::default());
    assert_eq!(stats.calls("GET /x"), 6, "all-time totals stay");
    assert_eq!(stats.kind("GET /x", ErrorKind::Overloaded).recovered, 6);

    // A bucket reused after the ring wrapped starts from zero.
    run(&mut svc, "/x", 2).await;
    assert_eq!(stats.last_minute("GET /x").calls, 2);
    assert_eq!(stats.last_ten_minutes("GET /x").calls, 2);
}

#[tokio::test(start_paused = true)]
async fn retry_info_on_every_response() {
    let mut svc = ServiceBuilder::new().layer(layer()).service(by_path());

    let res = send(&mut svc, get("/ok")).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().expect("on by default");
    assert_eq!(info.attempts, 1);
    assert_eq!(info.retries, 0);
    assert_eq!(info.outcome, CallOutcome::Succeeded);
    assert_eq!(info.total_delay, Duration::ZERO);
    assert_eq!(info.last_error, None);
    assert_eq!(info.key, None);

    let res = send(&mut svc, post("/ok")).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert!(info.key.is_some(), "a POST's key is reported");

    let res = send(&mut svc, get("/flaky")).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.attempts, 2);
    assert_eq!(info.retries, 1);
    assert_eq!(info.outcome, CallOutcome::Recovered);
    assert_eq!(info.last_error, Some(ErrorKind::Overloaded));
    assert!(info.total_delay > Duration::ZERO);
    assert!(info.elapsed >= info.total_delay);
    assert_eq!(info.operation, Some(Operation(Cow::Borrowed("GET /flaky"))));

    let res = send(&mut svc, get("/down")).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.attempts, 4);
    assert_eq!(
        info.outcome,
        CallOutcome::Stopped(StopReason::Exhausted { max_retries: 3 })
    );
    assert_eq!(info.last_error, Some(ErrorKind::ServerError));

    let res = send(&mut svc, get("/bad")).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.attempts, 1);
    assert_eq!(info.outcome, CallOutcome::Stopped(StopReason::NotRetryable));
    assert_eq!(info.last_error, Some(ErrorKind::ClientError));
    assert_eq!(
        info.operation,
        Some(Operation(Cow::Borrowed("GET /bad"))),
        "an attempt failed: the operation is named"
    );
}

#[tokio::test(start_paused = true)]
async fn info_on_success_off_only_drops_first_try_successes() {
    let mut svc = ServiceBuilder::new()
        .layer(layer().info_on_success(false))
        .service(by_path());
    let res = send(&mut svc, get("/ok")).await.unwrap();
    assert!(res.extensions().get::<RetryInfo>().is_none());
    let res = send(&mut svc, get("/flaky")).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().expect("after a retry");
    assert_eq!(info.outcome, CallOutcome::Recovered);
    let res = send(&mut svc, get("/down")).await.unwrap();
    assert!(
        res.extensions().get::<RetryInfo>().is_some(),
        "after giving up"
    );
    let res = send(&mut svc, get("/bad")).await.unwrap();
    assert!(
        res.extensions().get::<RetryInfo>().is_some(),
        "on a failure"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_info_on_the_error() {
    let layer = layer();
    let stats = layer.stats();
    let inner = Erroring::new(|| io::Error::from(io::ErrorKind::ConnectionRefused));
    let mut svc = ServiceBuilder::new().layer(layer).service(inner.clone());
    let err = send(&mut svc, get("/x")).await.unwrap_err();
    assert_eq!(inner.count(), 4);
    assert_eq!(err.reason(), &StopReason::Exhausted { max_retries: 3 });
    assert_eq!(err.attempts(), 4);
    assert_eq!(err.kind(), Some(ErrorKind::Connect));
    let info = err.info();
    assert_eq!(info.retries, 3);
    assert_eq!(
        info.outcome,
        CallOutcome::Stopped(StopReason::Exhausted { max_retries: 3 })
    );
    assert_eq!(info.operation, Some(Operation(Cow::Borrowed("GET /x"))));
    assert_eq!(err.total_delay(), info.total_delay);
    assert!(err.total_delay() > Duration::ZERO);
    assert_eq!(
        err.inner().map(|e| e.kind()),
        Some(io::ErrorKind::ConnectionRefused)
    );

    let connect = stats.kind("GET /x", ErrorKind::Connect);
    assert_eq!(
        (connect.failures, connect.retries, connect.exhausted),
        (4, 3, 1)
    );
    assert_eq!(stats.health("GET /x"), Health::Failing);
}

#[tokio::test(start_paused = true)]
async fn budget_denials_are_counted_per_scope() {
    let stats = RetryStats::new();
    let per_task = Budgets::none().per_task(Some(Limit::Count {
        max: 1,
        ttl: Duration::from_secs(3600),
    }));
    let mut tasks = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .budgets(per_task)
                .with_stats(stats.clone()),
        )
        .service(Scripted::always(503));
    let per_user = Budgets::none().per_user(Some(Limit::Count {
        max: 0,
        ttl: Duration::from_secs(3600),
    }));
    let mut users = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .budgets(per_user)
                .with_stats(stats.clone()),
        )
        .service(Scripted::always(429));

    let with = |name: &'static str, value: &'static str| {
        let mut req = get("/x");
        req.headers_mut().insert(name, value.parse().unwrap());
        req
    };
    // The task's one retry, then denied; the next call of the task is denied at once.
    let res = send(&mut tasks, with("x-task-id", "t1")).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.attempts, 2);
    assert!(matches!(
        &info.outcome,
        CallOutcome::Stopped(StopReason::Budget { scope: Scope::Task, key: Some(k), .. }) if k == "t1"
    ));
    let res = send(&mut tasks, with("x-task-id", "t1")).await.unwrap();
    assert_eq!(res.extensions().get::<RetryInfo>().unwrap().attempts, 1);
    // Another task has its own budget.
    let res = send(&mut tasks, with("x-task-id", "t2")).await.unwrap();
    assert_eq!(res.extensions().get::<RetryInfo>().unwrap().attempts, 2);
    // A request without a task id is not charged: it runs out of attempts instead.
    let res = send(&mut tasks, get("/x")).await.unwrap();
    assert_eq!(res.extensions().get::<RetryInfo>().unwrap().attempts, 4);

    send(&mut users, with("x-user-id", "u1")).await.unwrap();

    let overloaded = stats.kind("GET /x", ErrorKind::Overloaded);
    assert_eq!(overloaded.denied(Scope::Task), 3, "{overloaded:?}");
    assert_eq!(overloaded.denied_total(), 3, "{overloaded:?}");
    assert_eq!(overloaded.exhausted, 1);
    assert_eq!(overloaded.retries, 1 + 1 + 3);
    let limited = stats.kind("GET /x", ErrorKind::RateLimited);
    assert_eq!(limited.denied(Scope::User), 1, "{limited:?}");
    assert_eq!(limited.denied_total(), 1, "{limited:?}");
    assert_eq!(limited.retries, 0);
    assert_eq!(stats.totals("GET /x").denied_total(), 4);
    assert_eq!(stats.calls("GET /x"), 5);
    assert_eq!(stats.health("GET /x"), Health::Failing);
    let table = stats.to_string();
    assert!(table.contains("rate_limited"), "{table}");
}

#[tokio::test(start_paused = true)]
async fn stats_are_shared_between_layers_and_clones() {
    let stats = RetryStats::new();
    let policy = RetryPolicy::builder().max_retries(1).build().unwrap();
    let mut a = ServiceBuilder::new()
        .layer(layer().with_stats(stats.clone()).policy(policy))
        .service(Scripted::always(503));
    let mut b = ServiceBuilder::new()
        .layer(layer().with_stats(stats.clone()))
        .service(Scripted::always(200));
    send(&mut a, get("/x")).await.unwrap();
    send(&mut b, get("/x")).await.unwrap();
    let reader = stats.clone();
    assert_eq!(reader.calls("GET /x"), 2);
    assert_eq!(reader.kind("GET /x", ErrorKind::Overloaded).exhausted, 1);
}
