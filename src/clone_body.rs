//! [`CloneBody`]: request bodies that can be replayed.

use std::borrow::Cow;

use bytes::Bytes;

/// A request body that may be copied for a retry.
///
/// Implemented for the usual in-memory bodies. A streaming body (`hyper::body::Incoming`)
/// cannot be replayed; buffer it first (see [`BufferedBody`](crate::body::BufferedBody)).
#[diagnostic::on_unimplemented(
    message = "the body `{Self}` cannot be replayed for a retry",
    note = "buffer a streaming body first: put `BufferRequestBodyLayer` outside the `RetryLayer` (its `BufferedBody` implements `CloneBody`), or use `String`, `Bytes` or `Full<Bytes>`"
)]
pub trait CloneBody: Sized {
    /// A copy of the body, or `None` if it cannot be replayed.
    fn try_clone_body(&self) -> Option<Self>;

    /// The body's bytes, if it is in memory (the default: `None`). Called only when a retry
    /// is considered and the layer estimates costs from bodies
    /// ([`RetryLayer::llm_cost`](crate::RetryLayer::llm_cost)). Borrowed for every body
    /// here but `Full<Bytes>`, whose bytes are copied (it lends none).
    fn body_bytes(&self) -> Option<Cow<'_, [u8]>> {
        None
    }
}

macro_rules! clone_body {
    ($($t:ty => |$b:ident| $bytes:expr),* $(,)?) => {$(
        impl CloneBody for $t {
            fn try_clone_body(&self) -> Option<Self> {
                Some(self.clone())
            }

            fn body_bytes(&self) -> Option<Cow<'_, [u8]>> {
                let $b = self;
                $bytes
            }
        }
    )*};
}

clone_body!(
    () => |_b| Some(Cow::Borrowed(&[][..])),
    String => |b| Some(Cow::Borrowed(b.as_bytes())),
    Vec<u8> => |b| Some(Cow::Borrowed(&b[..])),
    &'static str => |b| Some(Cow::Borrowed(b.as_bytes())),
    &'static [u8] => |b| Some(Cow::Borrowed(*b)),
    Bytes => |b| Some(Cow::Borrowed(&b[..])),
    http_body_util::Full<Bytes> => |b| b.clone().into_inner().map(|d| Cow::Owned(d.to_vec())),
    http_body_util::Empty<Bytes> => |_b| Some(Cow::Borrowed(&[][..])),
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_bodies_lend_their_bytes() {
        let text = "{\"model\":\"m\"}";
        assert_eq!(
            String::from(text).body_bytes().as_deref(),
            Some(text.as_bytes())
        );
        assert_eq!(
            text.as_bytes().to_vec().body_bytes().as_deref(),
            Some(text.as_bytes())
        );
        assert_eq!(
            Bytes::from(text).body_bytes().as_deref(),
            Some(text.as_bytes())
        );
        let full = http_body_util::Full::new(Bytes::from(text));
        assert_eq!(full.body_bytes().as_deref(), Some(text.as_bytes()));
        let buffered = crate::body::BufferedBody::<String>::full(Bytes::from(text));
        assert_eq!(buffered.body_bytes().as_deref(), Some(text.as_bytes()));
        assert_eq!(().body_bytes().as_deref(), Some(&[][..]));
    }
}
