//! Paths of any length (an agent's tool fetching URLs the model chose): the stats keep a
//! bounded name per operation, so their memory stays bounded as documented (about 3.6 KB
//! per operation), and an operation is still found by its full name.

use std::io;

use http::{Request, Response};
use tower::{Layer, ServiceExt, service_fn};
use tower_retry_guard::{RetryLayer, RetryStats};

fn letters(n: usize, seed: usize) -> String {
    (0..n)
        .map(|i| char::from(b'a' + ((i * 7 + seed / (i % 3 + 1)) % 26) as u8))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_huge_path_is_kept_under_a_bounded_name() {
    let layer = RetryLayer::new();
    let stats: RetryStats = layer.stats();
    let svc = layer.layer(service_fn(|_: Request<String>| async {
        Ok::<_, io::Error>(Response::new(String::new()))
    }));
    let mut first = None;
    for n in 0..20 {
        let tag = char::from(b'a' + n as u8);
        let path = format!("/fetch/{tag}{}", letters(60_000, n));
        let req = Request::get(format!("http://127.0.0.1{path}"))
            .body(String::new())
            .unwrap();
        svc.clone().oneshot(req).await.unwrap();
        first.get_or_insert(format!("GET {path}"));
    }
    let names = stats.operations();
    assert_eq!(names.len(), 20);
    for name in &names {
        assert!(name.len() <= 512, "a name of {} bytes kept", name.len());
    }
    assert_eq!(stats.calls(&first.unwrap()), 1);
}
