//! The key and attempt headers (read, validated, stamped), and [`RetryRequest`] for
//! `http::Request`.

use std::borrow::Cow;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Request};

use super::{CloneBody, IdempotencyKey, InvalidKey, RequestView, RetryRequest, SideEffect};

/// The header names the layer reads and writes; see
/// [`RetryLayer::header_names`](crate::RetryLayer::header_names).
///
/// Build it with `..HeaderNames::default()` (or `..HeaderNames::grpc()`) so that a field
/// added later does not break the code.
#[derive(Debug, Clone)]
pub struct HeaderNames {
    /// Where the idempotency key goes (default `Idempotency-Key`).
    pub idempotency_key: HeaderName,
    /// Where the attempt number goes, 0 on the first attempt (default `x-retry-count`, as
    /// the OpenAI/Anthropic SDKs' `x-stainless-retry-count`); `None` sends none.
    pub attempt: Option<HeaderName>,
    /// Whether the attempt header is sent on the first attempt too, as `0` (default
    /// `true`). With `false` it appears from the first retry on (`1`, `2`, ...): the
    /// number of earlier attempts, as gRPC's `grpc-previous-rpc-attempts` (A6).
    pub attempt_on_first: bool,
    /// Where the task id is read from (default `x-task-id`).
    pub task_id: HeaderName,
    /// Where the user id is read from (default `x-user-id`).
    pub user_id: HeaderName,
}

impl Default for HeaderNames {
    fn default() -> Self {
        HeaderNames {
            idempotency_key: HeaderName::from_static("idempotency-key"),
            attempt: Some(HeaderName::from_static("x-retry-count")),
            attempt_on_first: true,
            task_id: HeaderName::from_static("x-task-id"),
            user_id: HeaderName::from_static("x-user-id"),
        }
    }
}

impl HeaderNames {
    /// The names for gRPC (A6): the attempt travels as `grpc-previous-rpc-attempts`, absent
    /// on the first attempt, `1` on the first retry; the rest as [`HeaderNames::default`]
    /// (the key as `idempotency-key` metadata). See [`Grpc`](crate::classify::Grpc).
    pub fn grpc() -> Self {
        HeaderNames {
            attempt: Some(HeaderName::from_static("grpc-previous-rpc-attempts")),
            attempt_on_first: false,
            ..HeaderNames::default()
        }
    }
}

/// The key in a request's headers, validated.
pub(crate) fn key_from_headers(
    headers: &HeaderMap,
    names: &HeaderNames,
) -> Result<Option<IdempotencyKey>, InvalidKey> {
    match single_header(headers, &names.idempotency_key)? {
        Some(v) => IdempotencyKey::from_header(v).map(Some),
        None => Ok(None),
    }
}

/// The one rule for the key a request carries: its header (validated: an invalid one is
/// an error, never sent) and its [`IdempotencyKey`] extension must agree when both are
/// there; either alone is the key. The layer's closure and minting come after, only for a
/// request that carries none.
pub(crate) fn key_of_parts(
    headers: &HeaderMap,
    extension: Option<&IdempotencyKey>,
    names: &HeaderNames,
) -> Result<Option<IdempotencyKey>, InvalidKey> {
    let header = key_from_headers(headers, names)?;
    match (header, extension) {
        (Some(h), Some(e)) if h != *e => Err(InvalidKey {
            problem: Cow::Owned(format!(
                "the header names `{}` and the IdempotencyKey extension `{}`: one request, \
                 one key",
                h.as_str(),
                e.as_str()
            )),
        }),
        (Some(h), _) => Ok(Some(h)),
        (None, e) => Ok(e.cloned()),
    }
}

/// The one value of a key header. Two values (two header lines, or lists joined into one
/// field) name two keys: which one a server dedupes on is anyone's guess, so it is invalid
/// (a structured-field Item cannot be a list).
pub(crate) fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a HeaderValue>, InvalidKey> {
    // A small map (most requests) is scanned: cheaper than hashing a custom name.
    if headers.len() <= SCAN_AT_MOST {
        let mut first = None;
        for (n, v) in headers {
            if n == name {
                if first.is_some() {
                    return Err(InvalidKey::new("more than one idempotency key header"));
                }
                first = Some(v);
            }
        }
        return Ok(first);
    }
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(InvalidKey::new("more than one idempotency key header"));
    }
    Ok(first)
}

/// Header maps up to this many values are scanned rather than looked up.
const SCAN_AT_MOST: usize = 8;

/// Stamps the key, unless the request sent one itself: that one is never replaced, not
/// even by its quoted form.
pub(crate) fn stamp_key(headers: &mut HeaderMap, key: &IdempotencyKey, names: &HeaderNames) {
    if !headers.contains_key(&names.idempotency_key) {
        headers.insert(names.idempotency_key.clone(), key.header_value().clone());
    }
}

/// Stamps the attempt number, if the layer sends one (on the first attempt only if asked).
pub(crate) fn stamp_attempt(headers: &mut HeaderMap, attempt: u32, names: &HeaderNames) {
    if let Some(name) = &names.attempt {
        if attempt > 0 || names.attempt_on_first {
            headers.insert(name.clone(), attempt_header(attempt));
        }
    }
}

const ATTEMPT_VALUES: [&str; 11] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];

/// The header value for an attempt number, without allocating for small numbers.
pub(crate) fn attempt_header(attempt: u32) -> HeaderValue {
    match ATTEMPT_VALUES.get(attempt as usize) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(attempt),
    }
}

impl<B: CloneBody> RetryRequest for Request<B> {
    fn try_clone(&self) -> Option<Self> {
        let body = self.body().try_clone_body()?;
        let mut req = Request::new(body);
        *req.method_mut() = self.method().clone();
        *req.uri_mut() = self.uri().clone();
        *req.version_mut() = self.version();
        *req.headers_mut() = self.headers().clone();
        *req.extensions_mut() = self.extensions().clone();
        Some(req)
    }

    fn side_effect(&self) -> SideEffect {
        // A `SideEffect` extension is read by the layer, before this, for every request type.
        SideEffect::of_method(self.method())
    }

    fn idempotency_key(&self, names: &HeaderNames) -> Result<Option<IdempotencyKey>, InvalidKey> {
        key_of_parts(
            self.headers(),
            self.extensions().get::<IdempotencyKey>(),
            names,
        )
    }

    fn set_idempotency_key(&mut self, key: &IdempotencyKey, names: &HeaderNames) {
        stamp_key(self.headers_mut(), key, names);
    }

    fn set_attempt(&mut self, attempt: u32, names: &HeaderNames) {
        stamp_attempt(self.headers_mut(), attempt, names);
    }

    fn body_bytes(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        self.body().body_bytes()
    }

    fn view(&self) -> RequestView<'_> {
        RequestView::http(
            self.method(),
            self.uri(),
            self.headers(),
            Some(self.extensions()),
        )
    }
}
