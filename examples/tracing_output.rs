//! What the layer tells a `tracing` subscriber: the call's span (`retry_call`), one
//! `retry_attempt` span per request sent (OpenTelemetry's HTTP client attributes), the WARN
//! event per retry and the final event. The README shows this program's output.
//!
//! Run: `cargo run --example tracing_output`

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tower::{Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::{Budgets, RetryLayer};
use tracing_subscriber::fmt::format::FmtSpan;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_target(false)
        .without_time()
        .with_span_events(FmtSpan::CLOSE)
        .init();
    // A provider that is overloaded twice, then answers.
    let calls = Arc::new(AtomicU32::new(0));
    let provider = tower::service_fn(move |_req: http::Request<String>| {
        let n = calls.fetch_add(1, Ordering::Relaxed);
        let status = if n < 2 { 503 } else { 200 };
        async move {
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(status)
                    .body(String::new())
                    .unwrap_or_default(),
            )
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().budgets(Budgets::none()))
        .service(provider);
    let request = http::Request::post("https://api.example.com/v1/chat/completions")
        .body("{}".to_owned())
        .unwrap_or_default();
    let response = svc.ready().await.map(|s| s.call(request));
    if let Ok(response) = response {
        let status = response.await.map(|r| r.status());
        println!("{status:?}");
    }
}
