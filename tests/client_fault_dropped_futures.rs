//! Calls dropped at random points (in flight, waiting for a slow budget store, sleeping
//! before a retry, waiting for the service to be ready) leave nothing behind: no active
//! call, no retry slot.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, Response};
use tower::{Layer, Service, ServiceExt};
use tower_retry_guard::budget::{BudgetStore, Draw, Grant, MemoryStore, StoreError};
use tower_retry_guard::{Budgets, RetryLayer, RetryPolicy};

/// A memory store that answers after `delay_ms` (virtual time).
#[derive(Clone)]
struct SlowStore {
    inner: MemoryStore,
    delay_ms: Arc<AtomicU64>,
}

impl BudgetStore for SlowStore {
    async fn draw(&self, draws: &[Draw]) -> Result<Grant, StoreError> {
        tokio::time::sleep(Duration::from_millis(self.delay_ms.load(Ordering::Relaxed))).await;
        self.inner.draw(draws).await
    }
}

/// A tiny deterministic generator (xorshift), so that every run is the same.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_anywhere_leaks_no_active_call_nor_retry_slot() {
    let delay_ms = Arc::new(AtomicU64::new(0));
    let budgets = Budgets::default().store(SlowStore {
        inner: MemoryStore::new(),
        delay_ms: delay_ms.clone(),
    });
    let policy = RetryPolicy::builder()
        .max_retries(3)
        .max_total_time(Duration::from_secs(2))
        .seed(7)
        .build()
        .unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..300u64 {
        let work_ms = rng.below(300);
        let status = [503u16, 500, 429, 200][rng.below(4) as usize];
        delay_ms.store(rng.below(200), Ordering::Relaxed);
        let inner = tower::service_fn(move |_: Request<String>| async move {
            tokio::time::sleep(Duration::from_millis(work_ms)).await;
            Ok::<_, io::Error>(
                Response::builder()
                    .status(status)
                    .body(String::new())
                    .unwrap(),
            )
        });
        let svc = RetryLayer::new()
            .policy(policy.clone())
            .budgets(budgets.clone())
            .layer(inner);
        let req = Request::post("http://127.0.0.1/v1/chat/completions")
            .header("x-task-id", format!("task-{}", round % 7))
            .header("x-user-id", "user-1")
            .body(String::new())
            .unwrap();
        let cut = Duration::from_millis(rng.below(2500));
        let mut svc = svc;
        let fut = svc.ready().await.unwrap().call(req);
        let _ = tokio::time::timeout(cut, fut).await;
        assert_eq!(budgets.active_calls(), Some(0), "round {round}");
        assert_eq!(budgets.retries_in_flight(), Some(0), "round {round}");
    }
}
