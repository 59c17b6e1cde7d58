//! The store fails while a keyed response is still being relayed: the client gets its
//! response as it is produced all the same; only the recording waits for the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_retry_guard::budget::StoreError;
use tower_retry_guard::server::{
    Begin, Claim, ClaimToken, IdempotencyLayer, IdempotencyStore, MemoryIdempotencyStore,
    Ownership, ScopedKey, Stored,
};

/// The memory store, with writes of results failing while `down` is set.
#[derive(Clone, Default)]
struct Flaky {
    inner: MemoryIdempotencyStore,
    down: Arc<AtomicBool>,
}

impl IdempotencyStore for Flaky {
    async fn begin(&self, key: &ScopedKey, claim: &Claim) -> Result<Begin, StoreError> {
        self.inner.begin(key, claim).await
    }
    async fn complete(
        &self,
        key: &ScopedKey,
        claim: &Claim,
        stored: Stored,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::new("connection refused"));
        }
        self.inner.complete(key, claim, stored, ttl).await
    }
    async fn renew(&self, key: &ScopedKey, claim: &Claim) -> Result<Ownership, StoreError> {
        self.inner.renew(key, claim).await
    }
    async fn release(&self, key: &ScopedKey, token: ClaimToken) -> Result<Ownership, StoreError> {
        self.inner.release(key, token).await
    }
}

/// Ten chunks of 1 KiB, one every 10 ms: more than the 2 KiB the layer keeps.
async fn export(State(effects): State<Arc<AtomicU32>>) -> impl IntoResponse {
    effects.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(async move {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if tx.send(Ok(Bytes::from(vec![b'x'; 1024]))).await.is_err() {
                return;
            }
        }
    });
    Response::new(Body::new(ChannelBody(rx)))
}

/// A response body fed by a channel.
struct ChannelBody(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| b.map(http_body::Frame::data)))
    }
}

#[tokio::test(start_paused = true)]
async fn an_oversized_response_reaches_the_client_while_the_store_is_down() {
    let store = Flaky::default();
    let effects = Arc::new(AtomicU32::new(0));
    let layer = IdempotencyLayer::builder()
        .store(store.clone())
        .max_response_body(2048)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/exports", post(export))
        .with_state(effects.clone())
        .layer(layer);
    store.down.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let res = app
        .clone()
        .oneshot(
            Request::post("/exports")
                .header("idempotency-key", "\"export-1\"")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 10 * 1024);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the client waited {:?} for the store to come back",
        started.elapsed()
    );
    // The store comes back: the marker is written, a retry is not run again.
    store.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let retry = app
        .oneshot(
            Request::post("/exports")
                .header("idempotency-key", "\"export-1\"")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}
