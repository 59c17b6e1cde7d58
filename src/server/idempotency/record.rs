//! Relaying a response to the client as it is produced while recording it for replays, and
//! writing the result under the claim.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http::header::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use super::claim::{LeaseKeeper, release};
use super::respond::not_replayable;
use super::{Config, OversizedResponse};
use crate::server::CatchUnwind;
use crate::server::body::Relayed;
use crate::server::memory::MARKER_RESERVE;
use crate::server::store::{Claim, IdempotencyStore, Ownership, ScopedKey, Stored};
use tower::BoxError;

/// Relays a response to the client as it is produced and records it for replays.
pub(super) struct Recorder<St> {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) store: St,
    pub(super) key: ScopedKey,
    pub(super) claim: Claim,
    pub(super) config: Arc<Config>,
    /// Renews the claim until the result is written (dropped then).
    pub(super) keeper: Option<LeaseKeeper>,
    /// When the claim ends even if the response is still being produced.
    pub(super) deadline: Instant,
}

impl<St: IdempotencyStore> Recorder<St> {
    pub(super) async fn relay<B>(mut self, body: B, tx: mpsc::Sender<Relayed>)
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let mut body = std::pin::pin!(body);
        let timer = tokio::time::sleep_until(self.deadline);
        let mut timer = std::pin::pin!(timer);
        let mut client = Some(tx);
        let mut recording = Some(BytesMut::new());
        let limit = self.config.max_response_body;
        let exact = body.size_hint().exact();
        // Ends when the body does (or fails); each turn relays one frame.
        loop {
            // A body that panics is a body that failed: caught here, the client's body ends
            // in an error (not cleanly, as if the half sent were whole) and the result is
            // not stored as if it were complete.
            let polled = CatchUnwind::new(body.frame());
            let Some(frame) = or_timer(polled, timer.as_mut(), recording.is_some()).await else {
                recording = None;
                self.still_running().await;
                continue;
            };
            // Converted at once: the handler's error type needs not be `Send`.
            let frame = relayed(frame);
            let frame = match frame {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    if recording.take().is_some() {
                        let why = format!(
                            "the response (status {}) failed while being produced: {e}",
                            self.status.as_u16()
                        );
                        self.unstorable(&why).await;
                    }
                    if let Some(tx) = client.take() {
                        let _ = tx.send(Err(e)).await;
                    }
                    return;
                }
            };
            if let (Some(buf), Some(data)) = (recording.as_mut(), frame.data_ref()) {
                if buf.len().saturating_add(data.len()) > limit {
                    recording = None;
                    let why = format!(
                        "the response (status {}) was larger than the {limit} bytes kept",
                        self.status.as_u16()
                    );
                    self.unstorable(&why).await;
                } else {
                    buf.extend_from_slice(data);
                }
            }
            // The last data frame goes out only once the result is written: a server that
            // knows the length ends the response with it, and the client's next request with
            // this key must find the result, not a claim in flight.
            let last = body.is_end_stream()
                || exact.is_some_and(|n| recording.as_ref().is_some_and(|b| b.len() as u64 >= n));
            if let Some(buf) = recording.take_if(|_| last) {
                let stored = self.stored(buf);
                let pending = self.write(stored).await;
                client = self.send(client, frame, timer.as_mut(), &mut None).await;
                if let Some(stored) = pending {
                    drop(client.take());
                    self.write_until_done(stored).await;
                }
                self.keeper = None;
                continue;
            }
            client = self
                .send(client, frame, timer.as_mut(), &mut recording)
                .await;
        }
        if let Some(buf) = recording {
            // The client's body ends once the result is written (or the first write
            // failed), so its next request with this key finds it.
            let stored = self.stored(buf);
            self.complete(stored, client).await;
        }
    }

    fn stored(&mut self, body: BytesMut) -> Stored {
        Stored {
            status: self.status,
            headers: std::mem::take(&mut self.headers),
            body: body.freeze(),
        }
    }

    /// Sends `frame` to the client, if it is still there; gives up recording meanwhile if the
    /// claim's time runs out while a slow client holds the relay.
    async fn send(
        &mut self,
        client: Option<mpsc::Sender<Relayed>>,
        frame: Frame<Bytes>,
        mut timer: Pin<&mut Sleep>,
        recording: &mut Option<BytesMut>,
    ) -> Option<mpsc::Sender<Relayed>> {
        let tx = client?;
        // At most two turns: the timer fires once.
        let sent = loop {
            match or_timer(tx.reserve(), timer.as_mut(), recording.is_some()).await {
                Some(Ok(permit)) => {
                    permit.send(Ok(frame));
                    break true;
                }
                Some(Err(_closed)) => break false, // the client hung up; keep recording
                None => {
                    *recording = None;
                    self.still_running().await;
                }
            }
        };
        sent.then_some(tx)
    }

    async fn still_running(&mut self) {
        let why = format!(
            "the response (status {}) was still being produced after {:?}",
            self.status.as_u16(),
            self.config.max_claim_time
        );
        self.unstorable(&why).await;
    }

    /// The request ran, but its response will not be kept whole.
    async fn unstorable(&mut self, why: &str) {
        match self.config.oversized {
            OversizedResponse::ReplayError => {
                tracing::warn!(key = %self.key.key(), why, "response not stored; retries with this key get a 'not replayable' answer");
                if let Some(marker) = self.write(not_replayable(why)).await {
                    // The store failed: the marker is written again in a task of its own (the
                    // claim kept meanwhile), not here, where it would hold the client's
                    // response until the store is back.
                    let mut writer = self.detached();
                    tokio::spawn(async move { writer.write_until_done(marker).await });
                }
                self.keeper = None;
            }
            OversizedResponse::Release => {
                tracing::warn!(key = %self.key.key(), why, "response not stored; key released, a retry will run the request again");
                self.keeper = None;
                release(&self.store, &self.key, self.claim.token, &self.config, why).await;
            }
        }
    }

    /// A recorder of the same claim that takes over its lease keeper, to write on its own.
    fn detached(&mut self) -> Self {
        Recorder {
            status: self.status,
            headers: HeaderMap::new(),
            store: self.store.clone(),
            key: self.key.clone(),
            claim: self.claim,
            config: self.config.clone(),
            keeper: self.keeper.take(),
            deadline: self.deadline,
        }
    }

    /// Writes the result under the claim; on a store failure, drops the client's relay (its
    /// body ends) and writes again with backoff while the claim is kept. Ends the claim.
    async fn complete(&mut self, stored: Stored, client: Option<mpsc::Sender<Relayed>>) {
        if let Some(stored) = self.write(stored).await {
            drop(client);
            self.write_until_done(stored).await;
        }
        self.keeper = None;
    }

    /// One write of the result; `Some(result)` if the store failed and it must be written
    /// again. A result the store has no room for is replaced by the small "not replayable"
    /// marker, for which every claim holds room.
    async fn write(&mut self, mut stored: Stored) -> Option<Stored> {
        // At most two turns: the marker always fits.
        loop {
            let ttl = self.config.ttl;
            match (self.store)
                .complete(&self.key, &self.claim, stored.clone(), ttl)
                .await
            {
                Ok(Ownership::Held) => return None,
                Ok(Ownership::Lost) => {
                    tracing::error!(key = %self.key.key(), "idempotency claim lost before its result was written (taken over by a recovery?); result not stored");
                    return None;
                }
                Err(e) if e.is_full() && stored.size() > MARKER_RESERVE => {
                    let why = format!("the idempotency store had no room for it ({})", e.message());
                    tracing::warn!(key = %self.key.key(), error = %e, "result not stored; keeping a 'not replayable' marker");
                    stored = not_replayable(&why);
                }
                Err(e) => {
                    tracing::warn!(key = %self.key.key(), error = %e, "could not store an idempotent response; trying again (the claim is kept)");
                    return Some(stored);
                }
            }
        }
    }

    /// Writes again with backoff (the lease keeper renews the claim meanwhile), up to the TTL.
    async fn write_until_done(&mut self, mut stored: Stored) {
        let give_up = crate::time::after(Instant::now(), self.config.ttl);
        let cap = (self.config.lease / 3).max(Duration::from_millis(100));
        let mut wait = Duration::from_millis(50);
        // Bounded by the TTL; each turn is one write.
        while Instant::now() + wait <= give_up {
            tokio::time::sleep(wait).await;
            match self.write(stored).await {
                None => return,
                Some(again) => stored = again,
            }
            wait = (wait * 2).min(cap);
        }
        tracing::error!(key = %self.key.key(), "could not store an idempotent response before its TTL; giving up");
    }
}

/// What polling the handler's body for a frame gave: the frame, or the panic it raised.
type Polled<E> = Result<Option<Result<Frame<Bytes>, E>>, Box<dyn Any + Send>>;

/// A frame as polled (or the panic that polling it raised), as it is relayed.
fn relayed<E: Into<BoxError>>(polled: Polled<E>) -> Option<Relayed> {
    match polled {
        Ok(frame) => frame.map(|f| f.map_err(Into::into)),
        Err(_panic) => Some(Err("the response body panicked".into())),
    }
}

/// `fut`'s output, or `None` if the armed `timer` fires first.
async fn or_timer<F: Future>(fut: F, mut timer: Pin<&mut Sleep>, armed: bool) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if armed && timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}
