//! One keyed request: claim the key, run the handler once, relay and record its response,
//! and end the claim — whatever the store does meanwhile.
//!
//! The promise kept here: once the handler started for a key, it is not started again for
//! that key because the store stalled, a write failed or a call timed out. Every step after
//! the claim carries its [`ClaimToken`]; a claim is renewed while its holder works (a
//! [`LeaseKeeper`]); a result that could not be written is written again with backoff while
//! the claim is kept; a `begin` or `release` that failed is released again (by token) over
//! one lease, in case the store runs it late.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tower::Service;

use super::respond::{
    kind, not_replayable, outcome_unknown, problem, replay, retry_later, storable_headers,
};
use super::{Config, OversizedResponse, ReleaseKey};
use crate::server::CatchUnwind;
use crate::server::body::{BoxError, IdempotencyBody, Relayed};
use crate::server::memory::MARKER_RESERVE;
use crate::server::store::{
    Begin, Claim, ClaimToken, Fingerprint, IdempotencyStore, Ownership, ScopedKey, Stored,
};

/// Frames relayed ahead of a slow client before the recorder waits for it.
const RELAY_BUFFER: usize = 16;

/// Claims `key` and answers: runs the handler (claimed), or replays, or refuses.
pub(super) async fn serve<S, St, B, ResBody>(
    inner: S,
    store: St,
    config: Arc<Config>,
    key: ScopedKey,
    fingerprint: Fingerprint,
    req: Request<B>,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    St: IdempotencyStore,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let claim = |take_over| Claim {
        token: ClaimToken::random(),
        fingerprint,
        lease: config.lease,
        keep: config.ttl,
        take_over,
    };
    let mut asked = claim(false);
    // At most two turns: an abandoned claim is taken over only once the user's recovery
    // says so.
    let begun = loop {
        let begun = store.begin(&key, &asked).await;
        if let Err(e) = &begun {
            if !e.is_full() {
                // The store may still run this `begin` (a stalled Redis runs its queue when
                // it wakes): free whatever it claims, so retries are not locked out by a
                // claim nobody holds.
                release_later(store.clone(), key.clone(), asked.token, config.lease);
            }
        }
        match begun {
            Ok(Begin::Abandoned) if !asked.take_over && config.unknown.allows_rerun(&key).await => {
                tracing::warn!(key = %key.key(), "idempotency: the earlier claim was abandoned; running the request again, as the recovery chose");
                asked = claim(true);
            }
            other => break other,
        }
    };
    match begun {
        Ok(Begin::Claimed) => run(inner, store, config, key, asked.token, req).await,
        Ok(Begin::InFlight) => Ok(retry_later(
            StatusCode::CONFLICT,
            kind::IN_PROGRESS,
            "Request in progress",
            "a request with this idempotency key is still being processed; retry later",
            1,
        )),
        Ok(Begin::Mismatch) => Ok(problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            kind::KEY_REUSED,
            "Idempotency key reused",
            "this idempotency key was used for a different request (method, path or body); use a new key for a new request",
        )),
        Ok(Begin::Done(stored)) => {
            tracing::debug!(key = %key.key(), status = stored.status.as_u16(), "idempotent replay");
            Ok(replay(stored))
        }
        Ok(Begin::Abandoned) => {
            tracing::warn!(key = %key.key(), "idempotency: the earlier request's outcome is unknown; not running it again");
            Ok(outcome_unknown())
        }
        Err(e) if e.is_full() => {
            tracing::warn!(key = %key.key(), error = %e, "idempotency store full; refusing the request");
            Ok(retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                kind::STORE_FULL,
                "Idempotency store full",
                &format!(
                    "the request was not processed: no new idempotency key can be kept now ({}); retry later",
                    e.message()
                ),
                30,
            ))
        }
        Err(e) => {
            tracing::warn!(key = %key.key(), error = %e, "idempotency store failed; refusing the request");
            Ok(retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                kind::STORE_UNAVAILABLE,
                "Idempotency store unavailable",
                "the request was not processed because its idempotency key could not be checked; retry later",
                1,
            ))
        }
    }
}

/// Runs the handler under the claim `token`, and hands its response on: relayed and recorded,
/// or (a response that releases the key) as it is.
async fn run<S, St, B, ResBody>(
    mut inner: S,
    store: St,
    config: Arc<Config>,
    key: ScopedKey,
    token: ClaimToken,
    req: Request<B>,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    St: IdempotencyStore,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let deadline = Instant::now() + config.max_claim_time;
    let keeper = LeaseKeeper::start(&store, &key, token, config.lease, deadline);
    let res = match CatchUnwind::new(inner.call(req)).await {
        Ok(Ok(res)) => res,
        Ok(Err(e)) => {
            drop(keeper);
            release(&store, &key, token, &config, "the inner service failed").await;
            return Err(e);
        }
        Err(_panic) => {
            drop(keeper);
            release(&store, &key, token, &config, "the handler panicked").await;
            return Ok(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                kind::INTERNAL,
                "Internal server error",
                "the request failed; it may be retried with the same idempotency key",
            ));
        }
    };
    let status = res.status();
    if res.extensions().get::<ReleaseKey>().is_some()
        || config.release_statuses.contains(&status)
        || (status.is_server_error() && !config.store_server_errors)
    {
        drop(keeper);
        let why = format!("the response's status {} releases the key", status.as_u16());
        release(&store, &key, token, &config, &why).await;
        return Ok(res.map(IdempotencyBody::stream));
    }
    let (parts, body) = res.into_parts();
    let hint = body.size_hint();
    let (tx, rx) = mpsc::channel(RELAY_BUFFER);
    let recorder = Recorder {
        status: parts.status,
        headers: storable_headers(&parts.headers),
        store,
        key,
        token,
        config,
        keeper: Some(keeper),
        deadline,
    };
    // Its own task: a client that hangs up does not cut the recording.
    tokio::spawn(recorder.relay(body, tx));
    Ok(Response::from_parts(
        parts,
        IdempotencyBody::relayed(rx, hint),
    ))
}

/// Relays a response to the client as it is produced and records it for replays.
struct Recorder<St> {
    status: StatusCode,
    headers: HeaderMap,
    store: St,
    key: ScopedKey,
    token: ClaimToken,
    config: Arc<Config>,
    /// Renews the claim until the result is written (dropped then).
    keeper: Option<LeaseKeeper>,
    /// When the claim ends even if the response is still being produced.
    deadline: Instant,
}

impl<St: IdempotencyStore> Recorder<St> {
    async fn relay<B>(mut self, body: B, tx: mpsc::Sender<Relayed>)
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
            let Some(frame) = or_timer(body.frame(), timer.as_mut(), recording.is_some()).await
            else {
                recording = None;
                self.still_running().await;
                continue;
            };
            // Converted at once: the handler's error type needs not be `Send`.
            let frame: Option<Relayed> = frame.map(|f| f.map_err(Into::into));
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
                self.complete(not_replayable(why), None).await;
            }
            OversizedResponse::Release => {
                tracing::warn!(key = %self.key.key(), why, "response not stored; key released, a retry will run the request again");
                self.keeper = None;
                release(&self.store, &self.key, self.token, &self.config, why).await;
            }
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
                .complete(&self.key, self.token, stored.clone(), ttl)
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
        let give_up = Instant::now() + self.config.ttl;
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

/// `fut`'s output, or `None` if the armed `timer` fires first.
async fn or_timer<F: Future>(fut: F, timer: Pin<&mut Sleep>, armed: bool) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        _ = timer, if armed => None,
    }
}

/// Renews a claim every third of its lease while its holder works, up to a deadline; stops
/// when dropped (the claim ended) or when the claim is lost.
struct LeaseKeeper(JoinHandle<()>);

impl LeaseKeeper {
    fn start<St: IdempotencyStore>(
        store: &St,
        key: &ScopedKey,
        token: ClaimToken,
        lease: Duration,
        deadline: Instant,
    ) -> Self {
        let (store, key) = (store.clone(), key.clone());
        LeaseKeeper(tokio::spawn(async move {
            let every = (lease / 3).max(Duration::from_millis(10));
            let mut next = every;
            // Bounded by `deadline`; each turn is one renewal.
            while Instant::now() + next < deadline {
                tokio::time::sleep(next).await;
                match store.renew(&key, token, lease).await {
                    Ok(Ownership::Held) => next = every,
                    Ok(Ownership::Lost) => {
                        tracing::warn!(key = %key.key(), "idempotency claim lost while its request runs (taken over by a recovery?)");
                        return;
                    }
                    Err(e) => {
                        // Sooner than usual: the lease is running out.
                        tracing::warn!(key = %key.key(), error = %e, "could not renew an idempotency lease");
                        next = (every / 4).max(Duration::from_millis(10));
                    }
                }
            }
            tracing::warn!(key = %key.key(), "idempotency claim held for its maximum time; no longer renewed");
        }))
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Gives up the claim `token`; if the store fails, tries again in the background.
async fn release<St: IdempotencyStore>(
    store: &St,
    key: &ScopedKey,
    token: ClaimToken,
    config: &Config,
    why: &str,
) {
    tracing::debug!(key = %key.key(), why, "releasing idempotency key");
    if let Err(e) = store.release(key, token).await {
        tracing::warn!(key = %key.key(), error = %e, "could not release an idempotency key; trying again");
        release_later(store.clone(), key.clone(), token, config.lease);
    }
}

/// Releases the claim `token` again over one lease, in the background: a `begin` or
/// `release` that timed out may still run in a stalled store, late or (after a reconnect)
/// out of order. The token makes this harmless to any other claim.
fn release_later<St: IdempotencyStore>(
    store: St,
    key: ScopedKey,
    token: ClaimToken,
    lease: Duration,
) {
    tokio::spawn(async move {
        let step = (lease / 4).max(Duration::from_millis(25));
        let end = Instant::now() + lease;
        // Bounded by one lease; each turn is one release.
        loop {
            if let Err(e) = store.release(&key, token).await {
                tracing::debug!(key = %key.key(), error = %e, "idempotency release failed; trying again");
            }
            if Instant::now() + step > end {
                break;
            }
            tokio::time::sleep(step).await;
        }
    });
}
