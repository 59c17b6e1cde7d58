//! `Duration::MAX` is how many users write "no limit". A setting given it is refused by its
//! builder, by name, or works as "very long": it never panics a request (an overflowing
//! `Instant + Duration`), and never leaves a key claimed by a request that did not run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http::{Request, Response, StatusCode};
use tower::{Layer, ServiceExt, service_fn};
use tower_retry_guard::IdempotencyKey;
use tower_retry_guard::guard::DedupeFn;
use tower_retry_guard::server::{DedupeLayer, IdempotencyLayer, MemoryIdempotencyStore};
use tower_retry_guard::stream::StreamGuardLayer;

const FOREVER: Duration = Duration::MAX;

#[tokio::test(start_paused = true)]
async fn idempotency_layer_max_claim_time() {
    let Ok(layer) = IdempotencyLayer::builder().max_claim_time(FOREVER).build() else {
        return; // refused by name: fine
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/emails",
            post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, "sent")
                }
            }),
        )
        .layer(layer);
    let send = || {
        Request::post("/emails")
            .header("idempotency-key", "\"k-forever\"")
            .body(Body::from("x"))
            .unwrap()
    };
    let first = app.clone().oneshot(send()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let _ = axum::body::to_bytes(first.into_body(), 1024).await.unwrap();
    let again = app.oneshot(send()).await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn dedupe_fn_ttl_wait_and_claim_time() {
    let dedupe = DedupeFn::new(MemoryIdempotencyStore::new())
        .ttl(FOREVER)
        .lease(Duration::from_secs(60), FOREVER)
        .wait(FOREVER);
    let key = IdempotencyKey::new("call_forever").unwrap();
    let runs = AtomicUsize::new(0);
    for _ in 0..2 {
        let out = dedupe
            .run("send_email", &key, || async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(String::from("sent"))
            })
            .await
            .unwrap();
        assert_eq!(out, "sent");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

fn key_of(call: &String) -> Option<IdempotencyKey> {
    IdempotencyKey::new(call).ok()
}

#[tokio::test(start_paused = true)]
async fn dedupe_layer_ttl() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let layer = DedupeLayer::new(key_of as fn(&String) -> Option<IdempotencyKey>).ttl(FOREVER);
    let svc = layer.layer(service_fn(move |_: String| {
        let r = r.clone();
        async move { Ok::<_, String>(r.fetch_add(1, Ordering::SeqCst).to_string()) }
    }));
    for _ in 0..2 {
        let out = svc.clone().oneshot("tool-call-1".to_owned()).await;
        assert_eq!(out.ok().as_deref(), Some("0"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn stream_guard_first_token_timeout() {
    let svc = StreamGuardLayer::new()
        .first_token_timeout(FOREVER)
        .layer(service_fn(|_: Request<String>| async {
            Ok::<_, std::io::Error>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(String::from("data: {\"delta\":\"hi\"}\n\n"))
                    .unwrap(),
            )
        }));
    let res = svc.oneshot(Request::new(String::new())).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}
