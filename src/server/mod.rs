//! The provider side: run each keyed request once, and replay its result to retries.
//!
//! A client's retry layer sends the same `Idempotency-Key` on every attempt of one logical
//! call. That is worth something only if the server deduplicates on it; this module does so.
//!
//! - [`IdempotencyLayer`] / [`Idempotency`] — for HTTP servers (axum, hyper, any
//!   `tower::Service<http::Request<B>>`), with the IETF Idempotency-Key draft's semantics:
//!
//!   | request | answer |
//!   |---|---|
//!   | `POST`/`PATCH` (configurable) without a key | 400 |
//!   | malformed key | 400 |
//!   | keyed, principal required but unreadable | 401 |
//!   | keyed body over the limit (1 MiB) | 413 |
//!   | first with a key | runs; its response is relayed as produced and stored (24 h) |
//!   | repeat, first finished | the stored response, same status, headers and body, plus `Idempotent-Replayed: true` |
//!   | repeat, first still running | 409 with `Retry-After: 1` |
//!   | repeat, first abandoned (its lease ran out without a result) | not run: 500 "outcome unknown", replayed ([`UnknownOutcome`]) |
//!   | same key, other method, path or body | 422 |
//!   | the store fails | 503 (a side effect never runs without deduplication) |
//!   | the store is full (for everyone, or for this principal) | 503 saying so, `Retry-After: 30` |
//!
//!   **The promise.** Once a handler started for a key, the layer never starts it again for
//!   that key because the store stalled, a write failed or a call timed out. Claims carry a
//!   token (fencing): renew, complete and release act on their own claim only. A result that
//!   could not be written is written again with backoff while the claim is kept; a `begin`
//!   that timed out is released again by its token, so retries are not locked out by a claim
//!   nobody holds. A claim whose lease ran out is *abandoned*, not free: its outcome is
//!   unknown, and re-running it is the user's explicit choice ([`UnknownOutcome`]).
//!
//!   **The fault model**: a store that stalls, fails a write, times out or dies; a handler
//!   that panics, fails or streams forever; a client that hangs up; hostile keys, bodies and
//!   principals. **Defaults**: 429, 503 and 529 release the key (nothing was processed, so
//!   the client's retry gets a fresh attempt), other 5xx are stored (Stripe: execution
//!   began); claims leased 60 s, renewed for at most 10 min; responses stored up to 1 MiB,
//!   larger ones leave a "completed, not replayable" marker; the memory store holds at most
//!   100 000 keys and 256 MiB, and 25 000 keys and 64 MiB per principal.
//!
//!   Keys are scoped by a principal read from the request ([`IdempotencyLayerBuilder::principal`]),
//!   so one user's key never replays another's response; [`IdempotencyLayerBuilder::principal_required`]
//!   refuses keyed requests without one. The handler runs in a task of its own: a client that
//!   hangs up mid-request does not cancel it, and its result is stored for the retry (the
//!   incident this crate exists for). Its response is relayed frame by frame as it is
//!   produced (a streamed LLM answer reaches the client at once) while it is recorded. A
//!   handler that panics or fails releases its key.
//! - [`DedupeLayer`] / [`Dedupe`] — the same guarantee for any `tower::Service` (tool
//!   executors): concurrent duplicates wait for the first call and share its result; later
//!   ones get the kept result.
//! - [`IdempotencyStore`] — where keys live: claim, then complete or release.
//!   [`MemoryIdempotencyStore`] keeps them in this process; `RedisStore` (feature `redis`)
//!   shares them between processes.
//!
//! ```
//! use axum::{Router, body::Body, routing::post};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_retry_guard::server::{IDEMPOTENT_REPLAYED, IdempotencyLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new()
//!     .route("/emails", post(|body: String| async move { format!("sent {body}") }))
//!     .layer(IdempotencyLayer::memory());
//!
//! let send = || {
//!     Request::post("/emails")
//!         .header("idempotency-key", "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"")
//!         .body(Body::from("hello"))
//!         .unwrap()
//! };
//! let first = app.clone().oneshot(send()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::OK);
//! assert!(first.headers().get(IDEMPOTENT_REPLAYED).is_none());
//!
//! // The retry does not send a second email: it gets the first response again.
//! let retry = app.clone().oneshot(send()).await.unwrap();
//! assert_eq!(retry.headers()[IDEMPOTENT_REPLAYED], "true");
//! let body = axum::body::to_bytes(retry.into_body(), 1024).await.unwrap();
//! assert_eq!(body, "sent hello");
//!
//! // No key on a POST: 400.
//! let keyless = Request::post("/emails").body(Body::from("hello")).unwrap();
//! assert_eq!(app.oneshot(keyless).await.unwrap().status(), StatusCode::BAD_REQUEST);
//! # }
//! ```

mod body;
mod config;
mod dedupe;
mod idempotency;
mod memory;
mod store;

pub use self::body::IdempotencyBody;
#[doc(no_inline)]
pub use self::config::ConfigError;
pub use self::dedupe::{Dedupe, DedupeError, DedupeFuture, DedupeLayer, KeyFn, ScopeFn};
pub use self::idempotency::{
    IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, Idempotency, IdempotencyLayer, IdempotencyLayerBuilder,
    OversizedResponse, ReleaseKey, ResponseFuture, UnknownOutcome,
};
pub(crate) use self::idempotency::{LeaseKeeper, release_later};
pub use self::memory::{MemoryIdempotencyStore, MemoryIdempotencyStoreBuilder};
pub use self::store::{
    Begin, Claim, ClaimToken, Fingerprint, IdempotencyStore, Ownership, ScopedKey, Stored,
};

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

pin_project! {
    /// Polls a future, turning a panic into an `Err` (so a panicking handler can release its
    /// key instead of holding it until its lease ends).
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(inner: F) -> Self {
        CatchUnwind { inner }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        // The future is never polled again after a panic, so no broken state is observed.
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
