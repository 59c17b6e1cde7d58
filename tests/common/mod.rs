//! Helpers shared by the observability tests.
#![allow(dead_code)]

use std::future::{Ready, ready};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use tower::{Service, ServiceExt};

type Script = Arc<dyn Fn(&Request<String>, u32) -> u16 + Send + Sync>;

/// A service that answers attempt `n` (0-based, counted over all calls) with `script(n)`.
#[derive(Clone)]
pub struct Scripted {
    pub calls: Arc<AtomicU32>,
    script: Script,
}

impl Scripted {
    pub fn new(script: impl Fn(u32) -> u16 + Send + Sync + 'static) -> Self {
        Scripted {
            calls: Arc::new(AtomicU32::new(0)),
            script: Arc::new(move |_: &Request<String>, n| script(n)),
        }
    }

    /// Answers `script(path, attempt)`, the attempt (0-based, per call) read from the
    /// `x-retry-count` header the layer stamps.
    pub fn per_call(script: impl Fn(&str, u32) -> u16 + Send + Sync + 'static) -> Self {
        Scripted {
            calls: Arc::new(AtomicU32::new(0)),
            script: Arc::new(move |req: &Request<String>, _| {
                let attempt = req
                    .headers()
                    .get("x-retry-count")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .expect("the layer stamps x-retry-count");
                script(req.uri().path(), attempt)
            }),
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

    fn call(&mut self, req: Request<String>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16((self.script)(&req, n)).unwrap();
        ready(Ok(Response::builder()
            .status(status)
            .body(String::new())
            .unwrap()))
    }
}

/// A service that always fails with `make()`.
pub struct Erroring<E> {
    pub calls: Arc<AtomicU32>,
    make: Arc<dyn Fn() -> E + Send + Sync>,
}

impl<E> Clone for Erroring<E> {
    fn clone(&self) -> Self {
        Erroring {
            calls: self.calls.clone(),
            make: self.make.clone(),
        }
    }
}

impl<E> Erroring<E> {
    pub fn new(make: impl Fn() -> E + Send + Sync + 'static) -> Self {
        Erroring {
            calls: Arc::new(AtomicU32::new(0)),
            make: Arc::new(make),
        }
    }

    pub fn count(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl<E> Service<Request<String>> for Erroring<E> {
    type Response = Response<String>;
    type Error = E;
    type Future = Ready<Result<Response<String>, E>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<String>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        ready(Err((self.make)()))
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

/// `n` milliseconds.
pub fn ms(n: u64) -> std::time::Duration {
    std::time::Duration::from_millis(n)
}

/// `n` seconds.
pub fn secs(n: u64) -> std::time::Duration {
    std::time::Duration::from_secs(n)
}

/// A body sent in the given chunks, one frame each (a streamed LLM response).
pub struct Chunks(pub std::collections::VecDeque<bytes::Bytes>);

impl Chunks {
    /// `text` cut into frames of `size` bytes (the cuts fall anywhere: mid-line, mid-key).
    pub fn cut(text: &str, size: usize) -> Self {
        let bytes = bytes::Bytes::copy_from_slice(text.as_bytes());
        let mut frames = std::collections::VecDeque::new();
        let mut at = 0;
        while at < bytes.len() {
            let end = (at + size.max(1)).min(bytes.len());
            frames.push_back(bytes.slice(at..end));
            at = end;
        }
        Chunks(frames)
    }
}

impl http_body::Body for Chunks {
    type Data = bytes::Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, io::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

type Reply<B> = Arc<dyn Fn(u32) -> (u16, B) + Send + Sync>;

/// A service that answers attempt `n` of each call (0-based, from the `x-retry-count`
/// header the layer stamps) with `reply(n)`: a status and a body.
pub struct Replies<B> {
    pub calls: Arc<AtomicU32>,
    reply: Reply<B>,
}

impl<B> Clone for Replies<B> {
    fn clone(&self) -> Self {
        Replies {
            calls: self.calls.clone(),
            reply: self.reply.clone(),
        }
    }
}

impl<B> Replies<B> {
    pub fn new(reply: impl Fn(u32) -> (u16, B) + Send + Sync + 'static) -> Self {
        Replies {
            calls: Arc::new(AtomicU32::new(0)),
            reply: Arc::new(reply),
        }
    }

    pub fn count(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl<B, ReqB> Service<Request<ReqB>> for Replies<B> {
    type Response = Response<B>;
    type Error = io::Error;
    type Future = Ready<Result<Response<B>, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let attempt = req
            .headers()
            .get("x-retry-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (status, body) = (self.reply)(attempt);
        let mut res = Response::new(body);
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        ready(Ok(res))
    }
}
