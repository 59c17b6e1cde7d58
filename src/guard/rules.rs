//! [`ErrorRules`]: a function's errors classified the way a retry decorator's
//! `retry_on=(ProviderError, TimeoutError)` does, by type, on top of [`Errors`](crate::classify::Errors).

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::Arc;

use crate::classify::{AsError, Classify, ErrorKind, Outcome, classify_error, is_gave_up};

type Rule = Arc<dyn Fn(&(dyn StdError + 'static)) -> Option<Outcome> + Send + Sync>;

/// The longest source chain walked (a cyclic chain must not hang a classification).
const MAX_DEPTH: usize = 32;

/// Classifies errors by rules, in the order added, then by the built-in [`Errors::classify_error`](crate::classify::Errors::classify_error)
/// (timeouts and connection failures retried, anything else not).
///
/// The default classifier of [`Guard`](crate::Guard); usable in a [`RetryLayer`](crate::RetryLayer)
/// too. A success (`Ok`) is a success; an error that an inner retry layer of this crate
/// already gave up on is never retried, whatever the rules say (retries at one layer only).
///
/// ```
/// use std::io;
/// use tower_retry_guard::classify::{Classify, ErrorKind, Outcome};
/// use tower_retry_guard::guard::ErrorRules;
///
/// #[derive(Debug)]
/// struct Overloaded;
/// impl std::fmt::Display for Overloaded {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("overloaded") }
/// }
/// impl std::error::Error for Overloaded {}
///
/// let rules = ErrorRules::new().retry_on::<Overloaded>();
/// let err: Box<dyn std::error::Error + Send + Sync> = Box::new(Overloaded);
/// assert!(matches!(Classify::<(), _>::classify(&rules, &Err(err)), Outcome::Retry { .. }));
/// let not_found: Result<(), io::Error> = Err(io::ErrorKind::NotFound.into());
/// assert_eq!(rules.classify(&not_found), Outcome::Fail { kind: ErrorKind::Other });
/// ```
#[derive(Clone, Default)]
pub struct ErrorRules {
    rules: Vec<Rule>,
}

impl ErrorRules {
    /// No rules: the built-in classification only.
    pub fn new() -> Self {
        ErrorRules::default()
    }

    /// Retries an error that is, or is caused by (anywhere in its source chain), an `X`.
    /// Its kind is the built-in one when it has one (an `io::Error` that timed out is a
    /// timeout), else [`ErrorKind::Other`].
    pub fn retry_on<X: StdError + 'static>(self) -> Self {
        self.rule(|e| find::<X>(e).then(|| Outcome::retry(kind_of(e))))
    }

    /// Retries an error for which `predicate` answers `true` (kind as for
    /// [`ErrorRules::retry_on`]).
    pub fn retry_on_fn<F>(self, predicate: F) -> Self
    where
        F: Fn(&(dyn StdError + 'static)) -> bool + Send + Sync + 'static,
    {
        self.rule(move |e| predicate(e).then(|| Outcome::retry(kind_of(e))))
    }

    /// Classifies an error that is, or is caused by, an `X` as an output failure
    /// ([`ErrorKind::OutputInvalid`]): retried only with a change
    /// ([`Call::on_output_failure`](crate::Call::on_output_failure)).
    pub fn output_invalid_on<X: StdError + 'static>(self) -> Self {
        self.rule(|e| find::<X>(e).then(|| Outcome::retry(ErrorKind::OutputInvalid)))
    }

    /// Never retries an error that is, or is caused by, an `X` (even a timeout).
    pub fn fail_on<X: StdError + 'static>(self) -> Self {
        self.rule(|e| find::<X>(e).then_some(Outcome::Fail { kind: kind_of(e) }))
    }

    /// A rule of its own: `Some(outcome)` decides, `None` leaves the error to the next rule.
    pub fn rule<F>(mut self, rule: F) -> Self
    where
        F: Fn(&(dyn StdError + 'static)) -> Option<Outcome> + Send + Sync + 'static,
    {
        self.rules.push(Arc::new(rule));
        self
    }

    /// Classifies one error: an inner layer's final error fails, then the rules in order,
    /// then [`Errors::classify_error`](crate::classify::Errors::classify_error).
    pub fn classify_error(&self, error: &(dyn StdError + 'static)) -> Outcome {
        if chain(error).any(is_gave_up) {
            return Outcome::Fail {
                kind: ErrorKind::GaveUp,
            };
        }
        self.rules
            .iter()
            .find_map(|rule| rule(error))
            .unwrap_or_else(|| classify_error(error))
    }
}

impl<T, E: AsError> Classify<T, E> for ErrorRules {
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) if e.gave_up() => Outcome::Fail {
                kind: ErrorKind::GaveUp,
            },
            Err(e) => self.classify_error(e.as_error()),
        }
    }
}

impl fmt::Debug for ErrorRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorRules")
            .field("rules", &self.rules.len())
            .finish()
    }
}

/// The error and its causes. An `io::Error` wrapping another error (`io::Error::other(e)`)
/// is followed into `e`: its `source()` skips `e` itself.
fn chain<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |e: &&'a (dyn StdError + 'static)| {
        let e: &'a (dyn StdError + 'static) = *e;
        match e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        }
    })
    .take(MAX_DEPTH)
}

fn find<X: StdError + 'static>(error: &(dyn StdError + 'static)) -> bool {
    chain(error).any(|e| e.is::<X>())
}

/// The built-in kind of a retryable error, else `Other`.
fn kind_of(error: &(dyn StdError + 'static)) -> ErrorKind {
    match classify_error(error) {
        Outcome::Retry { kind, .. } => kind,
        _ => ErrorKind::Other,
    }
}
