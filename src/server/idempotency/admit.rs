//! Admitting a request: its key, its principal and its fingerprint, read before anything
//! runs; then the keyed part, in a task of its own.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::Service;

use super::Config;
use super::respond::{kind, problem};
use crate::request::IdempotencyKey;
use crate::server::body::IdempotencyBody;
use crate::server::store::{Fingerprint, IdempotencyStore, ScopedKey};
use tower::BoxError;

pub(super) async fn handle<S, St, B, ResBody>(
    mut inner: S,
    store: St,
    config: Arc<Config>,
    req: Request<B>,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let key = match read_key(&config, &req) {
        Ok(Some(key)) => key,
        Ok(None) => {
            let res = inner.call(req).await?;
            return Ok(res.map(IdempotencyBody::stream));
        }
        Err(res) => return Ok(res),
    };

    let (parts, body) = req.into_parts();
    let principal = config.principal.as_ref().and_then(|f| f(&parts));
    if principal.is_none() && config.principal_required {
        return Ok(problem(
            StatusCode::UNAUTHORIZED,
            kind::PRINCIPAL_MISSING,
            "Principal missing",
            "requests with an idempotency key must say whose they are (the credentials this server reads the principal from are missing or invalid)",
        ));
    }
    let key = ScopedKey::new(principal.as_deref(), key);
    let bytes = match Limited::new(body, config.max_request_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            let detail = format!(
                "requests with an idempotency key may carry at most {} bytes",
                config.max_request_body
            );
            return Ok(problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                kind::BODY_TOO_LARGE,
                "Request body too large",
                &detail,
            ));
        }
        Err(e) => {
            let detail = format!("the request body could not be read: {e}");
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                kind::BODY_UNREADABLE,
                "Request body unreadable",
                &detail,
            ));
        }
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let fingerprint = Fingerprint::of(&parts.method, path, &bytes);

    // From here on, everything runs in a task of its own: a client that hangs up drops this
    // future, not the claim nor the handler, which runs to the end and has its result stored.
    let req = Request::from_parts(parts, B::from(bytes));
    let task = tokio::spawn(super::run::serve(
        inner,
        store,
        config,
        key,
        fingerprint,
        req,
    ));
    match task.await {
        Ok(result) => result,
        // Only when the runtime shuts down (panics are caught in the task).
        Err(e) => {
            tracing::error!(error = %e, "idempotent request task failed");
            Ok(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                kind::INTERNAL,
                "Request aborted",
                "the request was aborted",
            ))
        }
    }
}

/// The request's key: `None` for a request that is not deduplicated (a safe method, or an
/// unkeyed method that needs none), or the 400 to answer.
#[allow(clippy::result_large_err)]
fn read_key<B, R>(
    config: &Config,
    req: &Request<B>,
) -> Result<Option<IdempotencyKey>, Response<IdempotencyBody<R>>> {
    if req.method().is_safe() {
        return Ok(None);
    }
    let malformed = |e: &dyn std::fmt::Display| {
        let detail = format!("the `{}` header is not valid: {e}", config.header);
        problem(
            StatusCode::BAD_REQUEST,
            kind::KEY_MALFORMED,
            "Idempotency key malformed",
            &detail,
        )
    };
    // Two key headers are ambiguous: malformed (400), not "the first one".
    match crate::request::single_header(req.headers(), &config.header) {
        Err(e) => Err(malformed(&e)),
        Ok(None) if config.required.contains(req.method()) => {
            let detail = format!(
                "{} requests need an `{}` header (a unique string, such as a UUID, sent again unchanged on every retry)",
                req.method(),
                config.header
            );
            Err(problem(
                StatusCode::BAD_REQUEST,
                kind::KEY_MISSING,
                "Idempotency key missing",
                &detail,
            ))
        }
        Ok(None) => Ok(None),
        Ok(Some(value)) => IdempotencyKey::from_header(value)
            .map(Some)
            .map_err(|e| malformed(&e)),
    }
}
