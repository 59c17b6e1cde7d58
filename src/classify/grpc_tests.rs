//! Unit tests of the gRPC classifier: codes, pushback values, HTTP statuses, methods.

use super::*;

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, http::HeaderValue::from_static(value));
    }
    map
}

fn classify(pairs: &[(&'static str, &'static str)]) -> Outcome {
    Grpc::new().classify_parts(StatusCode::OK, &headers(pairs))
}

#[test]
fn pushback_values() {
    let p = |v: &'static str| pushback(&headers(&[("grpc-retry-pushback-ms", v)]));
    assert_eq!(p("20"), Pushback::After(Duration::from_millis(20)));
    assert_eq!(p(" 0 "), Pushback::After(Duration::ZERO));
    assert_eq!(p("-1"), Pushback::Stop);
    assert_eq!(p("+5"), Pushback::Stop);
    assert_eq!(p("1.5"), Pushback::Stop);
    assert_eq!(p(""), Pushback::Stop);
    assert_eq!(p("abc"), Pushback::Stop);
    assert_eq!(p("99999999999999999999999"), Pushback::After(Duration::MAX));
    assert_eq!(pushback(&headers(&[])), Pushback::Absent);
    let two = headers(&[
        ("grpc-retry-pushback-ms", "1"),
        ("grpc-retry-pushback-ms", "2"),
    ]);
    assert_eq!(pushback(&two), Pushback::Stop);
}

#[test]
fn codes_from_headers() {
    assert_eq!(classify(&[]), Outcome::Success);
    assert_eq!(classify(&[("grpc-status", "0")]), Outcome::Success);
    assert_eq!(
        classify(&[("grpc-status", "14")]),
        Outcome::retry(ErrorKind::Overloaded)
    );
    assert_eq!(
        classify(&[("grpc-status", "3")]),
        Outcome::Fail {
            kind: ErrorKind::ClientError
        }
    );
    assert_eq!(
        classify(&[("grpc-status", "x")]),
        Outcome::Fail {
            kind: ErrorKind::ServerError
        }
    );
    assert_eq!(
        classify(&[("grpc-status", "99999999999999")]),
        Outcome::Fail {
            kind: ErrorKind::ServerError
        }
    );
    assert_eq!(
        classify(&[("grpc-status", "14"), ("grpc-retry-pushback-ms", "-1")]),
        Outcome::Fail {
            kind: ErrorKind::Overloaded
        }
    );
}

#[test]
fn resource_exhausted_needs_a_pushback() {
    assert_eq!(
        classify(&[("grpc-status", "8")]),
        Outcome::Fail {
            kind: ErrorKind::QuotaExhausted
        }
    );
    assert_eq!(
        classify(&[("grpc-status", "8"), ("grpc-retry-pushback-ms", "250")]),
        Outcome::Retry {
            kind: ErrorKind::RateLimited,
            after: Some(Duration::from_millis(250))
        }
    );
    assert_eq!(
        classify(&[
            ("grpc-status", "8"),
            ("grpc-retry-pushback-ms", "250"),
            ("grpc-message", "insufficient_quota"),
        ]),
        Outcome::Fail {
            kind: ErrorKind::QuotaExhausted
        }
    );
}

#[test]
fn deadline_exceeded_is_opt_in() {
    let h = headers(&[("grpc-status", "4")]);
    assert_eq!(
        Grpc::new().classify_parts(StatusCode::OK, &h),
        Outcome::Fail {
            kind: ErrorKind::Timeout
        }
    );
    assert_eq!(
        Grpc::new()
            .retry_deadline_exceeded(true)
            .classify_parts(StatusCode::OK, &h),
        Outcome::retry(ErrorKind::Timeout)
    );
}

#[test]
fn http_statuses_map_as_grpc_does() {
    let g = Grpc::new();
    let status = |s: u16| StatusCode::from_u16(s).unwrap_or(StatusCode::OK);
    let none = HeaderMap::new();
    assert_eq!(
        g.classify_parts(status(503), &none),
        Outcome::retry(ErrorKind::Overloaded)
    );
    assert_eq!(
        g.classify_parts(status(429), &headers(&[("retry-after", "2")])),
        Outcome::Retry {
            kind: ErrorKind::RateLimited,
            after: Some(Duration::from_secs(2))
        }
    );
    assert_eq!(
        g.classify_parts(status(500), &none),
        Outcome::Fail {
            kind: ErrorKind::ServerError
        }
    );
    assert_eq!(
        g.classify_parts(status(404), &none),
        Outcome::Fail {
            kind: ErrorKind::ClientError
        }
    );
    // The gRPC status wins over the HTTP one.
    assert_eq!(
        g.classify_parts(status(503), &headers(&[("grpc-status", "3")])),
        Outcome::Fail {
            kind: ErrorKind::ClientError
        }
    );
}

#[test]
fn idempotent_methods_by_path() {
    let f = Grpc::idempotent_methods(["/shop.Catalog/", "/shop.Orders/Get"]);
    let side_effect = |path: &str| {
        let uri: http::Uri = path.parse().unwrap_or_default();
        let headers = HeaderMap::new();
        f(&RequestView::http(
            &http::Method::POST,
            &uri,
            &headers,
            None,
        ))
    };
    assert_eq!(
        side_effect("/shop.Catalog/List"),
        Some(SideEffect::Idempotent)
    );
    assert_eq!(
        side_effect("/shop.Orders/Get"),
        Some(SideEffect::Idempotent)
    );
    assert_eq!(side_effect("/shop.Orders/GetAll"), None);
    assert_eq!(side_effect("/shop.Orders/Create"), None);
}
