//! Policy validation: unbounded or contradictory settings cannot be built, and a built policy
//! bounds attempts and total time whatever its inputs.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use proptest::prelude::*;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_retry_guard::{
    Backoff, Budgets, CallOutcome, Jitter, PolicyError, RetryInfo, RetryLayer, RetryPolicy,
    RetryPolicyBuilder, StopReason,
};

mod common;
use common::{ms, secs};

fn exp(initial: Duration, multiplier: f64, cap: Duration) -> Backoff {
    Backoff::exponential(initial, multiplier, cap)
}

#[track_caller]
fn refused(builder: RetryPolicyBuilder, setting: &str) -> PolicyError {
    let err = builder.build().expect_err("must not build");
    assert_eq!(err.setting(), setting, "{err}");
    assert!(
        err.to_string().contains(&format!("`{setting}`")),
        "the message names the setting: {err}"
    );
    err
}

#[test]
fn zero_total_time_is_refused() {
    refused(
        RetryPolicy::builder().max_total_time(Duration::ZERO),
        "max_total_time",
    );
}

#[test]
fn total_time_above_the_24h_limit_is_refused() {
    refused(
        RetryPolicy::builder()
            .max_total_time(RetryPolicy::MAX_TOTAL_TIME_LIMIT + Duration::from_nanos(1)),
        "max_total_time",
    );
    refused(
        RetryPolicy::builder().max_total_time(Duration::MAX),
        "max_total_time",
    );
    let at_limit = RetryPolicy::builder()
        .max_total_time(RetryPolicy::MAX_TOTAL_TIME_LIMIT)
        .build()
        .unwrap();
    assert_eq!(at_limit.max_total_time(), secs(24 * 3600));
}

#[test]
fn cap_below_the_first_delay_is_refused() {
    refused(
        RetryPolicy::builder().backoff(exp(ms(500), 2.0, ms(499))),
        "backoff.cap",
    );
    // Equal is fine: a flat exponential.
    RetryPolicy::builder()
        .backoff(exp(ms(500), 2.0, ms(500)))
        .build()
        .unwrap();
}

#[test]
fn nan_negative_or_shrinking_multiplier_is_refused() {
    for m in [
        f64::NAN,
        -2.0,
        0.0,
        0.5,
        0.999,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        let err = refused(
            RetryPolicy::builder().backoff(exp(ms(100), m, secs(1))),
            "backoff.multiplier",
        );
        assert!(err.to_string().contains(&format!("{m}")), "{err}");
    }
    RetryPolicy::builder()
        .backoff(exp(ms(100), 1.0, secs(1)))
        .build()
        .unwrap();
}

#[test]
fn zero_initial_delay_of_an_exponential_is_refused() {
    refused(
        RetryPolicy::builder().backoff(exp(Duration::ZERO, 2.0, secs(1))),
        "backoff.initial",
    );
}

#[test]
fn proportional_jitter_outside_zero_to_one_is_refused() {
    for f in [f64::NAN, 1.0001, 2.0, -0.1, f64::INFINITY] {
        refused(
            RetryPolicy::builder().jitter(Jitter::Proportional(f)),
            "jitter",
        );
    }
    for f in [0.0, 0.2, 1.0] {
        let p = RetryPolicy::builder()
            .jitter(Jitter::Proportional(f))
            .build()
            .unwrap();
        assert_eq!(p.jitter(), Jitter::Proportional(f));
    }
}

#[test]
fn more_retries_than_the_limit_is_refused() {
    refused(
        RetryPolicy::builder().max_retries(RetryPolicy::MAX_RETRIES_LIMIT + 1),
        "max_retries",
    );
    refused(RetryPolicy::builder().max_retries(u32::MAX), "max_retries");
    let p = RetryPolicy::builder()
        .max_retries(RetryPolicy::MAX_RETRIES_LIMIT)
        .build()
        .unwrap();
    assert_eq!(p.max_retries(), RetryPolicy::MAX_RETRIES_LIMIT);
    let off = RetryPolicy::builder().max_retries(0).build().unwrap();
    assert_eq!(off.max_retries(), 0);
}

#[test]
fn first_delay_not_shorter_than_the_total_time_is_refused() {
    refused(
        RetryPolicy::builder()
            .max_total_time(secs(1))
            .backoff(exp(secs(1), 2.0, secs(5))),
        "backoff.initial",
    );
    refused(
        RetryPolicy::builder()
            .max_total_time(secs(1))
            .backoff(exp(secs(2), 2.0, secs(5))),
        "backoff.initial",
    );
    refused(
        RetryPolicy::builder()
            .max_total_time(secs(1))
            .backoff(Backoff::Constant(secs(1))),
        "backoff",
    );
    RetryPolicy::builder()
        .max_total_time(secs(1))
        .backoff(exp(ms(999), 2.0, secs(5)))
        .build()
        .unwrap();
}

#[test]
fn defaults_are_bounded() {
    let p = RetryPolicy::default();
    assert_eq!(p.max_retries(), 3);
    assert_eq!(p.max_total_time(), secs(10));
    assert_eq!(p.max_retry_after(), secs(60));
    assert_eq!(p.jitter(), Jitter::Equal);
    assert_eq!(p.backoff(), exp(ms(100), 2.0, secs(10)));
    let built = RetryPolicy::builder().build().unwrap();
    assert_eq!(built.max_retries(), 3);
    assert_eq!(built.max_total_time(), secs(10));
}

// ---------------------------------------------------------------------------------------------
// Properties.

#[derive(Debug, Clone)]
struct Inputs {
    max_retries: u32,
    total: Duration,
    backoff: Backoff,
    jitter: Jitter,
    max_retry_after: Duration,
    seed: u64,
    /// A `retry-after-ms` hint on every 503.
    hint_ms: Option<u32>,
}

impl Inputs {
    fn builder(&self) -> RetryPolicyBuilder {
        RetryPolicy::builder()
            .max_retries(self.max_retries)
            .max_total_time(self.total)
            .backoff(self.backoff)
            .jitter(self.jitter)
            .max_retry_after(self.max_retry_after)
            .seed(self.seed)
    }

    /// The validation rules, written out independently of the builder.
    fn should_build(&self) -> bool {
        let total_ok = !self.total.is_zero() && self.total <= RetryPolicy::MAX_TOTAL_TIME_LIMIT;
        let backoff_ok = match self.backoff {
            Backoff::Constant(d) => d < self.total,
            Backoff::Exponential {
                initial,
                multiplier,
                cap,
            } => {
                !initial.is_zero()
                    && multiplier.is_finite()
                    && multiplier >= 1.0
                    && cap >= initial
                    && initial < self.total
            }
        };
        let jitter_ok = match self.jitter {
            Jitter::Proportional(f) => f.is_finite() && (0.0..=1.0).contains(&f),
            _ => true,
        };
        self.max_retries <= RetryPolicy::MAX_RETRIES_LIMIT && total_ok && backoff_ok && jitter_ok
    }
}

fn duration_ms(max: u64) -> impl Strategy<Value = Duration> {
    (0..=max).prop_map(ms)
}

fn inputs() -> impl Strategy<Value = Inputs> {
    let multiplier = prop_oneof![
        4 => 0.5f64..6.0,
        1 => Just(1.0),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(1e25),
        1 => -3.0f64..1.0,
    ];
    let cap = prop_oneof![
        4 => duration_ms(20_000),
        1 => Just(Duration::MAX),
        1 => Just(RetryPolicy::MAX_TOTAL_TIME_LIMIT),
    ];
    let backoff = prop_oneof![
        1 => duration_ms(3_000).prop_map(Backoff::Constant),
        4 => (duration_ms(3_000), multiplier, cap)
            .prop_map(|(i, m, c)| Backoff::exponential(i, m, c)),
    ];
    let jitter = prop_oneof![
        Just(Jitter::None),
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
        (-0.5f64..1.5).prop_map(Jitter::Proportional),
        Just(Jitter::Proportional(f64::NAN)),
    ];
    let total = prop_oneof![
        6 => duration_ms(30_000),
        1 => Just(RetryPolicy::MAX_TOTAL_TIME_LIMIT),
        1 => Just(RetryPolicy::MAX_TOTAL_TIME_LIMIT + secs(1)),
    ];
    (
        0u32..=12,
        total,
        backoff,
        jitter,
        duration_ms(120_000),
        any::<u64>(),
        proptest::option::of(0u32..100_000),
    )
        .prop_map(
            |(max_retries, total, backoff, jitter, max_retry_after, seed, hint_ms)| Inputs {
                max_retries,
                total,
                backoff,
                jitter,
                max_retry_after,
                seed,
                hint_ms,
            },
        )
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn builds_exactly_when_bounded_and_consistent(input in inputs()) {
        let built = input.builder().build();
        prop_assert_eq!(built.is_ok(), input.should_build(), "{:?} -> {:?}", input, built.err());
        if let Err(e) = input.builder().build() {
            prop_assert!(
                ["max_retries", "max_total_time", "backoff", "backoff.initial",
                 "backoff.multiplier", "backoff.cap", "jitter"].contains(&e.setting()),
                "{}", e
            );
        }
    }

    #[test]
    fn a_built_policy_bounds_attempts_and_total_time(input in inputs()) {
        let Ok(policy) = input.builder().build() else {
            return Ok(());
        };
        let rt = paused_runtime();
        let (at, res) = rt.block_on(async {
            let log: Arc<Mutex<Vec<Instant>>> = Arc::default();
            let seen = log.clone();
            let hint = input.hint_ms;
            let inner = tower::service_fn(move |_req: Request<String>| {
                seen.lock().unwrap().push(Instant::now());
                let mut res = Response::builder().status(503);
                if let Some(h) = hint {
                    res = res.header("retry-after-ms", h.to_string());
                }
                std::future::ready(Ok::<_, io::Error>(res.body(String::new()).unwrap()))
            });
            let mut svc = RetryLayer::new()
                .policy(policy)
                .budgets(Budgets::none())
                .layer(inner);
            let start = Instant::now();
            let res = svc
                .ready()
                .await
                .unwrap()
                .call(Request::get("/x").body(String::new()).unwrap())
                .await
                .unwrap();
            let at: Vec<Duration> = log.lock().unwrap().iter().map(|t| *t - start).collect();
            (at, res)
        });
        let calls = at.len() as u32;
        prop_assert!(calls >= 1);
        prop_assert!(calls <= input.max_retries + 1, "{} calls for {:?}", calls, input);
        for t in &at {
            prop_assert!(*t <= input.total, "an attempt started at {:?} > {:?}", t, input.total);
        }
        prop_assert_eq!(res.status(), 503);
        let info = res.extensions().get::<RetryInfo>().expect("RetryInfo on the last 503");
        prop_assert_eq!(info.attempts, calls);
        prop_assert!(info.total_delay <= input.total);
        match &info.outcome {
            CallOutcome::Stopped(StopReason::Exhausted { max_retries }) => {
                prop_assert_eq!(*max_retries, input.max_retries);
                prop_assert_eq!(calls, input.max_retries + 1);
            }
            CallOutcome::Stopped(StopReason::Deadline { .. }) => {}
            CallOutcome::Stopped(StopReason::HintTooLong { hint, .. }) => {
                prop_assert_eq!(Some(*hint), input.hint_ms.map(|h| ms(h.into())));
            }
            other => prop_assert!(false, "unexpected outcome {:?}", other),
        }
    }
}
