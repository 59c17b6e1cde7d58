//! A guarded call is as visible as a layered one (a `retrying` event per retry, in a
//! `retry_call` span), and a closure that panics leaks no budget slot.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_retry_guard::budget::InFlightCap;
use tower_retry_guard::{Backoff, Budgets, Call, Guard, Jitter, RetryLayer, RetryPolicy};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type Fields = BTreeMap<String, String>;

/// An event: the span it happened in, its fields.
type Seen = (Option<String>, Fields);

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Seen>>>);

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
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() != "tower_retry_guard" {
            return;
        }
        let mut fields = Fields::new();
        event.record(&mut Visitor(&mut fields));
        let span = ctx.event_span(event).map(|s| s.name().to_owned());
        self.0.lock().unwrap().push((span, fields));
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy::builder()
        .max_retries(3)
        .backoff(Backoff::Constant(Duration::from_millis(100)))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn every_retry_is_a_tracing_event_with_operation_attempt_kind_delay_and_key() {
    let capture = Capture::default();
    let _default =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let guard = Guard::new(RetryLayer::new().policy(policy()).budgets(Budgets::none()));
    let call = Call::new("send_email").tool_call("task-1", "call_42");
    guard
        .run(call, |attempt| async move {
            if attempt.number() < 3 {
                Err(io::Error::from(io::ErrorKind::TimedOut))
            } else {
                Ok(())
            }
        })
        .await
        .unwrap();
    let events = capture.0.lock().unwrap().clone();
    let retries: Vec<_> = events
        .iter()
        .filter(|(_, f)| f.get("message").map(String::as_str) == Some("retrying"))
        .collect();
    assert_eq!(retries.len(), 2, "{events:#?}");
    for (i, (span, fields)) in retries.iter().enumerate() {
        assert_eq!(span.as_deref(), Some("retry_call"));
        assert_eq!(fields["operation"], "send_email");
        assert_eq!(fields["attempt"], (i + 2).to_string());
        assert_eq!(fields["error.type"], "timeout");
        assert_eq!(fields["delay_ms"], "100");
        assert_eq!(fields["key"], "tc:6.task-1:7.call_42");
    }
    let recovered = events
        .iter()
        .find(|(_, f)| f.get("outcome").map(String::as_str) == Some("recovered"))
        .expect("a final event");
    assert_eq!(recovered.1["attempts"], "3");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_closure_leaks_no_budget_slot() {
    // A subscriber on this thread too: a thread without one would cache the callsites'
    // interest as "never" for the test above, which runs in parallel.
    let _default =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(Capture::default()));
    // One retry in flight at most, for the whole process.
    let budgets = Budgets::none().in_flight(Some(InFlightCap::new(0.0, 1).unwrap()));
    let guard = Guard::new(RetryLayer::new().policy(policy()).budgets(budgets.clone()));
    let panicking = guard.clone();
    let task = tokio::spawn(async move {
        panicking
            .run(Call::new("tool").read_only(), |attempt| async move {
                if attempt.is_retry() {
                    panic!("the tool panicked during a retry");
                }
                Err::<(), _>(io::Error::from(io::ErrorKind::TimedOut))
            })
            .await
    });
    let joined = task.await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(
        budgets.retries_in_flight(),
        Some(0),
        "the retry's slot is free"
    );
    assert_eq!(
        budgets.active_calls(),
        Some(0),
        "the call is no longer active"
    );

    // The slot is really free: the next call gets its retry.
    let err = guard
        .run(Call::new("tool").read_only(), |_| async {
            Err::<(), _>(io::Error::from(io::ErrorKind::TimedOut))
        })
        .await
        .unwrap_err();
    assert_eq!(err.attempts(), 4);
}
