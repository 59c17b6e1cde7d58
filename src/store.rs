//! What both halves share: a store's failure ([`StoreError`]).

use std::fmt;

/// A budget or idempotency store could not answer, or refused for want of room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    message: String,
    full: bool,
}

impl StoreError {
    /// A store error with a message: the store could not answer (down, timed out, a
    /// malformed reply). Nothing is known of what the call did.
    pub fn new(message: impl Into<String>) -> Self {
        StoreError {
            message: message.into(),
            full: false,
        }
    }

    /// The store answered, and refused: it holds as much as it may (for everyone, or for the
    /// principal the message names). The call did nothing.
    pub fn full(message: impl Into<String>) -> Self {
        StoreError {
            message: message.into(),
            full: true,
        }
    }

    /// Whether the store refused for want of room (see [`StoreError::full`]), rather than
    /// failing to answer.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// The message, without the `store error: ` prefix of `Display`.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.full {
            write!(f, "store full: {}", self.message)
        } else {
            write!(f, "store error: {}", self.message)
        }
    }
}

impl std::error::Error for StoreError {}
