//! Idempotency keys from an LLM's tool-call ids ([`IdempotencyKey::from_tool_call`]).

use std::fmt::Write as _;

use crate::request::IdempotencyKey;

/// Parts longer than this are hashed, so that a key never passes 255 characters.
const MAX_RAW_PART: usize = 100;

impl IdempotencyKey {
    /// The key of an LLM's tool call: stable (the same task and id give the same key in
    /// every process and version) and valid for any input, never panicking.
    ///
    /// OpenAI's `call_...` and Anthropic's `toolu_...` ids are unique within a conversation,
    /// not across them, so the task (a conversation, an agent run) is part of the key. The
    /// key reads `tc:<len>.<task>:<len>.<id>`; a part that is longer than 100 bytes or holds
    /// characters a key cannot (non-ASCII, spaces, quotes, control characters) is replaced
    /// by `#` and the 32 hex digits of its XXH3-128 hash. Length prefixes and the `#` keep
    /// the form unambiguous: different (task, id) pairs give different keys (up to a hash
    /// collision among hashed parts).
    ///
    /// ```
    /// use tower_retry_guard::IdempotencyKey;
    ///
    /// let key = IdempotencyKey::from_tool_call("ticket-4711", "toolu_01A09q90qw90lq917835lq9");
    /// assert_eq!(key.as_str(), "tc:11.ticket-4711:29.toolu_01A09q90qw90lq917835lq9");
    /// // Any UTF-8 task: its hash stands in for it.
    /// let key = IdempotencyKey::from_tool_call("tâche 🚀", "call_abc123");
    /// assert!(key.as_str().starts_with("tc:#"));
    /// ```
    pub fn from_tool_call(task: &str, tool_call_id: &str) -> IdempotencyKey {
        let mut text = String::with_capacity(2 * MAX_RAW_PART + 16);
        text.push_str("tc:");
        push_part(&mut text, task);
        text.push(':');
        push_part(&mut text, tool_call_id);
        // Valid by construction (at most 3 + 2 * (4 + 100) + 1 visible ASCII characters).
        IdempotencyKey::new(&text).unwrap_or_else(|_| unreachable!("a tool-call key is valid"))
    }
}

fn push_part(text: &mut String, part: &str) {
    let safe = part.len() <= MAX_RAW_PART
        && part
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\');
    if safe {
        let _ = write!(text, "{}.{part}", part.len());
    } else {
        let hash = xxhash_rust::xxh3::xxh3_128(part.as_bytes());
        let _ = write!(text, "#{hash:032x}");
    }
}
