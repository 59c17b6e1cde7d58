//! Streams over real HTTP: an axum SSE "provider" on 127.0.0.1 that fails in each way a
//! provider does, a hyper-util client behind `RetryLayer` + `StreamGuardLayer`.
//!
//! Delays are milliseconds; no test asserts on wall-clock time.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::stream::{FirstTokenError, MidStreamError, StreamFailure, StreamGuardLayer};
use tower_retry_guard::{
    Backoff, Budgets, ErrorKind, Jitter, RetryInfo, RetryLayer, RetryPolicy, RetryStats, StopReason,
};

const OP: &str = "POST /v1/chat/completions";

/// One step of a scripted stream.
#[derive(Clone)]
enum Step {
    Send(String),
    /// Abort the connection mid-body.
    Drop,
    /// Send nothing more until the client goes away.
    Stall,
}

fn delta(i: usize) -> String {
    format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"tok{i} \"}}}}]}}\n\n")
}

/// What a healthy attempt produces.
fn whole() -> Vec<Step> {
    let mut steps = vec![Step::Send(": keep-alive\n\n".into())];
    steps.extend((0..5).map(|i| Step::Send(delta(i))));
    steps.push(Step::Send("data: [DONE]\n\n".into()));
    steps
}

fn whole_bytes() -> String {
    let mut s = String::from(": keep-alive\n\n");
    (0..5).for_each(|i| s.push_str(&delta(i)));
    s.push_str("data: [DONE]\n\n");
    s
}

/// The script of `scenario` at `attempt` (0-based).
fn script(scenario: &str, attempt: usize) -> Vec<Step> {
    let first = attempt == 0;
    match scenario {
        "drop" if first => vec![Step::Send(": keep-alive\n\n".into()), Step::Drop],
        "openai" if first => vec![Step::Send(
            "data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n".into(),
        )],
        "anthropic" if first => vec![
            Step::Send("event: ping\ndata: {\"type\": \"ping\"}\n\n".into()),
            Step::Send("event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n".into()),
        ],
        "anthropic_rate" if first => vec![Step::Send(
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"slow down\"}}\n\n".into(),
        )],
        "stall" if first => vec![Step::Send(": keep-alive\n\n".into()), Step::Stall],
        "quota" => vec![Step::Send(
            "data: {\"error\":{\"message\":\"You exceeded your current quota\",\"type\":\"insufficient_quota\",\"param\":null,\"code\":\"insufficient_quota\"}}\n\n".into(),
        )],
        "mid" => {
            let mut steps = vec![Step::Send(": keep-alive\n\n".into())];
            steps.extend((0..3).map(|i| Step::Send(delta(i))));
            steps.push(Step::Drop);
            steps
        }
        "mid_inband" => {
            let mut steps: Vec<Step> = (0..2).map(|i| Step::Send(delta(i))).collect();
            steps.push(Step::Send(
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n".into(),
            ));
            steps
        }
        _ => whole(),
    }
}

/// A body fed by a channel: what the handler's task sends, as it sends it.
struct ChanBody(mpsc::Receiver<Result<Bytes, io::Error>>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

type Seen = Arc<Mutex<HashMap<String, Vec<Option<String>>>>>;

async fn completions(State(seen): State<Seen>, headers: HeaderMap) -> axum::response::Response {
    let scenario = headers
        .get("x-scenario")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("ok")
        .to_owned();
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let attempt = {
        let mut seen = seen.lock().unwrap();
        let keys = seen.entry(scenario.clone()).or_default();
        keys.push(key);
        keys.len() - 1
    };
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        for step in script(&scenario, attempt) {
            match step {
                Step::Send(s) => {
                    if tx.send(Ok(Bytes::from(s))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Step::Drop => {
                    let _ = tx.send(Err(io::Error::other("provider died"))).await;
                    return;
                }
                Step::Stall => {
                    tx.closed().await;
                    return;
                }
            }
        }
    });
    axum::response::Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream; charset=utf-8")
        .body(axum::body::Body::new(ChanBody(rx)))
        .unwrap()
}

async fn provider() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route(
            "/v1/models",
            post(|| async { ([("content-type", "application/json")], "{\"data\":[]}") }),
        )
        .with_state(seen.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, seen)
}

fn client(
    stats: &RetryStats,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = http::Response<tower_retry_guard::stream::GuardedBody<hyper::body::Incoming>>,
    Error = tower_retry_guard::RetryError<BoxError>,
> + Clone {
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let policy = RetryPolicy::builder()
        .max_retries(3)
        .max_total_time(Duration::from_secs(20))
        .backoff(Backoff::exponential(
            Duration::from_millis(2),
            2.0,
            Duration::from_millis(10),
        ))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .policy(policy)
                .budgets(Budgets::none())
                .with_stats(stats.clone()),
        )
        .layer(
            StreamGuardLayer::new()
                .first_token_timeout(Duration::from_millis(300))
                .stats(stats.clone()),
        )
        .service(http)
}

fn request(base: &str, scenario: &str) -> Request<Full<Bytes>> {
    Request::post(format!("{base}/v1/chat/completions"))
        .header("x-scenario", scenario)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))
        .unwrap()
}

/// Reads a body to its end: the bytes received, and the error it ended on.
async fn drain<B>(mut body: B) -> (String, Option<BoxError>)
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let mut got = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
            Err(e) => return (String::from_utf8(got).unwrap(), Some(e)),
        }
    }
    (String::from_utf8(got).unwrap(), None)
}

/// Runs `scenario`, expecting it retried once and then delivered whole with one key.
async fn retried_once_then_whole(scenario: &str, kind: ErrorKind) {
    let (base, seen) = provider().await;
    let stats = RetryStats::new();
    let mut svc = client(&stats);
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(request(&base, scenario))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let info = res.extensions().get::<RetryInfo>().unwrap().clone();
    assert_eq!(info.attempts, 2, "{scenario}");
    assert_eq!(info.last_error, Some(kind), "{scenario}");
    let (got, error) = drain(res.into_body()).await;
    assert!(error.is_none(), "{scenario}: {error:?}");
    assert_eq!(
        got,
        whole_bytes(),
        "{scenario}: delivered whole, nothing twice"
    );

    let keys = seen.lock().unwrap()[scenario].clone();
    assert_eq!(keys.len(), 2, "{scenario}");
    assert!(keys[0].is_some(), "{scenario}: a key was sent");
    assert_eq!(
        keys[0], keys[1],
        "{scenario}: the same key on every attempt"
    );
    // On the wire, the key is a structured-field string (quoted).
    assert_eq!(
        info.key.as_ref().map(|k| format!("\"{}\"", k.as_str())),
        keys[0],
        "the key reported is the key sent"
    );

    assert_eq!(stats.kind(OP, kind).retries, 1, "{scenario}");
    assert_eq!(stats.kind(OP, kind).recovered, 1, "{scenario}");
    assert_eq!(stats.totals(OP).mid_stream_failures, 0);
}

#[tokio::test]
async fn a_stream_dropped_before_the_first_delta_is_retried_with_the_same_key() {
    retried_once_then_whole("drop", ErrorKind::Connect).await;
}

#[tokio::test]
async fn an_openai_error_event_at_the_start_is_retried_with_the_same_key() {
    retried_once_then_whole("openai", ErrorKind::ServerError).await;
}

#[tokio::test]
async fn an_anthropic_overloaded_event_at_the_start_is_retried_with_the_same_key() {
    retried_once_then_whole("anthropic", ErrorKind::Overloaded).await;
}

#[tokio::test]
async fn an_anthropic_rate_limit_event_at_the_start_is_retried_as_rate_limited() {
    retried_once_then_whole("anthropic_rate", ErrorKind::RateLimited).await;
}

#[tokio::test]
async fn a_stream_stalled_past_the_first_token_timeout_is_retried_with_the_same_key() {
    retried_once_then_whole("stall", ErrorKind::Timeout).await;
}

#[tokio::test]
async fn a_healthy_stream_is_delivered_whole_at_the_first_attempt() {
    let (base, seen) = provider().await;
    let stats = RetryStats::new();
    let res = client(&stats).oneshot(request(&base, "ok")).await.unwrap();
    assert_eq!(res.extensions().get::<RetryInfo>().unwrap().attempts, 1);
    assert!(res.body().is_guarded());
    let (got, error) = drain(res.into_body()).await;
    assert!(error.is_none());
    assert_eq!(got, whole_bytes());
    assert_eq!(seen.lock().unwrap()["ok"].len(), 1);
    assert_eq!(stats.calls(OP), 1);
}

#[tokio::test]
async fn a_stream_failing_after_n_deltas_is_not_retried_and_ends_in_a_typed_error() {
    let (base, seen) = provider().await;
    let stats = RetryStats::new();
    let res = client(&stats).oneshot(request(&base, "mid")).await.unwrap();
    assert_eq!(res.extensions().get::<RetryInfo>().unwrap().attempts, 1);
    let (got, error) = drain(res.into_body()).await;
    let expected: String = std::iter::once(": keep-alive\n\n".to_owned())
        .chain((0..3).map(delta))
        .collect();
    assert_eq!(got, expected, "exactly the 3 deltas, once each");
    let error = error.expect("the stream ends in an error");
    let mid = error
        .downcast_ref::<MidStreamError>()
        .expect("a MidStreamError");
    assert_eq!(mid.events(), 3);
    assert_eq!(mid.bytes(), expected.len() as u64);
    assert!(matches!(mid.cause(), StreamFailure::Transport(_)));
    assert_eq!(mid.kind(), ErrorKind::Connect);

    assert_eq!(seen.lock().unwrap()["mid"].len(), 1, "not retried");
    assert_eq!(stats.totals(OP).mid_stream_failures, 1);
    assert_eq!(stats.kind(OP, ErrorKind::Connect).mid_stream_failures, 1);
    assert_eq!(stats.totals(OP).retries, 0);
    assert!(stats.to_string().contains("mid-stream failures"), "{stats}");
}

#[tokio::test]
async fn an_error_event_after_deltas_is_delivered_then_a_typed_error() {
    let (base, seen) = provider().await;
    let stats = RetryStats::new();
    let res = client(&stats)
        .oneshot(request(&base, "mid_inband"))
        .await
        .unwrap();
    let (got, error) = drain(res.into_body()).await;
    assert!(got.starts_with(&(delta(0) + &delta(1))));
    assert!(
        got.ends_with("overloaded_error\"}}\n\n"),
        "the event as sent: {got}"
    );
    let error = error.expect("the stream ends in an error");
    let mid = MidStreamError::find(&*error).expect("a MidStreamError");
    assert_eq!(mid.events(), 2);
    assert_eq!(mid.kind(), ErrorKind::Overloaded);
    assert_eq!(seen.lock().unwrap()["mid_inband"].len(), 1, "not retried");
    assert_eq!(stats.kind(OP, ErrorKind::Overloaded).mid_stream_failures, 1);
}

#[tokio::test]
async fn a_quota_error_event_is_not_retried() {
    let (base, seen) = provider().await;
    let stats = RetryStats::new();
    let error = client(&stats)
        .oneshot(request(&base, "quota"))
        .await
        .expect_err("quota errors surface");
    assert!(matches!(error.reason(), StopReason::NotRetryable));
    assert_eq!(error.kind(), Some(ErrorKind::QuotaExhausted));
    let inner = error.into_inner().expect("the inner error");
    let first = inner
        .downcast_ref::<FirstTokenError>()
        .expect("a FirstTokenError");
    match first.cause() {
        StreamFailure::InBand(e) => {
            assert!(!e.is_retryable());
            assert!(e.data().contains("insufficient_quota"));
        }
        other => panic!("unexpected cause {other:?}"),
    }
    assert_eq!(seen.lock().unwrap()["quota"].len(), 1, "not retried");
    assert_eq!(stats.kind(OP, ErrorKind::QuotaExhausted).not_retried, 1);
}

#[tokio::test]
async fn a_non_stream_response_passes_through() {
    let (base, _) = provider().await;
    let stats = RetryStats::new();
    let res = client(&stats)
        .oneshot(
            Request::post(format!("{base}/v1/models"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(!res.body().is_guarded());
    let (got, error) = drain(res.into_body()).await;
    assert!(error.is_none());
    assert_eq!(got, "{\"data\":[]}");
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_streams_are_guarded_the_same_way() {
    let (base, seen) = provider().await;
    let stats = RetryStats::new();
    let policy = RetryPolicy::builder()
        .backoff(Backoff::exponential(
            Duration::from_millis(2),
            2.0,
            Duration::from_millis(10),
        ))
        .build()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .policy(policy)
                .budgets(Budgets::none())
                .with_stats(stats.clone()),
        )
        .layer(StreamGuardLayer::new().stats(stats.clone()))
        .service(reqwest::Client::new());
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");

    // An Anthropic overloaded event first: retried with the same key, delivered whole.
    let req = http
        .post(&url)
        .header("x-scenario", "anthropic")
        .body("{}")
        .build()
        .unwrap();
    let mut res = client.clone().oneshot(req).await.unwrap();
    assert_eq!(res.url().as_str(), url, "the response keeps its URL");
    assert_eq!(res.extensions().get::<RetryInfo>().unwrap().attempts, 2);
    let mut got = Vec::new();
    while let Some(chunk) = res.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(String::from_utf8(got).unwrap(), whole_bytes());
    let keys = seen.lock().unwrap()["anthropic"].clone();
    assert_eq!((keys.len(), keys[0].is_some()), (2, true));
    assert_eq!(keys[0], keys[1]);

    // Broken after 3 deltas: not retried; the MidStreamError is in reqwest's error chain.
    let req = http
        .post(&url)
        .header("x-scenario", "mid")
        .body("{}")
        .build()
        .unwrap();
    let mut res = client.oneshot(req).await.unwrap();
    let mut got = Vec::new();
    let error = loop {
        match res.chunk().await {
            Ok(Some(chunk)) => got.extend_from_slice(&chunk),
            Ok(None) => panic!("the stream should break"),
            Err(e) => break e,
        }
    };
    let mid = MidStreamError::find(&error).expect("a MidStreamError in the chain");
    assert_eq!(mid.events(), 3);
    assert_eq!(mid.bytes(), got.len() as u64);
    assert_eq!(seen.lock().unwrap()["mid"].len(), 1);
    assert_eq!(stats.totals(OP).mid_stream_failures, 1);
}
