//! [`StreamGuard`] over a reqwest 0.12 client (feature `reqwest`): the response stays a
//! `reqwest::Response` (its URL kept), its body wrapped in a [`GuardedBody`].

use std::task::{Context, Poll};

use reqwest::ResponseBuilderExt;
use tower::{BoxError, Service};

use super::{GuardedBody, ResponseFuture, StreamGuard, StreamResponse};
use crate::classify::{Classify, LlmHttp, Outcome};
use crate::observe::RetryInfo;
use crate::request::RequestView;

#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl StreamResponse for reqwest::Response {
    type Body = reqwest::Body;
    type Extra = reqwest::Url;
    type Output = reqwest::Response;

    fn into_http(self) -> (http::Response<reqwest::Body>, reqwest::Url) {
        let url = self.url().clone();
        (http::Response::from(self), url)
    }

    fn finish(
        response: http::Response<GuardedBody<reqwest::Body>>,
        url: reqwest::Url,
    ) -> Self::Output {
        let (mut parts, body) = response.into_parts();
        // reqwest keeps a response's URL in a private extension; its builder sets it.
        if let Ok(marker) = http::Response::builder().url(url).body(()) {
            parts.extensions.extend(marker.into_parts().0.extensions);
        }
        reqwest::Response::from(http::Response::from_parts(parts, reqwest::Body::wrap(body)))
    }
}

impl<S> Service<reqwest::Request> for StreamGuard<S>
where
    S: Service<reqwest::Request, Response = reqwest::Response>,
    S::Error: Into<BoxError>,
{
    type Response = reqwest::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, reqwest::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: reqwest::Request) -> Self::Future {
        // reqwest's URL is not an `http::Uri`: name the operation from the method and path.
        let uri = http::Uri::try_from(request.url().path()).ok();
        let recorder = self.recorder(&RequestView {
            method: Some(request.method()),
            uri: uri.as_ref(),
            headers: Some(request.headers()),
            extensions: None,
        });
        ResponseFuture::new(self.inner.call(request), self.config.clone(), recorder)
    }
}

/// The HTTP preset for a reqwest client behind a [`StreamGuard`] (whose errors are boxed):
/// statuses as for `reqwest::Response`, errors (a [`FirstTokenError`](super::FirstTokenError)
/// included) by [`Errors::classify_error`](crate::classify::Errors::classify_error).
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl Classify<reqwest::Response, BoxError> for LlmHttp {
    fn classify(&self, result: &Result<reqwest::Response, BoxError>) -> Outcome {
        match result {
            Ok(res) => {
                let outcome = LlmHttp::classify_parts(res.status(), res.headers());
                crate::classify::unless_inner_gave_up(outcome, res.extensions())
            }
            Err(e) => crate::classify::classify_error(&**e),
        }
    }

    fn attach(&self, response: &mut reqwest::Response, info: RetryInfo) -> Option<RetryInfo> {
        response.extensions_mut().insert(info);
        None
    }
}
