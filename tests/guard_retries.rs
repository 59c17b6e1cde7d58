//! The layer's behaviour table, run against both faces of the engine: the `RetryLayer`
//! around a service, and the `Guard` around an async closure. Same policy, same classifier
//! (`ErrorRules`), same script of failures: same attempts, delays, keys and reasons.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_retry_guard::budget::{Limit, Scope};
use tower_retry_guard::guard::ErrorRules;
use tower_retry_guard::{
    Backoff, Budgets, Call, ErrorKind, Guard, IdempotencyKey, Jitter, Operation, RetryError,
    RetryLayer, RetryPolicy, SideEffect, StopReason,
};

mod common;
use common::ms;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Face {
    Layer,
    Guard,
}

const FACES: [Face; 2] = [Face::Layer, Face::Guard];

/// The model's output did not validate.
#[derive(Debug)]
struct Invalid;

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid json")
    }
}

impl std::error::Error for Invalid {}

fn timed_out() -> io::Error {
    io::Error::from(io::ErrorKind::TimedOut)
}

fn policy(jitter: Jitter) -> RetryPolicy {
    RetryPolicy::builder()
        .max_retries(3)
        .max_total_time(Duration::from_secs(10))
        .backoff(Backoff::exponential(
            Duration::from_millis(100),
            2.0,
            Duration::from_secs(5),
        ))
        .jitter(jitter)
        .seed(7)
        .build()
        .unwrap()
}

/// What one attempt saw: when it started (since the call began) and its key.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    at: Duration,
    key: Option<String>,
}

type Script = Arc<dyn Fn(u32) -> Result<(), io::Error> + Send + Sync>;

/// One call through `face`: `script(attempt)` (0-based) answers each attempt, which lasts
/// `lasts` of virtual time.
async fn drive(
    face: Face,
    layer: RetryLayer,
    side: SideEffect,
    task: Option<&'static str>,
    lasts: Duration,
    script: impl Fn(u32) -> Result<(), io::Error> + Send + Sync + 'static,
) -> (Result<(), RetryError<io::Error>>, Vec<Seen>) {
    let script: Script = Arc::new(script);
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let start = Instant::now();
    let rules = ErrorRules::new().output_invalid_on::<Invalid>();
    let result = match face {
        Face::Layer => {
            let log = seen.clone();
            let svc = ServiceBuilder::new()
                .layer(layer.classify(rules))
                .service_fn(move |req: Request<String>| {
                    let (log, script) = (log.clone(), script.clone());
                    async move {
                        let key = req
                            .headers()
                            .get("idempotency-key")
                            .map(|v| IdempotencyKey::from_header(v).unwrap().to_string());
                        let n = {
                            let mut log = log.lock().unwrap();
                            log.push(Seen {
                                at: start.elapsed(),
                                key,
                            });
                            log.len() as u32 - 1
                        };
                        tokio::time::sleep(lasts).await;
                        script(n).map(|()| Response::new(String::new()))
                    }
                });
            let mut req = Request::post("http://tools/op")
                .body(String::new())
                .unwrap();
            req.extensions_mut().insert(Operation::from_static("op"));
            req.extensions_mut().insert(side);
            if let Some(task) = task {
                req.headers_mut().insert("x-task-id", task.parse().unwrap());
            }
            svc.oneshot(req).await.map(|_| ())
        }
        Face::Guard => {
            let guard = Guard::new(layer).classify(rules);
            let mut call = Call::new("op").side_effect(side);
            if let Some(task) = task {
                call = call.task(task);
            }
            let log = &seen;
            let script = &script;
            guard
                .run(call, |attempt| async move {
                    let n = {
                        let mut log = log.lock().unwrap();
                        log.push(Seen {
                            at: start.elapsed(),
                            key: attempt.key().map(|k| k.to_string()),
                        });
                        log.len() as u32 - 1
                    };
                    assert_eq!(attempt.number(), n + 1);
                    tokio::time::sleep(lasts).await;
                    script(n)
                })
                .await
        }
    };
    let seen = seen.lock().unwrap().clone();
    (result, seen)
}

fn no_budgets(jitter: Jitter) -> RetryLayer {
    RetryLayer::new()
        .policy(policy(jitter))
        .budgets(Budgets::none())
}

#[tokio::test(start_paused = true)]
async fn attempts_are_bounded() {
    for face in FACES {
        let (result, seen) = drive(
            face,
            no_budgets(Jitter::None),
            SideEffect::SideEffecting,
            None,
            Duration::ZERO,
            |_| Err(timed_out()),
        )
        .await;
        let err = result.unwrap_err();
        assert_eq!(seen.len(), 4, "{face:?}");
        assert_eq!(err.attempts(), 4, "{face:?}");
        assert_eq!(
            err.reason(),
            &StopReason::Exhausted { max_retries: 3 },
            "{face:?}"
        );
        assert_eq!(err.kind(), Some(ErrorKind::Timeout));
        assert_eq!(err.into_inner().unwrap().kind(), io::ErrorKind::TimedOut);
    }
}

#[tokio::test(start_paused = true)]
async fn backoff_delays_are_the_layers_in_virtual_time() {
    // Without jitter: 100, 200, 400 ms between attempts.
    for face in FACES {
        let (_, seen) = drive(
            face,
            no_budgets(Jitter::None),
            SideEffect::SideEffecting,
            None,
            Duration::ZERO,
            |_| Err(timed_out()),
        )
        .await;
        let at: Vec<_> = seen.iter().map(|s| s.at).collect();
        assert_eq!(at, [ms(0), ms(100), ms(300), ms(700)], "{face:?}");
    }
    // Seeded equal jitter: each delay in [v/2, v], and the same on both faces.
    let mut faces = Vec::new();
    for face in FACES {
        let (_, seen) = drive(
            face,
            no_budgets(Jitter::Equal),
            SideEffect::SideEffecting,
            None,
            Duration::ZERO,
            |_| Err(timed_out()),
        )
        .await;
        let at: Vec<_> = seen.iter().map(|s| s.at).collect();
        for (i, v) in [100u64, 200, 400].into_iter().enumerate() {
            let delay = at[i + 1] - at[i];
            assert!(
                delay >= ms(v / 2) && delay <= ms(v),
                "{face:?}: {delay:?} for {v} ms"
            );
        }
        faces.push(at);
    }
    assert_eq!(faces[0], faces[1]);
}

#[tokio::test(start_paused = true)]
async fn total_time_bounds_the_retries() {
    let layer = || {
        RetryLayer::new()
            .policy(
                RetryPolicy::builder()
                    .max_retries(10)
                    .max_total_time(Duration::from_secs(1))
                    .backoff(Backoff::Constant(ms(100)))
                    .jitter(Jitter::None)
                    .build()
                    .unwrap(),
            )
            .budgets(Budgets::none())
    };
    for face in FACES {
        let start = Instant::now();
        let (result, seen) = drive(
            face,
            layer(),
            SideEffect::SideEffecting,
            None,
            ms(300),
            |_| Err(timed_out()),
        )
        .await;
        let err = result.unwrap_err();
        assert!(
            matches!(err.reason(), StopReason::Deadline { .. }),
            "{face:?}: {err}"
        );
        // 0, 400, 800 ms: a fourth attempt would start after the second.
        assert_eq!(seen.len(), 3, "{face:?}");
        assert!(
            start.elapsed() <= Duration::from_secs(1) + ms(100),
            "{face:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_key_is_minted_once_and_sent_on_every_attempt() {
    for face in FACES {
        let (result, seen) = drive(
            face,
            no_budgets(Jitter::None),
            SideEffect::SideEffecting,
            None,
            Duration::ZERO,
            |n| if n < 2 { Err(timed_out()) } else { Ok(()) },
        )
        .await;
        result.unwrap();
        assert_eq!(seen.len(), 3);
        let key = seen[0].key.clone().expect("a side effect gets a key");
        assert_eq!(key.len(), 36, "a UUID: {key}");
        assert!(
            seen.iter().all(|s| s.key.as_deref() == Some(&*key)),
            "{face:?}: {seen:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_calls_own_key_is_used_and_reported() {
    let guard = Guard::new(no_budgets(Jitter::None));
    let given = IdempotencyKey::from_tool_call("task-1", "call_abc");
    let keys = Mutex::new(Vec::new());
    let keys_ref = &keys;
    let err = guard
        .run(
            Call::new("send_email").tool_call("task-1", "call_abc"),
            |attempt| async move {
                keys_ref.lock().unwrap().push(attempt.key().cloned());
                Err::<(), _>(timed_out())
            },
        )
        .await
        .unwrap_err();
    let keys = keys.into_inner().unwrap();
    assert_eq!(keys.len(), 4);
    assert!(keys.iter().all(|k| k.as_ref() == Some(&given)));
    assert_eq!(err.info().key.as_ref(), Some(&given));
}

#[tokio::test(start_paused = true)]
async fn a_side_effect_without_a_key_is_not_retried() {
    for face in FACES {
        let (result, seen) = drive(
            face,
            no_budgets(Jitter::None).idempotency_keys(false),
            SideEffect::SideEffecting,
            None,
            Duration::ZERO,
            |_| Err(timed_out()),
        )
        .await;
        let err = result.unwrap_err();
        assert_eq!(seen.len(), 1, "{face:?}");
        assert_eq!(seen[0].key, None);
        assert_eq!(
            err.reason(),
            &StopReason::SideEffectWithoutKey {
                operation: "op".into()
            },
            "{face:?}"
        );
        assert!(
            err.to_string()
                .contains("side effect without idempotency key")
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_read_only_call_is_retried_without_a_key() {
    for face in FACES {
        let (result, seen) = drive(
            face,
            no_budgets(Jitter::None).idempotency_keys(false),
            SideEffect::ReadOnly,
            None,
            Duration::ZERO,
            |n| if n == 0 { Err(timed_out()) } else { Ok(()) },
        )
        .await;
        result.unwrap();
        assert_eq!(seen.len(), 2, "{face:?}");
        assert!(seen.iter().all(|s| s.key.is_none()));
    }
}

#[tokio::test(start_paused = true)]
async fn an_output_failure_without_a_change_is_not_retried() {
    for face in FACES {
        let (result, seen) = drive(
            face,
            no_budgets(Jitter::None),
            SideEffect::ReadOnly,
            None,
            Duration::ZERO,
            |_| Err(io::Error::other(Invalid)),
        )
        .await;
        let err = result.unwrap_err();
        assert_eq!(seen.len(), 1, "{face:?}");
        assert_eq!(err.reason(), &StopReason::OutputUnchanged, "{face:?}");
        assert_eq!(err.kind(), Some(ErrorKind::OutputInvalid));
    }
}

#[tokio::test(start_paused = true)]
async fn an_output_failure_is_retried_with_the_change() {
    let guard = Guard::new(no_budgets(Jitter::None)).output_invalid_on::<Invalid>();
    let prompts = Mutex::new(Vec::new());
    let prompts_ref = &prompts;
    let call = Call::new("extract")
        .read_only()
        .on_output_failure(|failure| Some(format!("Your answer was {}; fix it.", failure.message)));
    let answer = guard
        .run(call, |attempt| async move {
            let mut prompt = String::from("Extract the date.");
            if let Some(change) = attempt.change() {
                prompt.push(' ');
                prompt.push_str(change);
            }
            let previous = attempt.previous().map(|p| (p.kind, p.retry));
            prompts_ref.lock().unwrap().push((prompt, previous));
            if attempt.number() == 1 {
                Err(io::Error::other(Invalid))
            } else {
                Ok("2026-01-01")
            }
        })
        .await
        .unwrap();
    assert_eq!(answer, "2026-01-01");
    let prompts = prompts.into_inner().unwrap();
    assert_eq!(
        prompts,
        [
            ("Extract the date.".to_owned(), None),
            (
                "Extract the date. Your answer was invalid json; fix it.".to_owned(),
                Some((ErrorKind::OutputInvalid, 1))
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_output_hook_that_changes_nothing_surfaces_the_failure() {
    let guard = Guard::new(no_budgets(Jitter::None)).output_invalid_on::<Invalid>();
    let err = guard
        .run(
            Call::new("extract").read_only().on_output_failure(|_| None),
            |_| async { Err::<(), _>(io::Error::other(Invalid)) },
        )
        .await
        .unwrap_err();
    assert_eq!(err.attempts(), 1);
    assert_eq!(err.reason(), &StopReason::OutputUnchanged);
}

#[tokio::test(start_paused = true)]
async fn the_task_budget_refuses_across_calls() {
    for face in FACES {
        let layer =
            RetryLayer::new()
                .policy(policy(Jitter::None))
                .budgets(Budgets::none().per_task(Some(Limit::Count {
                    max: 2,
                    ttl: Duration::from_secs(3600),
                })));
        let (result, seen) = drive(
            face,
            layer,
            SideEffect::ReadOnly,
            Some("task-9"),
            Duration::ZERO,
            |_| Err(timed_out()),
        )
        .await;
        let err = result.unwrap_err();
        assert_eq!(seen.len(), 3, "{face:?}: two retries, then the budget");
        assert_eq!(err.budget_scope(), Some(Scope::Task), "{face:?}");
        match err.reason() {
            StopReason::Budget { key, .. } => assert_eq!(key.as_deref(), Some("task-9")),
            other => panic!("{face:?}: {other}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_guarded_call_shares_the_layers_task_budget() {
    let budgets = Budgets::none().per_task(Some(Limit::Count {
        max: 1,
        ttl: Duration::from_secs(3600),
    }));
    let guard = Guard::new(
        RetryLayer::new()
            .policy(policy(Jitter::None))
            .budgets(budgets),
    );
    let call = || Call::new("op").read_only().task("t");
    let first = guard
        .run(call(), |_| async { Err::<(), _>(timed_out()) })
        .await
        .unwrap_err();
    assert_eq!(first.attempts(), 2);
    let second = guard
        .run(call(), |_| async { Err::<(), _>(timed_out()) })
        .await
        .unwrap_err();
    assert_eq!(second.attempts(), 1, "the task's one retry is spent");
    assert_eq!(second.budget_scope(), Some(Scope::Task));
}

#[tokio::test(start_paused = true)]
async fn errors_are_retried_by_type() {
    #[derive(Debug)]
    struct ProviderError;
    impl fmt::Display for ProviderError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("provider error")
        }
    }
    impl std::error::Error for ProviderError {}

    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let guard = Guard::new(no_budgets(Jitter::None)).retry_on::<ProviderError>();
    let read = || Call::new("op").read_only();
    let err = guard
        .run(read(), |_| async {
            Err::<(), BoxError>(Box::new(ProviderError))
        })
        .await
        .unwrap_err();
    assert_eq!(err.attempts(), 4, "listed: retried");
    let err = guard
        .run(read(), |_| async {
            Err::<(), BoxError>(io::Error::from(io::ErrorKind::NotFound).into())
        })
        .await
        .unwrap_err();
    assert_eq!(err.attempts(), 1, "not listed: not retried");
    assert_eq!(err.reason(), &StopReason::NotRetryable);
    let err = guard
        .run(read(), |_| async {
            Err::<(), BoxError>(timed_out().into())
        })
        .await
        .unwrap_err();
    assert_eq!(err.attempts(), 4, "timeouts: retried by default");
    let strict = guard.clone().fail_on::<io::Error>();
    let err = strict
        .run(read(), |_| async {
            Err::<(), BoxError>(timed_out().into())
        })
        .await
        .unwrap_err();
    assert_eq!(err.attempts(), 1, "fail_on wins over the default");
    let by_fn =
        Guard::new(no_budgets(Jitter::None)).retry_on_fn(|e| e.to_string().contains("flaky"));
    let err = by_fn
        .run(read(), |_| async {
            Err::<(), BoxError>("flaky upstream".into())
        })
        .await
        .unwrap_err();
    assert_eq!(err.attempts(), 4);
}

#[tokio::test(start_paused = true)]
async fn the_closure_sees_the_previous_failure() {
    let guard = Guard::new(no_budgets(Jitter::None));
    let seen = Mutex::new(Vec::new());
    let seen_ref = &seen;
    guard
        .run(Call::new("op").read_only(), |attempt| async move {
            seen_ref.lock().unwrap().push(
                attempt
                    .previous()
                    .map(|p| (p.kind, p.retry, p.message.clone())),
            );
            assert!(attempt.time_left() <= Duration::from_secs(10));
            if attempt.number() < 3 {
                Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "reset by peer",
                ))
            } else {
                Ok(())
            }
        })
        .await
        .unwrap();
    assert_eq!(
        seen.into_inner().unwrap(),
        [
            None,
            Some((ErrorKind::Connect, 1, "reset by peer".to_owned())),
            Some((ErrorKind::Connect, 2, "reset by peer".to_owned())),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_classifier_can_reject_an_ok_output() {
    let guard =
        Guard::new(no_budgets(Jitter::None)).classify(|r: &Result<String, io::Error>| match r {
            Ok(text) if text.starts_with('{') => tower_retry_guard::Outcome::Success,
            Ok(_) => tower_retry_guard::Outcome::retry(ErrorKind::OutputInvalid),
            Err(_) => tower_retry_guard::Outcome::Fail {
                kind: ErrorKind::Other,
            },
        });
    // No change: the last (rejected) output is returned as it is, as the layer returns a
    // failing response.
    let out = guard
        .run(Call::new("chat").read_only(), |_| async {
            Ok("not json".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(out, "not json");
    let stats = guard.stats();
    assert_eq!(stats.kind("chat", ErrorKind::OutputInvalid).not_retried, 1);
    // With a change: retried, and the change reaches the closure.
    let out = guard
        .run(
            Call::new("chat")
                .read_only()
                .on_output_failure(|f| Some(f.message.clone())),
            |attempt| async move {
                Ok(match attempt.change() {
                    Some(_) => "{}".to_owned(),
                    None => "not json".to_owned(),
                })
            },
        )
        .await
        .unwrap();
    assert_eq!(out, "{}");
}

#[tokio::test(start_paused = true)]
async fn stats_count_guarded_calls() {
    let guard = Guard::new(no_budgets(Jitter::None));
    let stats = guard.stats();
    let read = || Call::new("lookup").read_only();
    guard
        .run(read(), |a| async move {
            if a.number() == 1 {
                Err(timed_out())
            } else {
                Ok(())
            }
        })
        .await
        .unwrap();
    guard
        .run(read(), |_| async { Err::<(), _>(timed_out()) })
        .await
        .unwrap_err();
    assert_eq!(stats.calls("lookup"), 2);
    let timeouts = stats.kind("lookup", ErrorKind::Timeout);
    assert_eq!(timeouts.recovered, 1);
    assert_eq!(timeouts.exhausted, 1);
    assert_eq!(timeouts.retries, 4);
    assert_eq!(timeouts.failures, 5);
}

#[tokio::test(start_paused = true)]
async fn a_hung_function_ends_at_the_total_time() {
    let guard = RetryLayer::new()
        .policy(
            RetryPolicy::builder()
                .max_total_time(Duration::from_secs(2))
                .build()
                .unwrap(),
        )
        .budgets(Budgets::none())
        .guard();
    let start = Instant::now();
    let result: Result<(), _> = guard
        .run(Call::new("hangs").read_only(), |_| {
            std::future::pending::<Result<(), io::Error>>()
        })
        .await;
    let err = result.unwrap_err();
    assert!(matches!(err.reason(), StopReason::Deadline { .. }), "{err}");
    assert!(start.elapsed() <= Duration::from_secs(2) + ms(1));
}
