//! The stats as a table: `Display` for [`RetryStats`].

use std::fmt;

use super::health::health_of;
use super::stats::RetryStats;
use crate::classify::ErrorKind;

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
            if t.retry_cost > 0 {
                writeln!(
                    f,
                    "  {:<30} {:>8}  (units of the cost budgets, spent on retries)",
                    "retry cost", t.retry_cost
                )?;
            }
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
