//! Side effects need keys (issue 3): the key is minted once per call and sent on every attempt;
//! a side effect without a key is never retried; output failures are not retried unchanged.

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderValue, Method, Request, Response};
use tower::{Layer, Service, ServiceExt};
use tower_retry_guard::classify::Errors;
use tower_retry_guard::request::{HeaderNames, InvalidKey};
use tower_retry_guard::retry::RetryContext;
use tower_retry_guard::{
    Budgets, CallOutcome, Classify, ErrorKind, IdempotencyKey, LlmHttp, Operation, Outcome,
    RetryInfo, RetryLayer, RetryPolicy, RetryRequest, SideEffect, StopReason,
};

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    headers: HeaderMap,
    body: String,
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn keys(&self) -> Vec<Option<HeaderValue>> {
        self.seen()
            .into_iter()
            .map(|s| s.headers.get("idempotency-key").cloned())
            .collect()
    }
}

type Script = Arc<dyn Fn(usize, &Request<String>) -> Response<String> + Send + Sync>;

fn scripted(
    log: Log,
    script: Script,
) -> impl Service<Request<String>, Response = Response<String>, Error = io::Error> + Clone {
    tower::service_fn(move |req: Request<String>| {
        let n = {
            let mut seen = log.0.lock().unwrap();
            seen.push(Seen {
                method: req.method().clone(),
                headers: req.headers().clone(),
                body: req.body().clone(),
            });
            seen.len() - 1
        };
        std::future::ready(Ok::<_, io::Error>(script(n, &req)))
    })
}

fn status(code: u16) -> Response<String> {
    Response::builder()
        .status(code)
        .body(String::new())
        .unwrap()
}

/// 503 twice, then 200.
fn flaky() -> Script {
    Arc::new(|n, _| status(if n < 2 { 503 } else { 200 }))
}

fn layer() -> RetryLayer {
    RetryLayer::new()
        .policy(RetryPolicy::builder().seed(1).build().unwrap())
        .budgets(Budgets::none())
}

fn req(method: Method, path: &str) -> Request<String> {
    Request::builder()
        .method(method)
        .uri(path)
        .body("{\"to\":\"customer@example.com\"}".to_string())
        .unwrap()
}

async fn send<S, R>(svc: &mut S, req: R) -> Result<S::Response, S::Error>
where
    S: Service<R>,
{
    svc.ready().await?.call(req).await
}

fn info(res: &Response<String>) -> &RetryInfo {
    res.extensions().get::<RetryInfo>().expect("RetryInfo")
}

/// Checks that a header value is an RFC 8941 string holding a UUID v4; returns the UUID text.
fn quoted_uuid_v4(value: &HeaderValue) -> String {
    let text = value.to_str().unwrap();
    let item = sfv::Parser::new(text)
        .parse::<sfv::Item>()
        .unwrap_or_else(|e| panic!("{text:?} is not a structured field: {e}"));
    let sfv::BareItem::String(s) = item.bare_item else {
        panic!("{text:?} is not a structured-field string");
    };
    assert!(item.params.is_empty(), "{text:?}");
    let id = uuid::Uuid::parse_str(s.as_str()).unwrap();
    assert_eq!(id.get_version_num(), 4, "{text:?}");
    assert_eq!(text, format!("\"{}\"", id.hyphenated()));
    s.as_str().to_owned()
}

#[tokio::test(start_paused = true)]
async fn side_effect_key_is_the_same_on_every_attempt() {
    let log = Log::default();
    let mut svc = layer().layer(scripted(log.clone(), flaky()));
    let res = send(&mut svc, req(Method::POST, "/v1/tools/send_email"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let keys = log.keys();
    assert_eq!(keys.len(), 3);
    let first = keys[0].clone().expect("a POST is keyed");
    assert!(keys.iter().all(|k| k.as_ref() == Some(&first)), "{keys:?}");
    // RetryInfo carries the key that was sent.
    let key = info(&res).key.clone().expect("key in RetryInfo");
    assert_eq!(key.header_value(), &first);
    assert_eq!(key.as_str(), quoted_uuid_v4(&first));
}

#[tokio::test(start_paused = true)]
async fn side_effect_key_differs_between_calls() {
    let keys: Arc<Mutex<Vec<HeaderValue>>> = Arc::default();
    let k = keys.clone();
    let inner = tower::service_fn(move |req: Request<String>| {
        k.lock()
            .unwrap()
            .push(req.headers()["idempotency-key"].clone());
        std::future::ready(Ok::<_, io::Error>(status(200)))
    });
    let mut svc = layer().info_on_success(false).layer(inner);
    for _ in 0..10_000 {
        let res = send(&mut svc, req(Method::POST, "/v1/tools/send_email"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let keys = keys.lock().unwrap();
    assert_eq!(keys.len(), 10_000);
    let distinct: HashSet<&HeaderValue> = keys.iter().collect();
    assert_eq!(distinct.len(), 10_000, "a key was reused between calls");
    for k in keys.iter().take(100) {
        quoted_uuid_v4(k);
    }
}

#[tokio::test(start_paused = true)]
async fn key_header_is_a_quoted_uuid_v4() {
    let log = Log::default();
    let mut svc = layer().layer(scripted(log.clone(), flaky()));
    send(&mut svc, req(Method::PATCH, "/v1/files/1"))
        .await
        .unwrap();
    let key = log.keys()[0].clone().unwrap();
    let text = quoted_uuid_v4(&key);
    assert_eq!(text.len(), 36);
    // And the type's own constructor: generated keys parse back as themselves.
    let minted = IdempotencyKey::generate();
    quoted_uuid_v4(minted.header_value());
    assert_eq!(
        IdempotencyKey::from_header(minted.header_value()).unwrap(),
        minted
    );
}

#[tokio::test(start_paused = true)]
async fn an_existing_key_header_is_kept() {
    for value in ["\"order-42-email\"", "order-42-email"] {
        let log = Log::default();
        let mut svc = layer().layer(scripted(log.clone(), flaky()));
        let mut r = req(Method::POST, "/v1/tools/send_email");
        r.headers_mut()
            .insert("idempotency-key", HeaderValue::from_static(value));
        let res = send(&mut svc, r).await.unwrap();
        assert_eq!(res.status(), 200);
        let keys = log.keys();
        assert_eq!(keys.len(), 3);
        for k in &keys {
            assert_eq!(
                k.as_ref().unwrap(),
                value,
                "the caller's key, byte for byte"
            );
        }
        assert_eq!(info(&res).key.as_ref().unwrap().as_str(), "order-42-email");
    }
}

#[tokio::test(start_paused = true)]
async fn an_existing_key_extension_is_kept() {
    let log = Log::default();
    let mut svc = layer().layer(scripted(log.clone(), flaky()));
    let mut r = req(Method::POST, "/v1/tools/send_email");
    let key = IdempotencyKey::new("task-7:step-3").unwrap();
    r.extensions_mut().insert(key.clone());
    let res = send(&mut svc, r).await.unwrap();
    let keys = log.keys();
    assert_eq!(keys.len(), 3);
    for k in &keys {
        assert_eq!(k.as_ref().unwrap(), "\"task-7:step-3\"");
    }
    assert_eq!(info(&res).key.as_ref(), Some(&key));
}

#[tokio::test(start_paused = true)]
async fn an_invalid_key_is_refused_before_sending() {
    let long = "k".repeat(IdempotencyKey::MAX_LEN + 1);
    let values = [
        HeaderValue::from_str(&long).unwrap(),
        HeaderValue::from_str(&format!("\"{long}\"")).unwrap(),
        HeaderValue::from_static("abc\tdef"),
        HeaderValue::from_static(""),
        HeaderValue::from_static("\"\""),
        HeaderValue::from_static("has space"),
        HeaderValue::from_static("\"unterminated"),
    ];
    for value in values {
        let log = Log::default();
        let mut svc = layer().layer(scripted(log.clone(), flaky()));
        let mut r = req(Method::POST, "/v1/tools/send_email");
        r.headers_mut().insert("idempotency-key", value.clone());
        let err = send(&mut svc, r).await.unwrap_err();
        assert_eq!(log.count(), 0, "{value:?}: nothing may be sent");
        assert!(
            matches!(err.reason(), StopReason::InvalidKey(_)),
            "{value:?}: {:?}",
            err.reason()
        );
        assert_eq!(err.attempts(), 0);
        assert!(err.inner().is_none());
        assert!(std::error::Error::source(&err).is_some());
    }
}

#[test]
fn invalid_keys_cannot_be_constructed() {
    assert!(IdempotencyKey::new("k".repeat(IdempotencyKey::MAX_LEN)).is_ok());
    for bad in [
        "k".repeat(IdempotencyKey::MAX_LEN + 1),
        String::new(),
        "a\u{1}b".to_string(),
        "a\nb".to_string(),
        "a\u{7f}".to_string(),
        "quote\"d".to_string(),
        "back\\slash".to_string(),
        "ünï".to_string(),
    ] {
        let err: InvalidKey = IdempotencyKey::new(&bad).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid idempotency key"),
            "{err}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn side_effect_without_key_is_not_retried() {
    let log = Log::default();
    let mut svc = layer()
        .idempotency_keys(false)
        .layer(scripted(log.clone(), flaky()));
    let res = send(&mut svc, req(Method::POST, "/v1/tools/send_email"))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(log.count(), 1, "the email is sent at most once");
    assert!(log.keys()[0].is_none(), "no key is minted");
    let info = info(&res);
    assert_eq!(
        info.outcome,
        CallOutcome::Stopped(StopReason::SideEffectWithoutKey {
            operation: "POST /v1/tools/send_email".into()
        })
    );
    assert!(info.key.is_none());
    assert!(
        info.outcome
            .to_string()
            .contains("POST /v1/tools/send_email"),
        "{}",
        info.outcome
    );
}

#[tokio::test(start_paused = true)]
async fn side_effect_without_key_names_the_operation_extension() {
    let log = Log::default();
    let mut svc = layer()
        .idempotency_keys(false)
        .layer(scripted(log.clone(), flaky()));
    let mut r = req(Method::POST, "/v1/tools/call");
    r.extensions_mut()
        .insert(Operation::from_static("send_email"));
    let res = send(&mut svc, r).await.unwrap();
    assert_eq!(log.count(), 1);
    assert_eq!(
        info(&res).outcome,
        CallOutcome::Stopped(StopReason::SideEffectWithoutKey {
            operation: "send_email".into()
        })
    );
}

#[tokio::test(start_paused = true)]
async fn read_only_and_idempotent_methods_are_retried_without_a_key() {
    for method in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
        for mint in [true, false] {
            let log = Log::default();
            let mut svc = layer()
                .idempotency_keys(mint)
                .layer(scripted(log.clone(), flaky()));
            let res = send(&mut svc, req(method.clone(), "/v1/files/1"))
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "{method}");
            assert_eq!(log.count(), 3, "{method}");
            assert!(log.keys().iter().all(Option::is_none), "{method}: no key");
            assert!(info(&res).key.is_none());
            assert!(log.seen().iter().all(|s| s.method == method));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn idempotent_extension_on_a_post_retries_without_a_key() {
    let log = Log::default();
    let mut svc = layer()
        .idempotency_keys(false)
        .layer(scripted(log.clone(), flaky()));
    let mut r = req(Method::POST, "/v1/chat/completions");
    r.extensions_mut().insert(SideEffect::Idempotent);
    let res = send(&mut svc, r).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(log.count(), 3);
    assert!(log.keys().iter().all(Option::is_none));
}

#[tokio::test(start_paused = true)]
async fn side_effecting_extension_on_a_put_is_keyed() {
    let log = Log::default();
    let mut svc = layer().layer(scripted(log.clone(), flaky()));
    let mut r = req(Method::PUT, "/v1/tools/charge");
    r.extensions_mut().insert(SideEffect::SideEffecting);
    let res = send(&mut svc, r).await.unwrap();
    assert_eq!(res.status(), 200);
    let keys = log.keys();
    assert_eq!(keys.len(), 3);
    let first = keys[0].clone().expect("keyed");
    assert!(keys.iter().all(|k| k.as_ref() == Some(&first)));

    // And without keys, the same request is not retried.
    let log = Log::default();
    let mut svc = layer()
        .idempotency_keys(false)
        .layer(scripted(log.clone(), flaky()));
    let mut r = req(Method::PUT, "/v1/tools/charge");
    r.extensions_mut().insert(SideEffect::SideEffecting);
    let res = send(&mut svc, r).await.unwrap();
    assert_eq!(log.count(), 1);
    assert!(matches!(
        info(&res).outcome,
        CallOutcome::Stopped(StopReason::SideEffectWithoutKey { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn side_effect_fn_decides_per_layer() {
    let l = layer().idempotency_keys(false).side_effect_fn(|v| {
        let path = v.uri?.path();
        if path == "/v1/chat/completions" {
            Some(SideEffect::Idempotent)
        } else if path.starts_with("/v1/tools/") {
            Some(SideEffect::SideEffecting)
        } else {
            None
        }
    });

    // A completion POST: idempotent by the closure, retried.
    let log = Log::default();
    let mut svc = l.clone().layer(scripted(log.clone(), flaky()));
    let res = send(&mut svc, req(Method::POST, "/v1/chat/completions"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(log.count(), 3);

    // A tool GET: side-effecting by the closure, no key, not retried.
    let log = Log::default();
    let mut svc = l.clone().layer(scripted(log.clone(), flaky()));
    let res = send(&mut svc, req(Method::GET, "/v1/tools/send_email"))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(log.count(), 1);

    // The closure says nothing: the method decides (GET, retried).
    let log = Log::default();
    let mut svc = l.clone().layer(scripted(log.clone(), flaky()));
    send(&mut svc, req(Method::GET, "/v1/models"))
        .await
        .unwrap();
    assert_eq!(log.count(), 3);

    // An extension on the request wins over the closure.
    let log = Log::default();
    let mut svc = l.layer(scripted(log.clone(), flaky()));
    let mut r = req(Method::GET, "/v1/tools/lookup");
    r.extensions_mut().insert(SideEffect::ReadOnly);
    send(&mut svc, r).await.unwrap();
    assert_eq!(log.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn attempt_header_counts_from_zero() {
    let log = Log::default();
    let mut svc = layer().layer(scripted(log.clone(), flaky()));
    send(&mut svc, req(Method::GET, "/v1/models"))
        .await
        .unwrap();
    let counts: Vec<String> = log
        .seen()
        .iter()
        .map(|s| s.headers["x-retry-count"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(counts, ["0", "1", "2"]);

    // No attempt header when its name is None.
    let log = Log::default();
    let names = HeaderNames {
        attempt: None,
        ..HeaderNames::default()
    };
    let mut svc = layer()
        .header_names(names)
        .layer(scripted(log.clone(), flaky()));
    send(&mut svc, req(Method::GET, "/v1/models"))
        .await
        .unwrap();
    assert!(
        log.seen()
            .iter()
            .all(|s| !s.headers.contains_key("x-retry-count"))
    );
}

#[tokio::test(start_paused = true)]
async fn key_header_name_is_configurable() {
    let log = Log::default();
    let names = HeaderNames {
        idempotency_key: http::HeaderName::from_static("x-idempotency-key"),
        ..HeaderNames::default()
    };
    let mut svc = layer()
        .header_names(names)
        .layer(scripted(log.clone(), flaky()));
    let res = send(&mut svc, req(Method::POST, "/v1/tools/send_email"))
        .await
        .unwrap();
    let seen = log.seen();
    assert_eq!(seen.len(), 3);
    let key = info(&res).key.clone().unwrap();
    for s in &seen {
        assert!(!s.headers.contains_key("idempotency-key"));
        assert_eq!(&s.headers["x-idempotency-key"], key.header_value());
    }
}

// ---------------------------------------------------------------------------------------------
// Output failures.

fn body_check(r: &Result<Response<String>, io::Error>) -> Outcome {
    match r {
        Ok(res) if res.body() == "not json" => Outcome::retry(ErrorKind::OutputInvalid),
        _ => Outcome::Success,
    }
}

/// "not json" until the request carries the validation error.
fn validating() -> Script {
    Arc::new(|_, req| {
        if req.headers().contains_key("x-validation-error") && req.body().ends_with("JSON only") {
            Response::new("{}".to_string())
        } else {
            Response::new("not json".to_string())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn output_invalid_without_a_hook_is_not_retried() {
    let log = Log::default();
    let mut svc = layer()
        .classify(LlmHttp.or(body_check))
        .layer(scripted(log.clone(), validating()));
    let res = send(&mut svc, req(Method::GET, "/v1/chat")).await.unwrap();
    assert_eq!(res.body(), "not json");
    assert_eq!(log.count(), 1);
    assert_eq!(
        info(&res).outcome,
        CallOutcome::Stopped(StopReason::OutputUnchanged)
    );
    assert_eq!(info(&res).last_error, Some(ErrorKind::OutputInvalid));
}

#[tokio::test(start_paused = true)]
async fn output_invalid_with_a_hook_that_changes_nothing_is_not_retried() {
    let log = Log::default();
    let mut svc = layer()
        .classify(LlmHttp.or(body_check))
        .on_retry(
            |_: &mut Request<String>, _: &Result<Response<String>, io::Error>, _: &RetryContext| {
                false
            },
        )
        .layer(scripted(log.clone(), validating()));
    let res = send(&mut svc, req(Method::GET, "/v1/chat")).await.unwrap();
    assert_eq!(log.count(), 1);
    assert_eq!(
        info(&res).outcome,
        CallOutcome::Stopped(StopReason::OutputUnchanged)
    );
}

#[tokio::test(start_paused = true)]
async fn output_invalid_with_a_hook_retries_the_changed_request() {
    let log = Log::default();
    let mut svc = layer()
        .classify(LlmHttp.or(body_check))
        .on_retry(
            |r: &mut Request<String>, _: &Result<Response<String>, io::Error>, c: &RetryContext| {
                assert_eq!(c.kind, ErrorKind::OutputInvalid);
                r.headers_mut()
                    .insert("x-validation-error", HeaderValue::from_static("not json"));
                r.body_mut().push_str(" JSON only");
                true
            },
        )
        .layer(scripted(log.clone(), validating()));
    let res = send(&mut svc, req(Method::POST, "/v1/chat")).await.unwrap();
    assert_eq!(res.body(), "{}");
    let seen = log.seen();
    assert_eq!(seen.len(), 2);
    assert!(!seen[0].headers.contains_key("x-validation-error"));
    assert_eq!(seen[1].headers["x-validation-error"], "not json");
    assert!(seen[1].body.ends_with(" JSON only"));
    // Changed, but still the same logical call: the same key.
    assert_eq!(
        seen[0].headers["idempotency-key"],
        seen[1].headers["idempotency-key"]
    );
    assert_eq!(info(&res).outcome, CallOutcome::Recovered);
}

// ---------------------------------------------------------------------------------------------
// A tool call of its own type, with its key inside.

#[derive(Debug, Clone)]
struct ToolCall {
    tool: &'static str,
    args: String,
    key: Option<IdempotencyKey>,
    attempt: u32,
}

impl RetryRequest for ToolCall {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
    fn side_effect(&self) -> SideEffect {
        SideEffect::SideEffecting
    }
    fn idempotency_key(&self, _: &HeaderNames) -> Result<Option<IdempotencyKey>, InvalidKey> {
        Ok(self.key.clone())
    }
    fn set_idempotency_key(&mut self, key: &IdempotencyKey, _: &HeaderNames) {
        self.key = Some(key.clone());
    }
    fn set_attempt(&mut self, attempt: u32, _: &HeaderNames) {
        self.attempt = attempt;
    }
    fn operation(&self) -> Option<Operation> {
        Some(Operation::from_static(self.tool))
    }
}

type ToolLog = Arc<Mutex<Vec<(Option<IdempotencyKey>, u32, String)>>>;

/// Fails with a connection reset twice, then runs.
fn tool(log: ToolLog) -> impl Service<ToolCall, Response = String, Error = io::Error> + Clone {
    tower::service_fn(move |call: ToolCall| {
        let n = {
            let mut l = log.lock().unwrap();
            l.push((call.key.clone(), call.attempt, call.args.clone()));
            l.len()
        };
        std::future::ready(if n <= 2 {
            Err(io::Error::from(io::ErrorKind::ConnectionReset))
        } else {
            Ok(format!("sent to {}", call.args))
        })
    })
}

fn send_email(key: Option<IdempotencyKey>) -> ToolCall {
    ToolCall {
        tool: "send_email",
        args: "customer@example.com".into(),
        key,
        attempt: 99,
    }
}

#[tokio::test(start_paused = true)]
async fn tool_call_with_its_own_key_is_retried_with_that_key() {
    let log = ToolLog::default();
    let mut svc = layer().classify(Errors).layer(tool(log.clone()));
    let key = IdempotencyKey::new("task-9:send_email:1").unwrap();
    let out = send(&mut svc, send_email(Some(key.clone()))).await.unwrap();
    assert_eq!(out, "sent to customer@example.com");
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 3);
    for (i, (k, attempt, _)) in log.iter().enumerate() {
        assert_eq!(k.as_ref(), Some(&key));
        assert_eq!(*attempt, i as u32);
    }
}

#[tokio::test(start_paused = true)]
async fn tool_call_without_a_key_gets_one_minted_once() {
    let log = ToolLog::default();
    let mut svc = layer().classify(Errors).layer(tool(log.clone()));
    send(&mut svc, send_email(None)).await.unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 3);
    let first = log[0].0.clone().expect("minted");
    assert!(log.iter().all(|(k, _, _)| k.as_ref() == Some(&first)));
    quoted_uuid_v4(first.header_value());
}

#[tokio::test(start_paused = true)]
async fn tool_call_without_a_key_is_not_retried_when_keys_are_off() {
    let log = ToolLog::default();
    let mut svc = layer()
        .classify(Errors)
        .idempotency_keys(false)
        .layer(tool(log.clone()));
    let err = send(&mut svc, send_email(None)).await.unwrap_err();
    assert_eq!(log.lock().unwrap().len(), 1);
    assert_eq!(
        err.reason(),
        &StopReason::SideEffectWithoutKey {
            operation: "send_email".into()
        }
    );
    assert_eq!(err.kind(), Some(ErrorKind::Connect));
    assert_eq!(
        err.into_inner().unwrap().kind(),
        io::ErrorKind::ConnectionReset
    );

    // With its own key, the same layer retries it.
    let log = ToolLog::default();
    let mut svc = layer()
        .classify(Errors)
        .idempotency_keys(false)
        .layer(tool(log.clone()));
    let key = IdempotencyKey::new("k-1").unwrap();
    send(&mut svc, send_email(Some(key))).await.unwrap();
    assert_eq!(log.lock().unwrap().len(), 3);
}

mod layer_closures {
    use std::sync::{Arc, Mutex};

    use http::{Request, Response, StatusCode};
    use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
    use tower_retry_guard::{Budgets, IdempotencyKey, RetryLayer};

    #[derive(Clone)]
    struct ToolCallId(&'static str);

    #[tokio::test(start_paused = true)]
    async fn a_key_derived_by_the_layer_closure_is_sent_on_every_attempt() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let layer = RetryLayer::new()
            .budgets(Budgets::none())
            .idempotency_key_fn(|view| {
                let id = view.extensions?.get::<ToolCallId>()?;
                IdempotencyKey::new(format!("tool-{}", id.0)).ok()
            });
        let mut svc =
            ServiceBuilder::new()
                .layer(layer)
                .service_fn(move |req: Request<String>| {
                    let key = req.headers().get("idempotency-key").cloned();
                    let mut seen = s.lock().unwrap();
                    seen.push(key);
                    let status = if seen.len() < 3 { 503 } else { 200 };
                    async move {
                        Ok::<_, BoxError>(Response::builder().status(status).body(String::new())?)
                    }
                });
        let req = Request::post("/tools/send_email")
            .extension(ToolCallId("call_42"))
            .body(String::new())
            .unwrap();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        for key in seen.iter() {
            assert_eq!(key.as_ref().unwrap(), "\"tool-call_42\"");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_request_own_key_wins_over_the_layer_closure() {
        let layer = RetryLayer::new()
            .budgets(Budgets::none())
            .idempotency_key_fn(|_| IdempotencyKey::new("from-closure").ok());
        let mut svc =
            ServiceBuilder::new()
                .layer(layer)
                .service_fn(|req: Request<String>| async move {
                    let key = req.headers().get("idempotency-key").cloned();
                    Ok::<_, BoxError>(Response::new(format!("{key:?}")))
                });
        let req = Request::post("/tools/send_email")
            .header("idempotency-key", "\"mine\"")
            .body(String::new())
            .unwrap();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert!(res.body().contains("mine"), "{}", res.body());
        let req = Request::post("/tools/send_email")
            .body(String::new())
            .unwrap();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert!(res.body().contains("from-closure"), "{}", res.body());
    }
}
