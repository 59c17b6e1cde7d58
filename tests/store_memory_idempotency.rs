//! The in-memory idempotency store: claims, leases, TTLs, sweeps, and memory bounded in
//! entries and bytes, for everyone and per principal.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tower_retry_guard::IdempotencyKey;
use tower_retry_guard::server::{
    Begin, Claim, ClaimToken, Fingerprint, IdempotencyStore, MemoryIdempotencyStore, Ownership,
    ScopedKey, Stored,
};

fn key(k: &str) -> ScopedKey {
    ScopedKey::new(None, IdempotencyKey::new(k).unwrap())
}

fn key_of(principal: &str, k: &str) -> ScopedKey {
    ScopedKey::new(Some(principal), IdempotencyKey::new(k).unwrap())
}

fn stored(body: &'static str) -> Stored {
    Stored {
        status: StatusCode::OK,
        headers: http::HeaderMap::new(),
        body: Bytes::from_static(body.as_bytes()),
    }
}

fn claim(fingerprint: Fingerprint, lease: Duration, keep: Duration) -> Claim {
    Claim {
        token: ClaimToken::random(),
        fingerprint,
        lease,
        keep,
        take_over: false,
    }
}

fn small(entries: usize) -> MemoryIdempotencyStore {
    MemoryIdempotencyStore::builder()
        .max_total(entries, 1 << 30)
        .max_per_principal(entries, 1 << 30)
        .sweep_every(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn leases_ttl_release_and_sweep() {
    let store = small(3);
    let fp = Fingerprint::of(&http::Method::POST, "/x", b"1");
    let other = Fingerprint::of(&http::Method::POST, "/x", b"2");
    let (lease, keep) = (Duration::from_secs(30), Duration::from_secs(60));

    let a = claim(fp, lease, keep);
    assert_eq!(store.begin(&key("a"), &a).await, Ok(Begin::Claimed));
    assert_eq!(
        store.begin(&key("a"), &claim(fp, lease, keep)).await,
        Ok(Begin::InFlight)
    );
    assert_eq!(
        store.begin(&key("a"), &claim(other, lease, keep)).await,
        Ok(Begin::Mismatch)
    );
    // A dead claimant's lease runs out: the key is abandoned, not free.
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(
        store.begin(&key("a"), &claim(fp, lease, keep)).await,
        Ok(Begin::Abandoned)
    );
    // Its holder, alive after all, still completes it (nobody took it over).
    assert_eq!(
        store.complete(&key("a"), &a, stored("done"), keep).await,
        Ok(Ownership::Held)
    );
    assert_eq!(
        store.begin(&key("a"), &claim(fp, lease, keep)).await,
        Ok(Begin::Done(stored("done")))
    );
    // Release leaves finished keys alone.
    assert_eq!(store.release(&key("a"), a.token).await, Ok(Ownership::Lost));

    // Released claims are free again.
    let b = claim(fp, lease, keep);
    assert_eq!(store.begin(&key("b"), &b).await, Ok(Begin::Claimed));
    assert_eq!(store.release(&key("b"), b.token).await, Ok(Ownership::Held));
    assert_eq!(
        store.begin(&key("b"), &claim(fp, lease, keep)).await,
        Ok(Begin::Claimed)
    );

    // The cap: a, b, c held; d refused, and the refusal says the store is full.
    assert_eq!(
        store.begin(&key("c"), &claim(fp, lease, keep)).await,
        Ok(Begin::Claimed)
    );
    let refused = store.begin(&key("d"), &claim(fp, lease, keep)).await;
    assert!(refused.as_ref().is_err_and(|e| e.is_full()), "{refused:?}");

    // Everything expires and the periodic sweep drops it.
    tokio::time::advance(Duration::from_secs(120)).await;
    assert_eq!(store.len(), 3);
    assert_eq!(
        store.begin(&key("d"), &claim(fp, lease, keep)).await,
        Ok(Begin::Claimed)
    );
    assert_eq!(store.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_store_makes_room_from_expired_entries_before_refusing() {
    // Default sweep interval (60 s): a cap reached by entries that all expired must not
    // refuse new keys until the next periodic sweep.
    let store = MemoryIdempotencyStore::builder()
        .max_total(2, 1 << 20)
        .max_per_principal(2, 1 << 20)
        .build()
        .unwrap();
    let fp = Fingerprint::of(&http::Method::POST, "/orders", b"{}");
    let ttl = Duration::from_secs(1);
    for k in ["a", "b"] {
        let c = claim(fp, ttl, ttl);
        assert_eq!(store.begin(&key(k), &c).await, Ok(Begin::Claimed));
        assert_eq!(
            store.complete(&key(k), &c, stored("ok"), ttl).await,
            Ok(Ownership::Held)
        );
    }
    assert!(store.begin(&key("c"), &claim(fp, ttl, ttl)).await.is_err());
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(
        store.begin(&key("c"), &claim(fp, ttl, ttl)).await,
        Ok(Begin::Claimed)
    );
}

#[tokio::test(start_paused = true)]
async fn one_principal_cannot_take_another_principals_room() {
    let store = MemoryIdempotencyStore::builder()
        .max_total(10, 1 << 20)
        .max_per_principal(4, 1 << 20)
        .build()
        .unwrap();
    let fp = Fingerprint::from_u128(1);
    let hour = Duration::from_secs(3600);
    for i in 0..4 {
        let k = key_of("hog", &format!("k{i}"));
        assert_eq!(
            store.begin(&k, &claim(fp, hour, hour)).await,
            Ok(Begin::Claimed)
        );
    }
    let refused = store
        .begin(&key_of("hog", "k4"), &claim(fp, hour, hour))
        .await
        .expect_err("over its share");
    assert!(refused.is_full());
    assert!(refused.to_string().contains("\"hog\""), "{refused}");
    // Another principal, and the global scope, still get their first key.
    assert_eq!(
        store
            .begin(&key_of("alice", "k0"), &claim(fp, hour, hour))
            .await,
        Ok(Begin::Claimed)
    );
    assert_eq!(
        store.begin(&key("k0"), &claim(fp, hour, hour)).await,
        Ok(Begin::Claimed)
    );
    assert_eq!(store.usage_of(Some("hog")).0, 4);
    assert_eq!(store.usage_of(Some("alice")).0, 1);
}

#[tokio::test(start_paused = true)]
async fn a_result_too_large_for_the_byte_budget_is_refused_and_the_claim_kept() {
    let store = MemoryIdempotencyStore::builder()
        .max_total(100, 64 << 10)
        .max_per_principal(100, 8 << 10)
        .build()
        .unwrap();
    let fp = Fingerprint::from_u128(1);
    let hour = Duration::from_secs(3600);
    let c = claim(fp, hour, hour);
    assert_eq!(store.begin(&key("big"), &c).await, Ok(Begin::Claimed));
    let big = Stored {
        status: StatusCode::OK,
        headers: http::HeaderMap::new(),
        body: Bytes::from(vec![b'x'; 16 << 10]),
    };
    let refused = store.complete(&key("big"), &c, big, hour).await;
    assert!(refused.is_err_and(|e| e.is_full()));
    // Still claimed (a retry gets 409, never a re-run); a small marker fits in the reserve.
    assert_eq!(
        store.begin(&key("big"), &claim(fp, hour, hour)).await,
        Ok(Begin::InFlight)
    );
    assert_eq!(
        store
            .complete(&key("big"), &c, stored("marker"), hour)
            .await,
        Ok(Ownership::Held)
    );
    assert!(store.bytes() <= 8 << 10);
}

/// A flood of 1,000,000 distinct keys from one principal, each with a 1 KiB result: memory
/// stays under the byte budget and another principal's first request still runs.
#[tokio::test(start_paused = true)]
async fn a_flood_of_a_million_keys_stays_under_the_byte_budget() {
    let budget = 32 << 20;
    let store = MemoryIdempotencyStore::builder()
        .max_total(1_000_000, budget)
        .max_per_principal(1_000_000, budget / 4)
        .build()
        .unwrap();
    let fp = Fingerprint::from_u128(1);
    let hour = Duration::from_secs(3600);
    let body = Bytes::from(vec![b'x'; 1024]);
    let (mut claimed, mut refused, mut peak) = (0u32, 0u32, 0usize);
    for i in 0..1_000_000u32 {
        let k = key_of("flood", &format!("k{i}"));
        let c = claim(fp, hour, hour);
        match store.begin(&k, &c).await {
            Ok(Begin::Claimed) => {
                claimed += 1;
                let result = Stored {
                    status: StatusCode::OK,
                    headers: http::HeaderMap::new(),
                    body: body.clone(),
                };
                if store.complete(&k, &c, result, hour).await.is_err() {
                    let _ = store.complete(&k, &c, stored("marker"), hour).await;
                }
            }
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                assert!(e.is_full(), "{e}");
                refused += 1;
            }
        }
        peak = peak.max(store.bytes());
    }
    println!(
        "flood: {claimed} keys kept, {refused} refused, peak {peak} bytes counted (budget {} per principal)",
        budget / 4
    );
    assert!(peak <= budget / 4, "{peak}");
    assert!(claimed > 1000 && refused > 900_000);
    assert_eq!(
        store
            .begin(&key_of("other", "first"), &claim(fp, hour, hour))
            .await,
        Ok(Begin::Claimed)
    );
}

#[test]
fn limits_that_cannot_work_are_refused_by_name() {
    let e = MemoryIdempotencyStore::builder()
        .max_total(0, 1)
        .build()
        .unwrap_err();
    assert_eq!(e.setting(), "max_total");
    let e = MemoryIdempotencyStore::builder()
        .max_total(10, 1 << 20)
        .max_per_principal(20, 1 << 10)
        .build()
        .unwrap_err();
    assert_eq!(e.setting(), "max_per_principal");
    let e = MemoryIdempotencyStore::builder()
        .sweep_every(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.setting(), "sweep_every");
}
