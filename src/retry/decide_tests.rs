//! `decide` without a service: a call, an outcome, a time.

use std::time::Duration;

use http::Request;
use tokio::time::Instant;

use super::*;
use crate::budget::Budgets;
use crate::classify::Outcome;
use crate::retry::RetryLayer;

fn config(retries: u32) -> Config<crate::LlmHttp, ()> {
    let policy = crate::RetryPolicy::builder()
        .max_retries(retries)
        .max_total_time(Duration::from_secs(10))
        .max_retry_after(Duration::from_secs(5))
        .seed(7)
        .build()
        .unwrap_or_default();
    RetryLayer::new()
        .policy(policy)
        .budgets(Budgets::none())
        .into_config()
}

fn call(config: &Config<crate::LlmHttp, ()>, method: &str) -> Call<Request<String>> {
    let mut request = Request::builder()
        .method(method)
        .uri("http://x/a")
        .body(String::new())
        .unwrap_or_default();
    match Call::start(config, &mut request) {
        Ok(call) => call,
        Err(refused) => panic!("refused: {}", refused.invalid),
    }
}

fn retry(kind: ErrorKind, after: Option<Duration>) -> Outcome {
    Outcome::Retry { kind, after }
}

#[tokio::test(start_paused = true)]
async fn success_and_failures_that_are_not_retried() {
    let config = config(3);
    let call = call(&config, "GET");
    let now = Instant::now();
    assert!(matches!(
        decide(&config, &call, Outcome::Success, now),
        Decision::Succeed
    ));
    let fail = Outcome::Fail {
        kind: ErrorKind::ClientError,
    };
    assert!(matches!(
        decide(&config, &call, fail, now),
        Decision::Stop(ErrorKind::ClientError, StopReason::NotRetryable)
    ));
    let gave_up = Outcome::Fail {
        kind: ErrorKind::GaveUp,
    };
    assert!(matches!(
        decide(&config, &call, gave_up, now),
        Decision::Stop(_, StopReason::InnerGaveUp)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_retry_within_the_bounds_gets_a_delay() {
    let config = config(3);
    let call = call(&config, "GET");
    match decide(
        &config,
        &call,
        retry(ErrorKind::Overloaded, None),
        Instant::now(),
    ) {
        Decision::Retry { kind, delay, .. } => {
            assert_eq!(kind, ErrorKind::Overloaded);
            assert!(delay <= Duration::from_millis(100), "{delay:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn no_retries_left_is_exhausted() {
    let config = config(0);
    let call = call(&config, "GET");
    assert!(matches!(
        decide(
            &config,
            &call,
            retry(ErrorKind::Timeout, None),
            Instant::now()
        ),
        Decision::Stop(_, StopReason::Exhausted { max_retries: 0 })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_side_effect_without_key_is_not_retried() {
    let config = RetryLayer::new()
        .idempotency_keys(false)
        .budgets(Budgets::none())
        .into_config();
    let call = call(&config, "POST");
    match decide(
        &config,
        &call,
        retry(ErrorKind::Overloaded, None),
        Instant::now(),
    ) {
        Decision::Stop(_, StopReason::SideEffectWithoutKey { operation }) => {
            assert_eq!(operation, "POST /a");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn hints_past_the_cap_or_the_deadline_stop() {
    let config = config(3);
    let call = call(&config, "GET");
    let now = Instant::now();
    let long = retry(ErrorKind::RateLimited, Some(Duration::from_secs(6)));
    assert!(matches!(
        decide(&config, &call, long, now),
        Decision::Stop(_, StopReason::HintTooLong { .. })
    ));
    let late = now + Duration::from_secs(8);
    let hint = retry(ErrorKind::RateLimited, Some(Duration::from_secs(3)));
    assert!(matches!(
        decide(&config, &call, hint, late),
        Decision::Stop(_, StopReason::HintTooLong { max, .. }) if max == Duration::from_secs(2)
    ));
    let hint = retry(ErrorKind::RateLimited, Some(Duration::from_secs(1)));
    match decide(&config, &call, hint, now) {
        Decision::Retry { delay, .. } => assert!(delay >= Duration::from_secs(1)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn past_the_deadline_nothing_is_retried() {
    let config = config(3);
    let call = call(&config, "GET");
    let after = Instant::now() + Duration::from_secs(10);
    assert!(matches!(
        decide(&config, &call, retry(ErrorKind::Timeout, None), after),
        Decision::Stop(_, StopReason::Deadline { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn decide_is_pure() {
    let config = config(3);
    let call = call(&config, "GET");
    let now = Instant::now();
    let delays: Vec<_> = (0..3)
        .map(
            |_| match decide(&config, &call, retry(ErrorKind::Timeout, None), now) {
                Decision::Retry { delay, .. } => delay,
                other => panic!("{other:?}"),
            },
        )
        .collect();
    assert!(delays.windows(2).all(|w| w[0] == w[1]), "{delays:?}");
}

#[test]
fn an_output_failure_needs_a_change() {
    assert_eq!(
        unchanged(ErrorKind::OutputInvalid, false),
        Some(StopReason::OutputUnchanged)
    );
    assert_eq!(unchanged(ErrorKind::OutputInvalid, true), None);
    assert_eq!(unchanged(ErrorKind::Overloaded, false), None);
}
