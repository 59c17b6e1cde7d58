//! gRPC through the retry layer: a real tonic server on 127.0.0.1 and a real tonic client
//! over a real `Channel`. The service is hand-written (a bytes codec, no protobuf codegen);
//! each call answers from a script, and the server records what each attempt carried.
//!
//! Waits are real but in milliseconds (a pushback of 20 ms, backoff of 1 ms); no test asserts
//! a wall-clock duration.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::transport::{Channel, Server};
use tonic::{Code, Status};
use tower::{BoxError, Service, ServiceBuilder};
use tower_retry_guard::body::BufferRequestBodyLayer;
use tower_retry_guard::body::BufferedBody;
use tower_retry_guard::classify::Grpc;
use tower_retry_guard::request::HeaderNames;
use tower_retry_guard::{
    Backoff, CallOutcome, ErrorKind, Jitter, RetryInfo, RetryLayer, RetryPolicy, RetryStats,
};

// ---- a bytes codec: the message is its bytes -------------------------------------------

#[derive(Debug, Clone, Copy, Default)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;
    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

// ---- the server ------------------------------------------------------------------------

/// What one attempt carried, as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    previous_attempts: Option<String>,
    key: Option<String>,
    message: Bytes,
}

type Script = Arc<dyn Fn(usize) -> Result<Bytes, Status> + Send + Sync>;

/// A unary service `test.Echo/Call` (and `test.Echo/Get`): attempt `n` answers `script(n)`.
#[derive(Clone)]
struct Echo {
    script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let echo = self.clone();
        Box::pin(async move {
            let handler = tower::service_fn(move |req: tonic::Request<Bytes>| {
                let text = |name: &str| {
                    req.metadata()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let seen = Seen {
                    previous_attempts: text("grpc-previous-rpc-attempts"),
                    key: text("idempotency-key"),
                    message: req.get_ref().clone(),
                };
                let attempt = {
                    let mut log = echo.seen.lock().unwrap();
                    log.push(seen);
                    log.len() - 1
                };
                let answer = (echo.script)(attempt).map(tonic::Response::new);
                std::future::ready(answer)
            });
            Ok(tonic::server::Grpc::new(BytesCodec)
                .unary(handler, request)
                .await)
        })
    }
}

/// Serves `script` on 127.0.0.1 and returns a connected channel and the server's log.
async fn serve(
    script: impl Fn(usize) -> Result<Bytes, Status> + Send + Sync + 'static,
) -> (Channel, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let echo = Echo {
        script: Arc::new(script),
        seen: seen.clone(),
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        Server::builder()
            .add_service(echo)
            .serve_with_incoming(incoming),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, seen)
}

fn status(code: Code, pushback: Option<&'static str>) -> Status {
    let mut metadata = MetadataMap::new();
    if let Some(ms) = pushback {
        metadata.insert("grpc-retry-pushback-ms", ms.parse().unwrap());
    }
    Status::with_metadata(code, "scripted", metadata)
}

// ---- the client stack, as the docs show it ---------------------------------------------

fn retry() -> RetryLayer<Grpc> {
    let policy = RetryPolicy::builder()
        .max_retries(4) // A6: at most 5 attempts
        .max_total_time(Duration::from_secs(5))
        .backoff(Backoff::exponential(
            Duration::from_millis(1),
            2.0,
            Duration::from_millis(4),
        ))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    RetryLayer::new()
        .classify(Grpc::new())
        .header_names(HeaderNames::grpc())
        .policy(policy)
}

type Client = tonic::client::Grpc<
    tower::util::BoxCloneService<http::Request<Body>, http::Response<Body>, BoxError>,
>;

fn grpc_client(channel: Channel, retry: RetryLayer<Grpc>, buffer_limit: usize) -> Client {
    let stack = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new(buffer_limit))
        .layer(retry)
        .map_request(|req: http::Request<BufferedBody<Body>>| req.map(Body::new))
        .map_err(BoxError::from)
        .service(channel);
    tonic::client::Grpc::new(tower::util::BoxCloneService::new(stack))
}

async fn call(
    client: &mut Client,
    path: &'static str,
    message: &'static [u8],
) -> Result<tonic::Response<Bytes>, Status> {
    client
        .ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    client
        .unary(
            tonic::Request::new(Bytes::from_static(message)),
            PathAndQuery::from_static(path),
            BytesCodec,
        )
        .await
}

const CALL: &str = "/test.Echo/Call";

// ---- the behaviours --------------------------------------------------------------------

#[tokio::test]
async fn unavailable_with_pushback_is_retried_with_the_attempts_header() {
    let (channel, seen) = serve(|attempt| match attempt {
        0 => Err(status(Code::Unavailable, Some("20"))),
        _ => Ok(Bytes::from_static(b"pong")),
    })
    .await;
    let retry = retry();
    let stats = retry.stats();
    let mut client = grpc_client(channel, retry, 64 * 1024);

    let response = call(&mut client, CALL, b"ping").await.unwrap();
    assert_eq!(response.get_ref(), &Bytes::from_static(b"pong"));

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one retry: {seen:?}");
    // A6: absent on the first attempt, the number of earlier attempts on a retry.
    assert_eq!(seen[0].previous_attempts, None);
    assert_eq!(seen[1].previous_attempts.as_deref(), Some("1"));
    // The buffered request message went out again, byte for byte, with the same key.
    assert_eq!(seen[1].message, Bytes::from_static(b"ping"));
    assert!(seen[0].key.is_some());
    assert_eq!(seen[0].key, seen[1].key);

    // The call's account travels in the tonic response's extensions.
    let info = response.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.attempts, 2);
    assert_eq!(info.outcome, CallOutcome::Recovered);
    assert_eq!(info.last_error, Some(ErrorKind::Overloaded));
    // The pushback is a floor of the wait (the backoff alone is 1 ms).
    assert!(info.total_delay >= Duration::from_millis(20), "{info:?}");
    assert_eq!(
        stats
            .kind("POST /test.Echo/Call", ErrorKind::Overloaded)
            .retries,
        1
    );
}

#[tokio::test]
async fn invalid_argument_is_not_retried() {
    let (channel, seen) = serve(|_| Err(status(Code::InvalidArgument, None))).await;
    let mut client = grpc_client(channel, retry(), 64 * 1024);

    let error = call(&mut client, CALL, b"ping").await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn negative_pushback_stops_the_retries() {
    let (channel, seen) = serve(|_| Err(status(Code::Unavailable, Some("-1")))).await;
    let mut client = grpc_client(channel, retry(), 64 * 1024);

    let error = call(&mut client, CALL, b"ping").await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn resource_exhausted_is_retried_only_with_a_pushback() {
    let (channel, seen) = serve(|_| Err(status(Code::ResourceExhausted, None))).await;
    let mut client = grpc_client(channel, retry(), 64 * 1024);
    let error = call(&mut client, CALL, b"ping").await.unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert_eq!(seen.lock().unwrap().len(), 1, "a quota does not come back");

    let (channel, seen) = serve(|attempt| match attempt {
        0 => Err(status(Code::ResourceExhausted, Some("5"))),
        _ => Ok(Bytes::from_static(b"pong")),
    })
    .await;
    let mut client = grpc_client(channel, retry(), 64 * 1024);
    call(&mut client, CALL, b"ping").await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn unavailable_is_retried_at_most_five_attempts() {
    let (channel, seen) = serve(|_| Err(status(Code::Unavailable, None))).await;
    let mut client = grpc_client(channel, retry(), 64 * 1024);

    let error = call(&mut client, CALL, b"ping").await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    let seen = seen.lock().unwrap().clone();
    let previous: Vec<_> = seen.iter().map(|s| s.previous_attempts.clone()).collect();
    let expected: Vec<Option<String>> = vec![
        None,
        Some("1".into()),
        Some("2".into()),
        Some("3".into()),
        Some("4".into()),
    ];
    assert_eq!(previous, expected);
}

#[tokio::test]
async fn a_request_over_the_buffer_limit_is_sent_once() {
    let (channel, seen) = serve(|_| Err(status(Code::Unavailable, Some("1")))).await;
    // The encoded message (5 bytes of framing + 64) is over an 16-byte limit.
    let mut client = grpc_client(channel, retry(), 16);

    let error = call(&mut client, CALL, &[b'x'; 64]).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "not replayable, so not retried");
    assert_eq!(seen[0].message.len(), 64, "and sent whole");
}

#[tokio::test]
async fn without_keys_only_the_methods_marked_idempotent_are_retried() {
    let (channel, seen) = serve(|attempt| match attempt {
        0 | 2 => Err(status(Code::Unavailable, Some("1"))),
        _ => Ok(Bytes::from_static(b"pong")),
    })
    .await;
    let retry = retry()
        .side_effect_fn(Grpc::idempotent_methods(["/test.Echo/Get"]))
        .idempotency_keys(false);
    let mut client = grpc_client(channel, retry, 64 * 1024);

    // Marked: retried, and no key is needed (or sent).
    call(&mut client, "/test.Echo/Get", b"a").await.unwrap();
    // Not marked: a POST without a key, not retried.
    let error = call(&mut client, CALL, b"b").await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|s| s.key.is_none()));
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_reported() {
    // A port nobody listens on (bound, then closed).
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let stats = RetryStats::new();
    let mut client = grpc_client(channel, retry().with_stats(stats.clone()), 64 * 1024);

    let error = call(&mut client, CALL, b"ping").await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    let connect = stats.kind("POST /test.Echo/Call", ErrorKind::Connect);
    assert_eq!(connect.retries, 4, "{stats}");
}
