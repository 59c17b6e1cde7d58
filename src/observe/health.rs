//! [`Health`]: the verdict on an operation, and the stats table.

use std::fmt;

use crate::classify::ErrorKind;

use super::stats::{RetryStats, Window};

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

impl fmt::Display for RetryStats {
    /// A table: per operation, calls and retries over the last minute and all time, then a
    /// row per error kind seen.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<32} {:>8} {:>8} {:>9} {:>9} {:>7} {:>11}  health (last minute)",
            "operation / error kind",
            "calls",
            "retries",
            "recovered",
            "exhausted",
            "denied",
            "not retried"
        )?;
        for name in self.operations() {
            let t = self.totals(&name);
            let w = self.last_minute(&name);
            writeln!(
                f,
                "{:<32} {:>8} {:>8} {:>9} {:>9} {:>7} {:>11}  {} ({} calls, {} retries, {} recovered, {} failed)",
                truncate(&name, 32),
                self.calls(&name),
                t.retries,
                t.recovered,
                t.exhausted,
                t.denied_total(),
                t.not_retried,
                health_of(&w),
                w.calls,
                w.retries,
                w.recovered,
                w.failed,
            )?;
            if t.mid_stream_failures > 0 {
                writeln!(
                    f,
                    "  {:<30} {:>8}  (after the first content event; not retried)",
                    "mid-stream failures", t.mid_stream_failures
                )?;
            }
            for kind in ErrorKind::ALL {
                let k = self.kind(&name, kind);
                if k.failures == 0 && k.mid_stream_failures == 0 {
                    continue;
                }
                writeln!(
                    f,
                    "  {:<30} {:>8} {:>8} {:>9} {:>9} {:>7} {:>11}",
                    kind.as_str(),
                    "",
                    k.retries,
                    k.recovered,
                    k.exhausted,
                    k.denied_total(),
                    k.not_retried
                )?;
            }
        }
        Ok(())
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
