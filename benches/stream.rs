//! Streams through `StreamGuardLayer`: per-event overhead and time to first token, against
//! the bare service (in process: no socket, so the layer's own cost is what is measured).
//!
//! - `stream_per_event/*`: a 1,000-event SSE body (one delta per frame) read to its end;
//!   criterion reports time per event.
//! - `stream_ttft/*`: one call until the first content event is in the caller's hands
//!   (a keep-alive, then a delta): bare, behind `RetryLayer` only, behind both.
//!
//! Run: `cargo bench --bench stream -- --warm-up-time 1 --measurement-time 3`

use std::collections::VecDeque;
use std::convert::Infallible;
use std::hint::black_box;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::stream::StreamGuardLayer;
use tower_retry_guard::{Budgets, RetryLayer};

const EVENTS: usize = 1_000;

/// Frames ready at once.
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

fn events(n: usize) -> VecDeque<Bytes> {
    let mut v = VecDeque::with_capacity(n + 1);
    v.push_back(Bytes::from_static(b": keep-alive\n\n"));
    for i in 0..n {
        v.push_back(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} \"}}}}]}}\n\n"
        )));
    }
    v
}

fn provider(
    n: usize,
) -> impl Service<
    Request<String>,
    Response = Response<Frames>,
    Error = BoxError,
    Future = std::future::Ready<Result<Response<Frames>, BoxError>>,
> + Clone {
    let template = events(n);
    tower::service_fn(move |_: Request<String>| {
        std::future::ready(Ok::<_, BoxError>(
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Frames(template.clone()))
                .unwrap_or_else(|_| Response::new(Frames(VecDeque::new()))),
        ))
    })
}

fn request() -> Request<String> {
    let mut r = Request::new(String::from("{\"stream\":true}"));
    *r.method_mut() = http::Method::POST;
    *r.uri_mut() = http::Uri::from_static("http://127.0.0.1/v1/chat/completions");
    r
}

/// Reads the body until the first frame that carries a delta.
async fn first_token<B>(mut body: B) -> usize
where
    B: Body<Data = Bytes> + Unpin,
{
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            if data.starts_with(b"data:") {
                return data.len();
            }
        }
    }
    0
}

async fn drain<B>(mut body: B) -> usize
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut n = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            n += data.len();
        }
    }
    n
}

fn benches(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("a runtime: {e}"),
    };
    let retry = || RetryLayer::new().budgets(Budgets::none());

    let mut g = c.benchmark_group("stream_per_event");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("bare", |b| {
        let svc = provider(EVENTS);
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            async move {
                let res = svc.oneshot(request()).await.ok();
                black_box(
                    drain(
                        res.map(|r| r.into_body())
                            .unwrap_or(Frames(VecDeque::new())),
                    )
                    .await,
                )
            }
        })
    });
    g.bench_function("guarded", |b| {
        let svc = ServiceBuilder::new()
            .layer(retry())
            .layer(StreamGuardLayer::new())
            .service(provider(EVENTS));
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            async move {
                match svc.oneshot(request()).await {
                    Ok(res) => black_box(drain(res.into_body()).await),
                    Err(_) => 0,
                }
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("stream_ttft");
    g.bench_function("bare", |b| {
        let svc = provider(1);
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            async move {
                match svc.oneshot(request()).await {
                    Ok(res) => black_box(first_token(res.into_body()).await),
                    Err(_) => 0,
                }
            }
        })
    });
    g.bench_function("retry_only", |b| {
        let svc = ServiceBuilder::new().layer(retry()).service(provider(1));
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            async move {
                match svc.oneshot(request()).await {
                    Ok(res) => black_box(first_token(res.into_body()).await),
                    Err(_) => 0,
                }
            }
        })
    });
    g.bench_function("guarded", |b| {
        let svc = ServiceBuilder::new()
            .layer(retry())
            .layer(StreamGuardLayer::new().first_token_timeout(std::time::Duration::from_secs(30)))
            .service(provider(1));
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            async move {
                match svc.oneshot(request()).await {
                    Ok(res) => black_box(first_token(res.into_body()).await),
                    Err(_) => 0,
                }
            }
        })
    });
    g.finish();
}

criterion_group!(stream, benches);
criterion_main!(stream);
