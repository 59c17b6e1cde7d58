//! The response body of [`Idempotency`](super::Idempotency).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// A boxed error, as the bodies of [`Idempotency`](super::Idempotency) report them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pin_project! {
    /// The response body of [`Idempotency`](super::Idempotency): a buffered body (a replay, a
    /// stored first response, an error of the layer) or the inner service's body, maybe after
    /// a prefix the layer already read from it.
    pub struct IdempotencyBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Stream { prefix: Option<Bytes>, #[pin] rest: B },
        Boxed { prefix: Option<Bytes>, rest: Pin<Box<B>> },
    }
}

impl<B> IdempotencyBody<B> {
    /// A body of the given bytes.
    pub fn full(data: Bytes) -> Self {
        IdempotencyBody::with_trailers(data, None)
    }

    pub(crate) fn with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        IdempotencyBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// The inner body, streamed as it is.
    pub fn stream(body: B) -> Self {
        IdempotencyBody::prefixed(Bytes::new(), body)
    }

    pub(crate) fn prefixed(prefix: Bytes, rest: B) -> Self {
        IdempotencyBody {
            kind: Kind::Stream {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }

    pub(crate) fn boxed(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        IdempotencyBody {
            kind: Kind::Boxed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }
}

impl<B> std::fmt::Debug for IdempotencyBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Full { data, .. } => f
                .debug_struct("IdempotencyBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Stream { prefix, .. } | Kind::Boxed { prefix, .. } => f
                .debug_struct("IdempotencyBody::Stream")
                .field("prefix", &prefix.as_ref().map_or(0, Bytes::len))
                .finish_non_exhaustive(),
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
            KindProj::Full { data, trailers } => {
                if let Some(d) = data.take() {
                    Poll::Ready(Some(Ok(Frame::data(d))))
                } else if let Some(t) = trailers.take() {
                    Poll::Ready(Some(Ok(Frame::trailers(t))))
                } else {
                    Poll::Ready(None)
                }
            }
            KindProj::Stream { prefix, rest } => {
                if let Some(p) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                rest.poll_frame(cx).map_err(Into::into)
            }
            KindProj::Boxed { prefix, rest } => {
                if let Some(p) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                rest.as_mut().poll_frame(cx).map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Stream { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Kind::Boxed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream { prefix, rest } => prefixed_hint(prefix, rest.size_hint()),
            Kind::Boxed { prefix, rest } => prefixed_hint(prefix, rest.size_hint()),
        }
    }
}

fn prefixed_hint(prefix: &Option<Bytes>, inner: SizeHint) -> SizeHint {
    let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
    let mut hint = SizeHint::new();
    hint.set_lower(inner.lower().saturating_add(extra));
    if let Some(upper) = inner.upper() {
        hint.set_upper(upper.saturating_add(extra));
    }
    hint
}
