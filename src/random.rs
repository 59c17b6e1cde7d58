//! Randomness for jitter seeds, idempotency keys and claim tokens: one fast generator per
//! thread (`SmallRng`, Xoshiro256++), seeded once from the operating system.
//!
//! Keys and tokens need to be unique, not secret: 122 bits from a 256-bit-state generator
//! seeded by the OS make a collision negligible, at a few nanoseconds a draw (a UUID from
//! `uuid`'s `fast-rng` pulls `rand`'s ChaCha generator and several crates more, and `uuid`
//! itself needs a newer Rust than this crate's MSRV for sixteen lines of formatting).

use std::cell::RefCell;
use std::hash::{BuildHasher, Hasher};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(seeded());
}

fn seeded() -> SmallRng {
    SmallRng::try_from_os_rng().unwrap_or_else(|_| {
        // No OS randomness (a sandbox without getrandom): the standard library's per-process
        // random hash keys, mixed with the clock and the thread.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write(format!("{:?}", std::thread::current().id()).as_bytes());
        SmallRng::seed_from_u64(h.finish())
    })
}

/// A random `u64`.
pub(crate) fn u64() -> u64 {
    RNG.with(|rng| rng.borrow_mut().next_u64())
}

/// 16 random bytes.
pub(crate) fn bytes16() -> [u8; 16] {
    let mut out = [0u8; 16];
    RNG.with(|rng| rng.borrow_mut().fill_bytes(&mut out));
    out
}

/// A random UUID v4 (RFC 9562 §5.4), as its 36-character lowercase hyphenated text.
pub(crate) fn uuid_v4(out: &mut [u8; 36]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = bytes16();
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // variant 10
    let mut at = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[at] = b'-';
            at += 1;
        }
        out[at] = HEX[usize::from(byte >> 4)];
        out[at + 1] = HEX[usize::from(byte & 0x0f)];
        at += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4_and_distinct() {
        let (mut a, mut b) = ([0u8; 36], [0u8; 36]);
        uuid_v4(&mut a);
        uuid_v4(&mut b);
        assert_ne!(a, b);
        let text = std::str::from_utf8(&a).unwrap();
        let groups: Vec<&str> = text.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        assert_eq!(lens, [8, 4, 4, 4, 12], "{text}");
        assert!(
            text.chars()
                .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert!(groups[2].starts_with('4'), "version 4: {text}");
        assert!(
            matches!(&groups[3][..1], "8" | "9" | "a" | "b"),
            "variant: {text}"
        );
    }
}
