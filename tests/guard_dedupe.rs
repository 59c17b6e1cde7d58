//! `DedupeFn`: one execution per key for a plain async function, on an `IdempotencyStore`,
//! with the provider side's fencing (claim token, lease renewal, release on failure or
//! panic, an abandoned run never re-run by default).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tower_retry_guard::IdempotencyKey;
use tower_retry_guard::budget::StoreError;
use tower_retry_guard::guard::DedupeFn;
use tower_retry_guard::guard::DedupeFnError;
use tower_retry_guard::server::MemoryIdempotencyStore;
use tower_retry_guard::server::{
    Begin, Claim, ClaimToken, IdempotencyStore, Ownership, ScopedKey, Stored,
};

fn key(id: &str) -> IdempotencyKey {
    IdempotencyKey::from_tool_call("task-1", id)
}

/// A tool that counts its side effects and takes `lasts` to run.
async fn send(count: &AtomicU32, lasts: Duration) -> Result<String, io::Error> {
    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(lasts).await;
    Ok(format!("email #{n}"))
}

#[tokio::test(start_paused = true)]
async fn concurrent_duplicates_run_once_and_share_the_result() {
    let dedupe = DedupeFn::new(MemoryIdempotencyStore::new());
    let count = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let (dedupe, count) = (dedupe.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            dedupe
                .run("send_email", &key("call_1"), || {
                    send(&count, Duration::from_secs(1))
                })
                .await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), "email #1");
    }
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // A later duplicate gets the kept result too.
    let again = dedupe
        .run("send_email", &key("call_1"), || {
            send(&count, Duration::ZERO)
        })
        .await
        .unwrap();
    assert_eq!(again, "email #1");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_call_releases_the_key() {
    let dedupe = DedupeFn::new(MemoryIdempotencyStore::new());
    let count = AtomicU32::new(0);
    let failed = dedupe
        .run("send_email", &key("call_2"), || async {
            count.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(io::Error::from(io::ErrorKind::ConnectionRefused))
        })
        .await;
    match failed {
        Err(DedupeFnError::Inner(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
        other => panic!("{other:?}"),
    }
    let retried = dedupe
        .run("send_email", &key("call_2"), || {
            send(&count, Duration::ZERO)
        })
        .await
        .unwrap();
    assert_eq!(retried, "email #2", "the retry ran the function again");
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_waiting_for_a_call_that_fails_runs_it_itself() {
    let dedupe = DedupeFn::new(MemoryIdempotencyStore::new());
    let count = Arc::new(AtomicU32::new(0));
    let (first_dedupe, first_count) = (dedupe.clone(), count.clone());
    let first = tokio::spawn(async move {
        first_dedupe
            .run("send_email", &key("call_3"), || async {
                first_count.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                Err::<String, _>(io::Error::from(io::ErrorKind::ConnectionReset))
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let second = dedupe
        .run("send_email", &key("call_3"), || {
            send(&count, Duration::ZERO)
        })
        .await
        .unwrap();
    assert!(matches!(first.await.unwrap(), Err(DedupeFnError::Inner(_))));
    assert_eq!(second, "email #2");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_panic_releases_the_key_and_is_resumed() {
    let dedupe = DedupeFn::new(MemoryIdempotencyStore::new());
    let panicking = dedupe.clone();
    let task = tokio::spawn(async move {
        panicking
            .run("send_email", &key("call_4"), || async {
                if true {
                    panic!("the tool panicked");
                }
                Ok::<String, io::Error>(String::new())
            })
            .await
    });
    assert!(task.await.unwrap_err().is_panic());
    let count = AtomicU32::new(0);
    let retried = dedupe
        .run("send_email", &key("call_4"), || {
            send(&count, Duration::ZERO)
        })
        .await
        .unwrap();
    assert_eq!(retried, "email #1", "the key was free: the retry ran");
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_while_the_function_runs() {
    let dedupe = DedupeFn::new(MemoryIdempotencyStore::new())
        .lease(Duration::from_secs(1), Duration::from_secs(600))
        .wait(Duration::from_secs(60));
    let count = Arc::new(AtomicU32::new(0));
    let (first_dedupe, first_count) = (dedupe.clone(), count.clone());
    let first = tokio::spawn(async move {
        first_dedupe
            .run("send_email", &key("call_5"), || {
                send(&first_count, Duration::from_secs(10))
            })
            .await
    });
    // Long after the first lease would have run out: still in flight, not abandoned.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let second = dedupe
        .run("send_email", &key("call_5"), || {
            send(&count, Duration::ZERO)
        })
        .await
        .unwrap();
    assert_eq!(first.await.unwrap().unwrap(), "email #1");
    assert_eq!(second, "email #1");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_run_is_not_run_again_unless_asked() {
    let store = MemoryIdempotencyStore::new();
    let dedupe =
        DedupeFn::new(store.clone()).lease(Duration::from_secs(1), Duration::from_secs(600));
    let count = AtomicU32::new(0);
    // The caller gives up mid-run: the side effect may have happened.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        dedupe.run("send_email", &key("call_6"), || {
            send(&count, Duration::from_secs(10))
        }),
    )
    .await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = dedupe
        .run("send_email", &key("call_6"), || {
            send(&count, Duration::ZERO)
        })
        .await;
    assert!(
        matches!(again, Err(DedupeFnError::OutcomeUnknown)),
        "{again:?}"
    );
    assert_eq!(count.load(Ordering::SeqCst), 1);

    let recovering = DedupeFn::new(store).rerun_abandoned(true);
    let rerun = recovering
        .run("send_email", &key("call_6"), || {
            send(&count, Duration::ZERO)
        })
        .await
        .unwrap();
    assert_eq!(rerun, "email #2");
}

#[tokio::test(start_paused = true)]
async fn a_key_used_for_another_operation_is_a_mismatch() {
    let dedupe = DedupeFn::new(MemoryIdempotencyStore::new());
    let count = AtomicU32::new(0);
    dedupe
        .run("send_email", &key("call_7"), || {
            send(&count, Duration::ZERO)
        })
        .await
        .unwrap();
    let other = dedupe
        .run("refund", &key("call_7"), || send(&count, Duration::ZERO))
        .await;
    assert!(matches!(other, Err(DedupeFnError::Mismatch)), "{other:?}");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

/// A store that is down.
#[derive(Clone, Debug)]
struct Down;

impl IdempotencyStore for Down {
    async fn begin(&self, _: &ScopedKey, _: &Claim) -> Result<Begin, StoreError> {
        Err(StoreError::new("connection refused"))
    }
    async fn complete(
        &self,
        _: &ScopedKey,
        _: &Claim,
        _: Stored,
        _: Duration,
    ) -> Result<Ownership, StoreError> {
        Err(StoreError::new("connection refused"))
    }
    async fn renew(&self, _: &ScopedKey, _: &Claim) -> Result<Ownership, StoreError> {
        Err(StoreError::new("connection refused"))
    }
    async fn release(&self, _: &ScopedKey, _: ClaimToken) -> Result<Ownership, StoreError> {
        Err(StoreError::new("connection refused"))
    }
}

#[tokio::test(start_paused = true)]
async fn a_store_that_is_down_runs_nothing() {
    let dedupe = DedupeFn::new(Down);
    let count = AtomicU32::new(0);
    let result = dedupe
        .run("send_email", &key("call_8"), || {
            send(&count, Duration::ZERO)
        })
        .await;
    assert!(matches!(result, Err(DedupeFnError::Store(_))), "{result:?}");
    assert_eq!(count.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_gives_up_waiting_after_the_wait() {
    let dedupe = DedupeFn::new(MemoryIdempotencyStore::new()).wait(Duration::from_secs(2));
    let count = Arc::new(AtomicU32::new(0));
    let (first_dedupe, first_count) = (dedupe.clone(), count.clone());
    let _first = tokio::spawn(async move {
        first_dedupe
            .run("send_email", &key("call_9"), || {
                send(&first_count, Duration::from_secs(30))
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let start = tokio::time::Instant::now();
    let second = dedupe
        .run("send_email", &key("call_9"), || {
            send(&count, Duration::ZERO)
        })
        .await;
    assert!(matches!(second, Err(DedupeFnError::InFlight)), "{second:?}");
    assert!(start.elapsed() <= Duration::from_secs(2) + Duration::from_millis(10));
    assert_eq!(count.load(Ordering::SeqCst), 1);
}
