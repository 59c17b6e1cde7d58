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
//!   | keyed body over the limit (1 MiB) | 413 |
//!   | first with a key | runs; its response is stored (24 h) |
//!   | repeat, first finished | the stored response, same status, headers and body, plus `Idempotent-Replayed: true` |
//!   | repeat, first still running | 409 with `Retry-After: 1` |
//!   | same key, other method, path or body | 422 |
//!   | the store fails | 503 (a side effect never runs without deduplication) |
//!
//!   Keys are scoped by a principal read from the request ([`IdempotencyLayer::principal`]),
//!   so one user's key never replays another's response. The handler runs in a task of its
//!   own: a client that hangs up mid-request does not cancel it, and its result is stored for
//!   the retry (the incident this crate exists for). A handler that panics releases its key;
//!   a process that dies leaves a claim that expires with its lease.
//!   5xx responses are stored and replayed by default, as Stripe does once execution began
//!   ([`IdempotencyLayer::store_server_errors`], [`ReleaseKey`]); a response too large to
//!   store is answered once and leaves a marker that replays 500, so the request never runs
//!   twice ([`OversizedResponse`]).
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

pub use self::body::{BoxError, IdempotencyBody};
pub use self::config::ConfigError;
pub use self::dedupe::{Dedupe, DedupeError, DedupeFuture, DedupeLayer, KeyFn};
pub use self::idempotency::{
    IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, Idempotency, IdempotencyLayer, IdempotencyLayerBuilder,
    OversizedResponse, ReleaseKey, ResponseFuture, UnknownOutcome,
};
pub use self::memory::{MemoryIdempotencyStore, MemoryIdempotencyStoreBuilder};
pub use self::store::{
    Begin, Claim, ClaimToken, Fingerprint, IdempotencyStore, Ownership, ScopedKey, Stored,
};
/// The Redis store also holds idempotency keys (feature `redis`).
#[cfg(feature = "redis")]
pub use crate::budget::RedisStore;

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
