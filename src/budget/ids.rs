//! Task and user ids as budget keys: any id is charged, under a bounded key.
//!
//! An id is whatever the request carries (an extension, or the header's bytes, read as
//! UTF-8 with invalid bytes replaced). It is never skipped for its shape: a long id, a
//! UTF-8 id, an empty id or one with control characters is charged like any other. Ids of
//! 1 to [`MAX_PLAIN_ID`] bytes of `[A-Za-z0-9._:@/+=-]` are kept as they are (readable in
//! Redis and in errors); every other id is charged under `#` and the 32 hex digits of its
//! XXH3-128 digest (`#` is not in the plain set, so the two forms never meet). Two ids that
//! differ share a budget only if their digests collide (about n²/2¹²⁹), or if they differ
//! only in bytes that are not UTF-8 (both read as U+FFFD): a shared budget is narrower,
//! never wider.

use std::borrow::Cow;

/// The longest id kept as it is in a budget key.
pub(crate) const MAX_PLAIN_ID: usize = 64;

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'/' | b'+' | b'=' | b'-')
}

/// The budget key of an id: the id itself if short and plain, else its digest.
pub(crate) fn budget_key(id: &str) -> Cow<'_, str> {
    let bytes = id.as_bytes();
    if !bytes.is_empty() && bytes.len() <= MAX_PLAIN_ID && bytes.iter().all(|b| plain(*b)) {
        return Cow::Borrowed(id);
    }
    let digest = xxhash_rust::xxh3::xxh3_128(bytes);
    Cow::Owned(format!("#{digest:032x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ids_stay_and_others_are_digested() {
        assert_eq!(budget_key("task-1"), "task-1");
        for id in [
            "",
            "tâche-1",
            "a b",
            "x\u{0}y",
            &"t".repeat(65),
            "#abc",
            "{slot}",
        ] {
            let key = budget_key(id);
            assert!(key.starts_with('#') && key.len() == 33, "{id:?} -> {key}");
        }
        assert_ne!(budget_key("tâche-1"), budget_key("tâche-2"));
        assert_eq!(budget_key("tâche-1"), budget_key("tâche-1"));
    }
}
