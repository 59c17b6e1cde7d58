//! [`MemoryIdempotencyStoreBuilder`]: the limits of a [`MemoryIdempotencyStore`], checked
//! when built.

use std::time::Duration;

use super::{Limits, MemoryIdempotencyStore};
use crate::server::config::ConfigError;

/// Builds a [`MemoryIdempotencyStore`] with other limits; [`build`](Self::build) checks them.
#[derive(Debug, Clone)]
pub struct MemoryIdempotencyStoreBuilder {
    limits: Limits,
}

impl MemoryIdempotencyStoreBuilder {
    pub(super) fn new() -> Self {
        MemoryIdempotencyStoreBuilder {
            limits: Limits::default(),
        }
    }

    /// The most entries (claims and results) and bytes held in all (default 100 000 and
    /// 256 MiB).
    pub fn max_total(mut self, entries: usize, bytes: usize) -> Self {
        self.limits.max_entries = entries;
        self.limits.max_bytes = bytes;
        self
    }

    /// The most entries and bytes one principal may hold (default 25 000 and 64 MiB), so
    /// one tenant cannot take another's room.
    pub fn max_per_principal(mut self, entries: usize, bytes: usize) -> Self {
        self.limits.max_entries_per_principal = entries;
        self.limits.max_bytes_per_principal = bytes;
        self
    }

    /// How often the whole map is swept of expired entries (default 60 s).
    pub fn sweep_every(mut self, every: Duration) -> Self {
        self.limits.sweep_every = every;
        self
    }

    /// The store, or the first bad setting.
    pub fn build(self) -> Result<MemoryIdempotencyStore, ConfigError> {
        let l = self.limits;
        let err = |setting, problem: &str| {
            Err(ConfigError::new(
                "memory store",
                setting,
                problem.to_owned(),
            ))
        };
        if l.max_entries == 0 || l.max_bytes == 0 {
            return err("max_total", "must allow at least one entry and one byte");
        }
        if l.max_entries_per_principal == 0 || l.max_bytes_per_principal == 0 {
            return err(
                "max_per_principal",
                "must allow at least one entry and one byte",
            );
        }
        if l.max_entries_per_principal > l.max_entries || l.max_bytes_per_principal > l.max_bytes {
            return err("max_per_principal", "is larger than `max_total`");
        }
        if l.sweep_every.is_zero() {
            return err("sweep_every", "must be longer than zero");
        }
        Ok(MemoryIdempotencyStore::with(l))
    }
}
