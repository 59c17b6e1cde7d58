use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::{CallOutcome, RetryInfo, RetryLayer};

#[tokio::test(start_paused = true)]
async fn retries_503_then_succeeds() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mut svc =
        ServiceBuilder::new()
            .layer(RetryLayer::new())
            .service_fn(move |_req: Request<String>| {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move {
                    let status = if n < 2 {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    Ok::<_, std::io::Error>(
                        Response::builder()
                            .status(status)
                            .body(String::new())
                            .unwrap(),
                    )
                }
            });
    let start = tokio::time::Instant::now();
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(Request::post("/x").body("hi".to_string()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.attempts, 3);
    assert_eq!(info.outcome, CallOutcome::Recovered);
    assert!(info.key.is_some());
    assert!(start.elapsed() >= Duration::from_millis(150));
}
