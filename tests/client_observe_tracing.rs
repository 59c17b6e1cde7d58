//! Rule 6, "Visible": every retry is a tracing event with operation, attempt, error type,
//! delay and key; the call runs in a `retry_call` span, each request it sends in a
//! `retry_attempt` span under it (OpenTelemetry's HTTP client attributes); the final
//! outcome is an event. (`client_observe_otel.rs` checks the same tree through the
//! OpenTelemetry SDK.)

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Scripted, get, post, send};
use tower::ServiceBuilder;
use tower_retry_guard::budget::Limit;
use tower_retry_guard::{Budgets, Operation, RetryInfo, RetryLayer, RetryPolicy, StopReason};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type Fields = BTreeMap<String, String>;

#[derive(Debug, Clone)]
struct Ev {
    level: Level,
    /// The name of the span the event happened in.
    span: Option<String>,
    fields: Fields,
}

impl Ev {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    fn field(&self, name: &str) -> &str {
        self.get(name)
            .unwrap_or_else(|| panic!("no field `{name}` in {self:?}"))
    }

    fn num(&self, name: &str) -> u64 {
        self.field(name)
            .parse()
            .unwrap_or_else(|_| panic!("field `{name}` is not a number in {self:?}"))
    }
}

#[derive(Debug, Clone)]
struct Sp {
    id: u64,
    parent: Option<u64>,
    name: String,
    fields: Fields,
}

/// Records the crate's events and spans with their fields.
#[derive(Clone, Default)]
struct Capture {
    events: Arc<Mutex<Vec<Ev>>>,
    spans: Arc<Mutex<Vec<Sp>>>,
}

impl Capture {
    fn events(&self) -> Vec<Ev> {
        self.events.lock().unwrap().clone()
    }

    fn spans(&self, name: &str) -> Vec<Sp> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    fn retries(&self) -> Vec<Ev> {
        self.events()
            .into_iter()
            .filter(|e| e.get("message") == Some("retrying"))
            .collect()
    }

    /// The events that carry an `outcome` field: the final event of a call.
    fn finals(&self) -> Vec<Ev> {
        self.events()
            .into_iter()
            .filter(|e| e.get("outcome").is_some())
            .collect()
    }
}

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
}

const TARGET: &str = "tower_retry_guard";

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().target() != TARGET {
            return;
        }
        let mut fields = Fields::new();
        attrs.record(&mut Visitor(&mut fields));
        let parent = ctx
            .span(id)
            .and_then(|s| s.parent())
            .map(|p| p.id().into_u64());
        self.spans.lock().unwrap().push(Sp {
            id: id.into_u64(),
            parent,
            name: attrs.metadata().name().to_owned(),
            fields,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut spans = self.spans.lock().unwrap();
        if let Some(span) = spans.iter_mut().rev().find(|s| s.id == id.into_u64()) {
            values.record(&mut Visitor(&mut span.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut fields = Fields::new();
        event.record(&mut Visitor(&mut fields));
        self.events.lock().unwrap().push(Ev {
            level: *event.metadata().level(),
            span: ctx.event_span(event).map(|s| s.name().to_owned()),
            fields,
        });
    }
}

/// Captures on this thread (the tests run on tokio's current-thread runtime).
fn capture() -> (Capture, tracing::subscriber::DefaultGuard) {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let guard = tracing::subscriber::set_default(subscriber);
    (capture, guard)
}

fn no_budgets() -> RetryLayer {
    RetryLayer::new().budgets(Budgets::none())
}

#[tokio::test(start_paused = true)]
async fn retry_events_of_a_keyed_post_then_recovered() {
    let (cap, _guard) = capture();
    let inner = Scripted::new(|n| if n < 2 { 503 } else { 200 });
    let mut svc = ServiceBuilder::new()
        .layer(no_budgets())
        .service(inner.clone());
    let res = send(
        &mut svc,
        post("https://api.example.com/v1/chat/completions"),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(inner.count(), 3);
    let info = res.extensions().get::<RetryInfo>().unwrap().clone();
    let key = info
        .key
        .as_ref()
        .expect("a POST gets a minted key")
        .as_str();

    let retries = cap.retries();
    assert_eq!(retries.len(), 2, "{retries:#?}");
    let mut delay_sum = 0;
    for (i, ev) in retries.iter().enumerate() {
        let retry = i as u64 + 1;
        assert_eq!(ev.level, Level::WARN);
        assert_eq!(ev.span.as_deref(), Some("retry_call"));
        assert_eq!(ev.field("operation"), "POST /v1/chat/completions");
        assert_eq!(ev.num("attempt"), retry + 1);
        assert_eq!(ev.num("retry"), retry);
        // Renamed from `error_kind`; the resend count is on the attempt's span now.
        assert_eq!(ev.field("error.type"), "overloaded");
        assert!(ev.get("http.request.resend_count").is_none(), "{ev:?}");
        assert_eq!(ev.num("retries_left"), 3 - retry);
        assert_eq!(ev.field("key"), key);
        let delay = ev.num("delay_ms");
        assert!((1..=10_000).contains(&delay), "delay {delay}");
        let time_left = ev.num("time_left_ms");
        assert!(
            time_left < 10_000 && time_left > 8_000,
            "time left {time_left}"
        );
        delay_sum += delay;
    }
    // The second delay is computed later, from a smaller remaining time.
    assert!(retries[1].num("time_left_ms") < retries[0].num("time_left_ms"));
    let total = info.total_delay.as_millis() as u64;
    assert!(
        delay_sum <= total && total <= delay_sum + 2,
        "events say {delay_sum} ms, info says {total} ms"
    );

    let finals = cap.finals();
    assert_eq!(finals.len(), 1, "{finals:#?}");
    let done = &finals[0];
    assert_eq!(done.level, Level::INFO);
    assert_eq!(done.field("outcome"), "recovered");
    assert_eq!(done.num("attempts"), 3);
    assert_eq!(done.field("operation"), "POST /v1/chat/completions");
    assert_eq!(done.span.as_deref(), Some("retry_call"));

    let spans = cap.spans("retry_call");
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let call = &spans[0];
    let span = &call.fields;
    assert_eq!(span["operation"], "POST /v1/chat/completions");
    assert_eq!(span["otel.name"], "POST /v1/chat/completions");
    assert_eq!(span["http.request.method"], "POST");
    assert_eq!(span["side_effect"], "side_effecting");
    assert_eq!(span["key"], key);

    // One span per request sent, children of the call's span.
    let attempts = cap.spans("retry_attempt");
    assert_eq!(attempts.len(), 3, "{attempts:#?}");
    for (n, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt.parent, Some(call.id), "{attempt:?}");
        let f = &attempt.fields;
        assert_eq!(f["otel.name"], "POST");
        assert_eq!(f["otel.kind"], "client");
        assert_eq!(f["http.request.method"], "POST");
        assert_eq!(f["server.address"], "api.example.com");
        assert_eq!(f["server.port"], "443");
        // Absent on the first attempt (the semantic conventions), 1 and 2 on the retries.
        assert_eq!(
            f.get("http.request.resend_count").map(String::as_str),
            [None, Some("1"), Some("2")][n]
        );
        let status = ["503", "503", "200"][n];
        assert_eq!(f["http.response.status_code"], status);
        let error = [Some("overloaded"), Some("overloaded"), None][n];
        assert_eq!(f.get("error.type").map(String::as_str), error, "{f:?}");
        let otel_status = [Some("error"), Some("error"), None][n];
        assert_eq!(f.get("otel.status_code").map(String::as_str), otel_status);
    }
}

#[tokio::test(start_paused = true)]
async fn first_try_success_is_quiet_and_get_has_no_key() {
    let (cap, _guard) = capture();
    let mut svc = ServiceBuilder::new()
        .layer(no_budgets())
        .service(Scripted::always(200));
    let mut req = get("/v1/models");
    req.extensions_mut()
        .insert(Operation::from_static("list_models"));
    send(&mut svc, req).await.unwrap();
    let loud: Vec<Ev> = cap
        .events()
        .into_iter()
        .filter(|e| e.level <= Level::INFO)
        .collect();
    assert!(
        loud.is_empty(),
        "a first-try success logs nothing: {loud:#?}"
    );
    let spans = cap.spans("retry_call");
    assert_eq!(spans.len(), 1);
    let span = &spans[0].fields;
    assert_eq!(span["operation"], "list_models");
    assert_eq!(span["http.request.method"], "GET");
    assert_eq!(span["side_effect"], "read_only");
    assert!(!span.contains_key("key"), "a GET has no key: {span:?}");
    // One attempt: no resend count; a path-only URI: no server.
    let attempts = cap.spans("retry_attempt");
    assert_eq!(attempts.len(), 1);
    let f = &attempts[0].fields;
    assert_eq!(attempts[0].parent, Some(spans[0].id));
    assert_eq!(f["http.response.status_code"], "200");
    for absent in ["http.request.resend_count", "error.type", "server.address"] {
        assert!(!f.contains_key(absent), "{absent}: {f:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn exhausted_is_a_warning_with_attempts_and_kind() {
    let (cap, _guard) = capture();
    let mut svc = ServiceBuilder::new()
        .layer(no_budgets())
        .service(Scripted::always(503));
    let res = send(&mut svc, get("/v1/models")).await.unwrap();
    assert_eq!(res.status(), 503);
    let retries = cap.retries();
    assert_eq!(retries.len(), 3);
    assert!(retries.iter().all(|e| e.get("key").is_none()));
    assert_eq!(
        retries
            .iter()
            .map(|e| e.num("retries_left"))
            .collect::<Vec<_>>(),
        [2, 1, 0]
    );
    let finals = cap.finals();
    assert_eq!(finals.len(), 1, "{finals:#?}");
    let done = &finals[0];
    assert_eq!(done.level, Level::WARN);
    assert_eq!(done.field("outcome"), "exhausted");
    assert_eq!(done.num("attempts"), 4);
    assert_eq!(done.field("error.type"), "overloaded");
    assert_eq!(done.field("operation"), "GET /v1/models");
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(
        done.num("total_delay_ms"),
        info.total_delay.as_millis() as u64
    );
}

#[tokio::test(start_paused = true)]
async fn budget_denial_is_a_warning() {
    let (cap, _guard) = capture();
    let budgets = Budgets::none().per_task(Some(Limit::Count {
        max: 1,
        ttl: Duration::from_secs(60),
    }));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().budgets(budgets))
        .service(Scripted::always(500));
    let mut req = get("/v1/models");
    req.headers_mut()
        .insert("x-task-id", "task-7".parse().unwrap());
    let res = send(&mut svc, req).await.unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(cap.retries().len(), 1, "one retry is granted");
    let finals = cap.finals();
    assert_eq!(finals.len(), 1, "{finals:#?}");
    assert_eq!(finals[0].level, Level::WARN);
    assert_eq!(finals[0].field("outcome"), "budget");
    assert_eq!(finals[0].field("error.type"), "server_error");
    assert_eq!(finals[0].num("attempts"), 2);
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert!(matches!(
        &info.outcome,
        tower_retry_guard::CallOutcome::Stopped(StopReason::Budget { key: Some(k), .. }) if k == "task-7"
    ));
}

#[tokio::test(start_paused = true)]
async fn side_effect_without_key_is_a_warning_and_never_retried() {
    let (cap, _guard) = capture();
    let inner = Scripted::always(503);
    let mut svc = ServiceBuilder::new()
        .layer(no_budgets().idempotency_keys(false))
        .service(inner.clone());
    let res = send(&mut svc, post("/v1/emails")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(inner.count(), 1);
    assert!(cap.retries().is_empty());
    let finals = cap.finals();
    assert_eq!(finals.len(), 1, "{finals:#?}");
    assert_eq!(finals[0].level, Level::WARN);
    assert_eq!(finals[0].field("outcome"), "side_effect_without_key");
    assert_eq!(finals[0].field("operation"), "POST /v1/emails");
    let span = &cap.spans("retry_call")[0].fields;
    assert_eq!(span["side_effect"], "side_effecting");
    assert!(!span.contains_key("key"));
}

#[tokio::test(start_paused = true)]
async fn stop_on_the_first_attempt_names_the_operation() {
    // With retries off, the call ends on its first failure: the warning must still name the
    // operation, not a placeholder.
    let (cap, _guard) = capture();
    let policy = RetryPolicy::builder().max_retries(0).build().unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(no_budgets().policy(policy))
        .service(Scripted::always(503));
    let res = send(&mut svc, get("/v1/models")).await.unwrap();
    assert_eq!(res.status(), 503);
    let finals = cap.finals();
    assert_eq!(finals.len(), 1, "{finals:#?}");
    assert_eq!(finals[0].field("outcome"), "exhausted");
    assert_eq!(finals[0].field("operation"), "GET /v1/models");
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(
        info.operation.as_ref().map(|o| o.as_str()),
        Some("GET /v1/models")
    );
}

#[tokio::test(start_paused = true)]
async fn an_error_attempt_has_no_status_and_a_hung_one_ends_as_a_timeout() {
    // The first attempt fails to connect (no response: no status code); the retry hangs
    // until the call's deadline drops it: its span ends with `error.type` = `timeout`.
    let (cap, _guard) = capture();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let inner = tower::service_fn(move |_req: http::Request<String>| {
        let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
            }
            std::future::pending::<()>().await;
            Ok(http::Response::new(String::new()))
        }
    });
    let policy = RetryPolicy::builder()
        .max_total_time(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(no_budgets().policy(policy))
        .service(inner);
    let err = send(&mut svc, get("http://127.0.0.1:8080/v1/models"))
        .await
        .unwrap_err();
    assert!(matches!(err.reason(), StopReason::Deadline { .. }), "{err}");

    let call = &cap.spans("retry_call")[0];
    let attempts = cap.spans("retry_attempt");
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert!(attempts.iter().all(|a| a.parent == Some(call.id)));
    let (first, retry) = (&attempts[0].fields, &attempts[1].fields);
    assert_eq!(first["server.address"], "127.0.0.1");
    assert_eq!(first["server.port"], "8080");
    assert_eq!(first["error.type"], "connect");
    assert!(
        !first.contains_key("http.response.status_code"),
        "{first:?}"
    );
    assert_eq!(retry["http.request.resend_count"], "1");
    assert_eq!(retry["error.type"], "timeout");
    assert_eq!(retry["otel.status_code"], "error");
    assert!(
        !retry.contains_key("http.response.status_code"),
        "{retry:?}"
    );
}
