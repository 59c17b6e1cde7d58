//! The incident, replayed over real HTTP on 127.0.0.1.
//!
//! An agent calls a tool, `send_email`, over HTTP. The tool sends the email, then its
//! response is lost (it arrives after the caller's per-attempt timeout). The caller retries.
//!
//! - A naive retry (tower's `Retry` with a policy that retries errors) sends the request
//!   again: the customer gets the same email twice.
//! - `tower-retry-guard` mints one idempotency key for the call and sends it on every
//!   attempt; on its own that only *lets* the tool deduplicate: a tool that ignores the key
//!   still sends twice.
//! - With the tool behind `IdempotencyLayer`, the retry gets the original result: one email.
//!
//! Then a flaky LLM provider (429 with `retry-after-ms`, 529, 500, then 200) shows retries
//! that spike and recover, next to an operation that keeps failing, in the stats table.
//!
//! Run: `cargo run --example incident`

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::guard::DedupeFn;
use tower_retry_guard::server::MemoryIdempotencyStore;
use tower_retry_guard::{Budgets, Call, Guard, RetryLayer, RetryPolicy, RetryStats};

type Body = Full<Bytes>;
type HttpClient = Client<HttpConnector, Body>;

/// What the tool server saw.
#[derive(Default)]
struct Mailbox {
    emails: AtomicU32,
    requests: AtomicU32,
    keys: Mutex<HashMap<String, u32>>,
    lose_first: bool,
}

async fn send_email(
    State(mailbox): State<Arc<Mailbox>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let n = mailbox.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        if let Ok(mut keys) = mailbox.keys.lock() {
            *keys.entry(key.to_owned()).or_default() += 1;
        }
    }
    // The side effect happens...
    let id = mailbox.emails.fetch_add(1, Ordering::SeqCst) + 1;
    // ...then the first response is lost: it comes back after the caller gave up.
    if n == 0 && mailbox.lose_first {
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    (
        StatusCode::OK,
        format!("{{\"email_id\":{id},\"to\":{body:?}}}"),
    )
}

async fn serve(router: Router) -> Result<String, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(format!("http://{addr}"))
}

fn tool_router(mailbox: Arc<Mailbox>) -> Router {
    Router::new()
        .route("/tools/send_email", post(send_email))
        .with_state(mailbox)
}

fn email_request(base: &str) -> Result<http::Request<Body>, BoxError> {
    Ok(http::Request::post(format!("{base}/tools/send_email"))
        .header("content-type", "text/plain")
        .header("x-task-id", "ticket-4711")
        .body(Full::new(Bytes::from_static(b"customer@example.com")))?)
}

/// tower's plain retry: retries any error, up to 3 times, with no key and no backoff.
#[derive(Clone)]
struct Naive(u32);

impl<E> tower::retry::Policy<http::Request<Body>, http::Response<hyper::body::Incoming>, E>
    for Naive
{
    type Future = std::future::Ready<()>;
    fn retry(
        &mut self,
        _: &mut http::Request<Body>,
        result: &mut Result<http::Response<hyper::body::Incoming>, E>,
    ) -> Option<Self::Future> {
        match result {
            Err(_) if self.0 > 0 => {
                self.0 -= 1;
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }
    fn clone_request(&mut self, req: &http::Request<Body>) -> Option<http::Request<Body>> {
        let mut r = http::Request::new(req.body().clone());
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.headers_mut() = req.headers().clone();
        Some(r)
    }
}

type Run = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

struct Row {
    scenario: &'static str,
    emails: u32,
    requests: u32,
    keys: String,
    caller_saw: String,
}

async fn scenario(
    scenario: &'static str,
    dedupe: bool,
    call: impl FnOnce(String) -> Run,
) -> Result<Row, BoxError> {
    let mailbox = Arc::new(Mailbox {
        lose_first: true,
        ..Mailbox::default()
    });
    let mut router = tool_router(mailbox.clone());
    if dedupe {
        router = router.layer(tower_retry_guard::server::IdempotencyLayer::memory());
    }
    let base = serve(router).await?;
    let caller_saw = match call(base).await {
        Ok(body) => body,
        Err(e) => format!("error: {e}"),
    };
    // Let the lost response's handler finish before counting.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let keys = mailbox.keys.lock().map(|k| k.clone()).unwrap_or_default();
    let keys = if keys.is_empty() {
        "none".to_owned()
    } else {
        keys.values()
            .map(|n| format!("1 key, sent {n}x"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(Row {
        scenario,
        emails: mailbox.emails.load(Ordering::SeqCst),
        requests: mailbox.requests.load(Ordering::SeqCst),
        keys,
        caller_saw,
    })
}

async fn body_text(res: http::Response<hyper::body::Incoming>) -> Result<String, BoxError> {
    use http_body_util::BodyExt;
    let status = res.status();
    let bytes = res.into_body().collect().await?.to_bytes();
    Ok(format!("{status} {}", String::from_utf8_lossy(&bytes)))
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One call through the guarded client: retry layer, then a per-attempt timeout.
fn guarded_call(layer: RetryLayer, per_attempt: Duration, base: String) -> Run {
    Box::pin(async move {
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .layer(tower::timeout::TimeoutLayer::new(per_attempt))
            .service(client());
        let res = svc.ready().await?.call(email_request(&base)?).await?;
        body_text(res).await
    })
}

fn guarded(stats: &RetryStats) -> Result<RetryLayer, BoxError> {
    let policy = RetryPolicy::builder()
        .max_total_time(Duration::from_secs(10))
        .build()?;
    Ok(RetryLayer::new().policy(policy).with_stats(stats.clone()))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("== The incident: a tool call whose response is lost after the side effect ==\n");
    let stats = RetryStats::new();
    let per_attempt = Duration::from_millis(300);

    let mut rows = Vec::new();
    rows.push(
        scenario("naive retry (tower::retry)", false, |base| {
            Box::pin(async move {
                let mut svc = ServiceBuilder::new()
                    .layer(tower::retry::RetryLayer::new(Naive(3)))
                    .layer(tower::timeout::TimeoutLayer::new(per_attempt))
                    .service(client());
                let res = svc.ready().await?.call(email_request(&base)?).await?;
                body_text(res).await
            })
        })
        .await?,
    );
    for (name, dedupe) in [
        ("guarded, tool ignores the key", false),
        ("guarded + IdempotencyLayer", true),
    ] {
        let layer = guarded(&stats)?;
        rows.push(
            scenario(name, dedupe, move |base| {
                guarded_call(layer, per_attempt, base)
            })
            .await?,
        );
    }

    println!(
        "{:<32} {:>6} {:>9}  {:<18} caller saw",
        "scenario", "emails", "requests", "keys at the tool"
    );
    for r in &rows {
        println!(
            "{:<32} {:>6} {:>9}  {:<18} {}",
            r.scenario, r.emails, r.requests, r.keys, r.caller_saw
        );
    }
    let guarded_emails = rows.last().map_or(0, |r| r.emails);
    println!(
        "\nDuplicate side effects: naive {}, guarded with deduplication {}.\n",
        rows[0].emails.saturating_sub(1),
        guarded_emails.saturating_sub(1)
    );

    println!("== The same incident in process: the tool is an async function ==\n");
    let emails = in_process(&stats).await?;
    println!("guarded tool (Guard + DedupeFn, key from the tool-call id): {emails} email\n");

    println!("== A flaky LLM provider: 429, 529, 500, then 200 ==\n");
    provider(&stats).await?;
    println!("\n== Retry stats ==\n\n{stats}");
    for op in stats.operations() {
        println!("{op}: {}", stats.health(&op));
    }
    Ok(())
}

/// The incident without HTTP: a tool function whose answer is lost after it sent the email,
/// guarded with the model's tool-call id as key and run once per key by its executor.
async fn in_process(stats: &RetryStats) -> Result<u32, BoxError> {
    let emails = AtomicU32::new(0);
    let guard = Guard::new(guarded(stats)?);
    let executor = DedupeFn::new(MemoryIdempotencyStore::new());
    let (emails_ref, executor) = (&emails, &executor);
    let call = Call::new("send_email (in process)").tool_call("ticket-4711", "toolu_01A09q90qw90");
    guard
        .run(call, |attempt| async move {
            let key = attempt.key().ok_or("a side effect has a key")?;
            let send = || async {
                emails_ref.fetch_add(1, Ordering::SeqCst); // the side effect
                Ok::<_, std::io::Error>(())
            };
            executor.run("send_email", key, send).await?;
            if attempt.number() == 1 {
                return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()); // lost
            }
            Ok::<_, BoxError>(())
        })
        .await?;
    Ok(emails.load(Ordering::SeqCst))
}

/// An OpenAI-style endpoint that fails three times (429 with a hint, 529, 500) per
/// conversation, then answers; and one that is down for good.
async fn provider(stats: &RetryStats) -> Result<(), BoxError> {
    let counter = Arc::new(AtomicU32::new(0));
    let c = counter.clone();
    let router = Router::new()
        .route(
            "/v1/chat/completions",
            post(move || {
                let c = c.clone();
                async move {
                    let n = c.fetch_add(1, Ordering::SeqCst) % 4;
                    let mut h = HeaderMap::new();
                    match n {
                        0 => {
                            h.insert("retry-after-ms", http::HeaderValue::from_static("120"));
                            (StatusCode::TOO_MANY_REQUESTS, h, "rate limited")
                        }
                        1 => (
                            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                            h,
                            "overloaded",
                        ),
                        2 => (StatusCode::INTERNAL_SERVER_ERROR, h, "oops"),
                        _ => (
                            StatusCode::OK,
                            h,
                            "{\"choices\":[{\"message\":{\"content\":\"hi\"}}]}",
                        ),
                    }
                }
            }),
        )
        .route(
            "/v1/embeddings",
            post(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down") }),
        );
    let base = serve(router).await?;
    // LLM completions change nothing: mark them idempotent so they retry without a key.
    let layer = RetryLayer::new()
        .with_stats(stats.clone())
        // The default budgets: a quiet process (a few calls here) keeps its retries; the
        // process ratio speaks only when calls come by the tens a second.
        .budgets(Budgets::default())
        .side_effect_fn(|view| {
            let path = view.uri.map(|u| u.path()).unwrap_or_default();
            path.starts_with("/v1/")
                .then_some(tower_retry_guard::SideEffect::Idempotent)
        });
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .map_err(BoxError::from)
        .service(client());
    for i in 0..3 {
        let req = http::Request::post(format!("{base}/v1/chat/completions"))
            .header("x-user-id", "user-42")
            .body(Full::new(Bytes::from_static(
                b"{\"model\":\"m\",\"messages\":[]}",
            )))?;
        let res = svc.ready().await?.call(req).await?;
        let info = res
            .extensions()
            .get::<tower_retry_guard::RetryInfo>()
            .cloned();
        println!(
            "chat call {i}: {} after {} attempts ({:?} waited)",
            res.status(),
            info.as_ref().map_or(1, |i| i.attempts),
            info.map(|i| i.total_delay).unwrap_or_default()
        );
    }
    let req = http::Request::post(format!("{base}/v1/embeddings"))
        .body(Full::new(Bytes::from_static(b"{}")))?;
    let res = svc.ready().await?.call(req).await?;
    let info = res
        .extensions()
        .get::<tower_retry_guard::RetryInfo>()
        .cloned();
    println!(
        "embeddings call: {} after {} attempts, {}",
        res.status(),
        info.as_ref().map_or(1, |i| i.attempts),
        info.map(|i| i.outcome.to_string()).unwrap_or_default()
    );
    Ok(())
}
