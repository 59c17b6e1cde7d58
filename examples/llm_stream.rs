//! Streamed LLM calls, retried before the first token and never after.
//!
//! A local SSE "provider" on 127.0.0.1 fails each stream's first attempt in one of the ways
//! providers do: the connection drops before the first delta, an OpenAI error event, an
//! Anthropic `overloaded_error` event, a stall past the first-token timeout. Each is retried
//! with the same idempotency key and delivered whole. Then a stream that breaks after three
//! deltas (not retried: the caller gets the three deltas and a typed error) and a quota error
//! (never retried). The stats table closes.
//!
//! Run: `cargo run --example llm_stream`

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::post;
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_retry_guard::stream::{MidStreamError, StreamGuardLayer};
use tower_retry_guard::{Backoff, Budgets, RetryInfo, RetryLayer, RetryPolicy};

/// A body fed by a channel, so the provider can send, drop or stall at will.
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

enum Step {
    Send(&'static str),
    Drop,
    Stall,
}

const DELTAS: [&str; 3] = [
    "data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n",
    "data: {\"choices\":[{\"delta\":{\"content\":\", \"}}]}\n\n",
    "data: {\"choices\":[{\"delta\":{\"content\":\"world\"}}]}\n\n",
];

fn script(scenario: &str, first_attempt: bool) -> Vec<Step> {
    let error = |e: &'static str| vec![Step::Send(": keep-alive\n\n"), Step::Send(e)];
    match (scenario, first_attempt) {
        ("drop", true) => vec![Step::Send(": keep-alive\n\n"), Step::Drop],
        ("openai-error", true) => error(
            "data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\"}}\n\n",
        ),
        ("anthropic-overloaded", true) => error(
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        ),
        ("stall", true) => vec![Step::Send(": keep-alive\n\n"), Step::Stall],
        ("mid-stream", _) => vec![
            Step::Send(DELTAS[0]),
            Step::Send(DELTAS[1]),
            Step::Send(DELTAS[2]),
            Step::Drop,
        ],
        ("quota", _) => error(
            "data: {\"error\":{\"message\":\"You exceeded your current quota\",\"type\":\"insufficient_quota\",\"code\":\"insufficient_quota\"}}\n\n",
        ),
        _ => vec![
            Step::Send(": keep-alive\n\n"),
            Step::Send(DELTAS[0]),
            Step::Send(DELTAS[1]),
            Step::Send(DELTAS[2]),
            Step::Send("data: [DONE]\n\n"),
        ],
    }
}

async fn provider() -> Result<String, BoxError> {
    let attempts = Arc::new(AtomicU32::new(0));
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |headers: HeaderMap| {
            let scenario = headers
                .get("x-scenario")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let retry = headers
                .get("x-retry-count")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("0")
                .to_owned();
            let key = headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            attempts.fetch_add(1, Ordering::Relaxed);
            async move {
                println!("  provider: {scenario}, attempt {retry}, key {key}");
                let (tx, rx) = mpsc::channel(8);
                tokio::spawn(async move {
                    for step in script(&scenario, retry == "0") {
                        match step {
                            Step::Send(s) => {
                                if tx.send(Ok(Bytes::from_static(s.as_bytes()))).await.is_err() {
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            Step::Drop => {
                                let _ = tx.send(Err(io::Error::other("provider died"))).await;
                                return;
                            }
                            Step::Stall => return tx.closed().await,
                        }
                    }
                });
                (
                    [("content-type", "text/event-stream")],
                    axum::body::Body::new(ChanBody(rx)),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let base = provider().await?;
    let policy = RetryPolicy::builder()
        .max_retries(2)
        .max_total_time(Duration::from_secs(10))
        .backoff(Backoff::exponential(
            Duration::from_millis(10),
            2.0,
            Duration::from_millis(100),
        ))
        .build()?;
    let retry = RetryLayer::new().policy(policy).budgets(Budgets::none());
    let stats = retry.stats();
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let client = ServiceBuilder::new()
        .layer(retry)
        .layer(
            StreamGuardLayer::new()
                .first_token_timeout(Duration::from_millis(200))
                .stats(stats.clone()),
        )
        .service(http);

    for scenario in [
        "drop",
        "openai-error",
        "anthropic-overloaded",
        "stall",
        "mid-stream",
        "quota",
    ] {
        println!("{scenario}:");
        let request = http::Request::post(format!("{base}/v1/chat/completions"))
            .header("x-scenario", scenario)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))?;
        let response = match client.clone().oneshot(request).await {
            Ok(response) => response,
            Err(error) => {
                println!("  caller: failed, not retried: {error}\n");
                continue;
            }
        };
        if let Some(info) = response.extensions().get::<RetryInfo>() {
            println!(
                "  caller: committed after {} attempt(s), last error {:?}",
                info.attempts, info.last_error
            );
        }
        let mut body = response.into_body();
        let mut text = String::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        text.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                Err(error) => {
                    if let Some(mid) = error.downcast_ref::<MidStreamError>() {
                        println!(
                            "  caller: stream broke after {} events ({} bytes), not retried: {:?}",
                            mid.events(),
                            mid.bytes(),
                            mid.kind()
                        );
                    }
                    break;
                }
            }
        }
        let content: String = text
            .lines()
            .filter_map(|l| l.split("\"content\":\"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        println!("  caller received: {content:?}\n");
    }
    println!("{stats}");
    Ok(())
}
