//! [`ResponseFuture`]: one attempt, from the request to the commit point (headers, then
//! the held prefix up to the first content event).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::response::Parts;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::BoxError;

use super::body::{GuardedBody, Mode, Recorder, Watch};
use super::error::{FirstTokenError, StreamFailure};
use super::sse::Scanner;
use super::{Config, StreamResponse};

/// The attempt between its headers and its commit point.
struct Reading<B, X> {
    parts: Parts,
    extra: X,
    body: B,
    prefix: VecDeque<Frame<Bytes>>,
    watch: Box<Watch>,
}

pin_project! {
    /// The future of [`StreamGuard`](super::StreamGuard): resolves at the commit point (the
    /// first content event of a stream; the headers of anything else), or fails with a
    /// [`FirstTokenError`] the retry layer can retry.
    pub struct ResponseFuture<F, R>
    where
        R: StreamResponse,
    {
        #[pin]
        future: F,
        called: bool,
        reading: Option<Reading<R::Body, R::Extra>>,
        config: Arc<Config>,
        deadline: Option<Instant>,
        timer: Option<Pin<Box<Sleep>>>,
        recorder: Option<Recorder>,
    }
}

impl<F, R: StreamResponse> ResponseFuture<F, R> {
    pub(crate) fn new(future: F, config: Arc<Config>, recorder: Option<Recorder>) -> Self {
        let deadline = config
            .first_token_timeout
            .map(|t| crate::time::after(Instant::now(), t));
        ResponseFuture {
            future,
            called: false,
            reading: None,
            config,
            deadline,
            timer: None,
            recorder,
        }
    }
}

fn is_event_stream(parts: &Parts) -> bool {
    parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| {
            let v = v.as_bytes().trim_ascii_start();
            v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream")
        })
}

impl<F, R, E> Future for ResponseFuture<F, R>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
    R: StreamResponse,
    R::Body: Body + Unpin,
    <R::Body as Body>::Error: Into<BoxError>,
{
    type Output = Result<R::Output, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if !*this.called {
            match this.future.poll(cx) {
                Poll::Ready(Err(e)) => {
                    *this.called = true;
                    return Poll::Ready(Err(e.into()));
                }
                Poll::Ready(Ok(response)) => {
                    *this.called = true;
                    let (response, extra) = response.into_http();
                    let (parts, body) = response.into_parts();
                    let mode = if !parts.status.is_success() {
                        None
                    } else if is_event_stream(&parts) {
                        Some(Mode::Sse(Scanner::new(this.config.preamble.clone())))
                    } else if this.config.chunked
                        && !parts.headers.contains_key(http::header::CONTENT_LENGTH)
                    {
                        Some(Mode::Bytes { frames: 0 })
                    } else {
                        None
                    };
                    let Some(mode) = mode else {
                        let response =
                            http::Response::from_parts(parts, GuardedBody::passthrough(body));
                        return Poll::Ready(Ok(R::finish(response, extra)));
                    };
                    *this.reading = Some(Reading {
                        parts,
                        extra,
                        body,
                        prefix: VecDeque::new(),
                        watch: Box::new(Watch {
                            mode,
                            bytes: 0,
                            recorder: this.recorder.take(),
                        }),
                    });
                }
                Poll::Pending => {
                    let timeout = this.config.first_token_timeout;
                    return poll_timer(*this.deadline, timeout, this.timer, cx, 0);
                }
            }
        }
        let Some(mut reading) = this.reading.take() else {
            // Polled after completion: a broken caller; answer an error rather than panic.
            return Poll::Ready(Err("stream guard future polled after completion".into()));
        };
        let timeout = this.config.first_token_timeout;
        // Bounded by the body: each turn consumes a frame, and the prefix is capped.
        loop {
            match Pin::new(&mut reading.body).poll_frame(cx) {
                Poll::Pending => {
                    let bytes = reading.watch.bytes;
                    *this.reading = Some(reading);
                    return poll_timer(*this.deadline, timeout, this.timer, cx, bytes);
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(Box::new(FirstTokenError {
                        cause: StreamFailure::Transport(e.into()),
                        bytes: reading.watch.bytes,
                    })));
                }
                Poll::Ready(None) => {
                    // A stream that ended cleanly before any content is a whole (empty)
                    // answer, not a failure.
                    return Poll::Ready(Ok(commit::<R>(reading, false)));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = frame.map_data(|mut d| d.copy_to_bytes(d.remaining()));
                    if let Some(data) = frame.data_ref() {
                        reading.watch.feed(data);
                    }
                    reading.prefix.push_back(frame);
                    if let Mode::Sse(Scanner {
                        error: Some((0, e)),
                        ..
                    }) = &reading.watch.mode
                    {
                        return Poll::Ready(Err(Box::new(FirstTokenError {
                            cause: StreamFailure::InBand(e.clone()),
                            bytes: reading.watch.bytes,
                        })));
                    }
                    let content = reading.watch.content();
                    let over = reading.watch.bytes > this.config.max_prefix as u64;
                    if content > 0 || over {
                        if content == 0 {
                            tracing::warn!(
                                target: "tower_retry_guard",
                                held = reading.watch.bytes,
                                "no content event within the prefix limit: committed, no retry from here"
                            );
                        }
                        return Poll::Ready(Ok(commit::<R>(reading, true)));
                    }
                }
            }
        }
    }
}

/// Hands the held prefix and the rest of the stream to the caller.
fn commit<R: StreamResponse>(reading: Reading<R::Body, R::Extra>, more: bool) -> R::Output {
    let Reading {
        parts,
        extra,
        body,
        prefix,
        watch,
    } = reading;
    // An error event that followed the first content inside the prefix.
    let failed = match &watch.mode {
        Mode::Sse(Scanner {
            error: Some((_, e)),
            ..
        }) => Some(watch.fail(StreamFailure::InBand(e.clone()))),
        _ => None,
    };
    let body = GuardedBody::committed(prefix, more.then_some(body), watch, failed);
    R::finish(http::Response::from_parts(parts, body), extra)
}

fn poll_timer<T>(
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    timer: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
    bytes: u64,
) -> Poll<Result<T, BoxError>> {
    let (Some(deadline), Some(timeout)) = (deadline, timeout) else {
        return Poll::Pending;
    };
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(Box::new(FirstTokenError {
            cause: StreamFailure::FirstTokenTimeout(timeout),
            bytes,
        }))),
        Poll::Pending => Poll::Pending,
    }
}
