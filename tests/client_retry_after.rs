//! A Retry-After hint past the cap stops however it is written; only an unparseable one is
//! ignored.

mod common;

use std::time::{Duration, SystemTime};

use http::{Request, Response};
use tower::{BoxError, Layer, ServiceExt};

use tower_retry_guard::LlmHttp;
use tower_retry_guard::{CallOutcome, RetryInfo, RetryLayer, StopReason};

async fn outcome(header: &'static str, value: String) -> (u32, CallOutcome) {
    let svc = RetryLayer::new().layer(tower::service_fn(move |_: Request<String>| {
        let value = value.clone();
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(503)
                    .header(header, value)
                    .body(String::new())?,
            )
        }
    }));
    let res = svc
        .oneshot(Request::get("/v1/models").body(String::new()).unwrap())
        .await
        .unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    (info.attempts, info.outcome.clone())
}

#[tokio::test(start_paused = true)]
async fn a_hint_past_the_cap_stops_however_it_is_written() {
    let far = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(10 * 365 * 86_400));
    for (header, value) in [
        ("retry-after", "100000".to_owned()),
        ("retry-after", "99999999999999999999".to_owned()),
        ("retry-after", "9".repeat(400)),
        ("retry-after", far),
        ("retry-after-ms", "99999999999999999999999".to_owned()),
    ] {
        let (attempts, outcome) = outcome(header, value.clone()).await;
        assert_eq!(attempts, 1, "{header}: {value}");
        assert!(
            matches!(
                outcome,
                CallOutcome::Stopped(StopReason::HintTooLong { .. })
            ),
            "{header}: {value} -> {outcome:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn only_an_unparseable_hint_is_ignored() {
    let (attempts, outcome) = outcome("retry-after", "soon".to_owned()).await;
    assert_eq!(attempts, 4, "retried on the backoff");
    assert!(matches!(
        outcome,
        CallOutcome::Stopped(StopReason::Exhausted { .. })
    ));
}

#[test]
fn oversized_numbers_parse_as_the_longest_wait() {
    assert_eq!(
        LlmHttp::parse_retry_after(b"99999999999999999999", SystemTime::now()),
        Some(Duration::MAX)
    );
    assert_eq!(
        LlmHttp::parse_retry_after_ms(b"99999999999999999999999"),
        Some(Duration::MAX)
    );
    assert_eq!(LlmHttp::parse_retry_after(b"-1", SystemTime::now()), None);
}
