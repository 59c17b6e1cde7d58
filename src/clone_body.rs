//! [`CloneBody`]: request bodies that can be replayed.

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
}

macro_rules! clone_body {
    ($($t:ty),* $(,)?) => {$(
        impl CloneBody for $t {
            fn try_clone_body(&self) -> Option<Self> {
                Some(self.clone())
            }
        }
    )*};
}

clone_body!(
    (),
    String,
    Vec<u8>,
    &'static str,
    &'static [u8],
    Bytes,
    http_body_util::Full<Bytes>,
    http_body_util::Empty<Bytes>,
);
