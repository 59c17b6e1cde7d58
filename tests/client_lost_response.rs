//! The incident's failure, on a real socket: the server reads the request, does the side
//! effect, then the connection dies before the response is complete.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::{Budgets, ErrorKind, RetryInfo, RetryLayer, StopReason};

fn client() -> impl Service<
    Request<Full<Bytes>>,
    Response = http::Response<hyper::body::Incoming>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    tower::ServiceBuilder::new()
        .map_err(BoxError::from)
        .service(http)
}

#[tokio::test]
async fn a_connection_lost_before_the_headers_complete_is_retried_with_the_same_key() {
    // The response head is cut: hyper reports an incomplete message. (A body cut after a
    // complete head fails while the caller reads the body, after the layer returned.)
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let keys = Arc::new(std::sync::Mutex::new(Vec::new()));
    let k = keys.clone();
    tokio::spawn(async move {
        for n in 0..8 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 8192];
            let Ok(len) = sock.read(&mut buf).await else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..len]).to_lowercase();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("idempotency-key: ").map(str::to_owned));
            if let Ok(mut keys) = k.lock() {
                keys.push(key);
            }
            if n == 0 {
                // The side effect happened; the answer is cut in the middle of its head.
                let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-le").await;
                drop(sock);
            } else {
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            }
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().budgets(Budgets::none()))
        .service(client());
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(
            Request::post(format!("{base}/tools/send_email"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let info = res.extensions().get::<RetryInfo>().unwrap().clone();
    assert_eq!(info.attempts, 2);
    assert_eq!(info.last_error, Some(ErrorKind::Connect));
    let keys = keys.lock().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys[0].is_some());
    assert_eq!(
        keys[0], keys[1],
        "the retry carries the first attempt's key"
    );
}

#[tokio::test]
async fn a_lost_response_on_a_side_effect_without_a_key_is_not_retried() {
    // The server reads the request (the side effect happens), then the head is cut.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicU32::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        for _ in 0..8 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 8192];
            let _ = sock.read(&mut buf).await;
            let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-le").await;
            drop(sock);
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .budgets(Budgets::none())
                .idempotency_keys(false),
        )
        .service(client());
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(
            Request::post(format!("{base}/tools/send_email"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "sent once: no key, no retry"
    );
    assert_eq!(err.kind(), Some(ErrorKind::Connect));
    assert!(matches!(
        err.reason(),
        StopReason::SideEffectWithoutKey { .. }
    ));
}
