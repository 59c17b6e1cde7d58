//! Feature `metrics`: the stats are also exported through the `metrics` facade.
#![cfg(feature = "metrics")]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Scripted, get, send};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceBuilder;
use tower_retry_guard::{Budgets, RetryInfo, RetryLayer};

type Labels = Vec<(String, String)>;

/// Runs `f` on a paused current-thread runtime with a local debugging recorder, and returns
/// its output and every metric recorded, by name and sorted labels.
fn recorded<T>(
    f: impl std::future::Future<Output = T>,
) -> (T, BTreeMap<(String, Labels), DebugValue>) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let out = metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(f)
    });
    let metrics = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((key.name().to_owned(), labels), value)
        })
        .collect();
    (out, metrics)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    let mut l: Labels = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    l
}

fn counter(m: &BTreeMap<(String, Labels), DebugValue>, name: &str, l: &[(&str, &str)]) -> u64 {
    match m.get(&(name.to_owned(), labels(l))) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name} {l:?}: {other:?} in {m:#?}"),
    }
}

#[test]
fn attempts_calls_and_delays_are_recorded() {
    let (total_delay, m) = recorded(async {
        let mut svc = ServiceBuilder::new()
            .layer(RetryLayer::new().budgets(Budgets::none()))
            .service(Scripted::per_call(|path, attempt| match path {
                "/flaky" if attempt == 0 => 503,
                "/down" => 500,
                _ => 200,
            }));
        let mut total = Duration::ZERO;
        for path in ["/flaky", "/flaky", "/down", "/ok"] {
            let res = send(&mut svc, get(path)).await.unwrap();
            total += res.extensions().get::<RetryInfo>().unwrap().total_delay;
        }
        total
    });

    let attempts = "retry_attempts_total";
    assert_eq!(
        counter(
            &m,
            attempts,
            &[("operation", "GET /flaky"), ("error_kind", "overloaded")]
        ),
        2
    );
    assert_eq!(
        counter(
            &m,
            attempts,
            &[("operation", "GET /down"), ("error_kind", "server_error")]
        ),
        3
    );

    let calls = "retry_calls_total";
    assert_eq!(
        counter(
            &m,
            calls,
            &[("operation", "GET /flaky"), ("outcome", "recovered")]
        ),
        2
    );
    assert_eq!(
        counter(
            &m,
            calls,
            &[("operation", "GET /down"), ("outcome", "exhausted")]
        ),
        1
    );
    assert_eq!(
        counter(
            &m,
            calls,
            &[("operation", "GET /ok"), ("outcome", "succeeded")]
        ),
        1
    );
    assert!(
        !m.keys().any(
            |(name, l)| name == attempts && l.contains(&("operation".into(), "GET /ok".into()))
        ),
        "no retry, no attempt counted"
    );

    let mut delays = Vec::new();
    for op in ["GET /flaky", "GET /down"] {
        match m.get(&(
            "retry_delay_seconds".to_owned(),
            labels(&[("operation", op)]),
        )) {
            Some(DebugValue::Histogram(values)) => delays.extend(values.iter().map(|v| v.0)),
            other => panic!("retry_delay_seconds {op}: {other:?}"),
        }
    }
    assert_eq!(delays.len(), 5, "one delay per retry");
    assert!(delays.iter().all(|d| *d > 0.0 && *d < 10.0), "{delays:?}");
    let sum: f64 = delays.iter().sum();
    assert!(
        (sum - total_delay.as_secs_f64()).abs() < 1e-6,
        "histogram {sum} s, RetryInfo {total_delay:?}"
    );
}
