//! [`Health`]: the verdict on an operation.

use std::fmt;

use super::snapshot::Window;

/// The verdict on one operation, from the last minute of calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Few retries, few failures.
    Healthy,
    /// Retries are spiking but end in success: the upstream is unstable but recoverable.
    UnstableRecovering,
    /// Calls fail after their retries (or are denied them): the upstream issue surfaces.
    Failing,
}

impl Health {
    /// `healthy`, `unstable_recovering`, `failing`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::UnstableRecovering => "unstable_recovering",
            Health::Failing => "failing",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Healthy => "healthy",
            Health::UnstableRecovering => "unstable but recovering",
            Health::Failing => "failing",
        })
    }
}

pub(crate) fn health_of(w: &Window) -> Health {
    if w.calls == 0 {
        return Health::Healthy;
    }
    let failed_share = w.failed as f64 / w.calls as f64;
    let retry_share = w.retries as f64 / w.calls as f64;
    if failed_share >= 0.05 && w.failed >= w.recovered {
        Health::Failing
    } else if retry_share >= 0.05 || w.failed > 0 {
        Health::UnstableRecovering
    } else {
        Health::Healthy
    }
}
