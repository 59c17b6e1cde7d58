//! reqwest 0.13 behind the retry layer, set up in a few lines as a new user would: a 429 with
//! a retry hint, a timeout and a dropped connection are each retried, with the same key.
#![cfg(feature = "reqwest")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::{ErrorKind, RetryInfo, RetryLayer, RetryStats};

/// A provider on a raw socket (one request per connection): attempt 0 gets 429 with a retry
/// hint, attempt 1 no answer (the client's timeout), attempt 2 a connection closed before
/// any answer, attempt 3 a 200. Records each attempt's idempotency key.
async fn flaky_provider() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let keys = Arc::new(Mutex::new(Vec::new()));
    let seen = keys.clone();
    tokio::spawn(async move {
        // Bounded: the test makes four attempts.
        for attempt in 0..4 {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                match socket.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => len += n,
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]).to_lowercase();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("idempotency-key: "))
                .unwrap_or("")
                .trim()
                .to_owned();
            seen.lock().unwrap().push(key);
            let answer: &[u8] = match attempt {
                0 => b"HTTP/1.1 429 Too Many Requests\r\nretry-after-ms: 20\r\nretry-after: 1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                1 => {
                    // No answer within the client's timeout (held open meanwhile).
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        drop(socket);
                    });
                    continue;
                }
                2 => {
                    drop(socket); // the connection is lost before any answer
                    continue;
                }
                _ => b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}",
            };
            let _ = socket.write_all(answer).await;
        }
    });
    (base, keys)
}

#[tokio::test]
async fn reqwest_0_13_retries_a_429_a_timeout_and_a_dropped_connection() {
    let (base, keys) = flaky_provider().await;

    // The whole setup.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let retry = RetryLayer::new();
    let stats: RetryStats = retry.stats();
    let mut client = ServiceBuilder::new().layer(retry).service(http.clone());

    let request = http
        .post(format!("{base}/v1/tools/send_email"))
        .body("{}")
        .build()
        .unwrap();
    let response = client.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let info = response.extensions().get::<RetryInfo>().cloned().unwrap();
    assert_eq!(info.attempts, 4, "{info:?}");

    // Each failure was seen for what it is.
    let op = &stats.operations()[0];
    for kind in [
        ErrorKind::RateLimited,
        ErrorKind::Timeout,
        ErrorKind::Connect,
    ] {
        assert_eq!(stats.kind(op, kind).retries, 1, "{kind:?}: {stats}");
    }
    // One key, minted once, sent on every attempt and reported.
    let keys = keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 4);
    assert!(
        keys.iter().all(|k| !k.is_empty() && *k == keys[0]),
        "{keys:?}"
    );
    let reported = info.key.unwrap();
    assert_eq!(reported.header_value().to_str().unwrap(), keys[0]);
}
