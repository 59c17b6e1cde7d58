//! [`UnknownOutcome`]: what to do when a retry finds its first request abandoned.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::server::store::ScopedKey;

type RecoveryFn =
    Arc<dyn Fn(&ScopedKey) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// What to do when a retry finds that the first request with its key started and never
/// finished: its lease ran out without a result (its process died, or lost the store for a
/// whole lease), so whether its side effect happened is unknown.
///
/// The default, [`UnknownOutcome::refuse`], is the safe one: the request is not run again,
/// and the retry gets `500` with a problem of type `urn:tower-retry-guard:outcome-unknown`
/// and `Idempotent-Replayed: true` (a client's retry layer stops there). Stripe and
/// brandur's "recovery points" go further by making the handler itself resumable; this
/// layer cannot know how far a handler got, so re-running is the user's explicit choice:
/// [`UnknownOutcome::rerun`] always, or [`UnknownOutcome::ask`] per key (say, after
/// checking the side effect's own record: was the email sent?).
#[derive(Clone)]
pub struct UnknownOutcome(Recovery);

#[derive(Clone)]
enum Recovery {
    Refuse,
    Rerun,
    Ask(RecoveryFn),
}

impl UnknownOutcome {
    /// Never run it again (the default).
    pub fn refuse() -> Self {
        UnknownOutcome(Recovery::Refuse)
    }

    /// Run it again (the retry takes the claim over): only for handlers whose side effect is
    /// idempotent on its own.
    pub fn rerun() -> Self {
        UnknownOutcome(Recovery::Rerun)
    }

    /// Ask `decide` for each such key: `true` runs the request again, `false` refuses it.
    pub fn ask<F, Fut>(decide: F) -> Self
    where
        F: Fn(&ScopedKey) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        UnknownOutcome(Recovery::Ask(Arc::new(move |key| Box::pin(decide(key)))))
    }

    pub(super) async fn allows_rerun(&self, key: &ScopedKey) -> bool {
        match &self.0 {
            Recovery::Refuse => false,
            Recovery::Rerun => true,
            Recovery::Ask(decide) => decide(key).await,
        }
    }
}

impl Default for UnknownOutcome {
    fn default() -> Self {
        UnknownOutcome::refuse()
    }
}

impl fmt::Debug for UnknownOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Recovery::Refuse => "UnknownOutcome::Refuse",
            Recovery::Rerun => "UnknownOutcome::Rerun",
            Recovery::Ask(_) => "UnknownOutcome::Ask",
        })
    }
}
