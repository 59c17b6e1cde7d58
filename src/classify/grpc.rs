//! The classifier for gRPC responses (tonic channels and any gRPC-over-HTTP/2 client that is
//! a `tower::Service<http::Request<_>>`).

use std::time::Duration;

use http::{HeaderMap, Response, StatusCode};

use super::{AsError, Classify, ErrorKind, Outcome};
use crate::RetryInfo;
use crate::request::{RequestView, SideEffect};

/// The classifier for gRPC calls, as gRPC's retry design (A6) retries them.
///
/// It reads the status a gRPC server sends in the response *headers*: a trailers-only
/// response, which is what a server sends for a call that fails before its first message
/// (tonic's `Err(Status)` from a unary handler, a proxy's or load balancer's refusal). A
/// call whose status comes in the trailers, after a message, has already committed its
/// response: it is a success here, and the client reads its status as usual. That is the
/// boundary A6 draws too: a call is retried only until the response is committed. So the
/// retryable case is a unary call (or the first message of a stream) that fails before any
/// message arrives.
///
/// | `grpc-status` | outcome |
/// |---|---|
/// | 0 `OK`, or absent with HTTP 200 | success |
/// | 14 `UNAVAILABLE` | retry, [`ErrorKind::Overloaded`] |
/// | 8 `RESOURCE_EXHAUSTED` with a pushback | retry after it, [`ErrorKind::RateLimited`] |
/// | 8 `RESOURCE_EXHAUSTED` without one | fail, [`ErrorKind::QuotaExhausted`] |
/// | 4 `DEADLINE_EXCEEDED` | fail, [`ErrorKind::Timeout`]; retry with [`Grpc::retry_deadline_exceeded`] |
/// | 3 `INVALID_ARGUMENT`, 5 `NOT_FOUND`, 6 `ALREADY_EXISTS`, 7 `PERMISSION_DENIED`, 9 `FAILED_PRECONDITION`, 11 `OUT_OF_RANGE`, 12 `UNIMPLEMENTED`, 16 `UNAUTHENTICATED` | fail, [`ErrorKind::ClientError`] |
/// | 10 `ABORTED` | fail, [`ErrorKind::Conflict`] (retry the whole read-modify-write, not the call) |
/// | 2 `UNKNOWN`, 13 `INTERNAL`, 15 `DATA_LOSS` | fail, [`ErrorKind::ServerError`] |
/// | 1 `CANCELLED`, anything else | fail, [`ErrorKind::Other`] |
///
/// Why `RESOURCE_EXHAUSTED` needs a pushback: the code means "rate limited" as well as "out
/// of quota" (or out of memory, or a message too large), and only the first passes with
/// time. A server that sends `grpc-retry-pushback-ms` says it is the first; without it,
/// retrying would multiply the load on a quota that will not come back. A pushback whose
/// `grpc-message` says the account is out of money (`insufficient_quota`, ...: see
/// [`is_quota_error`](super::LlmHttp::is_quota_error)) fails all the same.
///
/// Why `DEADLINE_EXCEEDED` is off: the call's deadline covers all its attempts (A6), so once
/// the client's deadline passed another attempt cannot finish in time. Turn it on when the
/// server reports its own, shorter, deadlines (to a backend of its own).
///
/// A response without `grpc-status` and a status other than 200 comes from something that
/// is not a gRPC server (a proxy): its HTTP status is mapped as gRPC does
/// (`http-grpc-status-mapping`): 429, 502, 503 and 504 are `UNAVAILABLE` (retried as
/// [`ErrorKind::RateLimited`], [`ErrorKind::ServerError`], [`ErrorKind::Overloaded`],
/// [`ErrorKind::Timeout`]; a `Retry-After` there is the hint); 400 `INTERNAL`, 401
/// `UNAUTHENTICATED`, 403 `PERMISSION_DENIED`, 404 `UNIMPLEMENTED` and the rest `UNKNOWN`
/// fail.
///
/// **Pushback.** `grpc-retry-pushback-ms` is the server's wait hint, a floor like
/// `Retry-After`: a hint longer than the policy's
/// [`max_retry_after`](crate::RetryPolicyBuilder::max_retry_after) or past the deadline stops
/// the retries. A negative or unparseable value means "do not retry" (A6): the outcome is a
/// failure, whatever the status.
///
/// Transport errors (`Err`: connection refused or reset, timeouts) go through
/// [`classify_error`](super::Errors::classify_error). A failure an inner retry layer already returned
/// is not retried again ([`ErrorKind::GaveUp`]), nor is one the server replayed from its
/// idempotency store (`idempotent-replayed: true`).
///
/// Use it with [`HeaderNames::grpc`](crate::request::HeaderNames::grpc), so that retries carry
/// `grpc-previous-rpc-attempts`, and with a [`RetryPolicy`](crate::RetryPolicy) of at most 4
/// retries (A6 allows 5 attempts); see the [`classify`](super) module docs for the whole
/// tonic stack and which calls are retried (gRPC calls are POSTs: side-effecting).
#[derive(Debug, Clone, Copy, Default)]
pub struct Grpc {
    retry_deadline_exceeded: bool,
}

/// gRPC status codes used here (`grpc/doc/statuscodes.md`).
mod code {
    pub(super) const OK: u32 = 0;
    pub(super) const UNKNOWN: u32 = 2;
    pub(super) const DEADLINE_EXCEEDED: u32 = 4;
    pub(super) const RESOURCE_EXHAUSTED: u32 = 8;
    pub(super) const ABORTED: u32 = 10;
    pub(super) const INTERNAL: u32 = 13;
    pub(super) const UNAVAILABLE: u32 = 14;
    pub(super) const DATA_LOSS: u32 = 15;
    pub(super) const UNAUTHENTICATED: u32 = 16;
    pub(super) const PERMISSION_DENIED: u32 = 7;
    pub(super) const UNIMPLEMENTED: u32 = 12;
}

/// What `grpc-retry-pushback-ms` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pushback {
    /// No such header.
    Absent,
    /// Wait at least this long.
    After(Duration),
    /// Negative or unparseable: do not retry.
    Stop,
}

impl Grpc {
    /// The defaults: see the table above.
    pub const fn new() -> Self {
        Grpc {
            retry_deadline_exceeded: false,
        }
    }

    /// Whether `DEADLINE_EXCEEDED` is retried (default `false`: the deadline covers all
    /// attempts).
    pub const fn retry_deadline_exceeded(mut self, retry: bool) -> Self {
        self.retry_deadline_exceeded = retry;
        self
    }

    /// The gRPC status code of a response as known from its HTTP status and headers:
    /// `grpc-status` (a value that is not a number is `UNKNOWN`, 2, as tonic reads it), or
    /// the HTTP status mapped as gRPC does when the header is absent. `None` for a 200
    /// without `grpc-status`: the status will come in the trailers.
    pub fn code(status: StatusCode, headers: &HeaderMap) -> Option<u32> {
        if let Some(value) = headers.get("grpc-status") {
            return Some(parse_code(value.as_bytes()));
        }
        match status.as_u16() {
            200 => None,
            400 => Some(code::INTERNAL),
            401 => Some(code::UNAUTHENTICATED),
            403 => Some(code::PERMISSION_DENIED),
            404 => Some(code::UNIMPLEMENTED),
            429 | 502 | 503 | 504 => Some(code::UNAVAILABLE),
            _ => Some(code::UNKNOWN),
        }
    }

    /// Classifies a response by its HTTP status and headers (the body is not read).
    pub fn classify_parts(&self, status: StatusCode, headers: &HeaderMap) -> Outcome {
        let Some(grpc) = Grpc::code(status, headers) else {
            return Outcome::Success;
        };
        if grpc == code::OK {
            return Outcome::Success;
        }
        let from_proxy = !headers.contains_key("grpc-status");
        let kind = if from_proxy {
            http_kind(status)
        } else {
            grpc_kind(grpc)
        };
        // The stored result of this very key: every retry with the key gets it again.
        if super::http::values(headers, "idempotent-replayed")
            .any(|v| v.eq_ignore_ascii_case(b"true"))
        {
            return Outcome::Fail { kind };
        }
        let pushback = pushback(headers);
        let after = match pushback {
            Pushback::Stop => return Outcome::Fail { kind },
            Pushback::After(after) => Some(after),
            // A proxy speaks HTTP: its `Retry-After` is the hint.
            Pushback::Absent if from_proxy => super::http::retry_hint(headers),
            Pushback::Absent => None,
        };
        let retry = match grpc {
            code::UNAVAILABLE => true,
            code::DEADLINE_EXCEEDED => self.retry_deadline_exceeded,
            code::RESOURCE_EXHAUSTED => {
                pushback != Pushback::Absent
                    && !headers
                        .get("grpc-message")
                        .is_some_and(|m| super::LlmHttp::is_quota_error(m.as_bytes()))
            }
            _ => false,
        };
        match (retry, grpc) {
            (true, code::RESOURCE_EXHAUSTED) => Outcome::Retry {
                kind: ErrorKind::RateLimited,
                after,
            },
            (true, _) => Outcome::Retry { kind, after },
            (false, _) => Outcome::Fail { kind },
        }
    }

    /// A [`RetryLayer::side_effect_fn`](crate::RetryLayer::side_effect_fn) that marks the
    /// given gRPC methods [`SideEffect::Idempotent`]: each entry is a full method path
    /// (`/package.Service/Method`) or a whole service (`/package.Service/`, ending with a
    /// slash). Other calls keep their own side effect (a POST: side-effecting).
    ///
    /// This is A6's per-method retry policy: the service owner names the methods that are
    /// safe to repeat. With [`RetryLayer::idempotency_keys(false)`](crate::RetryLayer::idempotency_keys),
    /// only those are retried.
    pub fn idempotent_methods<I>(
        methods: I,
    ) -> impl Fn(&RequestView<'_>) -> Option<SideEffect> + Clone + Send + Sync + 'static
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let methods: std::sync::Arc<[String]> = methods.into_iter().map(Into::into).collect();
        move |view: &RequestView<'_>| {
            let path = view.uri?.path();
            methods
                .iter()
                .any(|m| {
                    if m.ends_with('/') {
                        path.starts_with(m.as_str())
                    } else {
                        path == m
                    }
                })
                .then_some(SideEffect::Idempotent)
        }
    }
}

/// A `grpc-status` value: a decimal number; anything else is `UNKNOWN` (as tonic reads it).
fn parse_code(value: &[u8]) -> u32 {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return code::UNKNOWN;
    }
    digits
        .iter()
        .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
}

fn grpc_kind(grpc: u32) -> ErrorKind {
    match grpc {
        code::UNAVAILABLE => ErrorKind::Overloaded,
        code::RESOURCE_EXHAUSTED => ErrorKind::QuotaExhausted,
        code::DEADLINE_EXCEEDED => ErrorKind::Timeout,
        code::ABORTED => ErrorKind::Conflict,
        code::UNKNOWN | code::INTERNAL | code::DATA_LOSS => ErrorKind::ServerError,
        3 | 5 | 6 | 7 | 9 | 11 | 12 | 16 => ErrorKind::ClientError,
        _ => ErrorKind::Other,
    }
}

fn http_kind(status: StatusCode) -> ErrorKind {
    match status.as_u16() {
        429 => ErrorKind::RateLimited,
        503 => ErrorKind::Overloaded,
        504 => ErrorKind::Timeout,
        400..=499 => ErrorKind::ClientError,
        500..=599 => ErrorKind::ServerError,
        _ => ErrorKind::Other,
    }
}

/// `grpc-retry-pushback-ms`: a non-negative decimal number of milliseconds. Anything else
/// (negative, empty, not a number, several values) is A6's "do not retry". A number too large
/// for a `Duration` is `Duration::MAX`: past any cap, so it stops the retries too.
fn pushback(headers: &HeaderMap) -> Pushback {
    let mut values = headers.get_all("grpc-retry-pushback-ms").iter();
    let Some(value) = values.next() else {
        return Pushback::Absent;
    };
    if values.next().is_some() {
        return Pushback::Stop;
    }
    let digits = value.as_bytes().trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Pushback::Stop;
    }
    let ms = digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    });
    Pushback::After(ms.map_or(Duration::MAX, Duration::from_millis))
}

impl<B, E: AsError> Classify<Response<B>, E> for Grpc {
    fn classify(&self, result: &Result<Response<B>, E>) -> Outcome {
        match result {
            Ok(res) => {
                let outcome = self.classify_parts(res.status(), res.headers());
                crate::classify::unless_inner_gave_up(outcome, res.extensions())
            }
            Err(e) if e.gave_up() => Outcome::Fail {
                kind: ErrorKind::GaveUp,
            },
            Err(e) => super::classify_error(e.as_error()),
        }
    }

    fn status_code(&self, result: &Result<Response<B>, E>) -> Option<u16> {
        result.as_ref().ok().map(|res| res.status().as_u16())
    }

    fn attach(&self, response: &mut Response<B>, info: RetryInfo) -> Option<RetryInfo> {
        // An inner retry layer's account is the truer one (see `LlmHttp`).
        if info.attempts <= 1 && response.extensions().get::<RetryInfo>().is_some() {
            return None;
        }
        response.extensions_mut().insert(info);
        None
    }
}

#[cfg(test)]
#[path = "grpc_tests.rs"]
mod tests;
