//! Budgets cannot be escaped by the shape of an id: any task or user id present is charged.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{HeaderValue, Request};
use proptest::prelude::*;
use tower::{Layer, ServiceExt};
use tower_retry_guard::budget::Limit;
use tower_retry_guard::request::TaskId;
use tower_retry_guard::{Backoff, Budgets, Jitter, RetryInfo, RetryLayer, RetryPolicy};

use common::Scripted;

fn policy() -> RetryPolicy {
    RetryPolicy::builder()
        .max_retries(3)
        .backoff(Backoff::Constant(Duration::from_millis(1)))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

fn with_header(name: &str, id: &[u8]) -> Request<String> {
    let mut req = Request::get("/v1/models").body(String::new()).unwrap();
    req.headers_mut().insert(
        name.parse::<http::HeaderName>().unwrap(),
        HeaderValue::from_bytes(id).unwrap(),
    );
    req
}

fn retries(res: &http::Response<String>) -> u32 {
    res.extensions().get::<RetryInfo>().unwrap().retries
}

async fn retries_for(budgets: &Budgets, req: Request<String>) -> u32 {
    let svc = RetryLayer::new()
        .policy(policy())
        .budgets(budgets.clone())
        .layer(Scripted::always(503));
    retries(&svc.oneshot(req).await.unwrap())
}

fn one_per(scope_task: bool) -> Budgets {
    let b = Budgets::default().ratio(None).in_flight(None);
    let one = Some(Limit::Count {
        max: 1,
        ttl: Duration::from_secs(3600),
    });
    if scope_task {
        b.per_task(one).per_user(None)
    } else {
        b.per_user(one).per_task(None)
    }
}

#[tokio::test(start_paused = true)]
async fn every_id_shape_is_charged_per_task_and_per_user() {
    let long = "t".repeat(256);
    let huge = "x".repeat(10 * 1024);
    let shapes: [&[u8]; 7] = [
        b"task-1",
        long.as_bytes(),
        huge.as_bytes(),
        "tâche-1".as_bytes(),
        b"",
        b"a\tb",
        b"\xff\xfe",
    ];
    for (task, header) in [(true, "x-task-id"), (false, "x-user-id")] {
        let budgets = one_per(task);
        for id in shapes {
            let mut total = 0;
            for _ in 0..5 {
                total += retries_for(&budgets, with_header(header, id)).await;
            }
            assert_eq!(
                total,
                1,
                "{header} {:?}: one retry in all",
                String::from_utf8_lossy(id)
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_id_extension_of_any_shape_is_charged() {
    let budgets = one_per(true);
    let mut total = 0;
    for _ in 0..5 {
        let mut req = Request::get("/v1/models").body(String::new()).unwrap();
        req.extensions_mut()
            .insert(TaskId("tâche\u{0}".repeat(1000)));
        total += retries_for(&budgets, req).await;
    }
    assert_eq!(total, 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Arbitrary ids drawn from one task's budget: grants never exceed the limit per id.
    #[test]
    fn grants_never_exceed_the_limit_per_id(
        ids in proptest::collection::vec(
            prop_oneof![
                "[a-z0-9-]{1,8}",
                "\\PC{0,300}",
                proptest::collection::vec(any::<u8>(), 0..64)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ],
            1..6,
        ),
        calls in 2usize..6,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let max = 2;
            let budgets = Budgets::default()
                .ratio(None)
                .in_flight(None)
                .per_user(None)
                .per_task(Some(Limit::Count { max, ttl: Duration::from_secs(3600) }));
            let attempts = Arc::new(AtomicU32::new(0));
            let mut distinct: Vec<String> = ids.clone();
            distinct.sort();
            distinct.dedup();
            for id in &distinct {
                let mut total = 0;
                for _ in 0..calls {
                    let mut req = Request::get("/x").body(String::new()).unwrap();
                    req.extensions_mut().insert(TaskId(id.clone()));
                    attempts.fetch_add(1, Ordering::SeqCst);
                    total += retries_for(&budgets, req).await;
                }
                assert!(total <= max, "{id:?}: {total} retries > {max}");
                assert_eq!(total, max, "{id:?}: charged, not refused for its shape");
            }
        });
    }
}
