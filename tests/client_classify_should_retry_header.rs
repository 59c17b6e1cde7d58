//! `x-should-retry` is read regardless of case and surrounding whitespace.

use http::{HeaderMap, HeaderValue, StatusCode};
use tower_retry_guard::{ErrorKind, LlmHttp, Outcome};

fn classify(status: u16, value: &'static str) -> Outcome {
    let mut headers = HeaderMap::new();
    headers.insert("x-should-retry", HeaderValue::from_static(value));
    LlmHttp::classify_parts(StatusCode::from_u16(status).unwrap(), &headers)
}

#[test]
fn x_should_retry_is_case_insensitive() {
    for value in ["TRUE", "True", " true "] {
        assert!(
            matches!(classify(400, value), Outcome::Retry { .. }),
            "{value:?} on a 400"
        );
    }
    for value in ["FALSE", "False", "false "] {
        assert_eq!(
            classify(503, value),
            Outcome::Fail {
                kind: ErrorKind::Overloaded
            },
            "{value:?} on a 503"
        );
    }
    // Anything else leaves the status table in charge.
    assert_eq!(
        classify(400, "yes"),
        Outcome::Fail {
            kind: ErrorKind::ClientError
        }
    );
}
