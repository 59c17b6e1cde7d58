//! The response body of [`Idempotency`](super::Idempotency).

use std::pin::Pin;
use std::task::{Context, Poll};
use tower::BoxError;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::mpsc;

/// A frame as the recorder hands it on.
pub(crate) type Relayed = Result<Frame<Bytes>, BoxError>;

pin_project! {
    /// The response body of [`Idempotency`](super::Idempotency): a buffered body (a replay or
    /// an answer of the layer), the inner service's body as it is (a request without a key,
    /// a response that releases its key), or the inner body relayed frame by frame, as the
    /// handler produces it, by the task that records it for replays.
    pub struct IdempotencyBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { data: Option<Bytes> },
        Stream { #[pin] body: B },
        Relayed { rx: mpsc::Receiver<Relayed>, hint: SizeHint, done: bool },
    }
}

impl<B> IdempotencyBody<B> {
    /// A body of the given bytes.
    pub fn full(data: Bytes) -> Self {
        IdempotencyBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// The inner body, streamed as it is.
    pub fn stream(body: B) -> Self {
        IdempotencyBody {
            kind: Kind::Stream { body },
        }
    }

    /// Frames relayed through a channel; `hint` is the inner body's size hint (so a server
    /// still sends `Content-Length` when the handler's body knew it).
    pub(crate) fn relayed(rx: mpsc::Receiver<Relayed>, hint: SizeHint) -> Self {
        IdempotencyBody {
            kind: Kind::Relayed {
                rx,
                hint,
                done: false,
            },
        }
    }
}

impl<B> std::fmt::Debug for IdempotencyBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Full { data } => f
                .debug_struct("IdempotencyBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Stream { .. } => f.debug_struct("IdempotencyBody::Stream").finish(),
            Kind::Relayed { .. } => f.debug_struct("IdempotencyBody::Relayed").finish(),
        }
    }
}

impl<B> Body for IdempotencyBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Stream { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Relayed { rx, done, .. } => {
                if *done {
                    return Poll::Ready(None);
                }
                let frame = std::task::ready!(rx.poll_recv(cx));
                *done = frame.is_none();
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Stream { body } => body.is_end_stream(),
            Kind::Relayed { done, .. } => *done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream { body } => body.size_hint(),
            Kind::Relayed { hint, .. } => *hint,
        }
    }
}
