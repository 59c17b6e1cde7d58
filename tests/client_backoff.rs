//! Backoff and jitter, measured in virtual time between the attempts an inner service sees.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_retry_guard::{Backoff, Budgets, Jitter, RetryLayer, RetryPolicy};

mod common;
use common::ms;

const MS: Duration = Duration::from_millis(1);

/// The instants at which the inner service was called.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Instant>>>);

impl Log {
    fn take(&self) -> Vec<Instant> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn always_503(
    log: Log,
) -> impl Service<Request<String>, Response = Response<String>, Error = io::Error> + Clone {
    tower::service_fn(move |_req: Request<String>| {
        log.0.lock().unwrap().push(Instant::now());
        std::future::ready(Ok::<_, io::Error>(
            Response::builder().status(503).body(String::new()).unwrap(),
        ))
    })
}

fn policy(retries: u32, backoff: Backoff, jitter: Jitter, seed: u64) -> RetryPolicy {
    RetryPolicy::builder()
        .max_retries(retries)
        .max_total_time(Duration::from_secs(3600))
        .backoff(backoff)
        .jitter(jitter)
        .seed(seed)
        .build()
        .unwrap()
}

fn exp(initial: Duration, multiplier: f64, cap: Duration) -> Backoff {
    Backoff::exponential(initial, multiplier, cap)
}

/// A service through a layer with `policy` and no budgets.
struct Harness<S> {
    svc: S,
    log: Log,
}

fn harness(
    policy: RetryPolicy,
) -> Harness<
    impl Service<Request<String>, Response = Response<String>, Error = impl std::fmt::Debug> + Clone,
> {
    let log = Log::default();
    let layer = RetryLayer::new().policy(policy).budgets(Budgets::none());
    Harness {
        svc: layer.layer(always_503(log.clone())),
        log,
    }
}

impl<S> Harness<S>
where
    S: Service<Request<String>, Response = Response<String>>,
    S::Error: std::fmt::Debug,
{
    /// One logical call (a GET: retried without a key); the gaps between its attempts.
    async fn gaps(&mut self) -> Vec<Duration> {
        self.log.take();
        let res = self
            .svc
            .ready()
            .await
            .unwrap()
            .call(Request::get("/x").body(String::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
        let at = self.log.take();
        at.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

fn within(gap: Duration, low: Duration, high: Duration) -> bool {
    // The timer fires on a 1 ms tick: a sleep ends up to 1 ms late, never early.
    gap >= low && gap <= high + MS
}

#[tokio::test(start_paused = true)]
async fn no_jitter_waits_exactly_the_exponential_backoff() {
    let mut h = harness(policy(4, Backoff::default(), Jitter::None, 1));
    let gaps = h.gaps().await;
    assert_eq!(gaps.len(), 4, "4 retries: {gaps:?}");
    for (gap, want) in gaps.iter().zip([100, 200, 400, 800]) {
        assert!(within(*gap, ms(want), ms(want)), "{gaps:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn full_jitter_stays_between_zero_and_the_backoff() {
    let mut h = harness(policy(4, Backoff::default(), Jitter::Full, 2));
    let mut firsts = Vec::new();
    for _ in 0..40 {
        let gaps = h.gaps().await;
        assert_eq!(gaps.len(), 4);
        for (gap, base) in gaps.iter().zip([100, 200, 400, 800]) {
            assert!(within(*gap, Duration::ZERO, ms(base)), "{gaps:?}");
        }
        firsts.push(gaps[0]);
    }
    // Spread over the whole range, not stuck at one end.
    assert!(firsts.iter().any(|g| *g < ms(40)), "{firsts:?}");
    assert!(firsts.iter().any(|g| *g > ms(60)), "{firsts:?}");
}

#[tokio::test(start_paused = true)]
async fn equal_jitter_keeps_half_the_backoff() {
    let mut h = harness(policy(4, Backoff::default(), Jitter::Equal, 3));
    let mut firsts = Vec::new();
    for _ in 0..40 {
        let gaps = h.gaps().await;
        assert_eq!(gaps.len(), 4);
        for (gap, base) in gaps.iter().zip([100, 200, 400, 800]) {
            assert!(within(*gap, ms(base / 2), ms(base)), "{gaps:?}");
        }
        firsts.push(gaps[0]);
    }
    assert!(firsts.iter().any(|g| *g < ms(70)), "{firsts:?}");
    assert!(firsts.iter().any(|g| *g > ms(80)), "{firsts:?}");
}

#[tokio::test(start_paused = true)]
async fn decorrelated_jitter_grows_from_the_previous_delay() {
    let cap = Duration::from_secs(2);
    let mut h = harness(policy(6, exp(ms(100), 2.0, cap), Jitter::Decorrelated, 4));
    let mut firsts = Vec::new();
    for _ in 0..40 {
        let gaps = h.gaps().await;
        assert_eq!(gaps.len(), 6);
        // First retry: U(initial, 3 * initial).
        assert!(within(gaps[0], ms(100), ms(300)), "{gaps:?}");
        for w in gaps.windows(2) {
            let high = (w[0] * 3).min(cap);
            assert!(within(w[1], ms(100), high), "{gaps:?}");
        }
        firsts.push(gaps[0]);
    }
    assert!(firsts.iter().any(|g| *g < ms(150)), "{firsts:?}");
    assert!(firsts.iter().any(|g| *g > ms(250)), "{firsts:?}");
}

#[tokio::test(start_paused = true)]
async fn proportional_jitter_stays_within_its_factor() {
    let mut h = harness(policy(4, Backoff::default(), Jitter::Proportional(0.2), 5));
    let mut firsts = Vec::new();
    for _ in 0..40 {
        let gaps = h.gaps().await;
        assert_eq!(gaps.len(), 4);
        for (gap, base) in gaps.iter().zip([100u64, 200, 400, 800]) {
            let low = ms(base * 8 / 10);
            let high = ms(base * 12 / 10);
            assert!(within(*gap, low, high), "{gaps:?}");
        }
        firsts.push(gaps[0]);
    }
    assert!(firsts.iter().any(|g| *g < ms(95)), "{firsts:?}");
    assert!(firsts.iter().any(|g| *g > ms(106)), "{firsts:?}");
}

#[tokio::test(start_paused = true)]
async fn default_policy_first_retry_is_about_100ms() {
    let policy = RetryPolicy::builder().seed(6).build().unwrap();
    let mut h = harness(policy);
    for _ in 0..20 {
        let gaps = h.gaps().await;
        assert_eq!(gaps.len(), 3, "default: 3 retries");
        // Equal jitter on 100 ms: 50..=100 ms.
        assert!(within(gaps[0], ms(50), ms(100)), "{gaps:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn delays_never_exceed_the_cap() {
    let cap = Duration::from_secs(1);
    let mut h = harness(policy(5, exp(ms(100), 10.0, cap), Jitter::None, 7));
    let gaps = h.gaps().await;
    let want = [100, 1000, 1000, 1000, 1000];
    assert_eq!(gaps.len(), want.len());
    for (gap, w) in gaps.iter().zip(want) {
        assert!(within(*gap, ms(w), ms(w)), "{gaps:?}");
    }

    for jitter in [
        Jitter::Full,
        Jitter::Equal,
        Jitter::Decorrelated,
        Jitter::Proportional(0.2),
        Jitter::Proportional(1.0),
    ] {
        let mut h = harness(policy(6, exp(ms(100), 10.0, cap), jitter, 8));
        for _ in 0..10 {
            let gaps = h.gaps().await;
            assert_eq!(gaps.len(), 6);
            for gap in &gaps {
                assert!(*gap <= cap + MS, "{jitter:?} exceeded the cap: {gaps:?}");
            }
        }
    }
}

#[test]
fn backoff_delay_is_exponential_then_capped() {
    let b = exp(ms(100), 2.0, Duration::from_secs(10));
    assert_eq!(b.delay(1), ms(100));
    assert_eq!(b.delay(2), ms(200));
    assert_eq!(b.delay(4), ms(800));
    assert_eq!(b.delay(8), Duration::from_secs(10));
    assert_eq!(b.delay(u32::MAX), Duration::from_secs(10));
    // A multiplier so large it overflows to infinity gives the cap, not a panic.
    let huge = exp(ms(1), 1e308, Duration::from_secs(5));
    assert_eq!(huge.delay(3), Duration::from_secs(5));
    assert_eq!(Backoff::Constant(ms(250)).delay(7), ms(250));
    assert_eq!(b.initial(), ms(100));
    assert_eq!(b.cap(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn tower_backoff_maker_replays_the_same_jitter_for_every_backoff() {
    use tower::retry::backoff::{Backoff as _, ExponentialBackoffMaker, MakeBackoff};
    use tower::util::rng::HasherRng;

    let mut maker =
        ExponentialBackoffMaker::new(ms(100), Duration::from_secs(10), 0.99, HasherRng::default())
            .unwrap();
    let mut first = maker.make_backoff();
    let mut second = maker.make_backoff();
    let now = Instant::now();
    let a: Vec<Duration> = (0..5)
        .map(|_| first.next_backoff().deadline() - now)
        .collect();
    let b: Vec<Duration> = (0..5)
        .map(|_| second.next_backoff().deadline() - now)
        .collect();
    // Jitter is there (not the bare 100, 200, 400 ...) ...
    assert_ne!(a[0], ms(100), "{a:?}");
    // ... but every backoff of the maker draws the very same jitter: synchronised clients.
    assert_eq!(a, b);
}

#[tokio::test(start_paused = true)]
async fn two_calls_through_one_layer_draw_different_jitter() {
    for jitter in [
        Jitter::Full,
        Jitter::Equal,
        Jitter::Decorrelated,
        Jitter::Proportional(0.2),
    ] {
        let mut h = harness(policy(4, Backoff::default(), jitter, 9));
        let a = h.gaps().await;
        let b = h.gaps().await;
        assert_eq!(a.len(), 4);
        assert_eq!(b.len(), 4);
        assert_ne!(a, b, "{jitter:?}: two calls replayed the same delays");
    }
}

#[tokio::test(start_paused = true)]
async fn two_services_from_one_layer_draw_different_jitter() {
    let log = Log::default();
    let layer = RetryLayer::new()
        .policy(policy(4, Backoff::default(), Jitter::Full, 10))
        .budgets(Budgets::none());
    let mut h1 = Harness {
        svc: layer.layer(always_503(log.clone())),
        log: log.clone(),
    };
    let mut h2 = Harness {
        svc: layer.layer(always_503(log.clone())),
        log,
    };
    let a = h1.gaps().await;
    let b = h2.gaps().await;
    assert_ne!(a, b);
}

#[tokio::test(start_paused = true)]
async fn same_seed_gives_same_delays_across_fresh_policies() {
    async fn run(seed: u64) -> Vec<Vec<Duration>> {
        let mut h = harness(policy(4, Backoff::default(), Jitter::Full, seed));
        let mut all = Vec::new();
        for _ in 0..3 {
            all.push(h.gaps().await);
        }
        all
    }
    let a = run(42).await;
    let b = run(42).await;
    assert_eq!(a, b, "same seed, same delays");
    let c = run(43).await;
    assert_ne!(a, c, "another seed, other delays");
}

#[tokio::test(start_paused = true)]
async fn proportional_jitter_on_a_huge_cap_does_not_panic() {
    // A policy the builder accepts: the cap is unbounded, the multiplier huge, so the second
    // retry's base delay is the cap itself. Jitter above 1x must not overflow the Duration.
    let p = RetryPolicy::builder()
        .max_retries(3)
        .max_total_time(Duration::from_secs(60))
        .backoff(exp(ms(1), 1e25, Duration::MAX))
        .jitter(Jitter::Proportional(1.0))
        .seed(11)
        .build()
        .unwrap();
    let mut h = harness(p);
    for _ in 0..16 {
        let gaps = h.gaps().await;
        // The first retry happens (about 1 ms); the second would wait far past the deadline.
        assert_eq!(gaps.len(), 1, "{gaps:?}");
    }
}
