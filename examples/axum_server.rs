//! A tool server in axum behind `IdempotencyLayer`, scoped per API key, and a client whose
//! requests are retried and duplicated: each side effect runs once.
//!
//! Run: `cargo run --example axum_server`

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::server::{IDEMPOTENT_REPLAYED, IdempotencyLayer};
use tower_retry_guard::{IdempotencyKey, RetryLayer};

async fn create_ticket(State(created): State<Arc<AtomicU32>>, body: String) -> String {
    let n = created.fetch_add(1, Ordering::SeqCst) + 1;
    // Slow enough that a concurrent duplicate arrives while it runs.
    tokio::time::sleep(Duration::from_millis(150)).await;
    format!("{{\"ticket\":{n},\"title\":{body:?}}}")
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let created = Arc::new(AtomicU32::new(0));
    let app = Router::new()
        .route("/tools/create_ticket", post(create_ticket))
        .with_state(created.clone())
        .layer(
            IdempotencyLayer::builder()
                .ttl(Duration::from_secs(24 * 3600))
                // One tenant's key never replays another tenant's response...
                .principal(|parts: &http::request::Parts| {
                    parts
                        .headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                })
                // ...and a keyed request without credentials gets 401, not a shared scope.
                .principal_required()
                .build()?,
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new())
        .map_err(BoxError::from)
        .service(http);

    // One logical call, sent three times at once (a caller that double-submits) with the
    // same key: the first runs, the others get 409 and retry until the result is stored.
    let key = IdempotencyKey::generate();
    let send = |tenant: &'static str| {
        let req = http::Request::post(format!("{base}/tools/create_ticket"))
            .header("authorization", tenant)
            .header("idempotency-key", key.header_value().clone())
            .body(Full::new(Bytes::from_static(b"printer on fire")));
        let client = client.clone();
        async move {
            let res = client.oneshot(req?).await?;
            let replayed = res.headers().contains_key(IDEMPOTENT_REPLAYED);
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((replayed, String::from_utf8_lossy(&body).into_owned()))
        }
    };
    let (a, b, c) = tokio::join!(send("tenant-a"), send("tenant-a"), send("tenant-a"));
    for (i, r) in [a?, b?, c?].into_iter().enumerate() {
        println!("tenant-a request {i}: replayed={} body={}", r.0, r.1);
    }
    // Another tenant with the same key is another operation.
    let (replayed, body) = send("tenant-b").await?;
    println!("tenant-b request:   replayed={replayed} body={body}");
    println!(
        "tickets created: {} (one per tenant)",
        created.load(Ordering::SeqCst)
    );
    assert_eq!(created.load(Ordering::SeqCst), 2);

    // A POST without a key is refused by the server (400), and not retried by the client.
    let req = http::Request::post(format!("{base}/tools/create_ticket"))
        .header("authorization", "tenant-a")
        .body(Full::new(Bytes::from_static(b"no key")))?;
    let mut raw = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let res = raw.ready().await?.call(req).await?;
    println!("without a key: {}", res.status());
    Ok(())
}
