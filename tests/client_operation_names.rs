//! Operation names are bounded: ids collapse in the default name, and the number of tracked
//! operations has a cap; memory stays flat over a million distinct paths.

mod common;

use tower::{Layer, Service, ServiceExt};
use tower_retry_guard::{Operation, RetryLayer, RetryStats};

use common::{Scripted, get};

#[tokio::test(start_paused = true)]
async fn ids_in_paths_collapse_in_the_default_name() {
    let layer = RetryLayer::new();
    let stats = layer.stats();
    let mut svc = layer.layer(Scripted::always(200));
    for path in [
        "/v1/batches/42",
        "/v1/batches/3f2b8c1e-9d4a-4c2b-8f1e-0a1b2c3d4e5f",
        "/v1/batches/0123456789abcdef0123",
    ] {
        svc.ready().await.unwrap().call(get(path)).await.unwrap();
    }
    assert_eq!(stats.operations(), vec!["GET /v1/batches/{id}".to_owned()]);
    assert_eq!(stats.calls("GET /v1/batches/{id}"), 3);
}

#[tokio::test(start_paused = true)]
async fn a_route_template_in_an_operation_extension_wins() {
    let layer = RetryLayer::new();
    let stats = layer.stats();
    let mut req = get("/users/alice/profile");
    req.extensions_mut()
        .insert(Operation::from_static("GET /users/:name/profile"));
    layer
        .layer(Scripted::always(200))
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(stats.calls("GET /users/:name/profile"), 1);
}

#[tokio::test(start_paused = true)]
async fn operations_past_the_cap_are_counted_under_one_name() {
    let stats = RetryStats::with_max_operations(10);
    let mut svc = RetryLayer::new()
        .with_stats(stats.clone())
        .layer(Scripted::always(200));
    for i in 0..100 {
        // Not id-like: distinct names a user might really make.
        let path = format!(
            "/users/user-{}/profile",
            char::from(b'a' + (i % 26) as u8)
                .to_string()
                .repeat(i / 26 + 1)
        );
        svc.ready().await.unwrap().call(get(&path)).await.unwrap();
    }
    assert_eq!(stats.tracked_operations(), 10);
    assert_eq!(stats.operations().len(), 11, "ten, and the overflow");
    assert_eq!(stats.calls(RetryStats::OVERFLOW_OPERATION), 90);
}

/// A million calls to distinct paths: the stats keep a bounded number of entries (memory is
/// flat; each entry is ~3.6 KB, so <= 1001 entries is under 4 MB). Prints RSS on Linux.
#[tokio::test(start_paused = true)]
async fn a_million_distinct_paths_keep_memory_flat() {
    let layer = RetryLayer::new().info_on_success(false);
    let stats = layer.stats();
    let mut svc = layer.layer(Scripted::always(200));
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    };
    let mut path = String::with_capacity(64);
    let mut entries_at = Vec::new();
    for i in 0u32..1_000_000 {
        path.clear();
        // Half id-like (collapsed), half distinct words (capped).
        if i % 2 == 0 {
            path.push_str(&format!("/v1/items/{i}"));
        } else {
            path.push_str("/v1/items/item-");
            let mut n = i;
            while n > 0 {
                path.push(char::from(b'a' + (n % 26) as u8));
                n /= 26;
            }
        }
        svc.ready().await.unwrap().call(get(&path)).await.unwrap();
        if i % 250_000 == 249_999 {
            entries_at.push((i + 1, stats.operations().len(), rss()));
        }
    }
    for (calls, entries, rss) in &entries_at {
        println!("after {calls} calls: {entries} stats entries, {rss}");
        assert!(*entries <= tower_retry_guard::RetryStats::DEFAULT_MAX_OPERATIONS + 1);
    }
    assert_eq!(
        stats.tracked_operations(),
        tower_retry_guard::RetryStats::DEFAULT_MAX_OPERATIONS
    );
}
