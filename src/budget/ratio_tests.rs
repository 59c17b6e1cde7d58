//! Unit tests of the parent module.
use super::*;
use std::time::Duration;

fn config(ratio: f64, floor: u32) -> RatioConfig {
    RatioConfig {
        ratio,
        floor,
        ..RatioConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn outage_allows_exactly_the_ratio() {
    let r = RetryRatio::new(config(0.1, 3));
    for _ in 0..100 {
        r.deposit();
    }
    let mut granted = 0;
    for _ in 0..50 {
        if r.try_withdraw() {
            granted += 1;
            r.record_retry_result(false);
        }
    }
    assert_eq!(granted, 10);
}

#[tokio::test(start_paused = true)]
async fn floor_lets_a_quiet_process_retry_until_its_retries_keep_failing() {
    // Floor 30, ratio 0.1: each failed retry takes 10 back.
    let r = RetryRatio::new(config(0.1, 30));
    r.deposit();
    let mut granted = 0;
    while r.try_withdraw() {
        granted += 1;
        r.record_retry_result(false);
    }
    // R + 1 <= 30 - 1 call - 10 R: 3 retries, then the floor is spent.
    assert_eq!(granted, 3);
    // The window slides: 10 s later the floor is there again.
    tokio::time::advance(Duration::from_secs(11)).await;
    r.deposit();
    assert!(r.try_withdraw());
}

#[tokio::test(start_paused = true)]
async fn floor_is_not_used_up_by_retries_that_work() {
    let r = RetryRatio::new(config(0.1, 30));
    r.deposit();
    // 25 retries in a quiet window, all working: the floor (30) holds.
    for _ in 0..25 {
        assert!(r.try_withdraw());
        r.record_retry_result(true);
    }
}

#[tokio::test(start_paused = true)]
async fn successes_open_the_ratio_up_to_the_cap() {
    let r = RetryRatio::new(config(0.1, 0));
    for _ in 0..10 {
        r.deposit();
    }
    let mut granted = 0;
    for _ in 0..100 {
        if r.try_withdraw() {
            granted += 1;
            r.record_retry_result(true);
        }
    }
    // Capped at 1.5 x 10 calls.
    assert_eq!(granted, 15);
}

#[tokio::test(start_paused = true)]
async fn window_slides_and_refund_gives_back() {
    let r = RetryRatio::new(config(0.5, 0));
    for _ in 0..4 {
        r.deposit();
    }
    assert!(r.try_withdraw());
    assert!(r.try_withdraw());
    assert!(!r.try_withdraw());
    r.refund();
    assert!(r.try_withdraw());
    assert!(!r.try_withdraw());
    // After the window, calls and retries are forgotten.
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(!r.try_withdraw());
    assert_eq!(r.in_window.load(Ordering::Relaxed), 0);
    for _ in 0..2 {
        r.deposit();
    }
    assert!(r.try_withdraw());
    assert!(!r.try_withdraw());
    // Half a window later, the old calls still count.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(!r.try_withdraw());
    r.deposit();
    r.deposit();
    assert!(r.try_withdraw());
}

#[tokio::test(start_paused = true)]
async fn first_window_buckets_are_labelled_with_their_epoch() {
    let r = RetryRatio::new(config(0.1, 0));
    // One call a second for 10 s: the calls of seconds 1..9 still count at second 10.
    for _ in 0..10 {
        for _ in 0..10 {
            r.deposit();
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(r.calls.sum(r.epoch()), 90);
}

#[test]
fn fractions_are_exact() {
    let r = RetryRatio::new(config(0.29, 0));
    for _ in 0..100 {
        r.deposit();
    }
    let granted = (0..100).filter(|_| r.try_withdraw()).count();
    assert_eq!(granted, 29);
}

#[test]
fn concurrent_withdrawals_never_pass_on_a_stale_allowance() {
    // Ratio 0.1, floor 12, no call yet: one after the other, 2 retries fit (R + 1 <= 12 -
    // 10 R). Withdrawals racing on threads must not all pass on the allowance one of them
    // computed before the others took theirs.
    use std::sync::{Arc, Barrier};
    const THREADS: usize = 4;
    for round in 0..2000 {
        let r = Arc::new(RetryRatio::new(config(0.1, 12)));
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (r, barrier) = (r.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    usize::from(r.try_withdraw())
                })
            })
            .collect();
        let granted: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        assert!(
            granted <= 2,
            "round {round}: {granted} retries granted, 2 fit"
        );
    }
}
