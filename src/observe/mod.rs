//! What the layer tells: how a call ended ([`StopReason`], [`CallOutcome`]) and the
//! [`RetryInfo`] on every response and error (`outcome.rs`); the shared [`RetryStats`]
//! (`stats.rs`), read as [`Window`]s, [`KindSnapshot`]s, a [`Health`] verdict (`health.rs`)
//! or a table (`table.rs`); and the operation names they are kept under (`operation.rs`:
//! low cardinality by default, a bounded number tracked). Metrics (feature `metrics`,
//! names in [`metrics`]) are recorded with the stats.

mod health;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
mod operation;
mod outcome;
mod snapshot;
mod stats;
mod table;

pub(crate) use self::outcome::Reservation;
pub use self::outcome::{CallOutcome, RetryInfo, StopReason};

pub use self::health::Health;
pub(crate) use self::operation::{OpKey, default_operation};
pub use self::snapshot::{KindSnapshot, Window};
pub(crate) use self::stats::OpHandle;
pub use self::stats::RetryStats;
