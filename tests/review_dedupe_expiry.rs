//! Review: expired results do not count against the dedupe layer's key cap.

use std::time::Duration;

use tower::{ServiceBuilder, ServiceExt};
use tower_retry_guard::IdempotencyKey;
use tower_retry_guard::server::{DedupeError, DedupeLayer};

#[tokio::test(start_paused = true)]
async fn a_full_dedupe_makes_room_from_expired_results_before_refusing() {
    let svc = ServiceBuilder::new()
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
