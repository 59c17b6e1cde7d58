//! Feature `metrics`: the stats are also exported through the `metrics` facade, under the
//! crate's prefix, with HELP text and units; `attempts` counts every request sent, by
//! `attempt_type` (`original` / `retry`).
#![cfg(feature = "metrics")]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Scripted, get, send};
use metrics::Unit;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceBuilder;
use tower_retry_guard::observe::metrics as names;
use tower_retry_guard::{Budgets, RetryInfo, RetryLayer};

type Labels = Vec<(String, String)>;
type Described = BTreeMap<String, (Option<Unit>, Option<String>)>;

/// Runs `f` on a paused current-thread runtime with a local debugging recorder, and returns
/// its output, every metric recorded, by name and sorted labels, and each name's unit and
/// description.
fn recorded<T>(
    f: impl std::future::Future<Output = T>,
) -> (T, BTreeMap<(String, Labels), DebugValue>, Described) {
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
    let mut described = Described::new();
    let metrics = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, unit, description, value)| {
            described.insert(
                key.key().name().to_owned(),
                (unit, description.map(|d| d.to_string())),
            );
            let key = key.key();
            let mut labels: Labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((key.name().to_owned(), labels), value)
        })
        .collect();
    (out, metrics, described)
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
    let (total_delay, m, described) = recorded(async {
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

    // Every request sent, first attempts included (was `retry_attempts_total`, which
    // counted retries only).
    let attempts = "tower_retry_guard_attempts_total";
    assert_eq!(names::ATTEMPTS, attempts);
    for (op, original, retries) in [("GET /flaky", 2, 2), ("GET /down", 1, 3), ("GET /ok", 1, 0)] {
        let count = |t| counter(&m, attempts, &[("operation", op), ("attempt_type", t)]);
        assert_eq!(count("original"), original, "{op}");
        if retries > 0 {
            assert_eq!(count("retry"), retries, "{op}");
        }
    }
    assert!(
        !m.keys().any(|(name, l)| name == attempts
            && l.contains(&("operation".into(), "GET /ok".into()))
            && l.contains(&("attempt_type".into(), "retry".into()))),
        "no retry, no retry attempt counted"
    );

    // Retries by the failure that caused them (the old counter's `error_kind` breakdown).
    let retries = "tower_retry_guard_retries_total";
    assert_eq!(
        counter(
            &m,
            retries,
            &[("operation", "GET /flaky"), ("error_type", "overloaded")]
        ),
        2
    );
    assert_eq!(
        counter(
            &m,
            retries,
            &[("operation", "GET /down"), ("error_type", "server_error")]
        ),
        3
    );

    let calls = "tower_retry_guard_calls_total";
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

    let delay = "tower_retry_guard_retry_delay_seconds";
    let mut delays = Vec::new();
    for op in ["GET /flaky", "GET /down"] {
        match m.get(&(delay.to_owned(), labels(&[("operation", op)]))) {
            Some(DebugValue::Histogram(values)) => delays.extend(values.iter().map(|v| v.0)),
            other => panic!("{delay} {op}: {other:?}"),
        }
    }
    assert_eq!(delays.len(), 5, "one delay per retry");
    assert!(delays.iter().all(|d| *d > 0.0 && *d < 10.0), "{delays:?}");
    let sum: f64 = delays.iter().sum();
    assert!(
        (sum - total_delay.as_secs_f64()).abs() < 1e-6,
        "histogram {sum} s, RetryInfo {total_delay:?}"
    );

    // HELP text and units, described when the layer's stats were made.
    for (name, unit) in [
        (attempts, Unit::Count),
        (retries, Unit::Count),
        (calls, Unit::Count),
        (delay, Unit::Seconds),
    ] {
        let (u, help) = &described[name];
        assert_eq!(u.as_ref(), Some(&unit), "{name}");
        assert!(help.as_ref().is_some_and(|h| !h.is_empty()), "{name}");
    }
    // Every name carries the crate's prefix.
    assert!(
        m.keys()
            .all(|(name, _)| name.starts_with("tower_retry_guard_")),
        "{:?}",
        m.keys()
    );
}
