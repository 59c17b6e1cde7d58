//! A quiet process keeps its retries; a denial says which budget, how full, how to change it.

mod common;

use std::time::Duration;

use tower::{Layer, ServiceExt};
use tower_retry_guard::budget::{InFlightCap, Limit, RatioConfig};
use tower_retry_guard::{Budgets, CallOutcome, RetryInfo, RetryLayer, StopReason};

use common::{Scripted, get};

#[tokio::test(start_paused = true)]
async fn a_fresh_quiet_process_keeps_its_retries_against_a_flaky_endpoint() {
    // Every call fails twice, then succeeds; one call a second.
    let svc = RetryLayer::new().layer(Scripted::per_call(
        |_, attempt| if attempt < 2 { 503 } else { 200 },
    ));
    for n in 0..10 {
        let res = svc.clone().oneshot(get("/v1/models")).await.unwrap();
        let info = res.extensions().get::<RetryInfo>().unwrap();
        assert_eq!(
            info.outcome,
            CallOutcome::Recovered,
            "call {n}: {}",
            info.outcome
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_process_denial_names_the_budget_how_full_and_how_to_change_it() {
    let budgets = Budgets::default().ratio(Some(RatioConfig::builder().floor(0).build().unwrap()));
    let svc = RetryLayer::new()
        .budgets(budgets)
        .layer(Scripted::always(503));
    let res = svc.oneshot(get("/v1/models")).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    let CallOutcome::Stopped(reason @ StopReason::Budget { .. }) = &info.outcome else {
        panic!("{:?}", info.outcome)
    };
    let text = reason.to_string();
    for needle in [
        "process",
        "0 of 0.1 retries used",
        "Budgets::ratio",
        "clones",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from {text}");
    }
}

#[tokio::test(start_paused = true)]
async fn task_and_in_flight_denials_say_how_to_change_them() {
    let budgets = Budgets::default()
        .ratio(None)
        .per_task(Some(Limit::Count {
            max: 0,
            ttl: Duration::from_secs(60),
        }))
        .in_flight(Some(InFlightCap::default()));
    let svc = RetryLayer::new()
        .budgets(budgets)
        .layer(Scripted::always(503));
    let mut req = get("/v1/models");
    req.headers_mut()
        .insert("x-task-id", "t-1".parse().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    let text = res
        .extensions()
        .get::<RetryInfo>()
        .unwrap()
        .outcome
        .to_string();
    for needle in ["task", "t-1", "0 of 0 used", "Budgets::per_task"] {
        assert!(text.contains(needle), "`{needle}` missing from {text}");
    }
}
