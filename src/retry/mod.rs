//! The client middleware: [`RetryLayer`] builds [`Retry`], whose [`ResponseFuture`] runs one
//! logical call.
//!
//! Where to look:
//!
//! - `layer.rs`: the builder; `config.rs`: the `Config` every call of a service shares
//!   (`Arc`); `change.rs`: the [`ChangeRequest`] hook.
//! - `service.rs`: [`Retry`]: readiness, and the first attempt.
//! - `call.rs`: one logical call, decided once before the first attempt: its side effect,
//!   key, operation name, deadline and the copy for a retry.
//! - `decide.rs`: every decision after an attempt, and every reason to stop: a pure
//!   `decide(&Config, &Call, outcome, now) -> Decision` for the local checks, the delay,
//!   the hint and the deadline; then the change hook's answer, the budgets' verdict, the
//!   in-flight slot and the deadline met while waiting, each turned into a
//!   [`StopReason`](crate::StopReason) there and only there.
//! - `report.rs`: what the layer tells: tracing events, stats, [`RetryInfo`](crate::RetryInfo).
//! - `future.rs`: the state machine (calling → waiting: acquiring, sleeping, ready →
//!   calling ...), each state owning its data, under one deadline.
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_retry_guard::retry::{ChangeRequest, RetryContext};
//! use tower_retry_guard::{ErrorKind, RetryLayer};
//!
//! // A change hook: a retry after an invalid output asks for a lower temperature.
//! let lower_temperature = |req: &mut http::Request<String>,
//!                          _: &Result<http::Response<String>, std::io::Error>,
//!                          cx: &RetryContext| {
//!     if cx.kind != ErrorKind::OutputInvalid {
//!         return false;
//!     }
//!     req.headers_mut().insert("x-temperature", http::HeaderValue::from_static("0"));
//!     true
//! };
//! let svc = ServiceBuilder::new()
//!     .layer(RetryLayer::new().on_retry(lower_temperature))
//!     .service_fn(|req: http::Request<String>| async move {
//!         Ok::<_, std::io::Error>(http::Response::new(req.into_body()))
//!     });
//! # let _ = svc;
//! ```

mod call;
mod change;
pub(crate) mod config;
mod decide;
mod future;
mod layer;
mod report;
mod service;
mod wait;

pub use self::change::{ChangeRequest, RetryContext};
pub use self::future::ResponseFuture;
pub use self::layer::RetryLayer;
pub use self::service::Retry;
