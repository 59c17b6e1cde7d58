//! One key's state in the memory store, and the pure arithmetic of a draw on it (see the
//! `budget::memory` module for the rules).

use std::time::Duration;

use super::{Limit, bucket, left_in_bucket};

const KIND_COUNT: u8 = 1;
const KIND_RATE: u8 = 2;
const KIND_COST: u8 = 3;
const KIND_COST_RATE: u8 = 4;

/// Why a draw was refused: when it may fit, and what the key had left (in its units).
pub(super) type Refusal = (Option<Duration>, Option<u64>);

/// The GCRA interval of one draw and the tolerance, in ns, of a cost rate.
pub(super) fn cost_gcra(units: u64, per: Duration, burst: u64, amount: u64) -> (u64, u64) {
    bucket(units, nanos(per), burst, amount, u64::MAX / 4)
}

/// One key's state.
#[derive(Clone, Copy)]
pub(super) struct Slot {
    /// Nanoseconds since the store's start: the count's expiry ([`Limit::Count`]) or the
    /// theoretical arrival time ([`Limit::Rate`]). The key is dead once `until <= now`.
    pub(super) until: u64,
    /// Draws counted ([`Limit::Count`]), or units summed ([`Limit::Cost`]).
    pub(super) count: u64,
    /// Which limit wrote it (a key whose limit changed kind starts afresh).
    pub(super) kind: u8,
}

impl Slot {
    pub(super) const EMPTY: Slot = Slot {
        until: 0,
        count: 0,
        kind: 0,
    };
}

pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The rate limit's emission interval `T` and tolerance `burst * T`, in nanoseconds.
pub(super) fn gcra(tokens: u32, per: Duration, burst: u32) -> (u64, u64) {
    let t = if tokens == 0 {
        // Never refills: an interval beyond any lifetime.
        u64::MAX / 4
    } else {
        (nanos(per) / u64::from(tokens)).max(1)
    };
    (t, t.saturating_mul(u64::from(burst)))
}

/// Takes one draw of `amount` (a cost limit's units; one retry for the others) from `slot`
/// at `now`, or says when one may be possible and what is left.
pub(super) fn take(slot: &mut Slot, limit: Limit, amount: u64, now: u64) -> Result<(), Refusal> {
    let kind = match limit {
        Limit::Count { .. } => KIND_COUNT,
        Limit::Rate { .. } => KIND_RATE,
        Limit::Cost { .. } => KIND_COST,
        Limit::CostRate { .. } => KIND_COST_RATE,
    };
    let counted = kind == KIND_COUNT || kind == KIND_COST;
    if slot.kind != kind || (counted && slot.until <= now) {
        *slot = Slot {
            until: now,
            count: 0,
            kind,
        };
    }
    match limit {
        Limit::Count { max, ttl } => take_sum(slot, u64::from(max), 1, ttl, now),
        Limit::Cost { max, ttl } => take_sum(slot, max, amount, ttl, now),
        Limit::Rate { tokens, per, burst } => {
            let (t, tolerance) = gcra(tokens, per, burst);
            let known = burst > 0 && tokens > 0;
            take_gcra(slot, t, tolerance, now, burst > 0, known).map_err(|(w, _)| (w, Some(0)))
        }
        Limit::CostRate { units, per, burst } => {
            let (t, tolerance) = cost_gcra(units, per, burst, amount);
            let known = units > 0 && amount <= burst;
            take_gcra(slot, t, tolerance, now, burst > 0, known).map_err(|(wait, used)| {
                (
                    wait,
                    Some(left_in_bucket(units, nanos(per), tolerance, used)),
                )
            })
        }
    }
}

/// A sum of at most `max`, kept `ttl` after its last draw.
pub(super) fn take_sum(
    slot: &mut Slot,
    max: u64,
    amount: u64,
    ttl: Duration,
    now: u64,
) -> Result<(), Refusal> {
    let left = max.saturating_sub(slot.count);
    if amount > left {
        let wait = Duration::from_nanos(slot.until.saturating_sub(now));
        // Only a sum that starts afresh can make room, and only for an amount within `max`.
        return Err(((amount <= max && max > 0).then_some(wait), Some(left)));
    }
    slot.count = slot.count.saturating_add(amount);
    slot.until = now.saturating_add(nanos(ttl)).max(now.saturating_add(1));
    Ok(())
}

/// GCRA: a draw moving the arrival time by `t`, within `tolerance`. A refusal carries how
/// far ahead the arrival time already was.
pub(super) fn take_gcra(
    slot: &mut Slot,
    t: u64,
    tolerance: u64,
    now: u64,
    allowed: bool,
    known: bool,
) -> Result<(), (Option<Duration>, u64)> {
    let start = slot.until.max(now);
    let next = start.saturating_add(t);
    let ahead = next - now;
    if !allowed || ahead > tolerance {
        let wait = Duration::from_nanos(ahead - tolerance.min(ahead));
        return Err((known.then_some(wait), start - now));
    }
    slot.until = next;
    Ok(())
}

/// Charges a cost draw on top of what `slot` holds, past its limit if need be (a
/// settlement: the cost was spent). Count and rate limits are not charged.
pub(super) fn charge(slot: &mut Slot, limit: Limit, amount: u64, now: u64) {
    match limit {
        Limit::Cost { ttl, .. } => {
            if slot.kind != KIND_COST || slot.until <= now {
                *slot = Slot {
                    until: now,
                    count: 0,
                    kind: KIND_COST,
                };
            }
            slot.count = slot.count.saturating_add(amount);
            slot.until = now.saturating_add(nanos(ttl)).max(now.saturating_add(1));
        }
        Limit::CostRate { units, per, burst } => {
            if slot.kind != KIND_COST_RATE {
                *slot = Slot {
                    until: now,
                    count: 0,
                    kind: KIND_COST_RATE,
                };
            }
            let (t, _) = cost_gcra(units, per, burst, amount);
            slot.until = slot.until.max(now).saturating_add(t);
        }
        Limit::Count { .. } | Limit::Rate { .. } => {}
    }
}

/// Gives back a draw taken by [`take`].
pub(super) fn give_back(slot: &mut Slot, limit: Limit, amount: u64) {
    match limit {
        Limit::Count { .. } if slot.kind == KIND_COUNT => {
            // The extended deadline stays: a key kept a little longer is harmless.
            slot.count = slot.count.saturating_sub(1);
        }
        Limit::Cost { .. } if slot.kind == KIND_COST => {
            slot.count = slot.count.saturating_sub(amount);
        }
        Limit::Rate { tokens, per, burst } if slot.kind == KIND_RATE => {
            let (t, _) = gcra(tokens, per, burst);
            slot.until = slot.until.saturating_sub(t);
        }
        Limit::CostRate { units, per, burst } if slot.kind == KIND_COST_RATE => {
            let (t, _) = cost_gcra(units, per, burst, amount);
            slot.until = slot.until.saturating_sub(t);
        }
        _ => {}
    }
}
