//! The cost of a retry from each of its sources (the `Cost` extension, the layer's
//! `cost_fn`, the built-in estimate of an LLM request), reserved from the cost budgets, then
//! settled from what the response says it cost: its JSON `usage`, its server-sent event
//! stream, or the caller's own hook. Real layer, real store, virtual time.

mod common;
#[cfg(feature = "redis")]
mod redis_support;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::budget::{
    BudgetStore, Budgets, Cost, Draw, Grant, LlmCost, MemoryStore, Scope, StoreError, UsageBody,
};
use tower_retry_guard::request::CloneBody;
use tower_retry_guard::{CallOutcome, RetryInfo, RetryLayer, RetryPolicy, StopReason};

use common::{Chunks, Replies, ms, secs, send};

/// Which way a settlement went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Refund,
    Charge,
}

/// One settled draw: scope, key, amount, which way.
type Settled = (Scope, String, u64, Settle);

/// A store (memory by default) that records every settlement it made.
#[derive(Clone)]
struct Recording<S> {
    inner: S,
    settled: Arc<Mutex<Vec<Settled>>>,
}

impl<S> Recording<S> {
    fn over(inner: S) -> Self {
        Recording {
            inner,
            settled: Arc::default(),
        }
    }

    fn settled(&self) -> Vec<Settled> {
        self.settled.lock().unwrap().clone()
    }

    /// Waits (bounded) until `n` draws were settled: the settlement is spawned.
    async fn wait_settled(&self, n: usize) {
        for _ in 0..2_000 {
            if self.settled.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(ms(1)).await;
        }
    }
}

impl<S: BudgetStore> BudgetStore for Recording<S> {
    fn draw(&self, draws: &[Draw]) -> impl Future<Output = Result<Grant, StoreError>> + Send {
        self.inner.draw(draws)
    }

    fn refund(&self, draws: &[Draw]) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.settle(draws, Settle::Refund)
    }

    fn charge(&self, draws: &[Draw]) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.settle(draws, Settle::Charge)
    }
}

impl<S: BudgetStore> Recording<S> {
    fn settle(
        &self,
        draws: &[Draw],
        how: Settle,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + use<S> {
        let (inner, log, draws) = (self.inner.clone(), self.settled.clone(), draws.to_vec());
        async move {
            match how {
                Settle::Refund => inner.refund(&draws).await?,
                Settle::Charge => inner.charge(&draws).await?,
            }
            log.lock().unwrap().extend(
                draws
                    .iter()
                    .map(|d| (d.scope, d.key.clone(), d.amount, how)),
            );
            Ok(())
        }
    }
}

/// One unit a token, whatever the model.
fn tokens() -> LlmCost {
    LlmCost::new().fallback(1_000_000, 1_000_000)
}

fn policy(retries: u32) -> RetryPolicy {
    RetryPolicy::builder()
        .max_retries(retries)
        .max_total_time(secs(60))
        .seed(7)
        .build()
        .unwrap()
}

/// A chat completion request of `task` (and `user`) with this JSON body.
fn chat(task: &str, user: Option<&str>, body: &str) -> Request<String> {
    let mut b = Request::post("/v1/chat/completions").header("x-task-id", task);
    if let Some(u) = user {
        b = b.header("x-user-id", u);
    }
    b.body(body.to_owned()).unwrap()
}

/// A prompt body of about `bytes` bytes asking for at most `max_tokens`.
fn prompt(bytes: usize, max_tokens: u64) -> String {
    let text = "x".repeat(bytes);
    format!(
        r#"{{"model":"m","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{text}"}}]}}"#
    )
}

/// The built-in estimate, by its documented rule: body bytes / 4 rounded up, plus the
/// maximum output, at one unit a token.
fn estimate_of(body: &str, max_tokens: u64) -> u64 {
    (body.len() as u64).div_ceil(4) + max_tokens
}

fn info<B>(res: &Response<B>) -> RetryInfo {
    res.extensions().get::<RetryInfo>().cloned().unwrap()
}

/// Reads a response body to its end, through a `UsageBody`, then lets the spawned
/// settlement run.
async fn read_through<B>(res: Response<B>, budgets: &Budgets, prices: &LlmCost) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let body = UsageBody::wrap(res, budgets, prices).into_body();
    let bytes = body.collect().await.unwrap().to_bytes();
    settled().await;
    bytes
}

/// The spawned settlement runs (virtual time: nothing really sleeps).
async fn settled() {
    tokio::time::sleep(ms(1)).await;
}

fn budget_stop(info: &RetryInfo) -> Option<Scope> {
    match &info.outcome {
        CallOutcome::Stopped(StopReason::Budget { scope, .. }) => Some(*scope),
        _ => None,
    }
}

const USAGE_JSON: &str = r#"{"id":"c1","model":"m-2025","choices":[{"message":{"content":"fine"}}],"usage":{"prompt_tokens":80,"completion_tokens":20,"total_tokens":100}}"#;

#[tokio::test(start_paused = true)]
async fn an_estimate_reserved_then_refunded_from_the_json_usage_lets_a_later_retry_through() {
    refund_lets_a_later_retry_through(MemoryStore::new(), "t", "u").await;
}

/// The same in Redis (real time: the store is a real server).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_estimate_reserved_then_refunded_lets_a_later_retry_through_in_redis() {
    let server = redis_support::server::RedisServer::start();
    refund_lets_a_later_retry_through(server.store("estimate:"), "task-r", "user-r").await;
}

async fn refund_lets_a_later_retry_through<S: BudgetStore>(store: S, task: &str, user: &str) {
    let store = Recording::over(store);
    let body = prompt(400, 900);
    let estimate = estimate_of(&body, 900);
    let budgets = Budgets::none()
        .store(store.clone())
        .task_cost(estimate + estimate / 2, secs(3600))
        .user_cost_rate(10 * estimate, secs(3600));
    let prices = tokens();
    let layer = RetryLayer::new()
        .policy(policy(1))
        .budgets(budgets.clone())
        .llm_cost(prices.clone());
    let inner = Replies::new(|attempt| {
        if attempt == 0 {
            (503, String::new())
        } else {
            (200, USAGE_JSON.to_owned())
        }
    });
    let mut svc = layer.layer(inner.clone());

    let first = send(&mut svc, chat(task, Some(user), &body)).await.unwrap();
    let first_info = info(&first);
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        (
            first_info.retry_cost,
            first_info.reserved(),
            first_info.task(),
            first_info.user()
        ),
        (estimate, estimate, Some(task), Some(user))
    );

    // Half an estimate left: the next call's retry is refused by the task's cost budget.
    let denied = send(&mut svc, chat(task, Some(user), &body)).await.unwrap();
    assert_eq!(budget_stop(&info(&denied)), Some(Scope::TaskCost));
    assert!(store.settled().is_empty());

    // The first call's answer says its retry cost 100 tokens: the rest goes back.
    let bytes = read_through(first, &budgets, &prices).await;
    store.wait_settled(2).await;
    assert_eq!(
        bytes,
        USAGE_JSON.as_bytes(),
        "the body passes through unchanged"
    );
    assert_eq!(
        store.settled(),
        vec![
            (
                Scope::TaskCost,
                task.to_owned(),
                estimate - 100,
                Settle::Refund
            ),
            (
                Scope::UserCost,
                user.to_owned(),
                estimate - 100,
                Settle::Refund
            ),
        ]
    );
    let granted = send(&mut svc, chat(task, Some(user), &body)).await.unwrap();
    let granted = info(&granted);
    assert_eq!(
        (budget_stop(&granted), granted.retries, granted.retry_cost),
        (None, 1, estimate)
    );
    assert_eq!(inner.count(), 2 + 1 + 2);
}

const ANTHROPIC_SSE: &str = "event: message_start\r\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_delta\r\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"\\\"usage\\\": not this one\"}}\r\n\r\n\
event: message_delta\r\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\r\n\r\n\
event: message_stop\r\n\
data: {\"type\":\"message_stop\"}\r\n\r\n";

const OPENAI_SSE: &str = "data: {\"id\":\"c\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":12,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n\
data: [DONE]\n\n";

const RESPONSES_SSE: &str = "event: response.created\n\
data: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-4o\",\"usage\":null}}\n\n\
event: response.output_text.delta\n\
data: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n\
event: response.completed\n\
data: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-4o\",\"output\":[{\"content\":[{\"text\":\"hi\"}]}],\"usage\":{\"input_tokens\":21,\"output_tokens\":9,\"total_tokens\":30}}}\n\n";

#[tokio::test(start_paused = true)]
async fn streamed_usage_settles_for_the_task_and_user_that_reserved() {
    // Each stream, cut in frames of 7 bytes (mid-line, mid-key), reports its usage:
    // Anthropic 25 + 5 cached input + 15 output, OpenAI chat 30 + 12, Responses 21 + 9.
    for (stream, actual) in [(ANTHROPIC_SSE, 45), (OPENAI_SSE, 42), (RESPONSES_SSE, 30)] {
        let store = Recording::over(MemoryStore::new());
        let budgets = Budgets::none()
            .store(store.clone())
            .task_cost(100_000, secs(3600))
            .user_cost_rate(100_000, secs(60));
        let prices = tokens();
        let layer = RetryLayer::new()
            .policy(policy(2))
            .budgets(budgets.clone())
            .llm_cost(prices.clone());
        let mut svc = layer.layer(Replies::new(move |attempt| {
            let status = if attempt < 2 { 529 } else { 200 };
            (status, Chunks::cut(stream, 7))
        }));
        let body = prompt(1_000, 2_000);
        let estimate = estimate_of(&body, 2_000);
        // Another task and user spend from their own budgets meanwhile.
        let other = Replies::new(|_| (200, Chunks::cut("", 1)));
        let _ = send(&mut layer.layer(other), chat("other", Some("eve"), &body)).await;

        let res = send(&mut svc, chat("task-7", Some("alice"), &body))
            .await
            .unwrap();
        let info = info(&res);
        // Two retries reserved; the last one is what the stream settles (refused retries
        // keep their reservation: `refund_refused` is off).
        assert_eq!(
            (info.retries, info.retry_cost, info.reserved()),
            (2, 2 * estimate, estimate)
        );
        let bytes = read_through(res, &budgets, &prices).await;
        assert_eq!(bytes, stream.as_bytes());
        assert_eq!(
            store.settled(),
            vec![
                (
                    Scope::TaskCost,
                    "task-7".to_owned(),
                    estimate - actual,
                    Settle::Refund
                ),
                (
                    Scope::UserCost,
                    "alice".to_owned(),
                    estimate - actual,
                    Settle::Refund
                ),
            ],
            "{stream}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn usage_over_the_reservation_is_charged_and_denies_a_later_retry() {
    let store = Recording::over(MemoryStore::new());
    // An estimate that errs low (100 bytes a token), against 1000 units of retries.
    let prices = tokens().chars_per_token(100);
    let budgets = Budgets::none()
        .store(store.clone())
        .task_cost(1_000, secs(3600));
    let layer = RetryLayer::new()
        .policy(policy(1))
        .budgets(budgets.clone())
        .llm_cost(prices.clone());
    let mut svc = layer.layer(Replies::new(|attempt| {
        let usage = r#"{"model":"m","usage":{"input_tokens":990,"output_tokens":5}}"#;
        if attempt == 0 {
            (500, String::new())
        } else {
            (200, usage.to_owned())
        }
    }));
    let body = prompt(300, 10);
    let estimate = (body.len() as u64).div_ceil(100) + 10;
    let res = send(&mut svc, chat("t", None, &body)).await.unwrap();
    assert_eq!(info(&res).reserved(), estimate);
    read_through(res, &budgets, &prices).await;
    assert_eq!(
        store.settled(),
        vec![(
            Scope::TaskCost,
            "t".to_owned(),
            995 - estimate,
            Settle::Charge
        )]
    );
    // 995 spent of 1000: a retry of `estimate` (> 5) no longer fits.
    assert!(estimate > 5);
    let res = send(&mut svc, chat("t", None, &body)).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(budget_stop(&info(&res)), Some(Scope::TaskCost));
}

#[tokio::test(start_paused = true)]
async fn each_source_of_cost_is_reserved_in_order_and_settled_by_the_callers_hook() {
    // The extension wins, then `cost_fn`, then the estimate. The provider here reports
    // usage in headers; the caller's hook reads them and prices them with the same table.
    let store = Recording::over(MemoryStore::new());
    let prices = LlmCost::new().model("m", 2_000, 8_000);
    let budgets = Budgets::none()
        .store(store.clone())
        .task_cost(1_000_000, secs(3600));
    let layer = RetryLayer::new()
        .policy(policy(1))
        .budgets(budgets.clone())
        .llm_cost(prices.clone())
        .cost_fn(|view| {
            view.headers?
                .get("x-cost")?
                .to_str()
                .ok()?
                .parse::<u64>()
                .ok()
        });
    let inner = ServiceBuilder::new()
        .map_response(|mut res: Response<String>| {
            if res.status().is_success() {
                let h = res.headers_mut();
                h.insert("x-usage-input", HeaderValue::from_static("1000"));
                h.insert("x-usage-output", HeaderValue::from_static("100"));
            }
            res
        })
        .service(Replies::new(|attempt| {
            (if attempt == 0 { 503 } else { 200 }, String::new())
        }));
    let mut svc = layer.layer(inner);
    // The caller's hook: usage from the headers, priced for the model it asked for.
    let hook = |res: &Response<String>| -> Option<u64> {
        let count = |name: &str| res.headers().get(name)?.to_str().ok()?.parse().ok();
        prices.price(Some("m"), count("x-usage-input")?, count("x-usage-output")?)
    };
    // 1000 input tokens at 2000 units per million, 100 output at 8000: 2.8, rounded up.
    let actual = 3;

    let body = prompt(4_000, 1_000);
    let input = (body.len() as u64).div_ceil(4);
    let estimate = (input * 2_000 + 1_000 * 8_000).div_ceil(1_000_000);
    let mut by_extension = chat("ext", None, &body);
    by_extension.extensions_mut().insert(Cost(700));
    by_extension
        .headers_mut()
        .insert("x-cost", HeaderValue::from_static("500"));
    let mut by_closure = chat("fn", None, &body);
    by_closure
        .headers_mut()
        .insert("x-cost", HeaderValue::from_static("500"));
    let by_estimate = chat("est", None, &body);

    let mut expected = Vec::new();
    for (req, task, reserved) in [
        (by_extension, "ext", 700),
        (by_closure, "fn", 500),
        (by_estimate, "est", estimate),
    ] {
        let res = send(&mut svc, req).await.unwrap();
        let info = info(&res);
        assert_eq!((info.reserved(), info.task()), (reserved, Some(task)));
        let cost = hook(&res).unwrap();
        assert_eq!(cost, actual);
        budgets
            .settle(info.task(), info.user(), info.reserved(), cost)
            .await
            .unwrap();
        expected.push((
            Scope::TaskCost,
            task.to_owned(),
            reserved - actual,
            Settle::Refund,
        ));
    }
    assert_eq!(
        estimate, 11,
        "(1019 tokens at 2000, 1000 at 8000) per million, rounded up"
    );
    assert_eq!(store.settled(), expected);
}

#[tokio::test(start_paused = true)]
async fn bodies_without_an_estimate_are_not_charged_and_never_panic() {
    // No fallback price: an unknown model has no estimate either. A cost limit of 0
    // refuses any retry whose cost is known: these retries go through uncharged.
    let prices = LlmCost::new()
        .model("m", 1_000_000, 1_000_000)
        .max_body_bytes(64 << 10);
    let layer = RetryLayer::new()
        .policy(policy(1))
        .budgets(Budgets::none().task_cost(0, secs(3600)))
        .llm_cost(prices);
    let stats = layer.stats();
    let mut svc = layer.layer(Replies::new(|attempt| {
        (if attempt == 0 { 503 } else { 200 }, String::new())
    }));
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    let huge = prompt(100 << 10, 10);
    let bodies = [
        "not json at all".to_owned(),
        String::new(),
        r#"{"model":"m","max_tokens":10,"messages":["#.to_owned(),
        r#"{"model":"m"} trailing"#.to_owned(),
        r#"["model","m"]"#.to_owned(),
        format!(r#"{{"model":"m","messages":{deep}}}"#),
        r#"{"model":"unknown","max_tokens":10}"#.to_owned(),
        "{\"model\":\"m\",\"content\":\"\u{1}\"}".to_owned(),
        huge,
    ];
    for body in &bodies {
        let res = send(&mut svc, chat("t", None, body)).await.unwrap();
        let info = info(&res);
        assert_eq!(
            (res.status(), info.retries, info.retry_cost, info.reserved()),
            (StatusCode::OK, 1, 0, 0),
            "{}",
            &body[..body.len().min(60)]
        );
    }
    assert_eq!(stats.totals("POST /v1/chat/completions").retry_cost, 0);

    // Absurd numbers: no panic. A count past u64 saturates (no cost budget fits it); a
    // fraction or a negative number is no count (the default maximum is used).
    let absurd = r#"{"model":"m","max_tokens":99999999999999999999999999}"#;
    let res = send(&mut svc, chat("t", None, absurd)).await.unwrap();
    assert_eq!(budget_stop(&info(&res)), Some(Scope::TaskCost));
    for odd in [
        r#"{"model":"m","max_tokens":1e400}"#,
        r#"{"model":"m","max_tokens":-5}"#,
    ] {
        let prices = LlmCost::new().model("m", 1_000_000, 1_000_000);
        assert_eq!(
            prices.estimate(odd.as_bytes()),
            Some((odd.len() as u64).div_ceil(4) + 4096)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn usage_body_settles_only_a_reserved_call_read_to_its_end() {
    let store = Recording::over(MemoryStore::new());
    let budgets = Budgets::none()
        .store(store.clone())
        .task_cost(100_000, secs(3600));
    let prices = tokens();
    let layer = RetryLayer::new()
        .policy(policy(1))
        .budgets(budgets.clone())
        .llm_cost(prices.clone());
    let body = prompt(100, 100);

    // Succeeded at once: nothing reserved, the body only passes through.
    let mut ok = layer.layer(Replies::new(|_| (200, USAGE_JSON.to_owned())));
    let res = send(&mut ok, chat("t", None, &body)).await.unwrap();
    assert_eq!(info(&res).reserved(), 0);
    assert_eq!(
        read_through(res, &budgets, &prices).await,
        USAGE_JSON.as_bytes()
    );

    let mut flaky = layer.layer(Replies::new(|attempt| {
        (
            if attempt == 0 { 503 } else { 200 },
            Chunks::cut(ANTHROPIC_SSE, 50),
        )
    }));
    // Dropped before its end (the client hung up): the reservation stays.
    let res = send(&mut flaky, chat("t", None, &body)).await.unwrap();
    let info_dropped = info(&res);
    let mut partial = UsageBody::new(res.into_body(), &info_dropped, &budgets, &prices);
    let _ = partial.frame().await;
    drop(partial);
    settled().await;

    // A usage that does not parse, or names a model without a price: no settlement.
    for usage in [
        r#"{"usage":{"prompt_tokens":1,"completion_tokens":"#,
        r#"{"model":"x","usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
    ] {
        let mut svc = layer.layer(Replies::new(move |attempt| {
            (if attempt == 0 { 503 } else { 200 }, usage.to_owned())
        }));
        let res = send(&mut svc, chat("t", None, &body)).await.unwrap();
        assert!(info(&res).reserved() > 0);
        read_through(res, &budgets, &LlmCost::new().model("m", 1, 1)).await;
    }
    assert_eq!(store.settled(), vec![]);
}

/// A request body that counts how often the layer looks at its bytes.
#[derive(Clone)]
struct Watched(String, Arc<AtomicU32>);

impl CloneBody for Watched {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }

    fn body_bytes(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        Some(std::borrow::Cow::Borrowed(self.0.as_bytes()))
    }
}

#[tokio::test(start_paused = true)]
async fn the_body_is_read_only_when_a_retry_is_considered() {
    let reads = Arc::new(AtomicU32::new(0));
    let layer = RetryLayer::new()
        .policy(policy(2))
        .budgets(Budgets::none().task_cost(1_000_000, secs(3600)))
        .llm_cost(tokens());
    let request = |reads: &Arc<AtomicU32>| -> Request<Watched> {
        Request::post("/v1/chat/completions")
            .header("x-task-id", "t")
            .body(Watched(prompt(40, 10), reads.clone()))
            .unwrap()
    };
    let mut ok = layer.layer(Replies::new(|_| (200, String::new())));
    for _ in 0..10 {
        let res = ServiceExt::<Request<Watched>>::ready(&mut ok)
            .await
            .unwrap()
            .call(request(&reads))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(reads.load(Ordering::SeqCst), 0, "never on the success path");

    let mut flaky = layer.layer(Replies::new(|attempt| {
        (if attempt < 2 { 503 } else { 200 }, String::new())
    }));
    let res = ServiceExt::<Request<Watched>>::ready(&mut flaky)
        .await
        .unwrap()
        .call(request(&reads))
        .await
        .unwrap();
    let info = info(&res);
    assert_eq!((info.retries, reads.load(Ordering::SeqCst)), (2, 2));
    assert_eq!(info.retry_cost, 2 * estimate_of(&prompt(40, 10), 10));
}

#[tokio::test]
async fn a_real_client_and_server_reserve_from_a_full_body_and_settle_from_the_stream() {
    // hyper-util's client over loopback: the estimate reads a `Full<Bytes>` request body, the
    // usage comes from a real `Incoming` event stream, framed as the connection delivers it.
    let app = axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(|headers: http::HeaderMap| async move {
            let retry = headers.get("x-retry-count").and_then(|v| v.to_str().ok());
            let status = if retry == Some("0") { 529 } else { 200 };
            Response::builder()
                .status(status)
                .header("content-type", "text/event-stream")
                .body(axum::body::Body::new(Chunks::cut(ANTHROPIC_SSE, 64)))
                .unwrap()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let store = Recording::over(MemoryStore::new());
    let budgets = Budgets::none()
        .store(store.clone())
        .task_cost(100_000, secs(3600));
    let prices = tokens();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .policy(policy(1))
                .budgets(budgets.clone())
                .llm_cost(prices.clone()),
        )
        .map_err(tower::BoxError::from)
        .service(client);
    let body = prompt(2_000, 1_024);
    let request = Request::post(format!("http://{addr}/v1/messages"))
        .header("x-task-id", "real")
        .body(http_body_util::Full::new(Bytes::from(body.clone())))
        .unwrap();
    let res = svc.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let estimate = estimate_of(&body, 1_024);
    assert_eq!(info(&res).reserved(), estimate);
    let bytes = UsageBody::wrap(res, &budgets, &prices)
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(bytes, ANTHROPIC_SSE.as_bytes());
    store.wait_settled(1).await;
    assert_eq!(
        store.settled(),
        vec![(
            Scope::TaskCost,
            "real".to_owned(),
            estimate - 45,
            Settle::Refund
        )]
    );
}

/// A retry the provider refuses (429, 503/529, 409, another 4xx) ran nothing, so it spent
/// nothing: its reservation goes back. A retry that may have run (a 504 timeout, a 500)
/// keeps it.
#[tokio::test(start_paused = true)]
async fn a_refused_retry_gives_its_reservation_back_and_one_that_may_have_run_keeps_it() {
    // Each attempt costs 400; the task may spend 1,000 on retries.
    let budgets = || {
        Budgets::none()
            .store(MemoryStore::new())
            .task_cost(1_000, secs(3600))
            .refund_refused(true)
    };
    let costly = |task: &str| {
        let mut req = chat(task, None, "{}");
        req.extensions_mut().insert(Cost(400));
        req
    };
    for (status, refunded) in [
        (429, true),
        (503, true),
        (529, true),
        (409, true),
        (504, false),
        (500, false),
    ] {
        let budgets = budgets();
        // The first call: a failure, a retry refused with `status`, a retry that succeeds.
        let mut svc = RetryLayer::new()
            .policy(policy(3))
            .budgets(budgets.clone())
            .layer(Replies::new(move |attempt| match attempt {
                0 => (503, String::new()),
                1 => (status, String::new()),
                _ => (200, String::new()),
            }));
        let res = send(&mut svc, costly("t")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{status}");
        let first = info(&res);
        assert_eq!(first.retries, 2, "{status}");
        assert_eq!(
            first.reserved(),
            400,
            "{status}: the last retry's reservation"
        );
        settled().await;

        // A second call of the task retries twice more: 800 on top. Within the 1,000 only
        // if the refused retry's 400 came back (1,000 - 400 for the first call's success).
        let mut again = RetryLayer::new()
            .policy(policy(2))
            .budgets(budgets)
            .layer(Replies::new(|attempt| match attempt {
                0 | 1 => (503, String::new()),
                _ => (200, String::new()),
            }));
        let res = send(&mut again, costly("t")).await.unwrap();
        let second = info(&res);
        if refunded {
            // The first call keeps 400 (its successful retry); this one's first retry (a
            // 503, a refusal) is refunded before its second is drawn: 800 at most.
            assert_eq!(res.status(), StatusCode::OK, "{status}: {second:?}");
            assert_eq!(second.retries, 2, "{status}");
        } else {
            // The first call keeps 800 (the retry that may have run, and the successful
            // one): the second call's second retry does not fit.
            assert_eq!(
                budget_stop(&second),
                Some(Scope::TaskCost),
                "{status}: {second:?}"
            );
        }
    }
}

/// A refused retry that ends the call gives its reservation back too, and a caller's
/// settlement from the `RetryInfo` cannot give it back twice.
#[tokio::test(start_paused = true)]
async fn a_call_that_ends_on_a_refused_retry_is_not_refunded_twice() {
    let store = Recording::over(MemoryStore::new());
    let budgets = Budgets::none()
        .store(store.clone())
        .task_cost(10_000, secs(3600))
        .refund_refused(true);
    let mut svc = RetryLayer::new()
        .policy(policy(1))
        .budgets(budgets.clone())
        .layer(Replies::new(|_| (429, String::new())));
    let mut req = chat("t", Some("u"), "{}");
    req.extensions_mut().insert(Cost(700));
    let res = send(&mut svc, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let info = info(&res);
    assert_eq!(info.retries, 1);
    settled().await;
    assert_eq!(
        store.settled(),
        vec![(Scope::TaskCost, "t".to_owned(), 700, Settle::Refund)]
    );
    // Nothing left to settle from the info: the caller's settlement is a no-op.
    assert_eq!(info.reserved(), 0);
    budgets
        .settle(info.task(), info.user(), info.reserved(), 0)
        .await
        .unwrap();
    settled().await;
    assert_eq!(store.settled().len(), 1);
}

/// Off by default: a refused retry keeps its reservation, so the cost limit bounds every
/// retry sent.
#[tokio::test(start_paused = true)]
async fn refused_retries_keep_their_reservation_by_default() {
    let store = Recording::over(MemoryStore::new());
    let budgets = Budgets::none()
        .store(store.clone())
        .task_cost(1_000, secs(3600));
    let mut svc = RetryLayer::new()
        .policy(policy(3))
        .budgets(budgets)
        .layer(Replies::new(|_| (429, String::new())));
    let mut req = chat("t", None, "{}");
    req.extensions_mut().insert(Cost(400));
    let res = send(&mut svc, req).await.unwrap();
    settled().await;
    let info = info(&res);
    // 400 + 400 fit the 1,000; the third retry does not.
    assert_eq!(info.retries, 2);
    assert_eq!(budget_stop(&info), Some(Scope::TaskCost));
    assert_eq!(info.reserved(), 400);
    assert!(store.settled().is_empty());
}
