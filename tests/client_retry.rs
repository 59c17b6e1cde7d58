//! The behaviours tower's own retry tests check (tower/tests/retry/main.rs), and the ones this
//! layer adds: responses on the last attempt, total time, stacking.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::request::{CloneBody, HeaderNames, InvalidKey};
use tower_retry_guard::retry::RetryContext;
use tower_retry_guard::{
    Backoff, Budgets, CallOutcome, ErrorKind, IdempotencyKey, Jitter, Outcome, RetryInfo,
    RetryLayer, RetryPolicy, RetryRequest, SideEffect, StopReason,
};

mod common;
use common::{ms, secs};

#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    headers: HeaderMap,
    body: String,
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

type Script = Arc<dyn Fn(usize) -> Result<Response<String>, io::Error> + Send + Sync>;

fn scripted(
    log: Log,
    script: Script,
) -> impl Service<Request<String>, Response = Response<String>, Error = io::Error> + Clone {
    tower::service_fn(move |req: Request<String>| {
        let n = {
            let mut seen = log.0.lock().unwrap();
            seen.push(Seen {
                at: Instant::now(),
                headers: req.headers().clone(),
                body: req.body().clone(),
            });
            seen.len() - 1
        };
        std::future::ready(script(n))
    })
}

fn status(code: u16, body: &str) -> Response<String> {
    Response::builder()
        .status(code)
        .body(body.to_string())
        .unwrap()
}

fn layer() -> RetryLayer {
    RetryLayer::new()
        .policy(RetryPolicy::builder().seed(1).build().unwrap())
        .budgets(Budgets::none())
}

fn get(body: &str) -> Request<String> {
    Request::get("/v1/models").body(body.to_string()).unwrap()
}

async fn send<S, R>(svc: &mut S, req: R) -> Result<S::Response, S::Error>
where
    S: Service<R>,
{
    svc.ready().await?.call(req).await
}

fn info<B>(res: &Response<B>) -> &RetryInfo {
    res.extensions().get::<RetryInfo>().expect("RetryInfo")
}

fn io_err(n: usize) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, format!("reset {n}"))
}

#[tokio::test(start_paused = true)]
async fn errors_are_retried() {
    let log = Log::default();
    let mut svc = layer().layer(scripted(
        log.clone(),
        Arc::new(|n| {
            if n < 2 {
                Err(io_err(n))
            } else {
                Ok(status(200, "ok"))
            }
        }),
    ));
    let res = send(&mut svc, get("")).await.unwrap();
    assert_eq!(res.body(), "ok");
    assert_eq!(log.count(), 3);
    assert_eq!(info(&res).attempts, 3);
    assert_eq!(info(&res).retries, 2);
    assert_eq!(info(&res).outcome, CallOutcome::Recovered);
}

#[tokio::test(start_paused = true)]
async fn the_limit_returns_the_last_error() {
    let log = Log::default();
    let mut svc = layer().layer(scripted(log.clone(), Arc::new(|n| Err(io_err(n)))));
    let err = send(&mut svc, get("")).await.unwrap_err();
    assert_eq!(log.count(), 4);
    assert_eq!(err.reason(), &StopReason::Exhausted { max_retries: 3 });
    assert_eq!(err.attempts(), 4);
    assert_eq!(err.info().retries, 3);
    assert_eq!(err.kind(), Some(ErrorKind::Connect));
    assert!(err.total_delay() >= ms(50 + 100 + 200));
    // The inner error is the source, not repeated in the message (reporters print both).
    assert!(!err.to_string().contains("reset 3"), "{err}");
    let source = std::error::Error::source(&err).expect("source");
    assert_eq!(source.to_string(), "reset 3");
    let inner = err.into_inner().unwrap();
    assert_eq!(
        inner.to_string(),
        "reset 3",
        "the last error, not the first"
    );
}

#[tokio::test(start_paused = true)]
async fn error_inspection_decides_what_is_retried() {
    let classify = |r: &Result<Response<String>, io::Error>| match r {
        Ok(_) => Outcome::Success,
        Err(e) if e.to_string().contains("retry") => Outcome::retry(ErrorKind::Other),
        Err(_) => Outcome::Fail {
            kind: ErrorKind::Other,
        },
    };
    let log = Log::default();
    let mut svc = layer().classify(classify).layer(scripted(
        log.clone(),
        Arc::new(|n| Err(io::Error::other(if n == 0 { "retry me" } else { "fatal" }))),
    ));
    let err = send(&mut svc, get("")).await.unwrap_err();
    assert_eq!(
        log.count(),
        2,
        "retried once, then stopped on the fatal error"
    );
    assert_eq!(err.reason(), &StopReason::NotRetryable);
    assert_eq!(err.into_inner().unwrap().to_string(), "fatal");
}

/// A body that cannot be replayed (a stream).
#[derive(Debug)]
struct Streaming(String);

impl CloneBody for Streaming {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
    type Writer = Buf;
    fn make_writer(&'a self) -> Buf {
        self.clone()
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The process-wide subscriber, writing to a buffer. Global rather than scoped: a scoped
/// subscriber can miss events whose callsite another test thread registered first (tracing
/// caches callsite interest process-wide). Other tests write here too: filter by operation.
fn capture() -> Buf {
    static BUF: std::sync::OnceLock<Buf> = std::sync::OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Buf::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::set_global_default(sub).unwrap();
        buf
    })
    .clone()
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_cloned_passes_the_first_result_through() {
    let logs = capture();
    let calls = Arc::new(Mutex::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |req: Request<Streaming>| {
        *c.lock().unwrap() += 1;
        assert_eq!(req.body().0, "stream");
        std::future::ready(Ok::<_, io::Error>(status(503, "busy")))
    });
    let mut svc = layer().layer(inner);
    let req = Request::get("/v1/stream")
        .body(Streaming("stream".into()))
        .unwrap();
    let res = send(&mut svc, req).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.body(), "busy");
    assert_eq!(*calls.lock().unwrap(), 1);
    assert_eq!(
        info(&res).outcome,
        CallOutcome::Stopped(StopReason::NotCloneable)
    );
    assert_eq!(
        info(&res).operation.as_ref().map(|o| o.as_str()),
        Some("GET /v1/stream"),
        "an attempt failed: the operation is named"
    );
    let text = logs.text();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("/v1/stream"))
        .filter(|l| l.contains("WARN") && l.contains("retries are off"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(warnings[0].contains("GET /v1/stream"), "{text}");
    // The give-up event names the operation too (not a generic "call").
    let gave_up: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("gave up") && l.contains("/v1/stream"))
        .collect();
    assert_eq!(gave_up.len(), 1, "{text}");
    assert!(gave_up[0].contains("not_cloneable"), "{text}");
    assert!(gave_up[0].contains("GET /v1/stream"), "{text}");

    // Warned once per service; later occurrences at debug.
    let req = Request::get("/v1/stream")
        .body(Streaming("stream".into()))
        .unwrap();
    send(&mut svc, req).await.unwrap();
    let text = logs.text();
    let warnings = text
        .lines()
        .filter(|l| l.contains("/v1/stream"))
        .filter(|l| l.contains("WARN") && l.contains("retries are off"))
        .count();
    assert_eq!(warnings, 1, "{text}");
    assert!(
        text.lines().any(|l| l.contains("DEBUG")
            && l.contains("retries are off")
            && l.contains("/v1/stream")),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_error_on_a_request_that_cannot_be_cloned_is_returned_with_the_reason() {
    let calls = Arc::new(Mutex::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_req: Request<Streaming>| {
        *c.lock().unwrap() += 1;
        std::future::ready(Err::<Response<String>, _>(io_err(0)))
    });
    let mut svc = layer().layer(inner);
    let req = Request::get("/x").body(Streaming(String::new())).unwrap();
    let err = send(&mut svc, req).await.unwrap_err();
    assert_eq!(*calls.lock().unwrap(), 1);
    assert_eq!(err.reason(), &StopReason::NotCloneable);
    assert_eq!(err.into_inner().unwrap().to_string(), "reset 0");
}

#[tokio::test(start_paused = true)]
async fn success_without_clone() {
    let inner = tower::service_fn(|req: Request<Streaming>| {
        std::future::ready(Ok::<_, io::Error>(status(200, &req.into_body().0)))
    });
    let mut svc = layer().layer(inner);
    let req = Request::get("/x").body(Streaming("hello".into())).unwrap();
    let res = send(&mut svc, req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.body(), "hello");
    assert_eq!(info(&res).outcome, CallOutcome::Succeeded);
    assert_eq!(info(&res).attempts, 1);
}

/// A request type of its own that cannot be cloned.
#[derive(Debug)]
struct OneShot(u32);

impl RetryRequest for OneShot {
    fn try_clone(&self) -> Option<Self> {
        None
    }
    fn side_effect(&self) -> SideEffect {
        SideEffect::ReadOnly
    }
    fn idempotency_key(&self, _: &HeaderNames) -> Result<Option<IdempotencyKey>, InvalidKey> {
        Ok(None)
    }
    fn set_idempotency_key(&mut self, _: &IdempotencyKey, _: &HeaderNames) {}
}

#[tokio::test(start_paused = true)]
async fn a_custom_request_that_cannot_be_cloned_is_not_retried() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c = calls.clone();
    let inner = tower::service_fn(move |req: OneShot| {
        c.lock().unwrap().push(req.0);
        std::future::ready(Err::<String, _>(io_err(0)))
    });
    let mut svc = layer()
        .classify(tower_retry_guard::classify::Errors)
        .layer(inner);
    let err = send(&mut svc, OneShot(7)).await.unwrap_err();
    assert_eq!(*calls.lock().unwrap(), vec![7]);
    assert_eq!(err.reason(), &StopReason::NotCloneable);
    assert_eq!(err.kind(), Some(ErrorKind::Connect));
}

#[tokio::test(start_paused = true)]
async fn the_request_can_be_changed_between_attempts() {
    let contexts = Arc::new(Mutex::new(Vec::new()));
    let ctx = contexts.clone();
    let log = Log::default();
    let l = layer().on_retry(
        move |req: &mut Request<String>,
              failed: &Result<Response<String>, io::Error>,
              c: &RetryContext| {
            ctx.lock()
                .unwrap()
                .push((c.retry, c.kind, failed.as_ref().map(|r| r.status()).ok()));
            req.headers_mut()
                .insert("x-fallback-model", c.retry.to_string().parse().unwrap());
            req.body_mut().push('+');
            // Ignored for failures other than output failures: the retry happens anyway.
            false
        },
    );
    let mut svc = l.layer(scripted(
        log.clone(),
        Arc::new(|n| {
            Ok(if n < 2 {
                status(503, "")
            } else {
                status(200, "ok")
            })
        }),
    ));
    let res = send(&mut svc, get("q")).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = log.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen.iter().map(|s| s.body.as_str()).collect::<Vec<_>>(),
        ["q", "q+", "q++"]
    );
    assert!(seen[0].headers.get("x-fallback-model").is_none());
    assert_eq!(seen[1].headers["x-fallback-model"], "1");
    assert_eq!(seen[2].headers["x-fallback-model"], "2");
    assert_eq!(
        *contexts.lock().unwrap(),
        vec![
            (
                1,
                ErrorKind::Overloaded,
                Some(http::StatusCode::SERVICE_UNAVAILABLE)
            ),
            (
                2,
                ErrorKind::Overloaded,
                Some(http::StatusCode::SERVICE_UNAVAILABLE)
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_response_on_the_last_attempt_is_returned_as_the_response() {
    let log = Log::default();
    let mut svc = layer().layer(scripted(
        log.clone(),
        Arc::new(|n| {
            let mut res = status(503, &format!("overloaded {n}"));
            res.headers_mut()
                .insert("x-request-id", n.to_string().parse().unwrap());
            Ok(res)
        }),
    ));
    let res = send(&mut svc, get("")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.body(),
        "overloaded 3",
        "the last response, with its body"
    );
    assert_eq!(res.headers()["x-request-id"], "3");
    let info = info(&res);
    assert_eq!(info.attempts, 4);
    assert_eq!(info.retries, 3);
    assert_eq!(info.last_error, Some(ErrorKind::Overloaded));
    assert_eq!(
        info.outcome,
        CallOutcome::Stopped(StopReason::Exhausted { max_retries: 3 })
    );
    assert!(!info.outcome.is_success());
    assert_eq!(info.operation.as_ref().unwrap().as_str(), "GET /v1/models");
}

#[tokio::test(start_paused = true)]
async fn total_time_caps_the_retries() {
    let policy = RetryPolicy::builder()
        .max_retries(10)
        .max_total_time(secs(1))
        .backoff(Backoff::Constant(ms(400)))
        .jitter(Jitter::None)
        .seed(1)
        .build()
        .unwrap();
    let log = Log::default();
    let mut svc = RetryLayer::new()
        .policy(policy)
        .budgets(Budgets::none())
        .layer(scripted(log.clone(), Arc::new(|n| Err(io_err(n)))));
    let start = Instant::now();
    let err = send(&mut svc, get("")).await.unwrap_err();
    let at: Vec<Duration> = log.seen().iter().map(|s| s.at - start).collect();
    // 0, 400, 800 ms; a retry at 1200 ms would start after the total time.
    assert_eq!(at.len(), 3, "{at:?}");
    assert!(at.iter().all(|t| *t <= secs(1)), "{at:?}");
    assert!(at[2] >= ms(800) && at[2] <= ms(802), "{at:?}");
    assert_eq!(
        err.reason(),
        &StopReason::Deadline {
            max_total_time: secs(1)
        }
    );
    assert_eq!(err.attempts(), 3);
    // Gave up at once, without sleeping into the deadline.
    assert!(start.elapsed() <= ms(802), "{:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn stacked_retry_layers_do_not_multiply_attempts() {
    let log = Log::default();
    let mut svc = ServiceBuilder::new()
        .layer(layer())
        .layer(layer())
        .service(scripted(log.clone(), Arc::new(|_| Ok(status(503, "")))));
    let res = send(
        &mut svc,
        Request::post("/v1/tools/send").body(String::new()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(log.count(), 4, "4 attempts, not 16");
    // The response keeps the inner layer's account (the outer made one attempt and did
    // not retry): 4 attempts, exhausted.
    let outer = info(&res);
    assert_eq!(outer.attempts, 4);
    assert!(matches!(
        outer.outcome,
        CallOutcome::Stopped(StopReason::Exhausted { .. })
    ));
    // One key end to end: the outer layer's key is the one every inner attempt sent.
    let key = outer.key.clone().expect("a POST is keyed");
    for s in log.seen() {
        assert_eq!(&s.headers["idempotency-key"], key.header_value());
    }
}

#[tokio::test(start_paused = true)]
async fn stacked_retry_layers_do_not_multiply_attempts_on_errors() {
    let log = Log::default();
    let mut svc = ServiceBuilder::new()
        .layer(layer())
        .layer(layer())
        .service(scripted(log.clone(), Arc::new(|n| Err(io_err(n)))));
    let err = send(&mut svc, get("")).await.unwrap_err();
    assert_eq!(log.count(), 4, "4 attempts, not 16");
    assert_eq!(err.reason(), &StopReason::InnerGaveUp);
    assert_eq!(err.attempts(), 1);
    let inner = err.into_inner().unwrap();
    assert_eq!(inner.reason(), &StopReason::Exhausted { max_retries: 3 });
    assert_eq!(inner.attempts(), 4);
}

#[tokio::test(start_paused = true)]
async fn retries_off_makes_one_attempt() {
    let log = Log::default();
    let mut svc = RetryLayer::new()
        .policy(RetryPolicy::builder().max_retries(0).build().unwrap())
        .budgets(Budgets::none())
        .layer(scripted(log.clone(), Arc::new(|_| Ok(status(503, "")))));
    let res = send(&mut svc, get("")).await.unwrap();
    assert_eq!(log.count(), 1);
    assert_eq!(
        info(&res).outcome,
        CallOutcome::Stopped(StopReason::Exhausted { max_retries: 0 })
    );
}

#[tokio::test(start_paused = true)]
async fn every_failed_call_names_its_operation() {
    // Not retryable at the first attempt.
    let log = Log::default();
    let mut svc = layer().layer(scripted(log.clone(), Arc::new(|_| Ok(status(400, "")))));
    let res = send(&mut svc, get("")).await.unwrap();
    assert_eq!(
        info(&res).outcome,
        CallOutcome::Stopped(StopReason::NotRetryable)
    );
    assert_eq!(
        info(&res).operation.as_ref().map(|o| o.as_str()),
        Some("GET /v1/models")
    );

    // A connection error, not retryable by this classifier.
    let mut svc = layer()
        .classify(|r: &Result<Response<String>, io::Error>| match r {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Fail {
                kind: ErrorKind::Connect,
            },
        })
        .layer(scripted(log.clone(), Arc::new(|n| Err(io_err(n)))));
    let err = send(&mut svc, get("")).await.unwrap_err();
    assert_eq!(err.reason(), &StopReason::NotRetryable);
    assert_eq!(
        err.info().operation.as_ref().map(|o| o.as_str()),
        Some("GET /v1/models")
    );
    assert!(err.to_string().contains("of `GET /v1/models`"), "{err}");
}

/// A request that counts its copies, and may refuse to be copied after `clones_left`.
#[derive(Debug)]
struct Counted {
    clones: Arc<Mutex<u32>>,
    clones_left: u32,
}

impl RetryRequest for Counted {
    fn try_clone(&self) -> Option<Self> {
        if self.clones_left == 0 {
            return None;
        }
        *self.clones.lock().unwrap() += 1;
        Some(Counted {
            clones: self.clones.clone(),
            clones_left: self.clones_left - 1,
        })
    }
    fn side_effect(&self) -> SideEffect {
        SideEffect::Idempotent
    }
    fn idempotency_key(&self, _: &HeaderNames) -> Result<Option<IdempotencyKey>, InvalidKey> {
        Ok(None)
    }
    fn set_idempotency_key(&mut self, _: &IdempotencyKey, _: &HeaderNames) {}
}

fn counting_service(
    calls: Arc<Mutex<u32>>,
    fail_first: u32,
) -> impl Service<Counted, Response = String, Error = io::Error> + Clone {
    tower::service_fn(move |_req: Counted| {
        let n = {
            let mut c = calls.lock().unwrap();
            *c += 1;
            *c
        };
        std::future::ready(if n <= fail_first {
            Err(io_err(n as usize))
        } else {
            Ok("ok".to_string())
        })
    })
}

#[tokio::test(start_paused = true)]
async fn a_request_is_copied_once_per_attempt_that_may_follow() {
    for (fail_first, want_calls, want_clones) in [
        // Success at once: one copy (as tower's retry makes), kept for a retry.
        (0, 1, 1),
        // One retry: a copy for it, and one for the attempt after.
        (1, 2, 2),
        // Exhausted: copies for attempts 2, 3 and 4; none for a fifth that cannot happen.
        (10, 4, 3),
    ] {
        let calls = Arc::new(Mutex::new(0));
        let clones = Arc::new(Mutex::new(0));
        let mut svc = layer()
            .classify(tower_retry_guard::classify::Errors)
            .layer(counting_service(calls.clone(), fail_first));
        let req = Counted {
            clones: clones.clone(),
            clones_left: u32::MAX,
        };
        let _ = send(&mut svc, req).await;
        assert_eq!(
            *calls.lock().unwrap(),
            want_calls,
            "fail_first={fail_first}"
        );
        assert_eq!(
            *clones.lock().unwrap(),
            want_clones,
            "fail_first={fail_first}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_that_stops_being_cloneable_stops_retrying() {
    let calls = Arc::new(Mutex::new(0));
    let clones = Arc::new(Mutex::new(0));
    let mut svc = layer()
        .classify(tower_retry_guard::classify::Errors)
        .layer(counting_service(calls.clone(), 10));
    let req = Counted {
        clones: clones.clone(),
        clones_left: 1,
    };
    let err = send(&mut svc, req).await.unwrap_err();
    assert_eq!(*calls.lock().unwrap(), 2);
    assert_eq!(err.reason(), &StopReason::NotCloneable);
    assert_eq!(err.attempts(), 2);
    assert_eq!(err.into_inner().unwrap().to_string(), "reset 2");
}

#[tokio::test(start_paused = true)]
async fn retry_info_is_attached_after_a_retry_even_when_off_on_success() {
    let log = Log::default();
    let mut svc = layer().info_on_success(false).layer(scripted(
        log.clone(),
        Arc::new(|n| Ok(status(if n == 1 { 503 } else { 200 }, ""))),
    ));
    let first = send(&mut svc, get("")).await.unwrap();
    assert!(first.extensions().get::<RetryInfo>().is_none());
    let start = Instant::now();
    let second = send(&mut svc, get("")).await.unwrap();
    let info = info(&second);
    assert_eq!(info.outcome, CallOutcome::Recovered);
    assert_eq!(info.attempts, 2);
    // Elapsed and total delay are the virtual time of the call.
    assert_eq!(info.elapsed, start.elapsed());
    assert!(info.total_delay >= ms(50) && info.total_delay <= ms(100));
    assert!(info.elapsed >= info.total_delay);
}
