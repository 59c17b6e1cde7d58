//! [`AsError`]: the error types the built-in classifiers can look into.

use std::error::Error as StdError;
use std::io;

/// Errors the built-in classifiers can look into.
///
/// A blanket implementation over `std::error::Error` is impossible next to the one for
/// `tower::BoxError` (`Box<dyn Error + Send + Sync>` does not implement `Error`), so the
/// common error types are listed here. For another error type, implement this trait (one
/// line: `fn as_error(&self) -> &(dyn Error + 'static) { self }`) or classify with a closure
/// that calls [`Errors::classify_error`](super::Errors::classify_error).
#[diagnostic::on_unimplemented(
    message = "the retry layer cannot classify errors of type `{Self}`",
    note = "map the inner service's error into `tower::BoxError` (`ServiceBuilder::new().layer(retry).map_err(BoxError::from).service(client)`), implement `AsError` for it (one line), or give the layer a classifier closure",
    note = "hyper-util's legacy client error implements it with the `hyper-util` feature; reqwest's with the `reqwest` feature"
)]
pub trait AsError {
    /// The error as a `std::error::Error` trait object whose source chain can be walked.
    fn as_error(&self) -> &(dyn StdError + 'static);

    /// Whether an inner retry layer of this crate already gave up on this error.
    fn gave_up(&self) -> bool {
        false
    }
}

impl AsError for Box<dyn StdError + Send + Sync> {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        &**self
    }
}

impl AsError for Box<dyn StdError + Send> {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        &**self
    }
}

impl AsError for Box<dyn StdError> {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        &**self
    }
}

impl AsError for io::Error {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        self
    }
}

impl AsError for tower::timeout::error::Elapsed {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        self
    }
}

#[cfg(feature = "hyper-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper-util")))]
impl AsError for hyper_util::client::legacy::Error {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        self
    }
}

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl AsError for reqwest::Error {
    fn as_error(&self) -> &(dyn StdError + 'static) {
        self
    }
}
