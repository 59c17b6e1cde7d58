//! An OpenAI-compatible chat-completions client on `reqwest`, retried by
//! `tower-retry-guard`, against a local provider on 127.0.0.1 that answers 429 (with
//! `retry-after-ms`), 529, 500, then 200.
//!
//! Run: `cargo run --example reqwest_llm --features reqwest`

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::post;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::{RetryInfo, RetryLayer, RetryPolicy, SideEffect};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The provider: fails three times, then answers.
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |headers: HeaderMap| {
            let n = h.fetch_add(1, Ordering::SeqCst);
            let attempt = headers
                .get("x-retry-count")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            async move {
                println!("provider: attempt {attempt}");
                let mut out = HeaderMap::new();
                let status = match n {
                    0 => {
                        out.insert("retry-after-ms", HeaderValue::from_static("250"));
                        StatusCode::TOO_MANY_REQUESTS
                    }
                    1 => StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    2 => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::OK,
                };
                (
                    status,
                    out,
                    r#"{"choices":[{"message":{"role":"assistant","content":"Hello!"}}]}"#,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    // The client: reqwest is a tower Service; completions change nothing, so they are
    // marked idempotent and retried without an idempotency key.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let retry = RetryLayer::new()
        .policy(RetryPolicy::builder().max_retries(3).build()?)
        .side_effect_fn(|_| Some(SideEffect::Idempotent));
    let stats = retry.stats();
    let mut llm = ServiceBuilder::new().layer(retry).service(client.clone());

    let request = client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-test","messages":[{"role":"user","content":"Hi"}]}"#)
        .build()?;
    let response = llm.ready().await?.call(request).await?;
    let info = response.extensions().get::<RetryInfo>().cloned();
    println!(
        "client: {} after {} attempts, waited {:?}",
        response.status(),
        info.as_ref().map_or(1, |i| i.attempts),
        info.as_ref().map(|i| i.total_delay).unwrap_or_default()
    );
    println!("client: {}", response.text().await?);
    println!("\n{stats}");
    Ok(())
}
