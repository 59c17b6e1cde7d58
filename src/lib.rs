//! # tower-retry-guard
//!
//! Retries that cannot make an incident worse: a [Tower](https://docs.rs/tower) middleware
//! that retries calls to LLM providers and tools with discipline.
//!
//! The story it exists for: an LLM call succeeded, the caller's connection timed out, the
//! naive retry ran the tool again, and the customer got the same email twice. This crate
//! enforces, not just allows, six rules:
//!
//! 1. **Bounded.** A [`RetryPolicy`] always has a maximum number of retries (default 3) and a
//!    maximum total time (default 10 s); [`RetryPolicyBuilder::build`] refuses unbounded or
//!    contradictory settings.
//! 2. **Backoff with sense.** First retry after ~100 ms, then x2 with [`Jitter`] (each call
//!    draws its own), capped. A server's `retry-after-ms` / `Retry-After` is a floor; a hint
//!    longer than the policy honours (default 60 s) or past the deadline stops at once.
//! 3. **Side effects need keys.** A [`SideEffect::SideEffecting`] request (POST, PATCH, or
//!    marked so) is retried only with an [`IdempotencyKey`]: the layer mints one (UUID v4) on
//!    the first attempt and sends the same one on every retry. The provider side,
//!    `server::IdempotencyLayer`, deduplicates on it.
//! 4. **Budgets.** Per task (5 retries), per user (a rate) and a process-wide retry ratio that
//!    stops retry storms yet lets retries through while they work: [`Budgets`]. Optionally
//!    the cost of retries too, in tokens or money, per task and per user
//!    ([`Budgets::task_cost`], [`budget::Cost`]).
//! 5. **No retry that changes nothing.** An [`ErrorKind::OutputInvalid`] failure is retried
//!    only when [`RetryLayer::on_retry`] changes the request; otherwise it surfaces.
//! 6. **Visible.** Every retry is a `tracing` event; [`RetryStats`] tells which operation
//!    retries, on which error, and whether retries end in success ([`Health`]); every
//!    response carries its [`RetryInfo`].
//!
//! ## Example
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response, StatusCode};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_retry_guard::{RetryInfo, RetryLayer, RetryPolicy};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let policy = RetryPolicy::builder()
//!     .max_retries(3)
//!     .max_total_time(Duration::from_secs(10))
//!     .build()?;
//! let layer = RetryLayer::new().policy(policy);
//! let stats = layer.stats();
//!
//! // A provider that is overloaded once, then answers.
//! let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
//! let mut client = ServiceBuilder::new().layer(layer).service_fn(move |req: Request<String>| {
//!     let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!     // The same key on every attempt of the call:
//!     assert!(req.headers().contains_key("idempotency-key"));
//!     async move {
//!         let status = if n == 0 { StatusCode::from_u16(529)? } else { StatusCode::OK };
//!         Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
//!             Response::builder().status(status).body(String::from("done"))?,
//!         )
//!     }
//! });
//!
//! let request = Request::post("http://127.0.0.1/tools/send_email").body("hi".to_string())?;
//! let response = client.ready().await?.call(request).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! let info = response.extensions().get::<RetryInfo>().expect("always attached");
//! assert_eq!(info.attempts, 2);
//! assert_eq!(stats.calls("POST /tools/send_email"), 1);
//! # Ok(())
//! # }
//! ```
//!
//! ## Decision order on a failed attempt
//!
//! Cheap and local first, shared last; nothing is drawn from a budget unless the retry will
//! really happen:
//!
//! 1. classify ([`Classify`]) → success / fail / retry(kind, hint);
//! 2. retries left? request cloneable? side effect safe (key present)?
//! 3. delay = max(backoff, hint); within the hint cap and the deadline?
//! 4. an output failure is retried only if the change hook
//!    ([`ChangeRequest`](retry::ChangeRequest)) changed the request;
//! 5. the process retry ratio (an atomic), then the task and user budgets (counts and costs)
//!    in one store call;
//! 6. record (tracing event + stats), sleep, call again with the same key.
//!
//! Steps 1–3 are one pure function (`src/retry/decide.rs`), where every reason to stop is
//! made.
//!
//! ## Errors and responses
//!
//! A failing *response* on the last attempt is returned as the response (the caller sees
//! the 503 and its body), with a [`RetryInfo`] extension saying why the layer stopped. An
//! inner *error* comes back as [`RetryError`], whose [`RetryError::reason`] says why
//! (exhausted, deadline, budget and which scope, not retryable, side effect without key,
//! output unchanged) and whose `source()` / [`RetryError::into_inner`] give the inner error.
//!
//! ## Streams
//!
//! A streamed response (server-sent events) is retried before its first content event and
//! never after: put [`stream::StreamGuardLayer`] inside the retry layer. A failure after the
//! first token ends the body with a typed [`stream::MidStreamError`], counted in
//! [`RetryStats`].
//!
//! ## gRPC
//!
//! A tonic `Channel` is retried like any tower service: [`classify::Grpc`] reads
//! `grpc-status` and `grpc-retry-pushback-ms`, [`HeaderNames::grpc`](crate::request::HeaderNames::grpc) stamps
//! `grpc-previous-rpc-attempts`, and [`BufferRequestBodyLayer`](crate::body::BufferRequestBodyLayer) keeps the request for a
//! retry. The stack and the rule for side effects are in the [`classify`] module docs.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod backoff;
pub mod body;
pub mod budget;
pub mod classify;
mod error;
pub mod guard;
pub mod observe;
mod policy;
mod random;
#[cfg(feature = "redis")]
mod redis;
pub mod request;
#[cfg(feature = "reqwest")]
mod reqwest_impl;
pub mod retry;
pub mod server;
mod store;
pub mod stream;
mod time;

pub use crate::backoff::{Backoff, Jitter};
pub use crate::budget::Budgets;
pub use crate::classify::{Classify, ErrorKind, LlmHttp, Outcome};
pub use crate::error::RetryError;
pub use crate::guard::{Call, Guard};
pub use crate::observe::{CallOutcome, Health, RetryInfo, RetryStats, StopReason};
pub use crate::policy::{PolicyError, RetryPolicy, RetryPolicyBuilder};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use crate::redis::RedisStore;
pub use crate::request::{IdempotencyKey, Operation, RetryRequest, SideEffect};
pub use crate::retry::{ResponseFuture, Retry, RetryLayer};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
