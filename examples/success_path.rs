//! N successful calls through one layer, for a profiler (callgrind) or a quick timing.
//!
//! ```text
//! CARGO_PROFILE_RELEASE_DEBUG=true cargo build --release --example success_path
//! valgrind --tool=callgrind target/release/examples/success_path guard_get 100000
//! ```
//!
//! Variants: `bare`, `tower_retry`, `tower_retry_post`, `guard_get`, `guard_post`,
//! `guard_get_no_info`, `guard_get_no_budgets`, `guard_get_floor` (no `RetryInfo`, no attempt
//! header, no budgets); with requests shaped like real LLM/tool calls (`authorization` and
//! `content-type` headers, a small JSON body): `bare_hdr`, `tower_retry_hdr`,
//! `tower_retry_post_hdr`, `guard_get_hdr`, `guard_post_hdr`, `guard_get_no_info_hdr`,
//! `guard_get_floor_hdr`.

use std::hint::black_box;
use std::time::Instant;

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

/// Calls `svc` `n` times on a current-thread runtime; returns the successes.
fn run<S>(svc: S, make: fn() -> Req, n: u64) -> u64
where
    S: Service<Req, Response = Res> + Clone,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    rt.block_on(async move {
        let mut ok = 0;
        for _ in 0..n {
            let mut s = svc.clone();
            let req = make();
            if let Ok(ready) = s.ready().await {
                if ready.call(req).await.is_ok() {
                    ok += 1;
                }
            }
        }
        black_box(ok)
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let variant = args.next().unwrap_or_else(|| "guard_get".to_owned());
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let guard = |layer: RetryLayer| ServiceBuilder::new().layer(layer).service(inner());
    let start = Instant::now();
    let ok = match variant.as_str() {
        "bare" => run(inner(), get, n),
        "tower_retry" => run(
            ServiceBuilder::new()
                .layer(tower::retry::RetryLayer::new(NeverRetry))
                .service(inner()),
            get,
            n,
        ),
        "tower_retry_post" => run(
            ServiceBuilder::new()
                .layer(tower::retry::RetryLayer::new(NeverRetry))
                .service(inner()),
            post,
            n,
        ),
        "guard_get" => run(guard(RetryLayer::new()), get, n),
        "guard_post" => run(guard(RetryLayer::new()), post, n),
        "guard_get_no_info" => run(guard(RetryLayer::new().info_on_success(false)), get, n),
        "guard_get_no_budgets" => run(guard(RetryLayer::new().budgets(Budgets::none())), get, n),
        "guard_get_floor" => run(guard(floor()), get, n),
        // Requests with two headers and a JSON body, as real LLM/tool calls carry.
        "bare_hdr" => run(inner(), get_hdr, n),
        "tower_retry_hdr" => run(
            ServiceBuilder::new()
                .layer(tower::retry::RetryLayer::new(NeverRetry))
                .service(inner()),
            get_hdr,
            n,
        ),
        "tower_retry_post_hdr" => run(
            ServiceBuilder::new()
                .layer(tower::retry::RetryLayer::new(NeverRetry))
                .service(inner()),
            post_hdr,
            n,
        ),
        "guard_get_hdr" => run(guard(RetryLayer::new()), get_hdr, n),
        "guard_post_hdr" => run(guard(RetryLayer::new()), post_hdr, n),
        "guard_get_no_info_hdr" => run(guard(RetryLayer::new().info_on_success(false)), get_hdr, n),
        "guard_get_floor_hdr" => run(guard(floor()), get_hdr, n),
        other => {
            eprintln!("unknown variant {other}");
            std::process::exit(2);
        }
    };
    let elapsed = start.elapsed();
    println!(
        "{variant}: {ok}/{n} calls, {:.1} ns per call",
        elapsed.as_nanos() as f64 / n as f64
    );
}
