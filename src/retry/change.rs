//! [`ChangeRequest`]: the hook that changes a request before it is retried.

use crate::classify::ErrorKind;

/// Changes a request before it is retried.
///
/// Called before every retry, once the local checks passed (retries left, a copy, a key for
/// a side effect, a delay within the hint cap and the deadline) and before any budget is
/// drawn, with the copy that the next attempt will send (its key and attempt number already
/// stamped) and the failed result. Its answer matters for output failures
/// ([`ErrorKind::OutputInvalid`]): `false` means "nothing changed", and the failure
/// surfaces instead of being retried unchanged. For other failures the answer is ignored
/// (the request may be changed all the same, e.g. to a fallback model).
///
/// Implemented by closures `Fn(&mut Req, &Result<Res, E>, &RetryContext) -> bool`, and by
/// `()`, the default: no change, so output failures surface at once.
pub trait ChangeRequest<Req, Res, E> {
    /// Changes `request` for retry number `context.retry`; `true` if it changed.
    fn change(&self, request: &mut Req, failed: &Result<Res, E>, context: &RetryContext) -> bool;
}

/// The context of a retry, for [`ChangeRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryContext {
    /// The retry about to be made (1 for the first).
    pub retry: u32,
    /// Why the last attempt failed.
    pub kind: ErrorKind,
}

/// No change hook: output failures surface at once.
impl<Req, Res, E> ChangeRequest<Req, Res, E> for () {
    fn change(&self, _: &mut Req, _: &Result<Res, E>, _: &RetryContext) -> bool {
        false
    }
}

impl<Req, Res, E, F> ChangeRequest<Req, Res, E> for F
where
    F: Fn(&mut Req, &Result<Res, E>, &RetryContext) -> bool,
{
    fn change(&self, request: &mut Req, failed: &Result<Res, E>, context: &RetryContext) -> bool {
        self(request, failed, context)
    }
}
