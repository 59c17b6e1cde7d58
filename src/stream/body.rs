//! [`GuardedBody`]: the held prefix, then the rest of the stream unbuffered, watched for a
//! failure after the commit point.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tower::BoxError;

use super::error::{MidStreamError, StreamFailure};
use super::sse::Scanner;
use crate::observe::RetryStats;
use crate::request::Operation;

/// Where a stream's mid-stream failure is recorded: the stats and the operation's name,
/// kept unformatted until a failure needs it.
#[derive(Debug, Clone)]
pub(crate) struct Recorder {
    pub(crate) stats: RetryStats,
    pub(crate) operation: OpName,
}

#[derive(Debug, Clone)]
pub(crate) enum OpName {
    Named(Operation),
    MethodPath(http::Method, http::Uri),
}

impl Recorder {
    fn record(&self, failure: &StreamFailure) {
        let kind = failure.kind();
        match &self.operation {
            OpName::Named(op) => self.stats.record_mid_stream_failure(op.as_str(), kind),
            OpName::MethodPath(m, u) => self
                .stats
                .record_mid_stream_failure(&format!("{m} {}", u.path()), kind),
        }
        tracing::warn!(
            target: "tower_retry_guard",
            operation = ?self.operation,
            "error.type" = kind.as_str(),
            error = %failure,
            "stream failed after its first content event; not retried"
        );
    }
}

/// How a stream is read: as server-sent events, or as bytes (first byte = commit).
#[derive(Debug)]
pub(crate) enum Mode {
    Sse(Scanner),
    Bytes { frames: u64 },
}

/// A guarded stream's account: what it has shown and delivered.
#[derive(Debug)]
pub(crate) struct Watch {
    pub(crate) mode: Mode,
    pub(crate) bytes: u64,
    pub(crate) recorder: Option<Recorder>,
}

impl Watch {
    pub(crate) fn feed(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        match &mut self.mode {
            Mode::Sse(scanner) => scanner.feed(data),
            Mode::Bytes { frames } => *frames += u64::from(!data.is_empty()),
        }
    }

    /// Content events (or data frames) seen, up to the first error event.
    pub(crate) fn content(&self) -> u64 {
        match &self.mode {
            Mode::Sse(s) => s.error.as_ref().map_or(s.content, |e| e.0),
            Mode::Bytes { frames } => *frames,
        }
    }

    pub(crate) fn fail(&self, cause: StreamFailure) -> MidStreamError {
        if let Some(recorder) = &self.recorder {
            recorder.record(&cause);
        }
        MidStreamError {
            events: self.content(),
            bytes: self.bytes,
            cause,
        }
    }
}

/// The body of a response that passed [`StreamGuard`](super::StreamGuard).
///
/// For a guarded stream: the frames held until the first content event, then the rest of
/// the stream as it arrives. A failure after that point is a [`MidStreamError`] (the body's
/// `BoxError` downcasts to it), after which the body ends. Any other response's body passes
/// through untouched (its errors boxed).
#[derive(Debug)]
pub struct GuardedBody<B> {
    prefix: VecDeque<Frame<Bytes>>,
    inner: Option<B>,
    watch: Option<Box<Watch>>,
    failed: Option<MidStreamError>,
}

impl<B> GuardedBody<B> {
    pub(crate) fn passthrough(body: B) -> Self {
        GuardedBody {
            prefix: VecDeque::new(),
            inner: Some(body),
            watch: None,
            failed: None,
        }
    }

    /// A stream committed with its held prefix; `failed` when an error event already
    /// followed the first content in the prefix.
    pub(crate) fn committed(
        prefix: VecDeque<Frame<Bytes>>,
        inner: Option<B>,
        watch: Box<Watch>,
        failed: Option<MidStreamError>,
    ) -> Self {
        GuardedBody {
            prefix,
            inner: if failed.is_some() { None } else { inner },
            watch: Some(watch),
            failed,
        }
    }

    /// Whether the response was a guarded stream (it had a commit point).
    pub fn is_guarded(&self) -> bool {
        self.watch.is_some()
    }
}

impl<B> Body for GuardedBody<B>
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
        let this = &mut *self;
        if let Some(frame) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(failed) = this.failed.take() {
            return Poll::Ready(Some(Err(Box::new(failed))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = frame.map_data(|mut d| d.copy_to_bytes(d.remaining()));
                if let (Some(watch), Some(data)) = (this.watch.as_mut(), frame.data_ref()) {
                    let had_error = matches!(&watch.mode, Mode::Sse(s) if s.error.is_some());
                    watch.feed(data);
                    if !had_error {
                        if let Mode::Sse(Scanner {
                            error: Some((_, e)),
                            ..
                        }) = &watch.mode
                        {
                            // The error event is delivered as sent; the typed error follows it
                            // and the stream ends there.
                            let cause = StreamFailure::InBand(e.clone());
                            this.failed = Some(watch.fail(cause));
                            this.inner = None;
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                match this.watch.as_ref() {
                    Some(watch) => {
                        let failed = watch.fail(StreamFailure::Transport(e.into()));
                        Poll::Ready(Some(Err(Box::new(failed))))
                    }
                    None => Poll::Ready(Some(Err(e.into()))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty()
            && self.failed.is_none()
            && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held: u64 = self
            .prefix
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        match &self.inner {
            None => SizeHint::with_exact(held),
            Some(inner) => {
                let h = inner.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower().saturating_add(held));
                if let Some(upper) = h.upper() {
                    out.set_upper(upper.saturating_add(held));
                }
                out
            }
        }
    }
}
