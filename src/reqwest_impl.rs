//! `RetryRequest` for `reqwest::Request` and the [`LlmHttp`] classifier for
//! `reqwest::Response` (feature `reqwest`). `reqwest::Client` is a `tower::Service`, so
//! `ServiceBuilder::new().layer(RetryLayer::new()).service(client)` retries it.

use crate::classify::{AsError, Classify, LlmHttp, Outcome};
use crate::observe::RetryInfo;
use crate::request::{
    HeaderNames, IdempotencyKey, InvalidKey, Operation, RequestView, RetryRequest, SideEffect,
    key_from_headers, stamp_attempt, stamp_key,
};

#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl RetryRequest for reqwest::Request {
    fn try_clone(&self) -> Option<Self> {
        reqwest::Request::try_clone(self)
    }

    fn side_effect(&self) -> SideEffect {
        SideEffect::of_method(self.method())
    }

    fn idempotency_key(&self, names: &HeaderNames) -> Result<Option<IdempotencyKey>, InvalidKey> {
        key_from_headers(self.headers(), names)
    }

    fn set_idempotency_key(&mut self, key: &IdempotencyKey, names: &HeaderNames) {
        stamp_key(self.headers_mut(), key, names);
    }

    fn set_attempt(&mut self, attempt: u32, names: &HeaderNames) {
        stamp_attempt(self.headers_mut(), attempt, names);
    }

    fn view(&self) -> RequestView<'_> {
        RequestView {
            method: Some(self.method()),
            headers: Some(self.headers()),
            ..RequestView::default()
        }
    }

    fn body_bytes(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        self.body()?.as_bytes().map(std::borrow::Cow::Borrowed)
    }

    fn server(&self) -> Option<(&str, Option<u16>)> {
        Some((self.url().host_str()?, self.url().port_or_known_default()))
    }

    fn operation(&self) -> Option<Operation> {
        Some(crate::observe::default_operation(
            self.method(),
            self.url().path(),
        ))
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl Classify<reqwest::Response, reqwest::Error> for LlmHttp {
    fn classify(&self, result: &Result<reqwest::Response, reqwest::Error>) -> Outcome {
        match result {
            Ok(res) => {
                let outcome = LlmHttp::classify_parts(res.status(), res.headers());
                crate::classify::unless_inner_gave_up(outcome, res.extensions())
            }
            Err(e) => crate::classify::Errors::classify_error(e.as_error()),
        }
    }

    fn status_code(&self, result: &Result<reqwest::Response, reqwest::Error>) -> Option<u16> {
        match result {
            Ok(res) => Some(res.status().as_u16()),
            Err(e) => e.status().map(|s| s.as_u16()),
        }
    }

    fn attach(&self, response: &mut reqwest::Response, info: RetryInfo) -> Option<RetryInfo> {
        response.extensions_mut().insert(info);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_in_memory_body_lends_its_bytes_for_the_estimate() {
        let Ok(url) = "http://127.0.0.1:1/v1/chat/completions".parse() else {
            panic!("a valid URL");
        };
        let mut req = reqwest::Request::new(http::Method::POST, url);
        assert_eq!(RetryRequest::body_bytes(&req), None);
        *req.body_mut() = Some(reqwest::Body::from("{\"model\":\"m\"}"));
        assert_eq!(
            RetryRequest::body_bytes(&req).as_deref(),
            Some(&b"{\"model\":\"m\"}"[..])
        );
    }
}
