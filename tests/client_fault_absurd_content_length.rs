//! A server that announces an absurd length (hyper accepts up to `u64::MAX - 2`) on an error
//! body larger than the buffer's limit: the buffered body's size hint does not overflow.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tower_retry_guard::body::BufferedBody;

/// Claims `u64::MAX - 2` bytes, sends 4 KiB frames forever.
struct Absurd;

impl Body for Absurd {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 4096])))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(u64::MAX - 2)
    }
}

#[tokio::test]
async fn an_absurd_length_past_the_buffer_limit_does_not_overflow_the_hint() {
    let body = BufferedBody::buffer(Absurd, 8 * 1024).await.unwrap();
    assert!(body.as_bytes().is_none(), "past the limit: not replayable");
    let hint = body.size_hint();
    assert_eq!(hint.lower(), u64::MAX);
    assert_eq!(hint.upper(), Some(u64::MAX));
}
