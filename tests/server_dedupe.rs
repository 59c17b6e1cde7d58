//! DedupeLayer over a plain tower service (a tool executor).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_retry_guard::IdempotencyKey;
use tower_retry_guard::server::{DedupeError, DedupeLayer};

#[derive(Clone, Debug)]
struct ToolCall {
    key: Option<&'static str>,
    input: &'static str,
}

fn key_of(call: &ToolCall) -> Option<IdempotencyKey> {
    call.key.and_then(|k| IdempotencyKey::new(k).ok())
}

/// A tool that counts its runs; it runs only while `gate` has permits (one per run), fails on
/// input "fail" and panics on input "panic".
#[derive(Clone)]
struct Tool {
    runs: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl Tool {
    fn new(open: bool) -> Self {
        Tool {
            runs: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(Semaphore::new(if open {
                Semaphore::MAX_PERMITS
            } else {
                0
            })),
        }
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

fn dedupe(
    tool: &Tool,
    layer: DedupeLayer<fn(&ToolCall) -> Option<IdempotencyKey>>,
) -> impl Service<ToolCall, Response = String, Error = DedupeError<String>, Future: Send> + Clone + use<>
{
    let t = tool.clone();
    layer.layer(service_fn(move |call: ToolCall| {
        let t = t.clone();
        async move {
            let _permit = t.gate.acquire().await.map_err(|e| e.to_string())?;
            let n = t.runs.fetch_add(1, Ordering::SeqCst) + 1;
            match call.input {
                "fail" => Err(format!("failed run {n}")),
                "panic" => panic!("tool bug"),
                input => Ok(format!("run {n}: {input}")),
            }
        }
    }))
}

fn layer() -> DedupeLayer<fn(&ToolCall) -> Option<IdempotencyKey>> {
    DedupeLayer::new(key_of as fn(&ToolCall) -> Option<IdempotencyKey>)
}

fn keyed(key: &'static str, input: &'static str) -> ToolCall {
    ToolCall {
        key: Some(key),
        input,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_once_and_share() {
    let tool = Tool::new(false);
    let svc = dedupe(&tool, layer());
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let svc = svc.clone();
        set.spawn(async move { svc.oneshot(keyed("send-email-1", "hi")).await });
    }
    // Every duplicate is either waiting or not yet called; release the single run.
    tool.gate.add_permits(1);
    let mut n = 0;
    while let Some(res) = set.join_next().await {
        assert_eq!(res.unwrap(), Ok("run 1: hi".to_owned()));
        n += 1;
    }
    assert_eq!(n, 50);
    assert_eq!(tool.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn later_duplicates_get_the_kept_result_until_ttl() {
    let tool = Tool::new(true);
    let svc = dedupe(&tool, layer().ttl(Duration::from_secs(60)));
    assert_eq!(
        svc.clone().oneshot(keyed("k", "a")).await.unwrap(),
        "run 1: a"
    );
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(
        svc.clone().oneshot(keyed("k", "a")).await.unwrap(),
        "run 1: a"
    );
    assert_eq!(tool.runs(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        svc.clone().oneshot(keyed("k", "a")).await.unwrap(),
        "run 2: a"
    );

    // Another key, and calls without a key, run every time.
    assert_eq!(
        svc.clone().oneshot(keyed("k2", "b")).await.unwrap(),
        "run 3: b"
    );
    let unkeyed = ToolCall {
        key: None,
        input: "c",
    };
    svc.clone().oneshot(unkeyed.clone()).await.unwrap();
    svc.clone().oneshot(unkeyed).await.unwrap();
    assert_eq!(tool.runs(), 5);
}

#[tokio::test]
async fn a_caller_that_gives_up_does_not_cancel_the_call() {
    let tool = Tool::new(false);
    let svc = dedupe(&tool, layer());
    let first = tokio::spawn(svc.clone().oneshot(keyed("lost", "x")));
    // Let the caller start the call (current-thread runtime: a few yields), then drop it.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!first.is_finished());
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    tool.gate.add_permits(1);
    // The retry joins or replays the first call instead of running again.
    assert_eq!(
        svc.clone().oneshot(keyed("lost", "x")).await.unwrap(),
        "run 1: x"
    );
    assert_eq!(tool.runs(), 1);
}

#[tokio::test]
async fn errors_are_shared_but_not_kept_by_default() {
    let tool = Tool::new(false);
    let svc = dedupe(&tool, layer());
    let a = tokio::spawn(svc.clone().oneshot(keyed("e", "fail")));
    let b = tokio::spawn(svc.clone().oneshot(keyed("e", "fail")));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tool.gate.add_permits(1);
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a, b);
    assert_eq!(a, Err(DedupeError::Inner("failed run 1".to_owned())));
    tool.gate.add_permits(1);
    // A later retry runs again.
    assert_eq!(
        svc.clone().oneshot(keyed("e", "fail")).await,
        Err(DedupeError::Inner("failed run 2".to_owned()))
    );

    // With cache_errors(true) the error is kept.
    let tool = Tool::new(true);
    let svc = dedupe(&tool, layer().cache_errors(true));
    svc.clone().oneshot(keyed("e", "fail")).await.unwrap_err();
    svc.clone().oneshot(keyed("e", "fail")).await.unwrap_err();
    assert_eq!(tool.runs(), 1);
}

#[tokio::test]
async fn a_panicking_call_frees_the_key() {
    let tool = Tool::new(true);
    let svc = dedupe(&tool, layer());
    assert_eq!(
        svc.clone().oneshot(keyed("p", "panic")).await,
        Err(DedupeError::Aborted)
    );
    assert_eq!(
        svc.clone().oneshot(keyed("p", "ok")).await.unwrap(),
        "run 2: ok"
    );
}

#[tokio::test]
async fn key_cap_refuses_instead_of_running_undeduplicated() {
    let tool = Tool::new(true);
    let svc = dedupe(&tool, layer().max_keys(1));
    svc.clone().oneshot(keyed("one", "a")).await.unwrap();
    assert_eq!(
        svc.clone().oneshot(keyed("two", "b")).await,
        Err(DedupeError::Full)
    );
    assert_eq!(tool.runs(), 1);
}

#[tokio::test]
async fn one_scope_filling_its_share_does_not_lock_out_another() {
    let tool = Tool::new(true);
    let t = tool.clone();
    // The scope is the input's prefix before '/': "hog/1", "alice/1".
    let scoped = layer()
        .scope(|call: &ToolCall| call.input.split('/').next().map(str::to_owned))
        .max_keys_per_scope(2);
    let svc = scoped.layer(service_fn(move |call: ToolCall| {
        let t = t.clone();
        async move {
            let n = t.runs.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, String>(format!("run {n}: {}", call.input))
        }
    }));
    for (key, input) in [("k1", "hog/1"), ("k2", "hog/2")] {
        svc.clone().oneshot(keyed(key, input)).await.unwrap();
    }
    let refused = svc.clone().oneshot(keyed("k3", "hog/3")).await.unwrap_err();
    assert_eq!(
        refused,
        DedupeError::ScopeFull {
            scope: Some("hog".to_owned()),
            max: 2
        }
    );
    assert!(refused.to_string().contains("\"hog\""), "{refused}");
    // Another scope still runs, and the same key in another scope is another call.
    assert_eq!(
        svc.clone().oneshot(keyed("k1", "alice/1")).await.unwrap(),
        "run 3: alice/1"
    );
    // The hog's own duplicates are still answered from its kept results.
    assert_eq!(
        svc.clone().oneshot(keyed("k1", "hog/1")).await.unwrap(),
        "run 1: hog/1"
    );
    assert_eq!(tool.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_full_dedupe_makes_room_from_expired_results_before_refusing() {
    let svc = tower::ServiceBuilder::new()
        .layer(
            DedupeLayer::new(|r: &String| IdempotencyKey::new(r).ok())
                .ttl(Duration::from_secs(1))
                .max_keys(2),
        )
        .service_fn(|r: String| async move { Ok::<_, String>(r) });
    assert_eq!(svc.clone().oneshot("a".into()).await, Ok("a".to_owned()));
    assert_eq!(svc.clone().oneshot("b".into()).await, Ok("b".to_owned()));
    assert_eq!(
        svc.clone().oneshot("c".into()).await,
        Err(DedupeError::Full),
        "full while a and b are kept"
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    // a and b expired: c runs (the default sweep every 60 s has not come yet).
    assert_eq!(svc.clone().oneshot("c".into()).await, Ok("c".to_owned()));
}
