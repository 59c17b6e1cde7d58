//! The HTTP classifier preset for LLM provider APIs.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, Response, StatusCode};

use super::{AsError, Classify, ErrorKind, Outcome};
use crate::observe::RetryInfo;

/// The classifier preset for LLM provider APIs over HTTP (OpenAI, Anthropic and compatible).
///
/// | status | outcome |
/// |---|---|
/// | 1xx, 2xx, 3xx | success |
/// | 408 | retry, [`ErrorKind::Timeout`] |
/// | 409 | retry, [`ErrorKind::Conflict`] |
/// | 429 | retry, [`ErrorKind::RateLimited`]; but fail with [`ErrorKind::QuotaExhausted`] when the error body (buffered by [`BufferErrorBodyLayer`](crate::body::BufferErrorBodyLayer)) says the account is out of quota (`insufficient_quota`, ...) |
/// | 503, 529 | retry, [`ErrorKind::Overloaded`] |
/// | 504 | retry, [`ErrorKind::Timeout`] |
/// | other 5xx | retry, [`ErrorKind::ServerError`] |
/// | other 4xx (400, 401, 403, 404, 422, ...) | fail, [`ErrorKind::ClientError`] |
///
/// A failed response replayed by the server's idempotency store (`Idempotent-Replayed:
/// true`) is never retried: every retry with the same key would get it again.
///
/// On a failed status, the provider's `x-should-retry: true|false` header overrides the
/// table (as in the OpenAI and Anthropic SDKs). The server's wait hint is read in the SDKs'
/// order: `retry-after-ms` (milliseconds), then `Retry-After` as delta-seconds or as an
/// HTTP-date. A hint past the policy's cap stops the retries however it is written: a number
/// too large for a `Duration` (`99999999999999999999`) or a date far in the future counts as
/// too long, never as unreadable. Only a hint that does not parse (negative, not a number,
/// a date in the past) is ignored: the layer falls back to its backoff. A header sent more
/// than once (or a list folded into one field) is read whole: the longest hint counts, an
/// `x-should-retry: false` among the values forbids the retry, an `Idempotent-Replayed:
/// true` among them marks a replay.
///
/// Transport errors (`Err`) are classified by [`Errors`](crate::classify::Errors). A response that an inner retry
/// layer of this crate already returned (it carries a [`RetryInfo`]) with a failing status is
/// not retried again ([`ErrorKind::GaveUp`]): retrying at several layers multiplies attempts.
#[derive(Debug, Clone, Copy, Default)]
pub struct LlmHttp;

impl LlmHttp {
    /// Classifies a status code and headers (the body is not read).
    pub fn classify_parts(status: StatusCode, headers: &HeaderMap) -> Outcome {
        if !(status.is_client_error() || status.is_server_error()) {
            return Outcome::Success;
        }
        let kind = kind_of(status);
        // A failure the server replayed from its idempotency store (`Idempotent-Replayed:
        // true`) is the stored result of this very key: every retry with the key gets it
        // again, so retrying it is useless.
        if values(headers, "idempotent-replayed").any(|v| v.eq_ignore_ascii_case(b"true")) {
            return Outcome::Fail { kind };
        }
        // Case and surrounding whitespace do not matter: `TRUE` and `True` (some gateways
        // and proxies rewrite the value) mean the same as `true`. Sent more than once, a
        // `false` anywhere wins: a retry one of them forbids is not made.
        let mut verdict = None;
        for v in values(headers, "x-should-retry") {
            if v.eq_ignore_ascii_case(b"false") {
                verdict = Some(false);
                break;
            }
            if v.eq_ignore_ascii_case(b"true") {
                verdict = Some(true);
            }
        }
        let retry = verdict.unwrap_or_else(|| is_retryable(status));
        if retry {
            Outcome::Retry {
                kind,
                after: retry_hint(headers),
            }
        } else {
            Outcome::Fail { kind }
        }
    }

    /// Whether an error body says the account is out of quota.
    pub fn is_quota_error(body: &[u8]) -> bool {
        // Bounded: error bodies are buffered up to a limit; look at the first 64 KiB at most.
        let body = &body[..body.len().min(64 * 1024)];
        QUOTA_MARKERS
            .iter()
            .any(|m| body.windows(m.len()).any(|w| w.eq_ignore_ascii_case(m)))
    }
    /// Parses a `retry-after-ms` value: a non-negative number of milliseconds (a decimal
    /// fraction is accepted, as the SDKs do). `None` for anything else; never panics.
    pub fn parse_retry_after_ms(value: &[u8]) -> Option<Duration> {
        parse_non_negative(value, 1e-3)
    }
    /// Parses a `Retry-After` value (RFC 9110 §10.2.3): delta-seconds, or an HTTP-date taken
    /// relative to `now`. `None` for a negative, malformed or past value; never panics.
    pub fn parse_retry_after(value: &[u8], now: SystemTime) -> Option<Duration> {
        if let Some(d) = parse_non_negative(value, 1.0) {
            return Some(d);
        }
        let text = std::str::from_utf8(value).ok()?.trim();
        let date = httpdate::parse_http_date(text).ok()?;
        // A date in the past is not a hint.
        let wait = date.duration_since(now).ok()?;
        (!wait.is_zero()).then_some(wait)
    }
}

/// Error codes that mean "out of money", not "too fast": waiting will not help
/// (OpenAI `insufficient_quota`, `billing_hard_limit_reached`; spend and credit limits).
const QUOTA_MARKERS: [&[u8]; 5] = [
    b"insufficient_quota",
    b"billing_hard_limit_reached",
    b"quota_exceeded",
    b"spend_limit",
    b"credit balance is too low",
];

fn is_retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error()
}

fn kind_of(status: StatusCode) -> ErrorKind {
    match status.as_u16() {
        408 | 504 => ErrorKind::Timeout,
        409 => ErrorKind::Conflict,
        429 => ErrorKind::RateLimited,
        503 | 529 => ErrorKind::Overloaded,
        500..=599 => ErrorKind::ServerError,
        _ => ErrorKind::ClientError,
    }
}

/// The server's wait hint from `retry-after-ms`, else `Retry-After`; `None` when absent or
/// unusable.
///
/// A hint sent more than once (two header lines, or a list a proxy folded into one field):
/// the longest wait readable among them, so that no value the server sent is waited less.
pub(crate) fn retry_hint(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = longest(headers, "retry-after-ms", LlmHttp::parse_retry_after_ms) {
        return Some(ms);
    }
    let now = SystemTime::now();
    longest(headers, "retry-after", |v| {
        LlmHttp::parse_retry_after(v, now)
    })
}

/// The longest of `name`'s values that `parse` reads: each header line whole (an HTTP-date
/// has a comma of its own), else each item of its comma-separated list.
fn longest(
    headers: &HeaderMap,
    name: &str,
    parse: impl Fn(&[u8]) -> Option<Duration>,
) -> Option<Duration> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| {
            let v = v.as_bytes();
            parse(v).or_else(|| v.split(|b| *b == b',').filter_map(&parse).max())
        })
        .max()
}

/// Every value of `name` (each header line, each item of a comma-separated line), trimmed.
pub(crate) fn values<'a>(headers: &'a HeaderMap, name: &str) -> impl Iterator<Item = &'a [u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
}

/// A non-negative decimal number times `unit` seconds. Rejects signs, exponents, NaN and
/// infinities; a number too large for a `Duration`, however it is written, is
/// `Duration::MAX` (a hint past any cap, which stops the retries, never an ignored one).
fn parse_non_negative(value: &[u8], unit: f64) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() {
        return None;
    }
    let mut dots = 0;
    for b in text.bytes() {
        match b {
            b'0'..=b'9' => {}
            b'.' => dots += 1,
            _ => return None,
        }
    }
    if dots > 1 || text.starts_with('.') || text.ends_with('.') {
        return None;
    }
    let number: f64 = text.parse().ok()?;
    let secs = number * unit;
    // Digits only, so the number is finite or +inf, never negative or NaN: too large is
    // the only way to fail.
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

impl<B, E: AsError> Classify<Response<B>, E> for LlmHttp {
    fn classify(&self, result: &Result<Response<B>, E>) -> Outcome {
        match result {
            Ok(res) => {
                let mut outcome = LlmHttp::classify_parts(res.status(), res.headers());
                if res.status() == StatusCode::TOO_MANY_REQUESTS {
                    if let Some(body) = res.extensions().get::<crate::body::ErrorBody>() {
                        if LlmHttp::is_quota_error(&body.0) {
                            outcome = Outcome::Fail {
                                kind: ErrorKind::QuotaExhausted,
                            };
                        }
                    }
                }
                crate::classify::unless_inner_gave_up(outcome, res.extensions())
            }
            Err(e) if e.gave_up() => Outcome::Fail {
                kind: ErrorKind::GaveUp,
            },
            Err(e) => super::Errors::classify_error(e.as_error()),
        }
    }

    fn status_code(&self, result: &Result<Response<B>, E>) -> Option<u16> {
        result.as_ref().ok().map(|res| res.status().as_u16())
    }

    fn attach(&self, response: &mut Response<B>, info: RetryInfo) -> Option<RetryInfo> {
        // An inner retry layer's account of the one attempt this layer made says what
        // really happened (its attempts, delay, key, outcome): keep it.
        if info.attempts <= 1 && response.extensions().get::<RetryInfo>().is_some() {
            return None;
        }
        response.extensions_mut().insert(info);
        None
    }
}
