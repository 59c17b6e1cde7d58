//! The decorator: any async function or agent tool guarded with the layer's discipline.
//!
//! Agent code calls most tools as async functions, not `tower` services. [`Guard`] runs a
//! closure on the [`RetryLayer`](crate::RetryLayer)'s own engine — the closure becomes the
//! inner service of a [`Retry`](crate::Retry), each [`Call`] its request — so the rules are
//! the layer's, enforced by the same code: bounded attempts and total time, backoff with
//! jitter, side effects retried only with a key (the same key on every attempt), output
//! failures retried only with a change, task/user/process budgets, [`RetryStats`](crate::RetryStats),
//! a `tracing` event per retry, and a [`RetryError`](crate::RetryError) that says why it
//! stopped.
//!
//! - [`Guard`]: `guard.run(call, |attempt| async move { .. })`; errors classified by type
//!   ([`Guard::retry_on`], as a decorator's `retry_on=(ProviderError, TimeoutError)`), by
//!   predicate, or by any [`Classify`](crate::Classify); timeouts and connection errors
//!   retried by default.
//! - [`Call`]: the operation's name, its side effect, its key
//!   ([`IdempotencyKey::from_tool_call`](crate::IdempotencyKey::from_tool_call) for an
//!   LLM's tool-call ids), its task and user, the change after an output failure.
//! - [`Attempt`]: what the closure gets: the attempt's number, the key to pass on, the
//!   deadline, the previous failure.
//! - [`DedupeFn`]: the tool's side — one execution per key, duplicates get the kept
//!   result, on any [`IdempotencyStore`](crate::server::IdempotencyStore) (memory or Redis).
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use tower_retry_guard::guard::DedupeFn;
//! use tower_retry_guard::server::MemoryIdempotencyStore;
//! use tower_retry_guard::{Call, Guard, RetryLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let guard = Guard::new(RetryLayer::new()).retry_on::<std::io::Error>();
//! let executor = DedupeFn::new(MemoryIdempotencyStore::new());
//! let emails = AtomicU32::new(0);
//!
//! // The model asked for a tool call; its id makes the key.
//! let call = Call::new("send_email").tool_call("ticket-4711", "call_8f2kq0XzL1");
//! let (executor, emails) = (&executor, &emails);
//! let receipt = guard
//!     .run(call, |attempt| async move {
//!         let key = attempt.key().ok_or("no key")?;
//!         let receipt = executor
//!             .run("send_email", key, || async {
//!                 let n = emails.fetch_add(1, Ordering::SeqCst) + 1;
//!                 Ok::<_, std::io::Error>(format!("email #{n}"))
//!             })
//!             .await?;
//!         if attempt.number() == 1 {
//!             // The email went out, but the answer is lost on the way back.
//!             return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into());
//!         }
//!         Ok::<_, Box<dyn std::error::Error + Send + Sync>>(receipt)
//!     })
//!     .await?;
//! assert_eq!(receipt, "email #1"); // the retry got the kept result
//! assert_eq!(emails.load(Ordering::SeqCst), 1); // one email
//! # Ok(())
//! # }
//! ```

mod call;
mod dedupe;
mod engine;
mod key;
mod request;
mod rules;

pub use self::call::{Attempt, Call, Failure};
pub use self::dedupe::{DedupeFn, DedupeFnError, StoredValue};
pub use self::engine::Guard;
pub use self::rules::ErrorRules;
