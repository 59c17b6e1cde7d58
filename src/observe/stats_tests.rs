//! Unit tests of the parent module.
use super::*;
use crate::observe::health::{Health, health_of};
use crate::observe::snapshot::Window;

#[test]
fn stats_find_an_entry_keyed_by_method_and_path_by_its_name() {
    let stats = RetryStats::new();
    let key = OpKey::of_method_path(&http::Method::POST, "/v1/messages");
    let handle = stats.handle(key, || "POST /v1/messages".to_owned());
    stats.record_success(&handle, Instant::now(), None);
    // A second handle for the same key finds the entry, and never names it again.
    let again = stats.handle(key, || unreachable!("the entry exists"));
    stats.record_retry(&again, ErrorKind::Overloaded, Duration::from_millis(100), 0);
    assert_eq!(stats.calls("POST /v1/messages"), 1);
    assert_eq!(
        stats
            .kind("POST /v1/messages", ErrorKind::Overloaded)
            .retries,
        1
    );
    assert_eq!(again.name(), "POST /v1/messages");
}

#[test]
fn health_thresholds() {
    let w = |calls, retries, recovered, failed| Window {
        calls,
        retries,
        recovered,
        failed,
    };
    assert_eq!(health_of(&w(0, 0, 0, 0)), Health::Healthy);
    assert_eq!(health_of(&w(100, 4, 4, 0)), Health::Healthy);
    assert_eq!(health_of(&w(100, 5, 5, 0)), Health::UnstableRecovering);
    assert_eq!(health_of(&w(100, 50, 40, 10)), Health::UnstableRecovering);
    assert_eq!(health_of(&w(100, 1, 0, 1)), Health::UnstableRecovering);
    assert_eq!(health_of(&w(100, 30, 5, 5)), Health::Failing);
    assert_eq!(health_of(&w(10, 30, 0, 10)), Health::Failing);
}
