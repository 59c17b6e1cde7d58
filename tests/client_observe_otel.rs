//! The span tree through the real OpenTelemetry SDK: the `tracing-opentelemetry` bridge
//! feeds an SDK tracer provider whose exporter is the SDK's own in-memory span exporter (no
//! mock). One logical call (`retry_call`, named after its operation) holds one client span
//! per request sent, with the HTTP semantic conventions' attributes, and the retry events.

mod common;

use common::{Scripted, post, send};
use opentelemetry::trace::{SpanKind, Status, TracerProvider as _};
use opentelemetry::{Key, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tower::ServiceBuilder;
use tower_retry_guard::{Budgets, RetryLayer};
use tracing_subscriber::layer::SubscriberExt;

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    let key = Key::from(key.to_owned());
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| &kv.value)
}

fn text(span: &SpanData, key: &str) -> Option<String> {
    attr(span, key).map(|v| v.as_str().into_owned())
}

fn int(span: &SpanData, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Value::I64(n) => Some(*n),
        other => panic!("{key} is not an integer: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_and_its_attempts_form_one_span_tree() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("client_observe_otel")));
    let guard = tracing::subscriber::set_default(subscriber);

    let inner = Scripted::new(|n| if n < 2 { 503 } else { 200 });
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().budgets(Budgets::none()))
        .service(inner.clone());
    let res = send(
        &mut svc,
        post("https://api.example.com/v1/chat/completions"),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(inner.count(), 3);
    drop(guard);
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    // The logical call: one root span, named after its operation.
    let calls: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "POST /v1/chat/completions")
        .collect();
    assert_eq!(calls.len(), 1, "{spans:#?}");
    let call = calls[0];
    assert_eq!(call.span_kind, SpanKind::Internal);
    assert_eq!(text(call, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(
        text(call, "operation").as_deref(),
        Some("POST /v1/chat/completions")
    );

    // Its two retry events, with OpenTelemetry's attribute names.
    let retries: Vec<_> = call
        .events
        .iter()
        .filter(|e| e.name == "retrying")
        .collect();
    assert_eq!(retries.len(), 2, "{:#?}", call.events);
    for event in &retries {
        let error = event
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == "error.type")
            .map(|kv| kv.value.as_str().into_owned());
        assert_eq!(error.as_deref(), Some("overloaded"));
    }

    // One client span per request sent, each a child of the call, in the call's trace.
    let mut attempts: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.parent_span_id == call.span_context.span_id())
        .collect();
    attempts.sort_by_key(|s| s.start_time);
    assert_eq!(attempts.len(), 3, "{spans:#?}");
    assert_eq!(
        spans.len(),
        4,
        "the call and its three attempts: {spans:#?}"
    );
    for (n, attempt) in attempts.iter().enumerate() {
        assert_eq!(
            attempt.span_context.trace_id(),
            call.span_context.trace_id()
        );
        assert_eq!(attempt.name, "POST");
        assert_eq!(attempt.span_kind, SpanKind::Client);
        assert_eq!(
            text(attempt, "http.request.method").as_deref(),
            Some("POST")
        );
        assert_eq!(
            text(attempt, "server.address").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(int(attempt, "server.port"), Some(443));
        // Absent on the first attempt, as the semantic conventions ask.
        assert_eq!(
            int(attempt, "http.request.resend_count"),
            [None, Some(1), Some(2)][n]
        );
        assert_eq!(
            int(attempt, "http.response.status_code"),
            Some([503, 503, 200][n])
        );
        let failed = n < 2;
        assert_eq!(
            text(attempt, "error.type").as_deref(),
            failed.then_some("overloaded")
        );
        if failed {
            assert!(
                matches!(attempt.status, Status::Error { .. }),
                "{:?}",
                attempt.status
            );
        } else {
            assert_eq!(attempt.status, Status::Unset);
        }
    }
    // The attempts do not overlap: each ends before the next starts.
    for pair in attempts.windows(2) {
        assert!(pair[0].end_time <= pair[1].start_time);
    }
}
