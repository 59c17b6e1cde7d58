//! tower-retry-guard
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod backoff;
pub mod budget;
pub mod classify;
mod error;
mod future;
mod layer;
mod observe;
mod policy;
mod request;
pub mod server;
mod service;

pub use crate::backoff::{Backoff, Jitter};
pub use crate::budget::{BudgetStore, Budgets, MemoryStore};
pub use crate::classify::{Classify, ErrorKind, LlmHttp, Outcome};
pub use crate::error::{RetryError, StopReason};
pub use crate::future::ResponseFuture;
pub use crate::layer::{ChangeRequest, NoChange, RetryContext, RetryLayer};
pub use crate::observe::{CallOutcome, RetryInfo};
pub use crate::policy::{
    MAX_RETRIES_LIMIT, MAX_TOTAL_TIME_LIMIT, PolicyError, RetryPolicy, RetryPolicyBuilder,
};
pub use crate::request::{
    CloneBody, HeaderNames, IdempotencyKey, InvalidKey, MAX_KEY_LEN, Operation, RequestView,
    RetryRequest, SideEffect, TaskId, UserId,
};
pub use crate::server::{
    Dedupe, DedupeLayer, Idempotency, IdempotencyLayer, IdempotencyStore, MemoryIdempotencyStore,
};
pub use crate::service::Retry;
