//! The process-wide retry ratio. (Interim version: cumulative, replaced by the windowed,
//! adaptive one.)

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Settings of the process-wide [`RetryRatio`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatioConfig {
    /// Retries allowed per call while retries are failing (default 0.1).
    pub ratio: f64,
    /// The window (default 10 s).
    pub window: Duration,
    /// Retries always allowed per window (default 3).
    pub floor: u32,
}

impl Default for RatioConfig {
    fn default() -> Self {
        RatioConfig {
            ratio: 0.1,
            window: Duration::from_secs(10),
            floor: 3,
        }
    }
}

/// Retries as a fraction of calls, process-wide.
#[derive(Debug)]
pub struct RetryRatio {
    config: RatioConfig,
    calls: AtomicU64,
    retries: Mutex<u64>,
}

impl RetryRatio {
    /// A ratio with these settings.
    pub fn new(config: RatioConfig) -> Self {
        RetryRatio {
            config,
            calls: AtomicU64::new(0),
            retries: Mutex::new(0),
        }
    }

    pub(crate) fn deposit(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn try_withdraw(&self) -> bool {
        let calls = self.calls.load(Ordering::Relaxed) as f64;
        let allowed = self.config.floor as f64 + self.config.ratio * calls;
        let mut retries = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        if (*retries as f64) < allowed {
            *retries += 1;
            true
        } else {
            false
        }
    }

    pub(crate) fn refund(&self) {
        let mut retries = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        *retries = retries.saturating_sub(1);
    }

    pub(crate) fn record_retry_result(&self, _succeeded: bool) {}

    pub(crate) fn describe(&self) -> String {
        format!(
            "retries <= {} x calls + {}",
            self.config.ratio, self.config.floor
        )
    }
}
