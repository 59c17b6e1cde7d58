//! What each principal holds, and the exact accounting that bounds it.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Inner;
use crate::server::store::ScopedKey;
use crate::store::StoreError;

/// Adds `n` to `counter` unless that passes `max`.
fn reserve(counter: &AtomicUsize, n: usize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            v.checked_add(n).filter(|total| *total <= max)
        })
        .is_ok()
}

fn whose(key: &ScopedKey) -> String {
    match key.principal() {
        None => "the global scope (requests without a principal)".to_owned(),
        Some(p) => {
            let shown: String = p.chars().take(64).collect();
            format!("principal {shown:?}")
        }
    }
}

impl Inner {
    /// Whether `entries` and `bytes` more would fit for `key`'s principal and in all (a read,
    /// to decide whether to sweep first).
    pub(super) fn check(&self, key: &ScopedKey, bytes: usize) -> Result<(), ()> {
        let l = &self.limits;
        let principal = key.principal.clone();
        let (pe, pb) = self
            .usage
            .get(&principal)
            .map_or((0, 0), |u| (u.entries, u.bytes));
        let fits = pe < l.max_entries_per_principal
            && pb.saturating_add(bytes) <= l.max_bytes_per_principal
            && self.entries.load(Ordering::Relaxed) < l.max_entries
            && self.bytes.load(Ordering::Relaxed).saturating_add(bytes) <= l.max_bytes;
        if fits { Ok(()) } else { Err(()) }
    }

    /// Counts `entries` and `bytes` more for `key`'s principal, exactly (under the
    /// principal's row lock and with atomic reservations), or refuses naming the limit.
    pub(super) fn charge(
        &self,
        key: &ScopedKey,
        entries: usize,
        bytes: usize,
    ) -> Result<(), StoreError> {
        let l = &self.limits;
        let mut row = self.usage.entry(key.principal.clone()).or_default();
        let refused = if row.entries.saturating_add(entries) > l.max_entries_per_principal {
            Some(format!(
                "{} holds {} idempotency keys, its share of this store",
                whose(key),
                row.entries
            ))
        } else if row.bytes.saturating_add(bytes) > l.max_bytes_per_principal {
            Some(format!(
                "{} holds {} of its {} bytes in this store",
                whose(key),
                row.bytes,
                l.max_bytes_per_principal
            ))
        } else if !reserve(&self.entries, entries, l.max_entries) {
            Some(format!(
                "the store holds {} idempotency keys, its limit",
                l.max_entries
            ))
        } else if !reserve(&self.bytes, bytes, l.max_bytes) {
            self.entries.fetch_sub(entries, Ordering::AcqRel);
            Some(format!("the store holds its {} bytes", l.max_bytes))
        } else {
            None
        };
        match refused {
            None => {
                row.entries += entries;
                row.bytes += bytes;
                Ok(())
            }
            Some(why) => {
                let empty = row.entries == 0;
                drop(row);
                if empty {
                    self.usage
                        .remove_if(&key.principal, |_, u| u.entries == 0 && u.bytes == 0);
                }
                Err(StoreError::full(why))
            }
        }
    }

    pub(super) fn refund(&self, key: &ScopedKey, entries: usize, bytes: usize) {
        self.entries.fetch_sub(entries, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        let empty = match self.usage.get_mut(&key.principal) {
            Some(mut row) => {
                row.entries = row.entries.saturating_sub(entries);
                row.bytes = row.bytes.saturating_sub(bytes);
                row.entries == 0
            }
            None => false,
        };
        if empty {
            self.usage
                .remove_if(&key.principal, |_, u| u.entries == 0 && u.bytes == 0);
        }
    }
}
