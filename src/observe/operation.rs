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
    const SEED: u64 = 0xcbf2_9ce4_8422_2325;

    /// FNV-1a: byte-wise, so hashing the pieces of a name in a row equals hashing the name.
    fn feed(mut h: u64, bytes: &[u8]) -> u64 {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    pub(crate) fn of_name(name: &str) -> Self {
        OpKey(Self::feed(Self::SEED, name.as_bytes()))
    }

    /// The key of the default name, `default_operation(method, path)`, without building it:
    /// one pass over the path, each segment looked at once to tell an id, then hashed.
    pub(crate) fn of_method_path(method: &http::Method, path: &str) -> Self {
        // Must equal `of_name(&default_operation(method, path))`, which names the entry.
        let mut h = Self::feed(Self::SEED, method.as_str().as_bytes());
        h = Self::feed(h, b" ");
        let mut first = true;
        for segment in path.as_bytes().split(|b| *b == b'/') {
            if !first {
                h = Self::feed(h, b"/");
            }
            first = false;
            let text = if is_id_bytes(segment) {
                ID.as_bytes()
            } else {
                segment
            };
            h = Self::feed(h, text);
        }
        OpKey(h)
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
        let paths = [
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
