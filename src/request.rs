//! What the layer needs to know about a request, and does to it: [`RetryRequest`],
//! [`SideEffect`], [`IdempotencyKey`].

#[path = "clone_body.rs"]
mod clone_body;
#[path = "key_headers.rs"]
mod key_headers;

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;

pub use self::clone_body::CloneBody;
pub use self::key_headers::HeaderNames;
pub(crate) use self::key_headers::single_header;
#[cfg(feature = "reqwest")]
pub(crate) use self::key_headers::{key_from_headers, stamp_attempt, stamp_key};
use http::header::HeaderName;
use http::{Extensions, HeaderMap, HeaderValue, Method, Uri};

/// Whether running a request twice can do harm.
///
/// By default taken from the HTTP method (RFC 9110 §9.2): GET, HEAD, OPTIONS and TRACE are
/// read-only; PUT and DELETE are idempotent; POST, PATCH, CONNECT and unknown methods are
/// side-effecting. Override per request by inserting a `SideEffect` into the request's
/// extensions (an LLM completion POST is [`SideEffect::Idempotent`]: it changes nothing), or
/// per layer with [`RetryLayer::side_effect_fn`](crate::RetryLayer::side_effect_fn).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SideEffect {
    /// Changes nothing: retried freely.
    ReadOnly,
    /// Changes something, but doing it twice is the same as once: retried freely.
    Idempotent,
    /// Doing it twice does it twice (sends the email twice): retried only with an
    /// idempotency key that the server deduplicates on.
    SideEffecting,
}

impl SideEffect {
    /// The side effect of an HTTP method (RFC 9110 §9.2.1, §9.2.2).
    pub fn of_method(method: &Method) -> SideEffect {
        match *method {
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE => SideEffect::ReadOnly,
            Method::PUT | Method::DELETE => SideEffect::Idempotent,
            _ => SideEffect::SideEffecting,
        }
    }

    /// A short name for logs: `read_only`, `idempotent`, `side_effecting`.
    pub const fn as_str(self) -> &'static str {
        match self {
            SideEffect::ReadOnly => "read_only",
            SideEffect::Idempotent => "idempotent",
            SideEffect::SideEffecting => "side_effecting",
        }
    }
}

/// An idempotency key: the name of one logical operation, the same on every attempt.
///
/// Valid keys are 1 to 255 characters of visible ASCII other than `"` and `\` (so that the
/// key is its own RFC 8941 structured-field string, as the IETF Idempotency-Key draft
/// requires, without escapes). Minted keys are random UUIDs (version 4): unpredictable, so a
/// client cannot guess and replay another's key, and needing no clock or node id. (A v7 UUID
/// would sort by time, which a store does not need.)
///
/// Cloning is cheap (a reference count).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    /// The header form: the key between double quotes.
    header: HeaderValue,
}

impl IdempotencyKey {
    /// The longest key accepted (Stripe's limit).
    pub const MAX_LEN: usize = 255;

    /// Mints a new random key (UUID v4). One allocation.
    pub fn generate() -> Self {
        let mut buf = [0u8; 38];
        buf[0] = b'"';
        buf[37] = b'"';
        let mut text = [0u8; 36];
        crate::random::uuid_v4(&mut text);
        buf[1..37].copy_from_slice(&text);
        let header = HeaderValue::from_maybe_shared(Bytes::from_owner(buf))
            .unwrap_or_else(|_| unreachable!("a quoted UUID is a valid header value"));
        IdempotencyKey { header }
    }

    /// Validates a key given as plain text.
    pub fn new(key: impl AsRef<str>) -> Result<Self, InvalidKey> {
        let key = key.as_ref();
        validate(key.as_bytes())?;
        let mut quoted = Vec::with_capacity(key.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(key.as_bytes());
        quoted.push(b'"');
        let header = HeaderValue::from_maybe_shared(Bytes::from(quoted))
            .map_err(|_| InvalidKey::new("not a valid header value"))?;
        Ok(IdempotencyKey { header })
    }

    /// Reads a key from a header value: an RFC 8941 string (`"abc"`, the IETF draft's form)
    /// or, leniently, a bare token (`abc`, as many clients send).
    pub fn from_header(value: &HeaderValue) -> Result<Self, InvalidKey> {
        let bytes = value.as_bytes();
        if bytes.first() == Some(&b'"') {
            IdempotencyKey::new(sf_string(bytes)?)
        } else {
            validate(bytes)?;
            // Safe to unwrap-free convert: validated as visible ASCII.
            let text = std::str::from_utf8(bytes).map_err(|_| InvalidKey::new("not ASCII"))?;
            IdempotencyKey::new(text)
        }
    }

    /// The key's text (without quotes).
    pub fn as_str(&self) -> &str {
        let bytes = self.header.as_bytes();
        // Invariant: the header form is `"` + visible ASCII + `"`.
        std::str::from_utf8(&bytes[1..bytes.len() - 1]).unwrap_or_default()
    }

    /// The header form (an RFC 8941 string: the key between double quotes).
    pub fn header_value(&self) -> &HeaderValue {
        &self.header
    }
}

/// The string of an RFC 8941 structured-field Item that is a String (`"..."`, with `\"` and
/// `\\` escapes, optional parameters after it, surrounding spaces allowed). Only what a key
/// can hold passes [`validate`] afterwards, so the escapes only serve to name the error.
fn sf_string(bytes: &[u8]) -> Result<String, InvalidKey> {
    let not_sf = || InvalidKey::new("not a structured-field string");
    let trimmed = bytes.trim_ascii_start();
    let rest = trimmed.strip_prefix(b"\"").ok_or_else(not_sf)?;
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.iter();
    loop {
        match chars.next() {
            None => return Err(not_sf()), // no closing quote
            Some(b'"') => break,
            Some(b'\\') => match chars.next() {
                Some(&c @ (b'"' | b'\\')) => out.push(char::from(c)),
                _ => return Err(not_sf()),
            },
            Some(&c) if (0x20..=0x7e).contains(&c) => out.push(char::from(c)),
            Some(_) => return Err(not_sf()),
        }
    }
    // Parameters (`;name=value`) may follow the Item; anything else may not.
    let after = chars.as_slice().trim_ascii_end();
    if !after.is_empty() && (after[0] != b';' || !after.iter().all(|c| (0x20..=0x7e).contains(c))) {
        return Err(not_sf());
    }
    Ok(out)
}

fn validate(bytes: &[u8]) -> Result<(), InvalidKey> {
    if bytes.is_empty() {
        return Err(InvalidKey::new("empty"));
    }
    if bytes.len() > IdempotencyKey::MAX_LEN {
        return Err(InvalidKey::new("longer than 255 characters"));
    }
    if let Some(at) = bytes
        .iter()
        .position(|b| !(0x21..=0x7e).contains(b) || *b == b'"' || *b == b'\\')
    {
        // Name the character, not its first byte (`café` contains 'é', not 'Ã').
        let rest = &bytes[at..];
        let valid = match std::str::from_utf8(rest) {
            Ok(text) => text,
            Err(e) => std::str::from_utf8(&rest[..e.valid_up_to()]).unwrap_or_default(),
        };
        let shown = match valid.chars().next() {
            Some(c) => format!("{c:?}"),
            None => format!("the byte 0x{:02x} (not UTF-8)", rest[0]),
        };
        return Err(InvalidKey {
            problem: Cow::Owned(format!(
                "contains {shown}: only visible ASCII other than '\"' and '\\' is allowed"
            )),
        });
    }
    Ok(())
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey")
            .field(&self.as_str())
            .finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An idempotency key that is not valid: empty, too long, or with forbidden characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidKey {
    problem: Cow<'static, str>,
}

impl InvalidKey {
    fn new(problem: &'static str) -> Self {
        InvalidKey {
            problem: Cow::Borrowed(problem),
        }
    }

    /// The `on_retry` hook left the retry with another key than the call's (or none it
    /// could read): the retry is not sent.
    pub(crate) fn changed_on_retry() -> Self {
        InvalidKey::new(
            "the on_retry hook changed the key of the retry; every attempt of a call is sent \
             with the key of its first attempt",
        )
    }
}

impl fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid idempotency key: {}", self.problem)
    }
}

impl std::error::Error for InvalidKey {}

/// The name of an operation, for stats, tracing and budgets. Put one in a request's
/// extensions to name it; otherwise the layer uses its naming closure, or the method and path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Operation(pub Cow<'static, str>);

impl Operation {
    /// An operation name known at compile time (no allocation).
    pub const fn from_static(name: &'static str) -> Self {
        Operation(Cow::Borrowed(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The task a request belongs to (for the per-task budget). An extension, or the
/// `x-task-id` header by default.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskId(pub String);

/// The user a request is made for (for the per-user budget). An extension, or the
/// `x-user-id` header by default.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(pub String);

/// A borrowed look at a request's HTTP parts, for the layer's per-layer closures
/// (side effect, operation name). Non-HTTP requests show nothing.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct RequestView<'a> {
    /// The method.
    pub method: Option<&'a Method>,
    /// The URI.
    pub uri: Option<&'a Uri>,
    /// The headers.
    pub headers: Option<&'a HeaderMap>,
    /// The extensions.
    pub extensions: Option<&'a Extensions>,
}

impl<'a> RequestView<'a> {
    /// A view of HTTP parts.
    pub fn http(
        method: &'a Method,
        uri: &'a Uri,
        headers: &'a HeaderMap,
        extensions: Option<&'a Extensions>,
    ) -> Self {
        RequestView {
            method: Some(method),
            uri: Some(uri),
            headers: Some(headers),
            extensions,
        }
    }
}

/// What the retry layer needs from a request type.
///
/// Implemented for `http::Request<B>` whose body can be cloned ([`CloneBody`]), for
/// `reqwest::Request` (feature `reqwest`), and by users for their own types (a tool call that
/// carries its key: see the `tool_call` example).
///
/// Every method is called by the layer, never by users.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be retried by `RetryLayer`: it does not implement `RetryRequest`",
    label = "the request type of the service behind `RetryLayer`",
    note = "`http::Request<B>` is retryable when its body `B` implements `CloneBody` (`String`, `Bytes`, `Full<Bytes>`, `BufferedBody`); put `BufferRequestBodyLayer` outside the retry for a streaming body",
    note = "for `reqwest::Request`, enable the `reqwest` feature; for your own request type (a tool call), implement `RetryRequest` or use `Guard::run`"
)]
pub trait RetryRequest: Sized {
    /// A copy for the next attempt. Called once per logical call, before the first attempt is
    /// stamped (the retry stamps its own key and attempt number), and again when a retry is
    /// sent, for the attempt after it. `None` turns retries off for
    /// this call: the first result is returned as it is, and a warning says why.
    fn try_clone(&self) -> Option<Self>;

    /// Whether the request has a side effect. Called once per logical call, when neither a
    /// [`SideEffect`] extension nor the layer's `side_effect_fn` decided it.
    fn side_effect(&self) -> SideEffect;

    /// The key the request already carries, if any. Called once per logical call, whatever
    /// its side effect. An invalid key is an error before anything is sent. For HTTP
    /// requests: the `Idempotency-Key` header and the [`IdempotencyKey`] extension; if both
    /// are there they must name the same key, else the request is refused
    /// ([`InvalidKey`]) — the key reported is always the key sent.
    fn idempotency_key(&self, names: &HeaderNames) -> Result<Option<IdempotencyKey>, InvalidKey>;

    /// Stamps the call's key on the request: on the first attempt's request, and on the copy
    /// for each retry (taken before the first attempt was stamped). A key the request already
    /// carries must be left as it is.
    fn set_idempotency_key(&mut self, key: &IdempotencyKey, names: &HeaderNames);

    /// Tells the server which attempt this is (0 for the first). Called before every attempt
    /// (for a retry, before the `on_retry` hook sees the copy).
    fn set_attempt(&mut self, attempt: u32, names: &HeaderNames) {
        let _ = (attempt, names);
    }

    /// The HTTP parts, for the layer's closures and the default operation name.
    fn view(&self) -> RequestView<'_> {
        RequestView::default()
    }

    /// The server the request goes to, host and port, for `server.address` and `server.port`
    /// on the attempt's span. Called once per attempt, only when a tracing subscriber records
    /// that span. The default reads the [`view`](RetryRequest::view)'s URI (the port from the
    /// URI, else 443 for `https` and 80 for `http`).
    fn server(&self) -> Option<(&str, Option<u16>)> {
        let uri = self.view().uri?;
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        Some((uri.host()?, port))
    }

    /// The operation's name, when the request knows it (a tool call knows its tool). Called
    /// when no [`Operation`] extension or naming closure named it; keep it cheap (a
    /// `&'static str` name does not allocate).
    fn operation(&self) -> Option<Operation> {
        None
    }

    /// The task id, for the per-task budget. Called only after a failure. Any id returned is
    /// charged, whatever its shape (long, UTF-8, empty, control characters: under a bounded
    /// digest); `None` means the request belongs to no task.
    fn task_id(&self, names: &HeaderNames) -> Option<String> {
        id_from_view(self.view(), &names.task_id, |t: &TaskId| t.0.clone())
    }

    /// The user id, for the per-user budget. Called only after a failure.
    fn user_id(&self, names: &HeaderNames) -> Option<String> {
        id_from_view(self.view(), &names.user_id, |u: &UserId| u.0.clone())
    }

    /// The body's bytes, if they are in memory, for the layer's cost estimate
    /// ([`RetryLayer::llm_cost`](crate::RetryLayer::llm_cost)). Called only when a retry is
    /// considered, and only when neither the [`Cost`](crate::budget::Cost) extension nor
    /// the layer's `cost_fn` knew the cost. The default: `None` (no estimate); for HTTP
    /// requests, [`CloneBody::body_bytes`]; for `reqwest::Request`, its body's `as_bytes`.
    fn body_bytes(&self) -> Option<Cow<'_, [u8]>> {
        None
    }

    /// What one attempt costs, for the cost budgets (by default the
    /// [`Cost`](crate::budget::Cost) extension; else the layer's
    /// [`cost_fn`](crate::RetryLayer::cost_fn) is asked, then its
    /// [`llm_cost`](crate::RetryLayer::llm_cost) estimate). Called only when a retry is
    /// considered.
    fn cost(&self) -> Option<u64> {
        self.view()
            .extensions
            .and_then(|e| e.get::<crate::budget::Cost>())
            .map(|c| c.0)
    }
}

fn id_from_view<T: Send + Sync + 'static>(
    view: RequestView<'_>,
    header: &HeaderName,
    from_ext: impl FnOnce(&T) -> String,
) -> Option<String> {
    if let Some(v) = view.extensions.and_then(|e| e.get::<T>()) {
        return Some(from_ext(v));
    }
    // Every id present is an id, whatever its shape: the budgets charge a bounded digest of
    // an unusual one, and never skip it (a skipped id would be a budget escaped). Several
    // header lines are read as one id, joined as the wire would fold them.
    let headers = view.headers?;
    let mut values = headers.get_all(header).iter();
    let first = values.next()?;
    let mut id = String::from_utf8_lossy(first.as_bytes()).into_owned();
    for more in values {
        id.push_str(", ");
        id.push_str(&String::from_utf8_lossy(more.as_bytes()));
    }
    Some(id)
}
