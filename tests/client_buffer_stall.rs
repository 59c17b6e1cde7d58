//! The buffering layers never wait on a body that stalls: a request body whose producer waits
//! for the response (a bidirectional stream) is passed on unbuffered instead of hanging the
//! call, and an error body that stalls is handed on without an `ErrorBody`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower::{BoxError, Layer, ServiceExt, service_fn};
use tower_retry_guard::body::{
    BufferErrorBodyLayer, BufferRequestBodyLayer, BufferedBody, ErrorBody,
};

/// A body fed through a channel by its producer, frame by frame; it ends when the sender is
/// dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn channel_body() -> (mpsc::Sender<Bytes>, ChannelBody) {
    let (tx, rx) = mpsc::channel(8);
    (tx, ChannelBody(rx))
}

/// A bidirectional exchange: the caller sends its first message and waits for the answer
/// before sending the second. Buffering the whole request body first would wait forever.
#[tokio::test(start_paused = true)]
async fn a_request_body_that_waits_for_the_response_is_passed_on_unbuffered() {
    // The server answers with the first frame of the request body, as soon as it has it.
    let echo_first = service_fn(|req: Request<BufferedBody<ChannelBody>>| async move {
        let replayable = req.body().as_bytes().is_some();
        let mut body = req.into_body();
        let first = match body.frame().await {
            Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
            _ => Bytes::new(),
        };
        Ok::<_, BoxError>((replayable, first))
    });
    let svc = BufferRequestBodyLayer::new(64 * 1024).layer(echo_first);

    let (tx, body) = channel_body();
    tx.send(Bytes::from_static(b"hello")).await.unwrap();
    let call = tokio::spawn(svc.oneshot(Request::new(body)));
    let answered = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the call hangs: the layer waits for a body whose producer waits for the answer")
        .unwrap()
        .unwrap();
    // Answered with the first message, the request passed on as a stream (not replayable).
    assert_eq!(answered, (false, Bytes::from_static(b"hello")));
    drop(tx);
}

/// A stall timeout set by the caller is the one that applies.
#[tokio::test(start_paused = true)]
async fn the_stall_timeout_is_the_callers() {
    let svc = BufferRequestBodyLayer::new(64 * 1024)
        .stall_timeout(Duration::from_secs(5))
        .layer(service_fn(
            |req: Request<BufferedBody<ChannelBody>>| async move {
                Ok::<_, BoxError>(req.body().as_bytes().cloned())
            },
        ));
    let (tx, body) = channel_body();
    tx.send(Bytes::from_static(b"part one, ")).await.unwrap();
    let started = tokio::time::Instant::now();
    let call = tokio::spawn(svc.oneshot(Request::new(body)));
    // The rest comes after 3 s: within the 5 s the caller allows, so the body is buffered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tx.send(Bytes::from_static(b"part two")).await.unwrap();
    drop(tx);
    let buffered = call.await.unwrap().unwrap();
    assert_eq!(buffered, Some(Bytes::from_static(b"part one, part two")));
    assert!(started.elapsed() >= Duration::from_secs(3));
}

/// A body whose frames are all there is buffered whole (replayable), as before.
#[tokio::test(start_paused = true)]
async fn a_body_that_is_all_there_is_buffered_whole() {
    let svc = BufferRequestBodyLayer::new(64 * 1024).layer(service_fn(
        |req: Request<BufferedBody<ChannelBody>>| async move {
            Ok::<_, BoxError>(req.body().as_bytes().cloned())
        },
    ));
    let (tx, body) = channel_body();
    for part in ["{\"model\":", "\"m\",", "\"input\":\"hi\"}"] {
        tx.send(Bytes::from_static(part.as_bytes())).await.unwrap();
    }
    drop(tx);
    let buffered = svc.oneshot(Request::new(body)).await.unwrap();
    assert_eq!(
        buffered,
        Some(Bytes::from_static(b"{\"model\":\"m\",\"input\":\"hi\"}"))
    );
}

/// An error response whose body stalls after its first bytes is handed on without an
/// `ErrorBody`, its body intact, instead of holding the attempt until the deadline.
#[tokio::test(start_paused = true)]
async fn an_error_body_that_stalls_is_handed_on_without_error_body() {
    let (tx, body) = channel_body();
    tx.send(Bytes::from_static(b"{\"error\":")).await.unwrap();
    let mut body = Some(body);
    let svc = BufferErrorBodyLayer::new(64 * 1024).layer(service_fn(move |_req: Request<()>| {
        let body = body.take();
        async move {
            let body = body.ok_or("called twice")?;
            let mut response = Response::new(body);
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, BoxError>(response)
        }
    }));
    let started = tokio::time::Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(60), svc.oneshot(Request::new(())))
        .await
        .expect("the layer waits on an error body that never ends")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.extensions().get::<ErrorBody>().is_none());
    // The bytes read while buffering come first, then the rest, as the server sends it.
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, Bytes::from_static(b"{\"error\":"));
    tx.send(Bytes::from_static(b"\"overloaded\"}"))
        .await
        .unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from_static(b"\"overloaded\"}"));
}
