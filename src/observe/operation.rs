//! Operation names: a low-cardinality default, and the hash the stats are keyed by.
//!
//! The default name of an HTTP request is its method and path with every segment that looks
//! like an id collapsed to `{id}` (`GET /v1/batches/{id}/results`), so that calls to distinct
//! resources share one name: a segment of digits only, a UUID, 16 or more hex digits, or 20
//! or more characters of `[A-Za-z0-9_-]` with a digit among them (`msgbatch_01H...`,
//! `chatcmpl-...`). The host is left out (one operation whatever the replica). A request that
//! knows its route template names itself with an [`Operation`] extension (or the layer's
//! `operation_fn`), which wins.

use std::borrow::Cow;

use crate::request::Operation;

/// The most operations tracked by default.
pub(crate) const DEFAULT_MAX_OPERATIONS: usize = 1000;

/// The name the calls of operations past the cap are counted under.
pub(crate) const OVERFLOW_OPERATION: &str = "(other operations)";

/// What an id-like path segment becomes.
const ID: &str = "{id}";

/// Whether a path segment looks like an id (see the module docs).
pub(crate) fn is_id_segment(segment: &str) -> bool {
    let b = segment.as_bytes();
    if b.is_empty() {
        return false;
    }
    if b.iter().all(u8::is_ascii_digit) {
        return true;
    }
    let uuid = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    if uuid || (b.len() >= 16 && b.iter().all(u8::is_ascii_hexdigit)) {
        return true;
    }
    b.len() >= 20
        && b.iter().any(u8::is_ascii_digit)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
}

/// The path with its id-like segments collapsed to `{id}`.
pub(crate) fn collapse_path(path: &str) -> Cow<'_, str> {
    if !path.split('/').any(is_id_segment) {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(if is_id_segment(segment) { ID } else { segment });
    }
    Cow::Owned(out)
}

/// The default name of an HTTP request: method and collapsed path.
pub(crate) fn default_operation(method: &http::Method, path: &str) -> Operation {
    Operation(Cow::Owned(format!("{method} {}", collapse_path(path))))
}

/// The stats key of an operation: a hash of its name, or of method and path, so that the
/// success path never formats a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpKey(pub(crate) u64);

impl OpKey {
    /// The key of a name. A name with a space is keyed in two parts around its first one,
    /// as [`OpKey::of_method_path`] keys `METHOD path`, so a route named by hand and the
    /// same route named by default share an entry.
    pub(crate) fn of_name(name: &str) -> Self {
        match name.split_once(' ') {
            Some((method, path)) => {
                Self::join(word_hash(method.as_bytes()), word_hash(path.as_bytes()))
            }
            None => OpKey(word_hash(name.as_bytes())),
        }
    }

    /// The key of the default name, `default_operation(method, path)`, without formatting
    /// it: a path without an id-like segment (most API paths) is hashed as it is, eight
    /// bytes at a time; one with ids is collapsed on the stack first.
    pub(crate) fn of_method_path(method: &http::Method, path: &str) -> Self {
        // Must equal `of_name(&default_operation(method, path))`, which names the entry.
        let bytes = path.as_bytes();
        let path_hash = if has_id_segment(bytes) {
            collapsed_hash(path)
        } else {
            word_hash(bytes)
        };
        Self::join(word_hash(method.as_str().as_bytes()), path_hash)
    }

    /// The key of `METHOD path` with the path as it is (equal to
    /// [`OpKey::of_method_path`] when no segment is an id).
    #[inline]
    pub(crate) fn of_raw_path(method: &http::Method, path: &str) -> Self {
        Self::join(
            word_hash(method.as_str().as_bytes()),
            word_hash(path.as_bytes()),
        )
    }

    fn join(method: u64, path: u64) -> Self {
        OpKey(mix(method.rotate_left(17) ^ 0x6a09_e667_f3bc_c908, path))
    }
}

const K: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline]
fn mix(h: u64, word: u64) -> u64 {
    let x = (h ^ word).wrapping_mul(K);
    x ^ (x >> 29)
}

/// A 64-bit hash of bytes, eight at a time (multiply-xorshift). Not collision resistant
/// against an adversary: the stats map it keys is capped, and a collision only merges two
/// operations' counts.
#[inline]
fn word_hash(bytes: &[u8]) -> u64 {
    let mut h = mix(0xcbf2_9ce4_8422_2325, bytes.len() as u64);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = mix(h, u64::from_le_bytes(word));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        h = mix(h, tail_word(rest));
    }
    h
}

/// The last 1 to 7 bytes as one word, without a `memcpy` call: two overlapping 4-byte reads,
/// or the first, middle and last byte (the length is mixed in already).
#[inline]
fn tail_word(rest: &[u8]) -> u64 {
    let n = rest.len();
    if let (Some(lo), Some(hi)) = (rest.first_chunk::<4>(), rest.last_chunk::<4>()) {
        return u64::from(u32::from_le_bytes(*lo)) | (u64::from(u32::from_le_bytes(*hi)) << 32);
    }
    let byte = |i: usize| u64::from(rest.get(i).copied().unwrap_or(0));
    byte(0) | (byte(n / 2) << 8) | (byte(n.saturating_sub(1)) << 16)
}

/// Whether any segment of the path is id-like.
fn has_id_segment(path: &[u8]) -> bool {
    path.split(|b| *b == b'/')
        .any(|segment| maybe_id(segment) && is_id_bytes(segment))
}

/// The hash of the collapsed path, collapsed into a stack buffer (a heap one past it).
#[cold]
fn collapsed_hash(path: &str) -> u64 {
    let mut buf = [0u8; 512];
    let mut len = 0usize;
    for (i, segment) in path.as_bytes().split(|b| *b == b'/').enumerate() {
        let piece: &[u8] = if is_id_bytes(segment) {
            ID.as_bytes()
        } else {
            segment
        };
        let sep = usize::from(i > 0);
        match buf.get_mut(len..len + sep + piece.len()) {
            Some(room) => {
                if let Some((slash, rest)) = room.split_first_mut().filter(|_| sep == 1) {
                    *slash = b'/';
                    rest.copy_from_slice(piece);
                } else {
                    room.copy_from_slice(piece);
                }
                len += sep + piece.len();
            }
            None => {
                // Longer than the buffer: collapse on the heap.
                return word_hash(collapse_path(path).as_bytes());
            }
        }
    }
    word_hash(buf.get(..len).unwrap_or_default())
}

/// Whether a segment may be an id: the cheap test that rules out most segments (shorter
/// than 16 bytes and not starting with a digit).
#[inline]
fn maybe_id(segment: &[u8]) -> bool {
    match segment.first() {
        None => false,
        Some(c) => segment.len() >= 16 || c.is_ascii_digit(),
    }
}

/// [`is_id_segment`] on bytes, in one pass over the segment (the success path names every
/// call this way).
#[inline]
fn is_id_bytes(b: &[u8]) -> bool {
    // Classes: 1 digit, 2 hex digit, 4 `[A-Za-z0-9_-]`.
    const fn class(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => 7,
            b'a'..=b'f' | b'A'..=b'F' => 6,
            b'g'..=b'z' | b'G'..=b'Z' | b'_' | b'-' => 4,
            _ => 0,
        }
    }
    const CLASS: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = class(i as u8);
            i += 1;
        }
        t
    };
    if b.is_empty() {
        return false;
    }
    let (mut all, mut any) = (7u8, 0u8);
    for c in b {
        let k = CLASS[*c as usize];
        all &= k;
        any |= k & 1;
    }
    if all & 1 != 0 {
        return true; // digits only
    }
    if b.len() == 36 {
        return is_id_segment_uuid(b);
    }
    (b.len() >= 16 && all & 2 != 0) || (b.len() >= 20 && any != 0 && all & 4 != 0)
}

fn is_id_segment_uuid(b: &[u8]) -> bool {
    let uuid = b.iter().enumerate().all(|(i, c)| match i {
        8 | 13 | 18 | 23 => *c == b'-',
        _ => c.is_ascii_hexdigit(),
    });
    // Not a UUID: the other rules still apply to 36 characters.
    uuid || b.iter().all(u8::is_ascii_hexdigit)
        || (b.iter().any(u8::is_ascii_digit)
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn id_like_segments_collapse() {
        let m = http::Method::GET;
        for (path, name) in [
            ("/v1/chat/completions", "GET /v1/chat/completions"),
            ("/users/42/orders/7", "GET /users/{id}/orders/{id}"),
            (
                "/v1/batches/3f2b8c1e-9d4a-4c2b-8f1e-0a1b2c3d4e5f",
                "GET /v1/batches/{id}",
            ),
            ("/blobs/0123456789abcdef0123", "GET /blobs/{id}"),
            (
                "/v1/messages/batches/msgbatch_013Zva2CMHLNnXjNJJKqJ2EF/results",
                "GET /v1/messages/batches/{id}/results",
            ),
            (
                "/v1/models/claude-3-5-sonnet",
                "GET /v1/models/claude-3-5-sonnet",
            ),
            ("/", "GET /"),
        ] {
            assert_eq!(default_operation(&m, path).as_str(), name);
        }
    }

    #[test]
    fn op_key_of_method_path_equals_of_name() {
        let long_ids = "/1".repeat(300);
        let paths = [
            long_ids.as_str(),
            "/v1/threads/thread_abc123def456ghi789jk/runs/12",
            "/v1/files/0123456789abcdef0123/content",
            "",
            "/",
            "/x",
            "/v1/chat/completions",
            "/v1/messages/batches/msgbatch_0123456789abcdef/results",
            "/ünïcödé/路径",
            "/exactly8",
            "/1234567",
        ];
        let methods = [
            http::Method::GET,
            http::Method::POST,
            http::Method::PUT,
            http::Method::DELETE,
            http::Method::PATCH,
            http::Method::from_bytes(b"PURGE").unwrap(),
        ];
        for m in &methods {
            for p in paths {
                assert_eq!(
                    OpKey::of_method_path(m, p),
                    OpKey::of_name(default_operation(m, p).as_str()),
                    "{m} {p}"
                );
                // The raw path's key is the entry's key exactly when nothing collapses.
                assert_eq!(
                    OpKey::of_raw_path(m, p) == OpKey::of_method_path(m, p),
                    collapse_path(p) == p,
                    "{m} {p}"
                );
            }
        }
        assert_ne!(
            OpKey::of_method_path(&http::Method::GET, "/a"),
            OpKey::of_method_path(&http::Method::GET, "/b")
        );
        assert_ne!(
            OpKey::of_method_path(&http::Method::GET, "/a"),
            OpKey::of_method_path(&http::Method::POST, "/a")
        );
    }

    proptest! {
        #[test]
        fn one_pass_id_test_agrees(segment in "[0-9a-fA-F_gzGZ\\-]{0,40}|\\PC{0,40}") {
            prop_assert_eq!(is_id_bytes(segment.as_bytes()), is_id_segment(&segment));
        }

        #[test]
        fn op_key_streaming_equivalence(method in "[A-Z]{1,12}", path in "/\\PC{0,60}") {
            let m = http::Method::from_bytes(method.as_bytes()).unwrap();
            prop_assert_eq!(
                OpKey::of_method_path(&m, &path),
                OpKey::of_name(default_operation(&m, &path).as_str())
            );
        }
    }
}
