//! the time a budget store takes to answer counts against the call's total time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_retry_guard::budget::{BudgetStore, Draw, Grant, StoreError};
use tower_retry_guard::{
    Backoff, Budgets, CallOutcome, Jitter, RetryInfo, RetryLayer, RetryPolicy, StopReason,
};

/// A store that grants every draw after `latency`.
#[derive(Clone)]
struct SlowStore {
    latency: Duration,
}

impl BudgetStore for SlowStore {
    async fn draw(&self, _: &[Draw]) -> Result<Grant, StoreError> {
        tokio::time::sleep(self.latency).await;
        Ok(Grant::Granted)
    }
}

async fn run(latency: Duration, backoff: Duration) -> (Vec<Duration>, RetryInfo) {
    let policy = RetryPolicy::builder()
        .max_total_time(Duration::from_secs(1))
        .backoff(Backoff::Constant(backoff))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    let budgets = Budgets::none()
        .per_task(Some(tower_retry_guard::Budgets::DEFAULT_PER_TASK))
        .store(SlowStore { latency })
        .store_timeout(Duration::from_secs(5));
    let start = Instant::now();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let log = sent.clone();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().policy(policy).budgets(budgets))
        .service_fn(move |_: Request<String>| {
            log.lock().unwrap().push(start.elapsed());
            async { Ok::<_, BoxError>(Response::builder().status(503).body(String::new())?) }
        });
    let req = Request::get("/v1/models")
        .header("x-task-id", "task-1")
        .body(String::new())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    (sent, info)
}

#[tokio::test(start_paused = true)]
async fn no_retry_starts_past_the_total_time_after_a_slow_budget_store() {
    // Decided at 0 ms: a 600 ms wait fits in 1 s. The store then takes 500 ms: sleeping the
    // whole 600 ms after it would send the retry at 1.1 s, past the total time.
    let (sent, info) = run(Duration::from_millis(500), Duration::from_millis(600)).await;
    for at in &sent {
        assert!(
            *at < Duration::from_secs(1),
            "an attempt at {at:?}: {sent:?}"
        );
    }
    // The wait started when the retry was decided: the retry goes at 600 ms.
    assert_eq!(sent[1], Duration::from_millis(600), "{sent:?}");
    assert_eq!(info.attempts as usize, sent.len());
}

#[tokio::test(start_paused = true)]
async fn a_store_slower_than_the_time_left_stops_at_the_deadline() {
    // The store answers after the total time has run out: no retry is sent.
    let (sent, info) = run(Duration::from_millis(1200), Duration::from_millis(100)).await;
    assert_eq!(sent, vec![Duration::ZERO]);
    assert!(
        matches!(
            info.outcome,
            CallOutcome::Stopped(StopReason::Deadline { .. })
        ),
        "{info:?}"
    );
}
