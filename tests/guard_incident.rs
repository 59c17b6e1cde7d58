//! The incident, in process: a tool sends the email, its answer is lost on the way back,
//! the guarded call is retried with the tool-call id as key, and the email is sent once.
//! Plus the keys made from tool-call ids.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tower_retry_guard::guard::DedupeFn;
use tower_retry_guard::server::MemoryIdempotencyStore;
use tower_retry_guard::{Budgets, Call, Guard, IdempotencyKey, RetryLayer, StopReason};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The tool call, as the model asked for it, run by an executor that may lose its answer.
async fn incident(dedupe: bool) -> (Result<String, BoxError>, u32, u32) {
    let guard = Guard::new(RetryLayer::new().budgets(Budgets::default()));
    let executor = DedupeFn::new(MemoryIdempotencyStore::new());
    let emails = AtomicU32::new(0);
    let attempts = AtomicU32::new(0);
    let (executor, emails, attempts_ref) = (&executor, &emails, &attempts);
    let call =
        Call::new("send_email").tool_call("conversation-17", "toolu_01A09q90qw90lq917835lq9");
    let result = guard
        .run(call, |attempt| async move {
            attempts_ref.fetch_add(1, Ordering::SeqCst);
            let send = || async {
                let n = emails.fetch_add(1, Ordering::SeqCst) + 1;
                Ok::<_, io::Error>(format!("email #{n} sent"))
            };
            let receipt = if dedupe {
                let key = attempt.key().ok_or("a side effect has a key")?;
                executor.run("send_email", key, send).await?
            } else {
                send().await?
            };
            if attempt.number() == 1 {
                // The side effect happened; the answer is lost (the caller's timeout).
                tokio::time::sleep(Duration::from_secs(2)).await;
                return Err(io::Error::from(io::ErrorKind::TimedOut).into());
            }
            Ok::<_, BoxError>(receipt)
        })
        .await
        .map_err(BoxError::from);
    (
        result,
        emails.load(Ordering::SeqCst),
        attempts.load(Ordering::SeqCst),
    )
}

#[tokio::test(start_paused = true)]
async fn a_lost_answer_retried_with_the_tool_call_key_sends_one_email() {
    let (result, emails, attempts) = incident(true).await;
    assert_eq!(
        result.unwrap(),
        "email #1 sent",
        "the retry got the kept result"
    );
    assert_eq!(attempts, 2);
    assert_eq!(emails, 1);
}

#[tokio::test(start_paused = true)]
async fn without_dedupe_the_same_retry_sends_two_emails() {
    // The key alone only lets the tool deduplicate: a tool that ignores it sends twice.
    let (result, emails, attempts) = incident(false).await;
    assert_eq!(result.unwrap(), "email #2 sent");
    assert_eq!(attempts, 2);
    assert_eq!(emails, 2);
}

#[tokio::test(start_paused = true)]
async fn without_a_key_the_side_effect_is_not_retried() {
    let guard = Guard::new(RetryLayer::new().idempotency_keys(false));
    let emails = AtomicU32::new(0);
    let emails_ref = &emails;
    let err = guard
        .run(
            Call::new("send_email").task("conversation-17"),
            |_| async move {
                emails_ref.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(io::Error::from(io::ErrorKind::TimedOut))
            },
        )
        .await
        .unwrap_err();
    assert_eq!(emails.load(Ordering::SeqCst), 1);
    assert!(matches!(
        err.reason(),
        StopReason::SideEffectWithoutKey { .. }
    ));
}

#[test]
fn tool_call_keys_are_stable_valid_and_distinct() {
    let openai = IdempotencyKey::from_tool_call("run-42", "call_DdmO9pD3xa9XTPNJ32zg2hcA");
    assert_eq!(
        openai.as_str(),
        "tc:6.run-42:29.call_DdmO9pD3xa9XTPNJ32zg2hcA"
    );
    let anthropic = IdempotencyKey::from_tool_call("run-42", "toolu_01A09q90qw90lq917835lq9");
    assert_eq!(
        anthropic.as_str(),
        "tc:6.run-42:29.toolu_01A09q90qw90lq917835lq9"
    );
    // Stable: the same inputs, the same key (its header form too).
    assert_eq!(
        IdempotencyKey::from_tool_call("run-42", "call_DdmO9pD3xa9XTPNJ32zg2hcA"),
        openai
    );

    let long = "x".repeat(10_000);
    let inputs: Vec<(&str, &str)> = vec![
        ("a:b", "c"),
        ("a", "b:c"),
        ("", ""),
        ("", "x"),
        ("x", ""),
        ("tâche 🚀", "call_1"),
        ("tache", "call_1"),
        ("with \"quotes\" and \\", "call_1"),
        ("tab\there", "new\nline"),
        (&long, "call_1"),
        (&long, &long),
        ("#0123", "call_1"),
        ("6.run-42", "call_1"),
    ];
    let mut seen = HashSet::new();
    for (task, id) in &inputs {
        let key = IdempotencyKey::from_tool_call(task, id);
        let text = key.as_str();
        assert!(
            !text.is_empty() && text.len() <= IdempotencyKey::MAX_LEN,
            "{text}"
        );
        assert!(
            text.bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\'),
            "{text}"
        );
        // Round trip through its header form.
        assert_eq!(
            IdempotencyKey::from_header(key.header_value()).unwrap(),
            key
        );
        assert!(seen.insert(text.to_owned()), "two inputs gave {text}");
    }
}
