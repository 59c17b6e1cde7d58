//! stats count only retries that were really sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use http::{Request, Response};
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_retry_guard::budget::{InFlightCap, Scope};
use tower_retry_guard::{Budgets, ErrorKind, RetryInfo, RetryLayer};

#[tokio::test(start_paused = true)]
async fn a_retry_refused_by_the_in_flight_cap_is_not_counted_as_sent() {
    // No retry may ever be in flight: every retry is refused just before it is sent.
    let budgets = Budgets::none().in_flight(Some(InFlightCap::new(0.0, 0).unwrap()));
    let layer = RetryLayer::new().budgets(budgets);
    let stats = layer.stats();
    let attempts = Arc::new(AtomicU32::new(0));
    let seen = attempts.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |_: Request<String>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(Response::builder().status(503).body(String::new())?) }
        });
    let res = svc
        .oneshot(Request::get("/x").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(res.extensions().get::<RetryInfo>().unwrap().retries, 0);

    let k = stats.kind("GET /x", ErrorKind::Overloaded);
    // One attempt failed, once; no retry was sent; one call denied by the in-flight cap.
    assert_eq!(k.failures, 1, "{k:?}");
    assert_eq!(k.retries, 0, "{k:?}");
    assert_eq!(k.denied(Scope::InFlight), 1, "{k:?}");
    let w = stats.last_minute("GET /x");
    assert_eq!((w.calls, w.retries, w.failed), (1, 0, 1), "{w:?}");
}
