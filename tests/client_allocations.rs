//! Heap allocations per successful call: tower's retry against this crate's layer.
//!
//! A counting global allocator (this test binary only: each integration test file is its own
//! binary) counts, per thread, the allocations made while a call runs, after a warm-up, on
//! a current-thread runtime. The inner service is a `tower::service_fn` returning a ready
//! `http::Response<String>`; the request is built before counting starts, so every figure
//! is what the layer (and the runtime's `block_on`, the same for all: see `bare`) adds.
//!
//! Goals (DESIGN.md, "Numbers to reach"): no more allocations than `tower::retry::Retry`
//! (whose policy clones the request) for a read-only request; at most one more for a
//! side-effecting request whose key the layer mints and stamps.
//!
//! The `*_hdr` rows send requests shaped like real LLM/tool calls (`authorization` and
//! `content-type` headers, a small JSON body), where tower's clone copies a header map too:
//! the like-for-like comparison. `floor` is `info_on_success(false)`, no attempt header and
//! `Budgets::none()`.
//!
//! Run with `cargo test --test allocations -- --nocapture` to see the table.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use http::{Request, Response};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::request::HeaderNames;
use tower_retry_guard::{Budgets, RetryLayer};

struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn bump() {
    // Const-initialised, no destructor: never allocates, never torn down.
    let on = ON.try_with(Cell::get).unwrap_or(false);
    if on {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: forwards every call to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

type Req = Request<String>;
type Res = Response<String>;
type Err = Box<dyn std::error::Error + Send + Sync>;

fn inner()
-> impl Service<Req, Response = Res, Error = Err, Future = std::future::Ready<Result<Res, Err>>> + Clone
{
    tower::service_fn(|_req: Req| std::future::ready(Ok::<_, Err>(Response::new(String::new()))))
}

/// tower's retry with a policy that clones the request (as it must, to retry) and never
/// retries.
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

const WARM_UP: u64 = 200;
const CALLS: u64 = 1_000;

/// Allocations per call (the average over `CALLS`, rounded up), after a warm-up.
fn per_call<S>(svc: &S, make: fn() -> Req) -> f64
where
    S: Service<Req, Response = Res> + Clone,
    S::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut total = 0;
    for n in 0..WARM_UP + CALLS {
        let req = make();
        let mut s = svc.clone();
        let before = COUNT.with(Cell::get);
        ON.with(|on| on.set(true));
        let res = rt.block_on(async move {
            let ready = s.ready().await.unwrap_or_else(|e| panic!("ready: {e:?}"));
            ready.call(req).await
        });
        ON.with(|on| on.set(false));
        let after = COUNT.with(Cell::get);
        assert!(res.is_ok(), "the call must succeed");
        drop(res);
        if n >= WARM_UP {
            total += after - before;
        }
    }
    total as f64 / CALLS as f64
}

struct Counts {
    bare: f64,
    tower_get: f64,
    tower_post: f64,
    guard_get: f64,
    guard_post_keyed: f64,
    guard_get_no_info: f64,
    guard_post_no_info: f64,
    guard_get_no_budgets: f64,
    guard_get_floor: f64,
    // Requests with two headers and a JSON body, as real LLM/tool calls carry.
    bare_hdr: f64,
    tower_get_hdr: f64,
    tower_post_hdr: f64,
    guard_get_hdr: f64,
    guard_post_keyed_hdr: f64,
    guard_get_no_info_hdr: f64,
    guard_post_no_info_hdr: f64,
    guard_get_floor_hdr: f64,
}

fn measure() -> Counts {
    let tower = ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(NeverRetry))
        .service(inner());
    let guard = |layer: RetryLayer| ServiceBuilder::new().layer(layer).service(inner());
    let counts = Counts {
        bare: per_call(&inner(), get),
        tower_get: per_call(&tower, get),
        tower_post: per_call(&tower, post),
        guard_get: per_call(&guard(RetryLayer::new()), get),
        guard_post_keyed: per_call(&guard(RetryLayer::new()), post),
        guard_get_no_info: per_call(&guard(RetryLayer::new().info_on_success(false)), get),
        guard_post_no_info: per_call(&guard(RetryLayer::new().info_on_success(false)), post),
        guard_get_no_budgets: per_call(&guard(RetryLayer::new().budgets(Budgets::none())), get),
        guard_get_floor: per_call(&guard(floor()), get),
        bare_hdr: per_call(&inner(), get_hdr),
        tower_get_hdr: per_call(&tower, get_hdr),
        tower_post_hdr: per_call(&tower, post_hdr),
        guard_get_hdr: per_call(&guard(RetryLayer::new()), get_hdr),
        guard_post_keyed_hdr: per_call(&guard(RetryLayer::new()), post_hdr),
        guard_get_no_info_hdr: per_call(&guard(RetryLayer::new().info_on_success(false)), get_hdr),
        guard_post_no_info_hdr: per_call(
            &guard(RetryLayer::new().info_on_success(false)),
            post_hdr,
        ),
        guard_get_floor_hdr: per_call(&guard(floor()), get_hdr),
    };
    eprintln!("allocations per successful call (after warm-up, {CALLS} calls):");
    for (name, n) in [
        ("bare service", counts.bare),
        ("tower::retry, GET", counts.tower_get),
        ("tower::retry, POST", counts.tower_post),
        ("guard, GET (read-only, no key)", counts.guard_get),
        ("guard, POST (keyed)", counts.guard_post_keyed),
        (
            "guard, GET, info_on_success(false)",
            counts.guard_get_no_info,
        ),
        (
            "guard, POST, info_on_success(false)",
            counts.guard_post_no_info,
        ),
        ("guard, GET, Budgets::none()", counts.guard_get_no_budgets),
        ("guard, GET, floor", counts.guard_get_floor),
        ("bare service, headers + JSON", counts.bare_hdr),
        ("tower::retry, GET, headers + JSON", counts.tower_get_hdr),
        ("tower::retry, POST, headers + JSON", counts.tower_post_hdr),
        ("guard, GET, headers + JSON", counts.guard_get_hdr),
        (
            "guard, POST (keyed), headers + JSON",
            counts.guard_post_keyed_hdr,
        ),
        (
            "guard, GET, no info, headers + JSON",
            counts.guard_get_no_info_hdr,
        ),
        (
            "guard, POST, no info, headers + JSON",
            counts.guard_post_no_info_hdr,
        ),
        (
            "guard, GET, floor, headers + JSON",
            counts.guard_get_floor_hdr,
        ),
    ] {
        eprintln!("  {name:<40} {n:>6.2}");
    }
    counts
}

/// Allocations the `metrics` feature adds per call (the counter's operation label is a
/// fresh `String`, and the key's label list another).
const METRICS_EXTRA: f64 = if cfg!(feature = "metrics") { 2.0 } else { 0.0 };

#[test]
fn allocations_per_successful_call() {
    let c = measure();
    // The bare service and block_on allocate nothing per call once warm: every count below
    // is the layer's own.
    assert_eq!(c.bare, 0.0, "the baseline must be allocation-free");
    assert!(c.tower_post >= c.tower_get);

    // Header-less requests: the goals (DESIGN.md) are NOT met with the defaults (see BENCHMARKS.md: the attempt header stamped on
    // the first attempt makes the copy clone a non-empty header map, and `RetryInfo` on
    // success fills the response's extensions). So these are regression guards at today's
    // counts, not the goals: each fails if the success path allocates more than it does now.
    // Replace them with the goal assertions below once the goals are met:
    //   c.guard_get <= c.tower_get
    //   c.guard_post_keyed <= c.tower_post + 1.0
    let bound = |today: f64| today + METRICS_EXTRA;
    assert!(
        c.guard_get <= c.tower_get + bound(7.0),
        "GET: {}",
        c.guard_get
    );
    assert!(
        c.guard_post_keyed <= c.tower_post + bound(8.0),
        "keyed POST: {}",
        c.guard_post_keyed
    );
    assert!(
        c.guard_get_no_info <= c.tower_get + bound(4.0),
        "GET without RetryInfo: {}",
        c.guard_get_no_info
    );
    assert!(
        c.guard_post_no_info <= c.tower_post + bound(5.0),
        "keyed POST without RetryInfo: {}",
        c.guard_post_no_info
    );
    assert!(
        c.guard_get_no_budgets <= c.guard_get,
        "Budgets::none() must not allocate more: {}",
        c.guard_get_no_budgets
    );
    // Attaching RetryInfo is never free, but it must stay bounded (today: 3 allocations).
    assert!(c.guard_get - c.guard_get_no_info <= 3.0);

    // The floor (no RetryInfo, no attempt header, no budgets) meets the goal on a
    // header-less request: nothing beyond tower's.
    assert!(
        c.guard_get_floor <= c.tower_get + METRICS_EXTRA,
        "GET, floor: {}",
        c.guard_get_floor
    );

    // Requests shaped like real LLM/tool calls (two headers, a JSON body): tower's clone
    // copies the header map too, so the attempt header costs nothing more. Without
    // RetryInfo the goals are met; with it (the default) RetryInfo's 3 allocations remain.
    assert_eq!(c.bare_hdr, 0.0, "the baseline must be allocation-free");
    assert!(
        c.guard_get_no_info_hdr <= c.tower_get_hdr + METRICS_EXTRA,
        "GET with headers, no RetryInfo: {}",
        c.guard_get_no_info_hdr
    );
    assert!(
        c.guard_post_no_info_hdr <= c.tower_post_hdr + 1.0 + METRICS_EXTRA,
        "keyed POST with headers, no RetryInfo: {}",
        c.guard_post_no_info_hdr
    );
    assert!(
        c.guard_get_floor_hdr <= c.tower_get_hdr + METRICS_EXTRA,
        "GET with headers, floor: {}",
        c.guard_get_floor_hdr
    );
    // Regression guards at today's counts (RetryInfo: 3 more than the goal).
    assert!(
        c.guard_get_hdr <= c.tower_get_hdr + bound(3.0),
        "GET with headers: {}",
        c.guard_get_hdr
    );
    assert!(
        c.guard_post_keyed_hdr <= c.tower_post_hdr + bound(4.0),
        "keyed POST with headers: {}",
        c.guard_post_keyed_hdr
    );
}
