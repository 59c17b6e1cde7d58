//! Replayable bodies: buffer a streaming request body so it can be retried, and buffer a
//! small error response body so a classifier can read it.
//!
//! `hyper::body::Incoming` is not `Clone`: a request that carries one cannot be retried.
//! [`BufferRequestBodyLayer`] (outside the retry layer) reads the body into memory up to a
//! limit; past the limit the request goes through unbuffered and unretried (the layer warns:
//! "cannot be cloned").
//!
//! [`BufferErrorBodyLayer`] (inside the retry layer) reads the body of an error response
//! (status >= 400) up to a limit and puts a copy in the response's extensions as
//! [`ErrorBody`], so that [`LlmHttp`](crate::LlmHttp) can tell a 429 "rate limited" from a
//! 429 "out of quota". The body is handed back intact.
//!
//! Neither waits on a body that stalls: when the next frame is not there within the stall
//! timeout (default 100 ms, `stall_timeout`), buffering stops and the body goes on as it is
//! (the bytes read first, then the rest), exactly as past the limit. A request body whose
//! producer waits for the response (a client-streaming or bidirectional gRPC call, a
//! channel fed by the caller) would otherwise never end, and the call would hang; such a
//! request is passed on unbuffered, so not retried. An error body that stalls is handed on
//! without an [`ErrorBody`] (the classifier judges the status and headers).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::{BoxError, Layer, Service};

use crate::request::CloneBody;

/// A body that is either fully in memory (replayable) or a buffered prefix followed by the
/// rest of a stream (not replayable).
#[derive(Debug)]
pub struct BufferedBody<B> {
    prefix: Option<Bytes>,
    rest: Option<B>,
}

impl<B> BufferedBody<B> {
    /// A body fully in memory.
    pub fn full(bytes: Bytes) -> Self {
        BufferedBody {
            prefix: Some(bytes),
            rest: None,
        }
    }

    /// The bytes, if the whole body is in memory.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match (&self.prefix, &self.rest) {
            (Some(b), None) => Some(b),
            _ => None,
        }
    }

    /// Reads `body` into memory, up to `limit` bytes. Past the limit, the bytes read so far
    /// are kept in front of the unread rest. Waits as long as the body takes (the layers
    /// stop waiting on a stalled body: see the module docs).
    pub async fn buffer(body: B, limit: usize) -> Result<Self, B::Error>
    where
        B: Body + Unpin,
    {
        Self::buffer_within(body, limit, None).await
    }

    /// [`BufferedBody::buffer`], giving up (the bytes read so far kept in front of the
    /// unread rest) when no frame comes within `stall`.
    async fn buffer_within(
        mut body: B,
        limit: usize,
        stall: Option<Duration>,
    ) -> Result<Self, B::Error>
    where
        B: Body + Unpin,
    {
        let mut buf = BytesMut::new();
        // Bounded: each frame adds data, and we stop once past the limit, at the end, or
        // when the body stalls.
        loop {
            let next = match stall {
                Some(stall) => match tokio::time::timeout(stall, body.frame()).await {
                    Ok(next) => next,
                    Err(_) => {
                        return Ok(BufferedBody {
                            prefix: Some(buf.freeze()),
                            rest: Some(body),
                        });
                    }
                },
                None => body.frame().await,
            };
            let Some(frame) = next else {
                break;
            };
            let frame = frame?;
            if let Ok(mut data) = frame.into_data() {
                buf.extend_from_slice(&data.copy_to_bytes(data.remaining()));
                if buf.len() > limit {
                    return Ok(BufferedBody {
                        prefix: Some(buf.freeze()),
                        rest: Some(body),
                    });
                }
            }
            // Trailers are dropped: LLM APIs do not use them.
        }
        Ok(BufferedBody::full(buf.freeze()))
    }
}

impl<B> CloneBody for BufferedBody<B> {
    fn try_clone_body(&self) -> Option<Self> {
        self.as_bytes().map(|b| BufferedBody::full(b.clone()))
    }

    fn body_bytes(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        self.as_bytes().map(|b| std::borrow::Cow::Borrowed(&b[..]))
    }
}

impl<B> Body for BufferedBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            if !prefix.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(prefix))));
            }
        }
        let Some(rest) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(
                frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
            ))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                self.rest = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.as_ref().is_none_or(|p| p.is_empty())
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        match &self.rest {
            None => SizeHint::with_exact(prefix),
            Some(r) => {
                let h = r.size_hint();
                let mut out = SizeHint::new();
                // Saturating: the inner hint is what a server announced (a `Content-Length`
                // up to `u64::MAX - 2` passes hyper).
                out.set_lower(h.lower().saturating_add(prefix));
                if let Some(u) = h.upper() {
                    out.set_upper(u.saturating_add(prefix));
                }
                out
            }
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How long the buffering layers wait for a body's next frame before they stop buffering.
const DEFAULT_STALL: Duration = Duration::from_millis(100);

/// Buffers request bodies up to a limit so requests can be retried; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct BufferRequestBodyLayer {
    limit: usize,
    stall: Duration,
}

impl BufferRequestBodyLayer {
    /// Buffers up to `limit` bytes of each request body.
    pub fn new(limit: usize) -> Self {
        BufferRequestBodyLayer {
            limit,
            stall: DEFAULT_STALL,
        }
    }

    /// How long to wait for the body's next frame before passing the request on unbuffered
    /// (so not retried); default 100 ms. A body whose producer waits for the response
    /// (streaming gRPC) never ends while the layer waits: see the module docs.
    pub fn stall_timeout(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }
}

impl<S> Layer<S> for BufferRequestBodyLayer {
    type Service = BufferRequestBody<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BufferRequestBody {
            inner,
            limit: self.limit,
            stall: self.stall,
        }
    }
}

/// The service of [`BufferRequestBodyLayer`].
#[derive(Debug, Clone)]
pub struct BufferRequestBody<S> {
    inner: S,
    limit: usize,
    stall: Duration,
}

impl<S, B> Service<Request<B>> for BufferRequestBody<S>
where
    S: Service<Request<BufferedBody<B>>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (limit, stall) = (self.limit, self.stall);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = BufferedBody::buffer_within(body, limit, Some(stall))
                .await
                .map_err(Into::into)?;
            inner
                .call(Request::from_parts(parts, body))
                .await
                .map_err(Into::into)
        })
    }
}

/// The buffered body of an error response, in the response's extensions; see the module
/// docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody(pub Bytes);

/// Buffers the bodies of error responses up to a limit for classifiers; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct BufferErrorBodyLayer {
    limit: usize,
    stall: Duration,
}

impl BufferErrorBodyLayer {
    /// Buffers up to `limit` bytes of each error response body (64 KiB is plenty for an
    /// API error).
    pub fn new(limit: usize) -> Self {
        BufferErrorBodyLayer {
            limit,
            stall: DEFAULT_STALL,
        }
    }

    /// How long to wait for the error body's next frame before handing the response on
    /// without an [`ErrorBody`]; default 100 ms.
    pub fn stall_timeout(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }
}

impl<S> Layer<S> for BufferErrorBodyLayer {
    type Service = BufferErrorBody<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BufferErrorBody {
            inner,
            limit: self.limit,
            stall: self.stall,
        }
    }
}

/// The service of [`BufferErrorBodyLayer`].
#[derive(Debug, Clone)]
pub struct BufferErrorBody<S> {
    inner: S,
    limit: usize,
    stall: Duration,
}

impl<S, Req, B> Service<Req> for BufferErrorBody<S>
where
    S: Service<Req, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<BufferedBody<B>>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<BufferedBody<B>>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let future = self.inner.call(request);
        let (limit, stall) = (self.limit, self.stall);
        Box::pin(async move {
            let response = future.await.map_err(Into::into)?;
            let status = response.status();
            let (mut parts, body) = response.into_parts();
            if !(status.is_client_error() || status.is_server_error()) {
                return Ok(Response::from_parts(
                    parts,
                    BufferedBody {
                        prefix: None,
                        rest: Some(body),
                    },
                ));
            }
            let body = BufferedBody::buffer_within(body, limit, Some(stall))
                .await
                .map_err(Into::into)?;
            if let Some(bytes) = body.as_bytes() {
                parts.extensions.insert(ErrorBody(bytes.clone()));
            }
            Ok(Response::from_parts(parts, body))
        })
    }
}
