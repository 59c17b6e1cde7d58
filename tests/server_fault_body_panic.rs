//! A handler whose response *body* panics half-way: the client must not see a clean end of
//! a truncated response, and a retry with the key must not replay the half as a result.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_retry_guard::server::IdempotencyLayer;

/// Two data frames, then a panic (a bug in the handler's serializer, say).
struct Breaks(u8);

impl http_body::Body for Breaks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0 += 1;
        if self.0 > 2 {
            panic!("serializer bug");
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"chunk ")))))
    }
}

async fn handler(State(effects): State<Arc<AtomicUsize>>) -> impl IntoResponse {
    effects.fetch_add(1, Ordering::SeqCst);
    Response::new(Body::new(Breaks(0)))
}

fn app(effects: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route("/orders", post(handler))
        .with_state(effects)
        .layer(IdempotencyLayer::memory())
}

fn post_keyed() -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", "\"k-body-panic\"")
        .body(Body::from("{}"))
        .unwrap()
}

#[tokio::test]
async fn a_body_that_panics_midway_reaches_the_client_as_an_error_not_a_clean_end() {
    let effects = Arc::new(AtomicUsize::new(0));
    let app = app(effects.clone());
    let res = app.clone().oneshot(post_keyed()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await;
    assert!(
        body.is_err(),
        "a truncated body must end in an error, got {:?}",
        body.map(|b| b.to_bytes())
    );
    // The handler ran: a retry with the key is not run again, and does not get the half
    // body as if it were the result.
    let retry = app.oneshot(post_keyed()).await.unwrap();
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let status = retry.status();
    let bytes = retry.into_body().collect().await.unwrap().to_bytes();
    assert_ne!(
        (status, &bytes[..]),
        (StatusCode::OK, &b"chunk chunk "[..]),
        "a half result replayed as the result"
    );
}
