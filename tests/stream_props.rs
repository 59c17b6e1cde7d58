//! In-process stream properties (no socket, virtual time): whatever fails where, the caller
//! receives a prefix of what the delivering attempt produced — no chunk twice, none out of
//! order, none from another attempt.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_retry_guard::stream::{FirstTokenError, MidStreamError, StreamFailure, StreamGuardLayer};
use tower_retry_guard::{Backoff, Budgets, ErrorKind, RetryInfo, RetryLayer, RetryPolicy};

/// How one attempt fails.
#[derive(Debug, Clone)]
enum Fault {
    None,
    /// The connection drops after `events` events.
    Transport {
        events: usize,
    },
    /// An overloaded error event after `events` events.
    InBand {
        events: usize,
    },
    /// The stream stops sending after `events` events.
    Stall {
        events: usize,
    },
}

/// One attempt's script: its events, how they are cut into frames, how it fails.
#[derive(Debug, Clone)]
struct Attempt {
    /// `true`: a content delta; `false`: a keep-alive comment or a ping.
    events: Vec<bool>,
    cuts: Vec<usize>,
    fault: Fault,
}

fn render(attempt: usize, a: &Attempt) -> (Vec<u8>, Option<usize>) {
    let mut out = Vec::new();
    let mut content = 0;
    let stop = match a.fault {
        Fault::None => a.events.len(),
        Fault::Transport { events } | Fault::InBand { events } | Fault::Stall { events } => {
            events.min(a.events.len())
        }
    };
    for (i, &is_content) in a.events[..stop].iter().enumerate() {
        if is_content {
            out.extend_from_slice(
                format!("data: {{\"attempt\":{attempt},\"delta\":{content}}}\n\n").as_bytes(),
            );
            content += 1;
        } else if i % 2 == 0 {
            out.extend_from_slice(b": keep-alive\n\n");
        } else {
            out.extend_from_slice(b"event: ping\ndata: {\"type\": \"ping\"}\n\n");
        }
    }
    if let Fault::InBand { .. } = a.fault {
        out.extend_from_slice(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n",
        );
    }
    (
        out,
        (stop < a.events.len() || !matches!(a.fault, Fault::None)).then_some(stop),
    )
}

/// Frames of an attempt, then its end: clean, an error, or pending forever.
struct Scripted {
    frames: VecDeque<Bytes>,
    end: Fault,
}

impl http_body::Body for Scripted {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(f))));
        }
        match self.end {
            Fault::Transport { .. } => {
                self.end = Fault::None;
                Poll::Ready(Some(Err(io::Error::from(io::ErrorKind::ConnectionReset))))
            }
            Fault::Stall { .. } => Poll::Pending,
            _ => Poll::Ready(None),
        }
    }
}

fn frames_of(bytes: &[u8], cuts: &[usize]) -> VecDeque<Bytes> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| Bytes::copy_from_slice(&bytes[w[0]..w[1]]))
        .collect()
}

fn attempt_strategy() -> impl Strategy<Value = Attempt> {
    (
        prop::collection::vec(prop::bool::weighted(0.7), 0..8),
        prop::collection::vec(0usize..400, 0..6),
        prop_oneof![
            2 => Just(Fault::None),
            2 => (0usize..8).prop_map(|events| Fault::Transport { events }),
            2 => (0usize..8).prop_map(|events| Fault::InBand { events }),
            1 => (0usize..8).prop_map(|events| Fault::Stall { events }),
        ],
    )
        .prop_map(|(events, cuts, fault)| Attempt {
            events,
            cuts,
            fault,
        })
}

async fn run(script: Vec<Attempt>) -> Result<(), TestCaseError> {
    let produced: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let p = produced.clone();
    let s = Arc::new(script.clone());
    let inner = tower::service_fn(move |_: Request<String>| {
        let mut produced = p.lock().unwrap();
        let n = produced.len();
        let attempt = s.get(n).cloned().unwrap_or(Attempt {
            events: vec![true],
            cuts: vec![],
            fault: Fault::None,
        });
        let (bytes, _) = render(n, &attempt);
        produced.push(bytes.clone());
        let body = Scripted {
            frames: frames_of(&bytes, &attempt.cuts),
            end: attempt.fault.clone(),
        };
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let policy = RetryPolicy::builder()
        .max_retries(3)
        .max_total_time(Duration::from_secs(60))
        .backoff(Backoff::Constant(Duration::ZERO))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().policy(policy).budgets(Budgets::none()))
        .layer(StreamGuardLayer::new().first_token_timeout(Duration::from_secs(5)))
        .service(inner);
    let result = svc
        .oneshot(Request::post("/v1/messages").body(String::new()).unwrap())
        .await;
    let produced = produced.lock().unwrap().clone();
    let res = match result {
        Ok(res) => res,
        Err(e) => {
            // Every attempt failed before its first content: nothing was delivered.
            prop_assert!(e.into_inner().is_some_and(|i| i.is::<FirstTokenError>()));
            return Ok(());
        }
    };
    let delivering = res.extensions().get::<RetryInfo>().unwrap().attempts as usize - 1;
    prop_assert_eq!(
        delivering + 1,
        produced.len(),
        "no attempt after the delivering one"
    );
    let mut body = res.into_body();
    let mut got = Vec::new();
    let mut error = None;
    let mut stalled = false;
    // Virtual time: a stream that stalls after its first content (no idle timeout is the
    // guard's business) is read until a minute of silence.
    loop {
        match tokio::time::timeout(Duration::from_secs(60), body.frame()).await {
            Err(_) => {
                stalled = true;
                break;
            }
            Ok(None) => break,
            Ok(Some(Ok(f))) => got.extend_from_slice(&f.into_data().unwrap_or_default()),
            Ok(Some(Err(e))) => {
                error = Some(e);
                break;
            }
        }
    }
    let mine = &produced[delivering];
    prop_assert!(
        mine.starts_with(&got),
        "received a prefix of attempt {}'s production:\n got  {:?}\n made {:?}",
        delivering,
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(mine)
    );
    // Deltas in order, once each, from one attempt.
    let text = String::from_utf8_lossy(&got);
    let deltas: Vec<&str> = text.matches("\"delta\":").collect();
    for (i, line) in text
        .lines()
        .filter(|l| l.contains("\"delta\":"))
        .enumerate()
    {
        prop_assert_eq!(
            line,
            format!("data: {{\"attempt\":{delivering},\"delta\":{i}}}")
        );
    }
    let attempt = script.get(delivering).cloned();
    match (attempt.map(|a| a.fault), error) {
        (None | Some(Fault::None), None) => prop_assert_eq!(&got, mine, "delivered whole"),
        (Some(Fault::Stall { .. }), None) => {
            prop_assert!(stalled, "a stalled stream does not end");
            prop_assert!(!deltas.is_empty(), "a stall before content was retried");
            prop_assert_eq!(&got, mine, "everything produced before the stall arrived");
        }
        (Some(fault), None) => {
            return Err(TestCaseError::fail(format!(
                "{fault:?} reached the caller silently"
            )));
        }
        (_, Some(e)) => {
            let mid = e.downcast_ref::<MidStreamError>();
            prop_assert!(mid.is_some(), "a typed mid-stream error: {}", e);
            let mid = mid.unwrap();
            prop_assert!(mid.events() >= 1, "only after content");
            prop_assert_eq!(mid.events() as usize, deltas.len());
            prop_assert_eq!(mid.bytes() as usize, got.len());
            prop_assert_eq!(&got, mine, "everything produced before the failure arrived");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config {
        cases: 256,
        rng_seed: RngSeed::Fixed(0x5157_2ea3),
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn the_caller_receives_a_prefix_of_the_delivering_attempt(
        script in prop::collection::vec(attempt_strategy(), 1..5)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run(script))?;
    }
}

#[tokio::test(start_paused = true)]
async fn a_stall_before_content_is_a_retryable_timeout_in_virtual_time() {
    let calls = Arc::new(Mutex::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_: Request<String>| {
        let mut n = c.lock().unwrap();
        *n += 1;
        let end = if *n == 1 {
            Fault::Stall { events: 0 }
        } else {
            Fault::None
        };
        let frames = if *n == 1 {
            VecDeque::from([Bytes::from_static(b": keep-alive\n\n")])
        } else {
            VecDeque::from([Bytes::from_static(b"data: hi\n\n")])
        };
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Scripted { frames, end })
                    .unwrap(),
            )
        }
    });
    let res = ServiceBuilder::new()
        .layer(RetryLayer::new().budgets(Budgets::none()))
        .layer(StreamGuardLayer::new().first_token_timeout(Duration::from_secs(2)))
        .service(inner)
        .oneshot(Request::post("/v1/messages").body(String::new()).unwrap())
        .await
        .unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap().clone();
    assert_eq!(info.attempts, 2);
    assert_eq!(info.last_error, Some(ErrorKind::Timeout));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"data: hi\n\n");
}

#[tokio::test]
async fn a_chunked_non_sse_stream_commits_at_its_first_byte() {
    let calls = Arc::new(Mutex::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_: Request<String>| {
        let mut n = c.lock().unwrap();
        *n += 1;
        let (frames, end) = if *n == 1 {
            (VecDeque::new(), Fault::Transport { events: 0 })
        } else {
            (
                VecDeque::from([Bytes::from_static(b"{\"a\":"), Bytes::from_static(b"1}")]),
                Fault::Transport { events: 1 },
            )
        };
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .header("content-type", "application/x-ndjson")
                    .body(Scripted { frames, end })
                    .unwrap(),
            )
        }
    });
    let res = ServiceBuilder::new()
        .layer(
            RetryLayer::new().budgets(Budgets::none()).policy(
                RetryPolicy::builder()
                    .backoff(Backoff::Constant(Duration::ZERO))
                    .build()
                    .unwrap(),
            ),
        )
        .layer(StreamGuardLayer::new().chunked_streams(true))
        .service(inner)
        .oneshot(Request::post("/v1/x").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.extensions().get::<RetryInfo>().unwrap().attempts, 2);
    let mut body = res.into_body();
    let mut got = Vec::new();
    let mut error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => got.extend_from_slice(&f.into_data().unwrap_or_default()),
            Err(e) => error = Some(e),
        }
    }
    assert_eq!(got, b"{\"a\":1}");
    let error = error.expect("a mid-stream error");
    let mid = error.downcast_ref::<MidStreamError>().unwrap();
    assert_eq!((mid.events(), mid.bytes()), (2, 7));
    assert!(matches!(mid.cause(), StreamFailure::Transport(_)));
}
