//! A ring of per-bucket counters for a sliding window, lock-free.

use std::sync::atomic::{AtomicU64, Ordering};

/// Buckets in the ring: the window moves in steps of `window / BUCKETS`.
pub(super) const BUCKETS: usize = 10;
/// Fixed-point scale of ratios (millionths).
pub(super) const SCALE: u128 = 1_000_000;
/// Bound on compare-and-swap turns; past it, a withdrawal is refused (never granted blind).
pub(super) const MAX_CAS_TURNS: usize = 128;

/// A bucket counter: the bucket's epoch in the high 32 bits, the count in the low 32.
pub(super) struct Ring(pub(super) [AtomicU64; BUCKETS]);

pub(super) fn pack(epoch: u32, count: u32) -> u64 {
    (u64::from(epoch) << 32) | u64::from(count)
}

pub(super) fn epoch_of(v: u64) -> u32 {
    (v >> 32) as u32
}

pub(super) fn count_of(v: u64) -> u32 {
    v as u32
}

/// Whether a bucket of epoch `e` is inside the window that ends at epoch `now` (a bucket a
/// little ahead, written by a thread whose clock read was later, counts too).
pub(super) fn live(e: u32, now: u32) -> bool {
    let behind = now.wrapping_sub(e) as usize;
    let ahead = e.wrapping_sub(now) as usize;
    behind < BUCKETS || ahead < BUCKETS
}

/// Whether a bucket labelled `label` is the bucket of `epoch` (or, after a stall of a whole
/// window, of a later epoch) rather than an older one to start afresh. A bucket's only
/// right label is the epoch it is used for: a label merely inside the window belongs to
/// another turn of the ring.
pub(super) fn current(label: u32, epoch: u32) -> bool {
    label.wrapping_sub(epoch) < u32::MAX / 2
}

impl Ring {
    pub(super) fn new() -> Self {
        Ring(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    pub(super) fn slot(&self, epoch: u32) -> &AtomicU64 {
        &self.0[epoch as usize % BUCKETS]
    }

    /// Adds one to the bucket of `epoch`: one `fetch_add`, unless the bucket still holds an
    /// old epoch, which is then started afresh. For counters whose dead counts are simply
    /// dropped (calls, results).
    pub(super) fn add(&self, epoch: u32) {
        let slot = self.slot(epoch);
        let before = slot.fetch_add(1, Ordering::Relaxed);
        if current(epoch_of(before), epoch) {
            return;
        }
        // The bucket held an old epoch: our increment went into a dead count. Start it
        // afresh, or join whoever already did.
        let mut current = slot.load(Ordering::Relaxed);
        for _ in 0..MAX_CAS_TURNS {
            let next = if self::current(epoch_of(current), epoch) {
                current.wrapping_add(1)
            } else {
                pack(epoch, 1)
            };
            match slot.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Adds one to the bucket of `epoch` by compare-and-swap only, so that a dead count it
    /// replaces is known exactly: `Some(dead count replaced)`, or `None` if contention
    /// outlasted the bound (nothing was added).
    pub(super) fn add_exact(&self, epoch: u32) -> Option<u32> {
        let slot = self.slot(epoch);
        let mut current = slot.load(Ordering::Acquire);
        for _ in 0..MAX_CAS_TURNS {
            let (next, dead) = if self::current(epoch_of(current), epoch) {
                (current.wrapping_add(1), 0)
            } else {
                (pack(epoch, 1), count_of(current))
            };
            match slot.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(dead),
                Err(actual) => current = actual,
            }
        }
        None
    }

    /// The sum of the live buckets at `epoch`.
    pub(super) fn sum(&self, epoch: u32) -> u64 {
        self.0
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .filter(|&v| live(epoch_of(v), epoch))
            .map(|v| u64::from(count_of(v)))
            .sum()
    }
}
