//! Unit tests of the Redis budget draws: answers and arguments.
use super::*;
use crate::budget::Scope;

#[test]
fn draw_answers_are_checked() {
    let draws = [Draw::one(
        Scope::User,
        "u",
        Limit::Count {
            max: 1,
            ttl: Duration::from_secs(1),
        },
    )];
    let ok = Value::Array(vec![Value::Int(1)]);
    assert_eq!(parse_grant(&ok, &draws), Ok(Grant::Granted));
    let denied = Value::Array(vec![
        Value::Int(0),
        Value::Int(1),
        Value::Int(1500),
        Value::Int(1),
    ]);
    assert_eq!(
        parse_grant(&denied, &draws),
        Ok(Grant::Denied {
            scope: Scope::User,
            retry_in: Some(Duration::from_micros(1500)),
            left: Some(0),
        })
    );
    let unknown = Value::Array(vec![
        Value::Int(0),
        Value::Int(1),
        Value::Int(-1),
        Value::Int(0),
    ]);
    assert!(matches!(
        parse_grant(&unknown, &draws),
        Ok(Grant::Denied { retry_in: None, .. })
    ));
    for v in [
        Value::Array(vec![
            Value::Int(0),
            Value::Int(2),
            Value::Int(1),
            Value::Int(0),
        ]),
        Value::Array(vec![
            Value::Int(0),
            Value::Int(0),
            Value::Int(1),
            Value::Int(0),
        ]),
        Value::Array(vec![Value::Int(0), Value::Int(1), Value::Int(1)]),
        Value::Array(vec![]),
        Value::Int(1),
        Value::Nil,
    ] {
        assert!(parse_grant(&v, &draws).is_err(), "{v:?}");
    }
}

#[test]
fn limits_become_bounded_arguments() {
    let of = |limit, amount| Draw {
        amount,
        ..Draw::one(Scope::Task, "t", limit)
    };
    let args = draw_args(&of(
        Limit::Rate {
            tokens: 0,
            per: Duration::MAX,
            burst: u32::MAX,
        },
        1,
    ));
    assert_eq!(args[1], MAX_INTERVAL_US.to_string());
    assert_eq!(args[2], MAX_TOLERANCE_US.to_string());
    assert_eq!(args[3], "0");
    let count = Limit::Count {
        max: 5,
        ttl: Duration::ZERO,
    };
    assert_eq!(draw_args(&of(count, 9)), ["c", "5", "1", "1", "1"]);
    let cost = Limit::Cost {
        max: u64::MAX,
        ttl: Duration::from_secs(1),
    };
    let args = draw_args(&of(cost, u64::MAX));
    assert_eq!(args[1], MAX_UNITS.to_string());
    assert_eq!(args[4], MAX_UNITS.to_string());
    let rate = Limit::CostRate {
        units: 1000,
        per: Duration::from_secs(1),
        burst: 500,
    };
    assert_eq!(draw_args(&of(rate, 10)), ["r", "10000", "500000", "1", "0"]);
    assert_eq!(left_of(&of(rate, 10), 100_000), Some(400));
    assert_eq!(millis(Duration::MAX), super::super::MAX_EXPIRY_MS);
    assert_eq!(millis(Duration::from_micros(1001)), 2);
}
