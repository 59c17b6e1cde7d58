//! What [`Dedupe`](super::Dedupe) reads from a request (its key, its scope), and why it may
//! give no response.

use std::fmt;

use crate::request::IdempotencyKey;

/// Reads the idempotency key of a request, if it has one. Implemented by closures
/// `Fn(&Req) -> Option<IdempotencyKey>`.
pub trait KeyFn<Req> {
    /// The request's key; `None`: the request is not deduplicated.
    fn key(&self, req: &Req) -> Option<IdempotencyKey>;
}

impl<Req, F> KeyFn<Req> for F
where
    F: Fn(&Req) -> Option<IdempotencyKey>,
{
    fn key(&self, req: &Req) -> Option<IdempotencyKey> {
        self(req)
    }
}

/// Reads the scope of a request (a user, a tenant, a task): each scope holds at most its
/// share of the layer's keys, and a key deduplicates only within its scope. Implemented by
/// closures `Fn(&Req) -> Option<String>`; `()` (the default) puts every request in one
/// scope.
pub trait ScopeFn<Req> {
    /// The request's scope; `None`: the shared scope.
    fn scope(&self, req: &Req) -> Option<String>;
}

impl<Req, F> ScopeFn<Req> for F
where
    F: Fn(&Req) -> Option<String>,
{
    fn scope(&self, req: &Req) -> Option<String> {
        self(req)
    }
}

/// No scopes: every request is in the shared scope (the default of
/// [`DedupeLayer`](super::DedupeLayer)).
impl<Req> ScopeFn<Req> for () {
    fn scope(&self, _: &Req) -> Option<String> {
        None
    }
}

/// Why [`Dedupe`](super::Dedupe) gives no response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DedupeError<E> {
    /// The inner service failed (the call for this key, maybe run for another caller).
    Inner(E),
    /// The call for this key did not finish: it panicked or its runtime shut down. The key is
    /// free again, so a retry runs the call anew.
    Aborted,
    /// The layer tracks as many keys as it may; the call was not run.
    Full,
    /// The request's scope holds its share of the keys
    /// ([`DedupeLayer::max_keys_per_scope`](super::DedupeLayer::max_keys_per_scope)); the call was not run. Other scopes still run.
    ScopeFull {
        /// The scope (`None`: the shared scope).
        scope: Option<String>,
        /// Its share.
        max: usize,
    },
}

impl<E> DedupeError<E> {
    /// The inner service's error, if that is what this is.
    pub fn into_inner(self) -> Option<E> {
        match self {
            DedupeError::Inner(e) => Some(e),
            _ => None,
        }
    }
}

impl<E: fmt::Display> fmt::Display for DedupeError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DedupeError::Inner(e) => e.fmt(f),
            DedupeError::Aborted => f.write_str("the deduplicated call did not finish"),
            DedupeError::Full => f.write_str("too many deduplicated keys; the call was not run"),
            DedupeError::ScopeFull { scope, max } => match scope {
                Some(scope) => write!(
                    f,
                    "the scope {scope:?} holds its share of {max} deduplicated keys; the call was not run"
                ),
                None => write!(
                    f,
                    "the shared scope holds its share of {max} deduplicated keys; the call was not run"
                ),
            },
        }
    }
}

impl<E> std::error::Error for DedupeError<E>
where
    E: std::error::Error + 'static,
{
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DedupeError::Inner(e) => Some(e),
            _ => None,
        }
    }
}
