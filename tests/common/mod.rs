//! Helpers shared by the observability tests.
#![allow(dead_code)]

use std::future::{Ready, ready};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use tower::{Service, ServiceExt};

/// A service that answers attempt `n` (0-based, counted over all calls) with `script(n)`.
#[derive(Clone)]
pub struct Scripted {
    pub calls: Arc<AtomicU32>,
    script: Arc<dyn Fn(u32) -> u16 + Send + Sync>,
}

impl Scripted {
    pub fn new(script: impl Fn(u32) -> u16 + Send + Sync + 'static) -> Self {
        Scripted {
            calls: Arc::new(AtomicU32::new(0)),
            script: Arc::new(script),
        }
    }

    /// Always answers `status`.
    pub fn always(status: u16) -> Self {
        Scripted::new(move |_| status)
    }

    /// Attempts made so far.
    pub fn count(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<String>> for Scripted {
    type Response = Response<String>;
    type Error = io::Error;
    type Future = Ready<Result<Response<String>, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<String>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16((self.script)(n)).unwrap();
        ready(Ok(Response::builder()
            .status(status)
            .body(String::new())
            .unwrap()))
    }
}

/// Drives one call through a ready service.
pub async fn send<S>(svc: &mut S, req: Request<String>) -> Result<S::Response, S::Error>
where
    S: Service<Request<String>>,
{
    svc.ready().await?.call(req).await
}

pub fn get(path: &str) -> Request<String> {
    Request::get(path).body(String::new()).unwrap()
}

pub fn post(path: &str) -> Request<String> {
    Request::post(path).body("{}".to_string()).unwrap()
}
