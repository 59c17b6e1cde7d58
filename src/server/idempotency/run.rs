//! One keyed request: claim the key, run the handler once, relay and record its response,
//! and end the claim — whatever the store does meanwhile.
//!
//! The promise kept here: once the handler started for a key, it is not started again for
//! that key because the store stalled, a write failed or a call timed out. Every step after
//! the claim carries its [`ClaimToken`]; a claim is renewed while its holder works (a
//! [`LeaseKeeper`]); a result that could not be written is written again with backoff while
//! the claim is kept; a `begin` or `release` that failed is released again (by token) over
//! one lease, in case the store runs it late.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::Service;

use super::claim::{LeaseKeeper, release, release_later};
use super::record::Recorder;
use super::respond::{kind, outcome_unknown, problem, replay, retry_later, storable_headers};
use super::{Config, ReleaseKey};
use crate::server::CatchUnwind;
use crate::server::body::IdempotencyBody;
use crate::server::store::{Begin, Claim, ClaimToken, Fingerprint, IdempotencyStore, ScopedKey};
use tower::BoxError;

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
        Ok(Begin::Claimed) => run(inner, store, config, key, asked, req).await,
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

/// Runs the handler under `claim`, and hands its response on: relayed and recorded,
/// or (a response that releases the key) as it is.
async fn run<S, St, B, ResBody>(
    mut inner: S,
    store: St,
    config: Arc<Config>,
    key: ScopedKey,
    claim: Claim,
    req: Request<B>,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    St: IdempotencyStore,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let deadline = crate::time::after(Instant::now(), config.max_claim_time);
    let keeper = LeaseKeeper::start(&store, &key, claim, deadline);
    let token = claim.token;
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
        claim,
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
