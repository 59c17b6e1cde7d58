//! Odd but valid server-sent events. Lines may end with CR alone (the SSE grammar allows CRLF, LF
//! or CR): such a stream commits at its first content event like any other, instead of
//! being held (and timed out and retried) as if it had sent nothing. A chunk whose first key
//! is `"error": null` is content, not an error event; a leading byte order mark is ignored.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt, service_fn};
use tower_retry_guard::stream::StreamGuardLayer;

/// Sends its frames, then stays open (a long generation still running).
struct Open(Vec<&'static [u8]>);

impl http_body::Body for Open {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.0.is_empty() {
            return Poll::Pending;
        }
        let next = self.0.remove(0);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(next)))))
    }
}

async fn first_frame_within_timeout(frames: Vec<&'static [u8]>) -> Result<Bytes, String> {
    let svc = StreamGuardLayer::new()
        .first_token_timeout(Duration::from_secs(5))
        .layer(service_fn(move |_: Request<String>| {
            let frames = frames.clone();
            async move {
                Ok::<_, std::io::Error>(
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Open(frames))
                        .unwrap(),
                )
            }
        }));
    let res = svc
        .oneshot(Request::new(String::new()))
        .await
        .map_err(|e| e.to_string())?;
    let mut body = res.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    Ok(frame.into_data().unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_cr_only_stream_commits_at_its_first_content_event() {
    let first =
        first_frame_within_timeout(vec![b": keep-alive\r\r", b"data: {\"delta\":\"Hel\"}\r\r"])
            .await;
    assert_eq!(first.as_deref(), Ok(&b": keep-alive\r\r"[..]));
}

#[tokio::test(start_paused = true)]
async fn crlf_split_between_frames_still_reads_as_one_line_end() {
    // A keep-alive, then an event whose CRLF is cut between two frames.
    let first = first_frame_within_timeout(vec![
        b": ping\r\n\r\ndata: {\"delta\":\"Hel\"}\r",
        b"\n\r\n",
    ])
    .await;
    assert!(first.is_ok(), "{first:?}");
}

#[tokio::test(start_paused = true)]
async fn an_error_event_in_a_cr_only_stream_is_seen() {
    let first = first_frame_within_timeout(vec![
        b"event: error\rdata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\r\r",
    ])
    .await;
    let e = first.unwrap_err();
    assert!(e.contains("overloaded"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_content_event_with_a_null_error_field_is_content() {
    // Some OpenAI-compatible servers put `"error": null` first in every chunk.
    let first = first_frame_within_timeout(vec![
        b"data: {\"error\":null,\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    ])
    .await;
    assert!(first.is_ok(), "{first:?}");
}

#[tokio::test(start_paused = true)]
async fn a_leading_byte_order_mark_is_ignored() {
    // The SSE grammar: one leading U+FEFF is ignored; the event after it is content.
    let first =
        first_frame_within_timeout(vec![b"\xEF\xBB\xBFdata: {\"delta\":\"Hel\"}\n\n"]).await;
    assert!(first.is_ok(), "{first:?}");
}
