//! The success path per call: a bare service, tower's retry, backon, tower-resilience's retry,
//! and this crate.
//!
//! The `*_hdr` variants send requests shaped like real LLM/tool calls (`authorization` and
//! `content-type` headers, a small JSON body): like for like with tower, whose clone then
//! copies a non-empty header map too. `guard_get_floor*` is the layer with
//! `info_on_success(false)`, no attempt header and `Budgets::none()`: its floor cost.
//!
//! Run: `cargo bench --bench overhead -- --warm-up-time 1 --measurement-time 3`
//!
//! `tower_resilience` is `tower-resilience-retry` 0.14 (the `retry` part of
//! `tower-resilience`): 4 attempts, exponential backoff from 100 ms, retrying 5xx responses
//! (its response predicate), no budget, default features (no tracing, no metrics). It clones
//! the request (`Req: Clone`) before every attempt and boxes its future.

use std::hint::black_box;

use backon::{ExponentialBuilder, Retryable};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::request::HeaderNames;
use tower_retry_guard::{Budgets, RetryLayer};

type Req = Request<String>;
type Res = Response<String>;
type Err = Box<dyn std::error::Error + Send + Sync>;

fn inner()
-> impl Service<Req, Response = Res, Error = Err, Future = std::future::Ready<Result<Res, Err>>> + Clone
{
    tower::service_fn(|_req: Req| std::future::ready(Ok::<_, Err>(Response::new(String::new()))))
}

#[derive(Clone)]
struct NeverRetry;

impl tower::retry::Policy<Req, Res, Err> for NeverRetry {
    type Future = std::future::Ready<()>;
    fn retry(&mut self, _: &mut Req, _: &mut Result<Res, Err>) -> Option<Self::Future> {
        None
    }
    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        let mut r = Request::new(req.body().clone());
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.headers_mut() = req.headers().clone();
        Some(r)
    }
}

fn get() -> Req {
    Request::get("http://127.0.0.1/v1/models")
        .body(String::new())
        .unwrap_or_default()
}

fn post() -> Req {
    Request::post("http://127.0.0.1/tools/send_email")
        .body(String::from("{}"))
        .unwrap_or_default()
}

/// A small chat-completion body, as an LLM or tool request carries.
const JSON_BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

/// A GET shaped like a real provider request: `authorization` and `content-type` headers
/// and a small JSON body (the headerless `get` makes the layer pay for a header map that
/// tower's clone does not; real requests carry one either way).
fn get_hdr() -> Req {
    Request::get("http://127.0.0.1/v1/models")
        .header("authorization", "Bearer x")
        .header("content-type", "application/json")
        .body(String::from(JSON_BODY))
        .unwrap_or_default()
}

/// A POST shaped like a real tool call: the same two headers and JSON body.
fn post_hdr() -> Req {
    Request::post("http://127.0.0.1/tools/send_email")
        .header("authorization", "Bearer x")
        .header("content-type", "application/json")
        .body(String::from(JSON_BODY))
        .unwrap_or_default()
}

/// The floor: no `RetryInfo` on success, no attempt header, no budgets.
fn floor() -> RetryLayer {
    RetryLayer::new()
        .info_on_success(false)
        .header_names(HeaderNames {
            attempt: None,
            ..Default::default()
        })
        .budgets(Budgets::none())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut g = c.benchmark_group("success_path");

    let svc = inner();
    g.bench_function("bare", |b| {
        b.to_async(&rt).iter(|| {
            let mut s = svc.clone();
            async move {
                let r = match s.ready().await {
                    Ok(s) => s.call(get()).await.is_ok(),
                    Err(_) => false,
                };
                black_box(r)
            }
        })
    });

    let tower_retry = ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(NeverRetry))
        .service(inner());
    g.bench_function("tower_retry", |b| {
        b.to_async(&rt).iter(|| {
            let mut s = tower_retry.clone();
            async move {
                let r = match s.ready().await {
                    Ok(s) => s.call(get()).await.is_ok(),
                    Err(_) => false,
                };
                black_box(r)
            }
        })
    });

    g.bench_function("tower_retry_post", |b| {
        b.to_async(&rt).iter(|| {
            let mut s = tower_retry.clone();
            async move {
                let r = match s.ready().await {
                    Ok(s) => s.call(post()).await.is_ok(),
                    Err(_) => false,
                };
                black_box(r)
            }
        })
    });

    // The same, with requests shaped like real LLM/tool calls (two headers, a JSON body).
    g.bench_function("bare_hdr", |b| {
        b.to_async(&rt).iter(|| {
            let mut s = svc.clone();
            async move {
                let r = match s.ready().await {
                    Ok(s) => s.call(get_hdr()).await.is_ok(),
                    Err(_) => false,
                };
                black_box(r)
            }
        })
    });
    for (name, req) in [
        ("tower_retry_hdr", get_hdr as fn() -> Req),
        ("tower_retry_post_hdr", post_hdr),
    ] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let mut s = tower_retry.clone();
                async move {
                    let r = match s.ready().await {
                        Ok(s) => s.call(req()).await.is_ok(),
                        Err(_) => false,
                    };
                    black_box(r)
                }
            })
        });
    }

    g.bench_function("backon", |b| {
        b.to_async(&rt).iter(|| {
            let s = svc.clone();
            async move {
                let r = (|| {
                    let mut s = s.clone();
                    async move { s.call(get()).await }
                })
                .retry(ExponentialBuilder::default())
                .await;
                black_box(r.is_ok())
            }
        })
    });

    let resilience = ServiceBuilder::new()
        .layer(
            tower_resilience_retry::RetryLayer::<Req, Res, Err>::builder()
                .max_attempts(4)
                .exponential_backoff(std::time::Duration::from_millis(100))
                .retry_on_response(|r: &Res| r.status().is_server_error())
                .build(),
        )
        .service(inner());
    g.bench_function("tower_resilience", |b| {
        b.to_async(&rt).iter(|| {
            let mut s = resilience.clone();
            async move {
                let r = match s.ready().await {
                    Ok(s) => s.call(get()).await.is_ok(),
                    Err(_) => false,
                };
                black_box(r)
            }
        })
    });

    for (name, layer, req) in [
        ("guard_get", RetryLayer::new(), get as fn() -> Req),
        (
            "guard_get_no_info",
            RetryLayer::new().info_on_success(false),
            get,
        ),
        ("guard_post_keyed", RetryLayer::new(), post),
        (
            "guard_get_no_budgets",
            RetryLayer::new().budgets(Budgets::none()),
            get,
        ),
        ("guard_get_floor", floor(), get),
        // Requests with two headers and a JSON body, as real LLM/tool calls carry.
        ("guard_get_hdr", RetryLayer::new(), get_hdr),
        ("guard_post_keyed_hdr", RetryLayer::new(), post_hdr),
        (
            "guard_get_no_info_hdr",
            RetryLayer::new().info_on_success(false),
            get_hdr,
        ),
        ("guard_get_floor_hdr", floor(), get_hdr),
    ] {
        let guarded = ServiceBuilder::new().layer(layer).service(inner());
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let mut s = guarded.clone();
                async move {
                    let r = match s.ready().await {
                        Ok(s) => s.call(req()).await.is_ok(),
                        Err(_) => false,
                    };
                    black_box(r)
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
