//! The answers the layer gives itself: RFC 9457 problems, replays, stored markers.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use super::IDEMPOTENT_REPLAYED;
use crate::server::body::IdempotencyBody;
use crate::server::store::Stored;

/// The problem types of the layer's answers, so a client can tell them apart by more than
/// the status.
pub(super) mod kind {
    pub(crate) const KEY_MISSING: &str = "idempotency-key-missing";
    pub(crate) const KEY_MALFORMED: &str = "idempotency-key-malformed";
    pub(crate) const BODY_TOO_LARGE: &str = "request-body-too-large";
    pub(crate) const BODY_UNREADABLE: &str = "request-body-unreadable";
    pub(crate) const PRINCIPAL_MISSING: &str = "principal-missing";
    pub(crate) const IN_PROGRESS: &str = "request-in-progress";
    pub(crate) const KEY_REUSED: &str = "idempotency-key-reused";
    pub(crate) const OUTCOME_UNKNOWN: &str = "outcome-unknown";
    pub(crate) const NOT_REPLAYABLE: &str = "result-not-replayable";
    pub(crate) const STORE_UNAVAILABLE: &str = "idempotency-store-unavailable";
    pub(crate) const STORE_FULL: &str = "idempotency-store-full";
    pub(crate) const INTERNAL: &str = "internal-error";
}

/// An RFC 9457 problem as a storable response: `type` is `urn:tower-retry-guard:<kind>`.
pub(super) fn problem_stored(status: StatusCode, kind: &str, title: &str, detail: &str) -> Stored {
    let body = format!(
        r#"{{"type":"urn:tower-retry-guard:{}","title":"{}","status":{},"detail":"{}"}}"#,
        kind,
        json_escape(title),
        status.as_u16(),
        json_escape(detail)
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    Stored {
        status,
        headers,
        body: Bytes::from(body),
    }
}

/// An RFC 9457 problem response.
pub(super) fn problem<B>(
    status: StatusCode,
    kind: &str,
    title: &str,
    detail: &str,
) -> Response<IdempotencyBody<B>> {
    let stored = problem_stored(status, kind, title, detail);
    let mut res = Response::new(IdempotencyBody::full(stored.body));
    *res.status_mut() = status;
    *res.headers_mut() = stored.headers;
    res
}

/// A problem that invites a retry after `secs` seconds (`Retry-After`).
pub(super) fn retry_later<B>(
    status: StatusCode,
    kind: &str,
    title: &str,
    detail: &str,
    secs: u32,
) -> Response<IdempotencyBody<B>> {
    let mut res = problem(status, kind, title, detail);
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    res
}

/// The answer to a retry whose first request's outcome is unknown: marked as replayed, so a
/// client's retry layer treats it as the key's final answer and does not try again.
pub(super) fn outcome_unknown<B>() -> Response<IdempotencyBody<B>> {
    replay(problem_stored(
        StatusCode::INTERNAL_SERVER_ERROR,
        kind::OUTCOME_UNKNOWN,
        "Outcome unknown",
        "a request with this idempotency key was started, and its processing ended without a \
         result (its server stopped, or lost its idempotency store for longer than its lease). \
         Whether it took effect is unknown, so it is not run again with this key: check the \
         effect itself, then send a new key if it is still wanted",
    ))
}

/// The stored answer for a request that ran but whose response cannot be replayed.
pub(super) fn not_replayable(why: &str) -> Stored {
    problem_stored(
        StatusCode::INTERNAL_SERVER_ERROR,
        kind::NOT_REPLAYABLE,
        "Result not available",
        &format!(
            "the request with this idempotency key was processed, but its result cannot be \
             replayed: {why}. It will not be processed again with this key."
        ),
    )
}

/// A stored response, replayed (`Idempotent-Replayed: true`).
pub(super) fn replay<B>(stored: Stored) -> Response<IdempotencyBody<B>> {
    let mut res = Response::new(IdempotencyBody::full(stored.body));
    *res.status_mut() = stored.status;
    *res.headers_mut() = stored.headers;
    res.headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    res
}

/// The headers kept for a replay: hop-by-hop headers and a stale replay mark removed.
pub(super) fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        IDEMPOTENT_REPLAYED,
    ] {
        out.remove(name);
    }
    out
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_json() {
        assert_eq!(json_escape("a\"b\\c\n"), "a\\\"b\\\\c\\u000a");
    }

    #[test]
    fn markers_fit_the_reserve_a_claim_holds() {
        let why = "the response (status 200) was larger than the 1048576 bytes kept";
        assert!(not_replayable(why).size() <= crate::server::memory::MARKER_RESERVE);
    }
}
