//! Classification: the LLM HTTP preset's statuses and hints, error classifiers, closures.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use proptest::prelude::*;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::classify::Errors;

use tower_retry_guard::{
    Backoff, Budgets, CallOutcome, Classify, ErrorKind, Jitter, LlmHttp, Outcome, RetryInfo,
    RetryLayer, RetryPolicy, StopReason,
};

mod common;
use common::{ms, secs};

const MS: Duration = Duration::from_millis(1);

type Script = Arc<dyn Fn(usize) -> Result<Response<String>, io::Error> + Send + Sync>;

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Instant>>>);

impl Log {
    fn at(&self) -> Vec<Instant> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

fn scripted(
    log: Log,
    script: Script,
) -> impl Service<Request<String>, Response = Response<String>, Error = io::Error> + Clone {
    tower::service_fn(move |_req: Request<String>| {
        let n = {
            let mut at = log.0.lock().unwrap();
            at.push(Instant::now());
            at.len() - 1
        };
        std::future::ready(script(n))
    })
}

fn status(code: u16) -> Response<String> {
    Response::builder()
        .status(code)
        .body(format!("status {code}"))
        .unwrap()
}

fn with_header(code: u16, name: &str, value: HeaderValue) -> Response<String> {
    let mut res = status(code);
    res.headers_mut().insert(
        http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
        value,
    );
    res
}

/// 100 ms without jitter, 3 retries, 10 s (or `total`).
fn policy(total: Duration) -> RetryPolicy {
    RetryPolicy::builder()
        .max_total_time(total)
        .backoff(Backoff::exponential(ms(100), 2.0, secs(10)))
        .jitter(Jitter::None)
        .seed(1)
        .build()
        .unwrap()
}

fn layer() -> RetryLayer {
    RetryLayer::new()
        .policy(policy(secs(10)))
        .budgets(Budgets::none())
}

fn get() -> Request<String> {
    Request::get("/v1/models").body(String::new()).unwrap()
}

async fn send<S>(svc: &mut S, req: Request<String>) -> Result<S::Response, S::Error>
where
    S: Service<Request<String>>,
{
    svc.ready().await?.call(req).await
}

fn info(res: &Response<String>) -> &RetryInfo {
    res.extensions().get::<RetryInfo>().expect("RetryInfo")
}

/// One call through `layer`: the first response from `first`, then 200. Returns the response,
/// the number of attempts and the gap between the first two.
async fn first_then_ok(
    layer: RetryLayer,
    first: impl Fn() -> Response<String> + Send + Sync + 'static,
) -> (Response<String>, usize, Option<Duration>, Duration) {
    let log = Log::default();
    let mut svc = layer.layer(scripted(
        log.clone(),
        Arc::new(move |n| Ok(if n == 0 { first() } else { status(200) })),
    ));
    let start = Instant::now();
    let res = send(&mut svc, get()).await.unwrap();
    let elapsed = start.elapsed();
    let at = log.at();
    let gap = (at.len() >= 2).then(|| at[1] - at[0]);
    (res, at.len(), gap, elapsed)
}

// ---------------------------------------------------------------------------------------------
// Statuses.

#[tokio::test(start_paused = true)]
async fn retryable_statuses_are_retried_with_their_kind() {
    let table = [
        (408, ErrorKind::Timeout),
        (409, ErrorKind::Conflict),
        (429, ErrorKind::RateLimited),
        (500, ErrorKind::ServerError),
        (502, ErrorKind::ServerError),
        (503, ErrorKind::Overloaded),
        (504, ErrorKind::Timeout),
        (529, ErrorKind::Overloaded),
        (599, ErrorKind::ServerError),
    ];
    for (code, kind) in table {
        let st = StatusCode::from_u16(code).unwrap();
        assert_eq!(
            LlmHttp::classify_parts(st, &HeaderMap::new()),
            Outcome::Retry { kind, after: None },
            "{code}"
        );
        let log = Log::default();
        let mut svc = layer().layer(scripted(log.clone(), Arc::new(move |_| Ok(status(code)))));
        let res = send(&mut svc, get()).await.unwrap();
        assert_eq!(res.status(), code);
        assert_eq!(res.body(), &format!("status {code}"));
        assert_eq!(log.count(), 4, "{code} is retried 3 times");
        let info = info(&res);
        assert_eq!(info.attempts, 4);
        assert_eq!(info.last_error, Some(kind), "{code}");
        assert_eq!(
            info.outcome,
            CallOutcome::Stopped(StopReason::Exhausted { max_retries: 3 })
        );
    }
}

#[tokio::test(start_paused = true)]
async fn client_errors_are_never_retried() {
    for code in [400, 401, 403, 404, 422] {
        let st = StatusCode::from_u16(code).unwrap();
        assert_eq!(
            LlmHttp::classify_parts(st, &HeaderMap::new()),
            Outcome::Fail {
                kind: ErrorKind::ClientError
            },
            "{code}"
        );
        let log = Log::default();
        let mut svc = layer().layer(scripted(log.clone(), Arc::new(move |_| Ok(status(code)))));
        let start = Instant::now();
        let res = send(&mut svc, get()).await.unwrap();
        assert_eq!(res.status(), code);
        assert_eq!(log.count(), 1, "{code} is not retried");
        assert_eq!(start.elapsed(), Duration::ZERO);
        let info = info(&res);
        assert_eq!(info.last_error, Some(ErrorKind::ClientError));
        assert_eq!(info.outcome, CallOutcome::Stopped(StopReason::NotRetryable));
    }
}

#[tokio::test(start_paused = true)]
async fn success_statuses_are_successes() {
    for code in [200, 201, 204, 301, 304] {
        let st = StatusCode::from_u16(code).unwrap();
        assert_eq!(
            LlmHttp::classify_parts(st, &HeaderMap::new()),
            Outcome::Success
        );
        let log = Log::default();
        let mut svc = layer().layer(scripted(log.clone(), Arc::new(move |_| Ok(status(code)))));
        let res = send(&mut svc, get()).await.unwrap();
        assert_eq!(res.status(), code);
        assert_eq!(log.count(), 1);
        assert_eq!(info(&res).outcome, CallOutcome::Succeeded);
        assert_eq!(info(&res).attempts, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_true_retries_a_400() {
    let (res, attempts, _, _) = first_then_ok(layer(), || {
        with_header(400, "x-should-retry", HeaderValue::from_static("true"))
    })
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(attempts, 2);
    assert_eq!(info(&res).last_error, Some(ErrorKind::ClientError));
    assert_eq!(info(&res).outcome, CallOutcome::Recovered);
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_false_stops_a_503() {
    let (res, attempts, _, _) = first_then_ok(layer(), || {
        with_header(503, "x-should-retry", HeaderValue::from_static("false"))
    })
    .await;
    assert_eq!(res.status(), 503);
    assert_eq!(attempts, 1);
    assert_eq!(
        info(&res).outcome,
        CallOutcome::Stopped(StopReason::NotRetryable)
    );
    assert_eq!(info(&res).last_error, Some(ErrorKind::Overloaded));
}

// ---------------------------------------------------------------------------------------------
// Retry-After.

#[tokio::test(start_paused = true)]
async fn retry_after_ms_is_honoured() {
    let (res, attempts, gap, _) = first_then_ok(layer(), || {
        with_header(429, "retry-after-ms", HeaderValue::from_static("1500"))
    })
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(attempts, 2);
    let gap = gap.unwrap();
    assert!(gap >= ms(1500) && gap <= ms(1500) + MS, "{gap:?}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_ms_with_decimals_is_honoured() {
    let (_, attempts, gap, _) = first_then_ok(layer(), || {
        with_header(429, "retry-after-ms", HeaderValue::from_static("250.5"))
    })
    .await;
    assert_eq!(attempts, 2);
    let gap = gap.unwrap();
    assert!(
        gap >= Duration::from_micros(250_500) && gap <= ms(252),
        "{gap:?}"
    );
    assert_eq!(
        LlmHttp::parse_retry_after_ms(b"250.5"),
        Some(Duration::from_micros(250_500))
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_delta_seconds_is_honoured() {
    let (_, attempts, gap, _) = first_then_ok(layer(), || {
        with_header(503, "retry-after", HeaderValue::from_static("2"))
    })
    .await;
    assert_eq!(attempts, 2);
    let gap = gap.unwrap();
    assert!(gap >= secs(2) && gap <= secs(2) + MS, "{gap:?}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_ms_wins_over_retry_after() {
    let (_, _, gap, _) = first_then_ok(layer(), || {
        let mut res = with_header(429, "retry-after-ms", HeaderValue::from_static("300"));
        res.headers_mut()
            .insert("retry-after", HeaderValue::from_static("5"));
        res
    })
    .await;
    let gap = gap.unwrap();
    assert!(gap >= ms(300) && gap <= ms(301), "{gap:?}");

    // An unusable retry-after-ms falls through to Retry-After.
    let (_, _, gap, _) = first_then_ok(layer(), || {
        let mut res = with_header(429, "retry-after-ms", HeaderValue::from_static("soon"));
        res.headers_mut()
            .insert("retry-after", HeaderValue::from_static("3"));
        res
    })
    .await;
    let gap = gap.unwrap();
    assert!(gap >= secs(3) && gap <= secs(3) + MS, "{gap:?}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_date_in_the_future_is_honoured() {
    let (_, attempts, gap, _) = first_then_ok(layer(), || {
        let date = httpdate::fmt_http_date(SystemTime::now() + secs(5));
        with_header(503, "retry-after", HeaderValue::from_str(&date).unwrap())
    })
    .await;
    assert_eq!(attempts, 2);
    let gap = gap.unwrap();
    // The date has a 1 s resolution, and a little real time passes.
    assert!(gap >= secs(3) && gap <= secs(5) + MS, "{gap:?}");

    let now = SystemTime::UNIX_EPOCH + secs(1_700_000_000);
    let date = httpdate::fmt_http_date(now + secs(42));
    assert_eq!(
        LlmHttp::parse_retry_after(date.as_bytes(), now),
        Some(secs(42))
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_date_in_the_past_is_ignored() {
    let (_, attempts, gap, _) = first_then_ok(layer(), || {
        let date = httpdate::fmt_http_date(SystemTime::now() - secs(30));
        with_header(503, "retry-after", HeaderValue::from_str(&date).unwrap())
    })
    .await;
    assert_eq!(attempts, 2);
    let gap = gap.unwrap();
    assert!(gap >= ms(100) && gap <= ms(101), "backoff only: {gap:?}");

    let now = SystemTime::UNIX_EPOCH + secs(1_700_000_000);
    let past = httpdate::fmt_http_date(now - secs(1));
    assert_eq!(LlmHttp::parse_retry_after(past.as_bytes(), now), None);
    let same = httpdate::fmt_http_date(now);
    assert_eq!(LlmHttp::parse_retry_after(same.as_bytes(), now), None);
}

#[tokio::test(start_paused = true)]
async fn garbage_retry_after_falls_back_to_backoff() {
    // (A number too large for a `Duration` is not garbage: it is a hint past the cap, and
    // stops; see tests/client_retry_after.rs.)
    let garbage: [&[u8]; 11] = [
        b"-5",
        b"-0.5",
        b"abc",
        b"",
        "\u{0663}".as_bytes(), // Arabic-Indic digit three
        "\u{FF15}".as_bytes(), // fullwidth 5
        b"1e3",
        b"+5",
        b"NaN",
        b"inf",
        b"1.2.3",
    ];
    for value in garbage {
        assert_eq!(
            LlmHttp::parse_retry_after(value, SystemTime::now()),
            None,
            "{value:?}"
        );
        assert_eq!(LlmHttp::parse_retry_after_ms(value), None, "{value:?}");
        for header in ["retry-after", "retry-after-ms"] {
            let v = HeaderValue::from_bytes(value).unwrap();
            let (res, attempts, gap, _) =
                first_then_ok(layer(), move || with_header(503, header, v.clone())).await;
            assert_eq!(res.status(), 200, "{header}: {value:?}");
            assert_eq!(attempts, 2, "{header}: {value:?}");
            let gap = gap.unwrap();
            assert!(
                gap >= ms(100) && gap <= ms(101),
                "{header}: {value:?} → backoff only, got {gap:?}"
            );
        }
    }
}

#[test]
fn valid_retry_after_values_parse() {
    let now = SystemTime::now();
    assert_eq!(LlmHttp::parse_retry_after(b"0", now), Some(Duration::ZERO));
    assert_eq!(LlmHttp::parse_retry_after(b"120", now), Some(secs(120)));
    assert_eq!(LlmHttp::parse_retry_after(b" 7 ", now), Some(secs(7)));
    assert_eq!(LlmHttp::parse_retry_after_ms(b"20"), Some(ms(20)));
    assert_eq!(
        LlmHttp::parse_retry_after_ms(b"0.5"),
        Some(Duration::from_micros(500))
    );
}

#[tokio::test(start_paused = true)]
async fn hint_above_max_retry_after_fails_fast() {
    for (name, value, hint) in [
        ("retry-after", "61", secs(61)),
        ("retry-after-ms", "60001", ms(60_001)),
    ] {
        let layer = RetryLayer::new()
            .policy(policy(secs(600)))
            .budgets(Budgets::none());
        let (res, attempts, _, elapsed) = first_then_ok(layer, move || {
            with_header(429, name, HeaderValue::from_static(value))
        })
        .await;
        assert_eq!(res.status(), 429);
        assert_eq!(attempts, 1, "{name}: {value}");
        assert_eq!(elapsed, Duration::ZERO, "no sleep before giving up");
        assert_eq!(
            info(&res).outcome,
            CallOutcome::Stopped(StopReason::HintTooLong {
                hint,
                max: secs(60)
            })
        );
        assert_eq!(info(&res).total_delay, Duration::ZERO);
    }
}

#[tokio::test(start_paused = true)]
async fn max_retry_after_is_configurable() {
    let p = RetryPolicy::builder()
        .max_retry_after(secs(5))
        .max_total_time(secs(60))
        .seed(1)
        .build()
        .unwrap();
    let l = RetryLayer::new().policy(p).budgets(Budgets::none());
    let (res, attempts, _, elapsed) = first_then_ok(l, || {
        with_header(429, "retry-after", HeaderValue::from_static("6"))
    })
    .await;
    assert_eq!(attempts, 1);
    assert_eq!(elapsed, Duration::ZERO);
    assert_eq!(
        info(&res).outcome,
        CallOutcome::Stopped(StopReason::HintTooLong {
            hint: secs(6),
            max: secs(5)
        })
    );
}

#[tokio::test(start_paused = true)]
async fn hint_crossing_the_deadline_fails_fast() {
    // 30 s is within max_retry_after (60 s) but past the 10 s total time.
    let (res, attempts, _, elapsed) = first_then_ok(layer(), || {
        with_header(503, "retry-after", HeaderValue::from_static("30"))
    })
    .await;
    assert_eq!(res.status(), 503);
    assert_eq!(attempts, 1);
    assert_eq!(elapsed, Duration::ZERO);
    match &info(&res).outcome {
        CallOutcome::Stopped(StopReason::HintTooLong { hint, max }) => {
            assert_eq!(*hint, secs(30));
            assert!(*max <= secs(10), "{max:?}");
        }
        other => panic!("{other:?}"),
    }

    // A hint within the deadline is waited for.
    let (res, attempts, gap, _) = first_then_ok(layer(), || {
        with_header(503, "retry-after", HeaderValue::from_static("8"))
    })
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(attempts, 2);
    assert!(gap.unwrap() >= secs(8));
}

#[tokio::test(start_paused = true)]
async fn delay_is_the_longer_of_backoff_and_hint() {
    // Hint longer than the backoff: the hint.
    let (_, _, gap, _) = first_then_ok(layer(), || {
        with_header(429, "retry-after", HeaderValue::from_static("2"))
    })
    .await;
    assert!(gap.unwrap() >= secs(2), "{gap:?}");

    // Hint shorter than the backoff: the backoff (the hint is a floor, not a replacement).
    let p = RetryPolicy::builder()
        .backoff(Backoff::exponential(ms(500), 2.0, secs(10)))
        .jitter(Jitter::None)
        .seed(1)
        .build()
        .unwrap();
    let l = RetryLayer::new().policy(p).budgets(Budgets::none());
    let (_, _, gap, _) = first_then_ok(l, || {
        with_header(429, "retry-after-ms", HeaderValue::from_static("10"))
    })
    .await;
    let gap = gap.unwrap();
    assert!(gap >= ms(500) && gap <= ms(501), "{gap:?}");
}

#[tokio::test(start_paused = true)]
async fn hint_is_reported_in_the_outcome() {
    let mut headers = HeaderMap::new();
    headers.insert("retry-after-ms", HeaderValue::from_static("1234"));
    assert_eq!(
        LlmHttp::classify_parts(StatusCode::TOO_MANY_REQUESTS, &headers),
        Outcome::Retry {
            kind: ErrorKind::RateLimited,
            after: Some(ms(1234))
        }
    );
    // A hint on a non-retryable status does not make it retryable.
    assert_eq!(
        LlmHttp::classify_parts(StatusCode::BAD_REQUEST, &headers),
        Outcome::Fail {
            kind: ErrorKind::ClientError
        }
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn retry_after_parsers_never_panic_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let now = SystemTime::now();
        let _ = LlmHttp::parse_retry_after(&bytes, now);
        let _ = LlmHttp::parse_retry_after(&bytes, SystemTime::UNIX_EPOCH);
        if LlmHttp::parse_retry_after_ms(&bytes).is_some() {
            let text = std::str::from_utf8(&bytes).unwrap().trim();
            prop_assert!(text.bytes().all(|b| b.is_ascii_digit() || b == b'.'), "{:?}", text);
        }
    }

    #[test]
    fn retry_after_parsers_never_panic_on_numbers(text in "[0-9.+\\- e]{0,40}") {
        let _ = LlmHttp::parse_retry_after(text.as_bytes(), SystemTime::now());
        let _ = LlmHttp::parse_retry_after_ms(text.as_bytes());
    }

    #[test]
    fn integer_retry_after_parses_exactly(n in 0u64..1_000_000_000) {
        let text = n.to_string();
        prop_assert_eq!(LlmHttp::parse_retry_after(text.as_bytes(), SystemTime::now()), Some(secs(n)));
        prop_assert_eq!(LlmHttp::parse_retry_after_ms(text.as_bytes()), Some(ms(n)));
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

#[tokio::test(start_paused = true)]
async fn tower_timeout_elapsed_inside_the_retry_layer_is_retried() {
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let slow = tower::service_fn(move |_req: Request<String>| {
        let n = {
            let mut c = c.lock().unwrap();
            *c += 1;
            *c
        };
        async move {
            if n <= 2 {
                tokio::time::sleep(secs(5)).await;
            }
            Ok::<_, io::Error>(status(200))
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(layer())
        .layer(tower::timeout::TimeoutLayer::new(secs(1)))
        .service(slow);
    let start = Instant::now();
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(*calls.lock().unwrap(), 3);
    assert_eq!(info(&res).last_error, Some(ErrorKind::Timeout));
    assert_eq!(info(&res).outcome, CallOutcome::Recovered);
    // Two timeouts of 1 s, then 100 + 200 ms of backoff.
    let elapsed = start.elapsed();
    assert!(elapsed >= ms(2300) && elapsed <= ms(2310), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn tower_timeout_elapsed_exhausts_with_the_elapsed_error() {
    let slow = tower::service_fn(|_req: Request<String>| async {
        tokio::time::sleep(secs(5)).await;
        Ok::<_, io::Error>(status(200))
    });
    let mut svc = ServiceBuilder::new()
        .layer(layer())
        .layer(tower::timeout::TimeoutLayer::new(secs(1)))
        .service(slow);
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(err.reason(), &StopReason::Exhausted { max_retries: 3 });
    assert_eq!(err.attempts(), 4);
    assert_eq!(err.kind(), Some(ErrorKind::Timeout));
    let inner = err.into_inner().unwrap();
    assert!(inner.is::<tower::timeout::error::Elapsed>(), "{inner}");
}

async fn io_error_then_ok(kind: io::ErrorKind) -> (usize, Result<Response<String>, String>) {
    let log = Log::default();
    let mut svc = layer().layer(scripted(
        log.clone(),
        Arc::new(move |n| {
            if n == 0 {
                Err(io::Error::from(kind))
            } else {
                Ok(status(200))
            }
        }),
    ));
    let res = send(&mut svc, get()).await.map_err(|e| {
        format!(
            "{}|{:?}|{:?}",
            e.reason().as_str(),
            e.kind(),
            e.inner().map(|i| i.kind())
        )
    });
    (log.count(), res)
}

#[tokio::test(start_paused = true)]
async fn timeout_and_connection_io_errors_are_retried() {
    for (kind, want) in [
        (io::ErrorKind::TimedOut, ErrorKind::Timeout),
        (io::ErrorKind::ConnectionRefused, ErrorKind::Connect),
        (io::ErrorKind::ConnectionReset, ErrorKind::Connect),
    ] {
        let (calls, res) = io_error_then_ok(kind).await;
        let res = res.unwrap();
        assert_eq!(calls, 2, "{kind:?}");
        assert_eq!(info(&res).last_error, Some(want), "{kind:?}");
        assert_eq!(info(&res).outcome, CallOutcome::Recovered);
    }
}

#[tokio::test(start_paused = true)]
async fn other_io_errors_are_not_retried() {
    for kind in [
        io::ErrorKind::PermissionDenied,
        io::ErrorKind::NotFound,
        io::ErrorKind::InvalidData,
        io::ErrorKind::Other,
    ] {
        let (calls, res) = io_error_then_ok(kind).await;
        assert_eq!(calls, 1, "{kind:?}");
        assert_eq!(
            res.unwrap_err(),
            format!("not_retryable|Some(Other)|Some({kind:?})")
        );
    }
}

#[derive(Debug)]
struct Wrapper(io::Error);

impl fmt::Display for Wrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request failed")
    }
}

impl StdError for Wrapper {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

#[test]
fn error_classifier_walks_the_source_chain() {
    let reset = Wrapper(io::Error::from(io::ErrorKind::ConnectionReset));
    assert_eq!(
        Errors::classify_error(&reset),
        Outcome::retry(ErrorKind::Connect)
    );
    let boxed: Box<dyn StdError + Send + Sync> =
        Box::new(Wrapper(io::Error::from(io::ErrorKind::TimedOut)));
    assert_eq!(
        Classify::<(), _>::classify(&Errors, &Err(boxed)),
        Outcome::retry(ErrorKind::Timeout)
    );
    let denied = Wrapper(io::Error::from(io::ErrorKind::PermissionDenied));
    assert_eq!(
        Errors::classify_error(&denied),
        Outcome::Fail {
            kind: ErrorKind::Other
        }
    );
    assert_eq!(
        Classify::<(), io::Error>::classify(&Errors, &Ok(())),
        Outcome::Success
    );
}

// ---------------------------------------------------------------------------------------------
// Closures.

#[tokio::test(start_paused = true)]
async fn a_closure_classifier_replaces_the_preset() {
    let log = Log::default();
    let l = layer().classify(|r: &Result<Response<String>, io::Error>| match r {
        Ok(res) if res.body() == "busy" => Outcome::retry(ErrorKind::Other),
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Fail {
            kind: ErrorKind::Other,
        },
    });
    let mut svc = l.layer(scripted(
        log.clone(),
        Arc::new(|n| {
            Ok(match n {
                0 => Response::new("busy".to_string()),
                // A 503 is a success to this classifier: not retried.
                _ => status(503),
            })
        }),
    ));
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(log.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn or_extends_the_preset_with_a_body_check() {
    let body_check = |r: &Result<Response<String>, io::Error>| match r {
        Ok(res) if !res.body().starts_with('{') => Outcome::retry(ErrorKind::OutputInvalid),
        _ => Outcome::Success,
    };
    let log = Log::default();
    let l = layer().classify(LlmHttp.or(body_check)).on_retry(
        |req: &mut Request<String>,
         _: &Result<Response<String>, io::Error>,
         _: &tower_retry_guard::retry::RetryContext| {
            req.body_mut().push_str(" (answer in JSON)");
            true
        },
    );
    let mut svc = l.layer(scripted(
        log.clone(),
        Arc::new(|n| {
            Ok(match n {
                // The preset still decides first: a 503 is retried.
                0 => status(503),
                1 => Response::new("not json".to_string()),
                _ => Response::new("{}".to_string()),
            })
        }),
    ));
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "{}");
    assert_eq!(log.count(), 3);
    // The preset attaches the info through `or`.
    assert_eq!(info(&res).last_error, Some(ErrorKind::OutputInvalid));
    assert_eq!(info(&res).outcome, CallOutcome::Recovered);

    // The preset's failures stay failures.
    assert_eq!(
        LlmHttp
            .or(body_check)
            .classify(&Ok(Response::new("{}".to_string()))),
        Outcome::Success
    );
    assert_eq!(
        LlmHttp.or(body_check).classify(&Ok(status(400))),
        Outcome::Fail {
            kind: ErrorKind::ClientError
        }
    );
}

#[tokio::test(start_paused = true)]
async fn retry_info_survives_a_validator_placed_before_the_preset() {
    // A closure attaches nothing: `validator.or(LlmHttp)` hands the info to the preset
    // (before, only the first classifier was asked, and the info was lost).
    let validator = |r: &Result<Response<String>, io::Error>| match r {
        Ok(res) if res.body() == "bad" => Outcome::retry(ErrorKind::OutputInvalid),
        _ => Outcome::Success,
    };
    let mut svc = layer().classify(validator.or(LlmHttp)).layer(scripted(
        Log::default(),
        Arc::new(|n| {
            Ok(match n {
                0 => status(503),
                _ => Response::new("{}".to_string()),
            })
        }),
    ));
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(info(&res).attempts, 2);
    assert_eq!(info(&res).outcome, CallOutcome::Recovered);
    // On a first-attempt success too.
    let mut svc = layer().classify(validator.or(LlmHttp)).layer(scripted(
        Log::default(),
        Arc::new(|_| Ok(Response::new("{}".to_string()))),
    ));
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(info(&res).outcome, CallOutcome::Succeeded);
}

mod replayed_and_late {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use http::{Request, Response};
    use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
    use tower_retry_guard::{
        Backoff, Budgets, CallOutcome, ErrorKind, RetryInfo, RetryLayer, RetryPolicy, StopReason,
    };

    #[tokio::test(start_paused = true)]
    async fn a_replayed_server_error_is_not_retried() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let mut svc = ServiceBuilder::new()
            .layer(RetryLayer::new().budgets(Budgets::none()))
            .service_fn(move |_: Request<String>| {
                c.fetch_add(1, Ordering::SeqCst);
                async move {
                    Ok::<_, BoxError>(
                        Response::builder()
                            .status(500)
                            .header("idempotent-replayed", "true")
                            .body(String::new())?,
                    )
                }
            });
        let req = Request::post("/tools/send_email")
            .body(String::new())
            .unwrap();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), 500);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let info = res.extensions().get::<RetryInfo>().unwrap();
        assert_eq!(info.last_error, Some(ErrorKind::ServerError));
        assert_eq!(info.outcome, CallOutcome::Stopped(StopReason::NotRetryable));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_ends_past_the_deadline_stops_on_the_deadline_even_with_a_zero_hint() {
        let policy = RetryPolicy::builder()
            .max_total_time(Duration::from_secs(1))
            .backoff(Backoff::Constant(Duration::ZERO))
            .build()
            .unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(RetryLayer::new().policy(policy).budgets(Budgets::none()))
            .service_fn(|_: Request<String>| async move {
                // The attempt alone outlasts the call's total time.
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(503)
                        .header("retry-after", "0")
                        .body(String::new())?,
                )
            });
        let started = tokio::time::Instant::now();
        // The attempt is dropped at the deadline: no answer to return, an error that says so.
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(Request::get("/").body(String::new()).unwrap())
            .await
            .unwrap_err();
        assert!(started.elapsed() <= Duration::from_millis(1001));
        let info = err.info();
        assert_eq!(info.attempts, 1);
        assert_eq!(
            info.outcome,
            CallOutcome::Stopped(StopReason::Deadline {
                max_total_time: Duration::from_secs(1)
            })
        );
    }
}
