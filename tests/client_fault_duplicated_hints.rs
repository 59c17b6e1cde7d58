//! Hints sent twice (two header lines, or one list folded by a proxy): the layer never
//! waits less, nor retries more, than any of them asks.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tower::{BoxError, Layer, ServiceExt};
use tower_retry_guard::{CallOutcome, ErrorKind, LlmHttp, Outcome, RetryInfo, RetryLayer};

fn headers(pairs: &[(&'static str, &'static [u8])]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_bytes(value).unwrap());
    }
    map
}

fn hint(pairs: &[(&'static str, &'static [u8])]) -> Option<Duration> {
    match LlmHttp::classify_parts(StatusCode::SERVICE_UNAVAILABLE, &headers(pairs)) {
        Outcome::Retry { after, .. } => after,
        other => panic!("503 not retried: {other:?}"),
    }
}

#[test]
fn of_two_retry_after_values_the_longer_wait_counts() {
    let s = |n| Some(Duration::from_secs(n));
    assert_eq!(
        hint(&[("retry-after", b"1"), ("retry-after", b"120")]),
        s(120)
    );
    assert_eq!(
        hint(&[("retry-after", b"120"), ("retry-after", b"1")]),
        s(120)
    );
    // Folded into one field by a proxy.
    assert_eq!(hint(&[("retry-after", b"1, 30")]), s(30));
    // Garbage next to a number: the number.
    assert_eq!(
        hint(&[("retry-after", b"soon"), ("retry-after", b"7")]),
        s(7)
    );
    assert_eq!(
        hint(&[("retry-after", b"\xff\xfe"), ("retry-after", b"7")]),
        s(7)
    );
    assert_eq!(
        hint(&[("retry-after-ms", b"100"), ("retry-after-ms", b"2500")]),
        Some(Duration::from_millis(2500))
    );
    // One value, as before.
    assert_eq!(hint(&[("retry-after", b"3")]), s(3));
    assert_eq!(hint(&[("retry-after", b"nonsense")]), None);
    assert_eq!(
        hint(&[("retry-after", b"Wed, 21 Oct 2015 07:28:00 GMT")]),
        None
    );
}

#[test]
fn a_should_retry_false_anywhere_means_no_retry() {
    let status = StatusCode::SERVICE_UNAVAILABLE;
    for pairs in [
        &[
            ("x-should-retry", &b"true"[..]),
            ("x-should-retry", b"false"),
        ][..],
        &[("x-should-retry", b"false"), ("x-should-retry", b"true")],
        &[("x-should-retry", b"true, false")],
    ] {
        assert_eq!(
            LlmHttp::classify_parts(status, &headers(pairs)),
            Outcome::Fail {
                kind: ErrorKind::Overloaded
            },
            "{pairs:?}"
        );
    }
    // A replayed failure is never retried, whichever line says so.
    let replayed = headers(&[
        ("idempotent-replayed", b"false"),
        ("idempotent-replayed", b"true"),
    ]);
    assert!(matches!(
        LlmHttp::classify_parts(status, &replayed),
        Outcome::Fail { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_second_retry_after_past_the_cap_stops_at_once() {
    let svc = RetryLayer::new().layer(tower::service_fn(|_: Request<String>| async {
        Ok::<_, BoxError>(
            Response::builder()
                .status(429)
                .header("retry-after", "1")
                .header("retry-after", "3600")
                .body(String::new())?,
        )
    }));
    let started = tokio::time::Instant::now();
    let res = svc
        .oneshot(Request::get("/v1/models").body(String::new()).unwrap())
        .await
        .unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.attempts, 1, "{:?}", info.outcome);
    assert!(matches!(info.outcome, CallOutcome::Stopped(_)));
    assert_eq!(started.elapsed(), Duration::ZERO);
}
