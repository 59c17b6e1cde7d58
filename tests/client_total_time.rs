//! Total time is total: a hung attempt ends at the call's deadline, with or without a
//! per-attempt timeout inside, and gives back what it held.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use proptest::prelude::*;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::budget::InFlightCap;
use tower_retry_guard::{Backoff, Budgets, Jitter, RetryLayer, RetryPolicy, StopReason};

use common::get;

/// Attempt `n` (0-based) answers 503 at once unless it is the hang point, which never answers.
#[derive(Clone)]
struct HangAt {
    hang: u32,
    calls: Arc<AtomicU32>,
}

impl Service<Request<String>> for HangAt {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<String>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<String>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let hang = n == self.hang;
        Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            Ok(Response::builder().status(503).body(String::new())?)
        })
    }
}

fn policy(total: Duration) -> RetryPolicy {
    RetryPolicy::builder()
        .max_total_time(total)
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_hung_retry_ends_at_the_deadline() {
    let budgets = Budgets::default();
    let svc = RetryLayer::new()
        .policy(policy(Duration::from_secs(1)))
        .budgets(budgets.clone())
        .layer(HangAt {
            hang: 1,
            calls: Arc::default(),
        });
    let started = tokio::time::Instant::now();
    let err = svc.oneshot(get("/v1/models")).await.unwrap_err();
    assert!(
        started.elapsed() <= Duration::from_millis(1001),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err.reason(), StopReason::Deadline { .. }), "{err}");
    assert_eq!(err.attempts(), 2);
    // The hung attempt was dropped: its slot and the call are given back.
    assert_eq!(budgets.retries_in_flight(), Some(0));
    assert_eq!(budgets.active_calls(), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_per_attempt_timeout_longer_than_the_total_does_not_stretch_it() {
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().policy(policy(Duration::from_secs(10))))
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(30)))
        .service(HangAt {
            hang: 1,
            calls: Arc::default(),
        });
    let started = tokio::time::Instant::now();
    let err = svc.oneshot(get("/v1/models")).await.unwrap_err();
    assert!(
        started.elapsed() <= Duration::from_millis(10_001),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err.reason(), StopReason::Deadline { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_hung_first_attempt_ends_at_the_deadline() {
    let svc = RetryLayer::new()
        .policy(policy(Duration::from_secs(2)))
        .layer(HangAt {
            hang: 0,
            calls: Arc::default(),
        });
    let started = tokio::time::Instant::now();
    let err = svc.oneshot(get("/v1/models")).await.unwrap_err();
    assert!(started.elapsed() <= Duration::from_millis(2001));
    assert_eq!(err.attempts(), 1);
    assert!(matches!(err.reason(), StopReason::Deadline { .. }));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random hang points and policies: no call outlives max_total_time + one tick.
    #[test]
    fn no_call_outlives_its_total_time(
        hang in 0u32..5,
        retries in 0u32..5,
        total_ms in 10u64..5_000,
        initial_ms in 1u64..500,
        per_attempt_ms in proptest::option::of(1u64..20_000),
        seed in any::<u64>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let elapsed = rt.block_on(async move {
            let policy = RetryPolicy::builder()
                .max_retries(retries)
                .max_total_time(Duration::from_millis(total_ms))
                .backoff(Backoff::exponential(Duration::from_millis(initial_ms.min(total_ms - 1)), 2.0, Duration::from_secs(10)))
                .seed(seed)
                .build()
                .unwrap();
            let budgets = Budgets::none().in_flight(Some(InFlightCap::default()));
            let inner = HangAt { hang, calls: Arc::default() };
            let layer = RetryLayer::new().policy(policy).budgets(budgets.clone());
            let started = tokio::time::Instant::now();
            match per_attempt_ms {
                Some(t) => {
                    let svc = ServiceBuilder::new()
                        .layer(layer)
                        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(t)))
                        .map_err(BoxError::from)
                        .service(inner);
                    let _ = svc.oneshot(get("/x")).await;
                }
                None => {
                    let _ = layer.layer(inner).oneshot(get("/x")).await;
                }
            }
            assert_eq!(budgets.active_calls(), Some(0));
            assert_eq!(budgets.retries_in_flight(), Some(0));
            started.elapsed()
        });
        prop_assert!(elapsed <= Duration::from_millis(total_ms + 1), "{elapsed:?} > {total_ms} ms");
    }
}
