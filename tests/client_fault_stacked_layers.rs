//! Retry at one layer only: an outer layer does not retry what an inner one gave up on,
//! whatever the inner layer's error type once it is boxed between the two (here hyper-util's
//! legacy client error, without a `map_err` inside).
#![cfg(feature = "hyper-util")]

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_retry_guard::{Backoff, ErrorKind, RetryError, RetryLayer, RetryPolicy, StopReason};

fn layer() -> RetryLayer {
    RetryLayer::new().policy(
        RetryPolicy::builder()
            .backoff(Backoff::Constant(Duration::from_millis(5)))
            .build()
            .unwrap(),
    )
}

#[tokio::test]
async fn an_outer_layer_does_not_retry_a_boxed_hyper_util_give_up() {
    // Bind then drop: the port is (very likely) closed.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new()
        .layer(layer())
        .map_err(BoxError::from)
        .layer(layer())
        .service(client);
    let err: RetryError<BoxError> = svc
        .oneshot(
            Request::get(format!("http://{addr}/"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap_err();
    // The outer layer sent one attempt (the inner made four) and stopped on its give-up.
    assert_eq!(err.attempts(), 1, "{err}");
    assert_eq!(err.kind(), Some(ErrorKind::GaveUp));
    assert_eq!(err.reason(), &StopReason::InnerGaveUp);
}
