//! Retrying a tool call that is not HTTP: a request type that carries its own
//! idempotency key implements `RetryRequest`, and the tool executor deduplicates on it.
//!
//! Run: `cargo run --example tool_call`

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::request::{HeaderNames, InvalidKey};
use tower_retry_guard::{
    Budgets, ErrorKind, IdempotencyKey, Operation, Outcome, RetryLayer, RetryPolicy, RetryRequest,
    SideEffect,
};

/// A tool call as an agent framework would make it.
#[derive(Debug, Clone)]
struct ToolCall {
    tool: &'static str,
    arguments: String,
    /// The key of the logical operation, e.g. derived from the model's tool-call id.
    idempotency_key: Option<String>,
    attempt: u32,
}

impl RetryRequest for ToolCall {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }

    fn side_effect(&self) -> SideEffect {
        match self.tool {
            "search_docs" => SideEffect::ReadOnly,
            _ => SideEffect::SideEffecting,
        }
    }

    fn idempotency_key(&self, _: &HeaderNames) -> Result<Option<IdempotencyKey>, InvalidKey> {
        self.idempotency_key
            .as_deref()
            .map(IdempotencyKey::new)
            .transpose()
    }

    fn set_idempotency_key(&mut self, key: &IdempotencyKey, _: &HeaderNames) {
        self.idempotency_key
            .get_or_insert_with(|| key.as_str().to_owned());
    }

    fn set_attempt(&mut self, attempt: u32, _: &HeaderNames) {
        self.attempt = attempt;
    }

    fn operation(&self) -> Option<Operation> {
        Some(Operation::from_static(self.tool))
    }
}

/// The tool executor: sends emails, times out on its first attempt after the side effect,
/// and deduplicates on the key it is given.
#[derive(Clone, Default)]
struct Executor {
    sent: Arc<AtomicU32>,
    results: Arc<Mutex<HashMap<String, String>>>,
    calls: Arc<AtomicU32>,
}

impl Service<ToolCall> for Executor {
    type Response = String;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: ToolCall) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let n = this.calls.fetch_add(1, Ordering::SeqCst);
            let key = call.idempotency_key.clone().unwrap_or_default();
            if let Some(stored) = this.results.lock().map_err(|_| "poisoned")?.get(&key) {
                return Ok(format!("{stored} (replayed)"));
            }
            let id = this.sent.fetch_add(1, Ordering::SeqCst) + 1;
            let result = format!("email #{id} to {}", call.arguments);
            this.results
                .lock()
                .map_err(|_| "poisoned")?
                .insert(key, result.clone());
            if n == 0 {
                // The side effect happened, but the answer is lost.
                return Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "tool timed out",
                )) as BoxError);
            }
            Ok(result)
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let executor = Executor::default();
    let layer = RetryLayer::new()
        .policy(
            RetryPolicy::builder()
                .max_total_time(Duration::from_secs(5))
                .build()?,
        )
        .budgets(Budgets::none())
        .classify(|result: &Result<String, BoxError>| match result {
            Ok(_) => Outcome::Success,
            Err(e) => tower_retry_guard::classify::Errors::classify_error(e.as_ref()),
        });
    let mut tools = ServiceBuilder::new()
        .layer(layer.clone())
        .service(executor.clone());

    let call = ToolCall {
        tool: "send_email",
        arguments: "customer@example.com".into(),
        idempotency_key: Some("call_7f3a9c".into()),
        attempt: 0,
    };
    let result = tools.ready().await?.call(call).await?;
    println!("send_email with a key: {result}");
    println!("emails sent: {}", executor.sent.load(Ordering::SeqCst));

    // Without a key, and with minting off, the layer refuses to retry the side effect.
    let mut strict = ServiceBuilder::new()
        .layer(layer.idempotency_keys(false))
        .service(Executor::default());
    let call = ToolCall {
        tool: "send_email",
        arguments: "other@example.com".into(),
        idempotency_key: None,
        attempt: 0,
    };
    match strict.ready().await?.call(call).await {
        Ok(r) => println!("unexpected: {r}"),
        Err(e) => {
            assert_eq!(e.kind(), Some(ErrorKind::Timeout));
            println!("send_email without a key: {e}");
        }
    }
    Ok(())
}
