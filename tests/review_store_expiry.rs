//! Review: expired idempotency entries do not count against the store's cap.

use std::time::Duration;

use tower_retry_guard::IdempotencyKey;
use tower_retry_guard::server::{
    Begin, Fingerprint, IdempotencyStore, MemoryIdempotencyStore, ScopedKey,
};

fn key(k: &str) -> ScopedKey {
    ScopedKey::new(None, IdempotencyKey::new(k).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_full_memory_store_makes_room_from_expired_entries_before_refusing() {
    // Default sweep interval (60 s): a cap reached by entries that all expired must not
    // refuse new keys (the layer would answer 503) until the next periodic sweep.
    let store = MemoryIdempotencyStore::with_limits(2, Duration::from_secs(60));
    let fp = Fingerprint::of(&http::Method::POST, "/orders", b"{}");
    let ttl = Duration::from_secs(1);
    for k in ["a", "b"] {
        assert_eq!(store.begin(&key(k), fp, ttl).await, Ok(Begin::Claimed));
        store.complete(&key(k), stored(), ttl).await.unwrap();
    }
    assert!(store.begin(&key("c"), fp, ttl).await.is_err(), "full");
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(store.begin(&key("c"), fp, ttl).await, Ok(Begin::Claimed));
}

fn stored() -> tower_retry_guard::server::Stored {
    tower_retry_guard::server::Stored {
        status: http::StatusCode::OK,
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::from_static(b"ok"),
    }
}
