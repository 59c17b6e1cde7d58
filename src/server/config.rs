//! [`ConfigError`]: a server layer or store refused its settings when built.

/// A setting of a server layer or store that cannot work, named when it is built: the
/// crate's one error for a setting, [`PolicyError`](crate::PolicyError), as
/// [`RetryPolicy::builder`](crate::RetryPolicy::builder) reports it on the client side.
#[doc(no_inline)]
pub use crate::policy::PolicyError as ConfigError;
