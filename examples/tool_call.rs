//! Guarding an agent's tool, a plain async function, with the layer's discipline: the
//! model's tool-call id is the key, the executor runs each key once, and the retry after a
//! lost answer gets the kept result instead of sending a second email.
//!
//! Run: `cargo run --example tool_call`

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tower::BoxError;
use tower_retry_guard::guard::DedupeFn;
use tower_retry_guard::server::MemoryIdempotencyStore;
use tower_retry_guard::{Call, Guard, RetryLayer, RetryPolicy};

static EMAILS: AtomicU32 = AtomicU32::new(0);

/// The tool: sends an email. Nothing in it knows about retries.
async fn send_email(to: &str) -> Result<String, std::io::Error> {
    let n = EMAILS.fetch_add(1, Ordering::SeqCst) + 1;
    Ok(format!("email #{n} to {to}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    // --- the guarding code ---
    let policy = RetryPolicy::builder()
        .max_total_time(Duration::from_secs(5))
        .build()?;
    let guard = Guard::new(RetryLayer::new().policy(policy)).retry_on::<std::io::Error>();
    let executor = DedupeFn::new(MemoryIdempotencyStore::new()); // or a RedisStore
    let tool = |task: &'static str, tool_call_id: &'static str, to: &'static str| {
        let (guard, executor) = (&guard, &executor);
        async move {
            let call = Call::new("send_email").tool_call(task, tool_call_id);
            guard
                .run(call, |attempt| async move {
                    let key = attempt.key().ok_or("a side effect has a key")?;
                    let receipt = executor.run("send_email", key, || send_email(to)).await?;
                    if attempt.number() == 1 {
                        // The email went out; the answer is lost on the way back.
                        return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into());
                    }
                    Ok::<_, BoxError>(receipt)
                })
                .await
        }
    };
    // --- end of the guarding code ---

    let receipt = tool(
        "ticket-4711",
        "call_DdmO9pD3xa9XTPNJ32zg2hcA",
        "customer@example.com",
    )
    .await?;
    println!("send_email: {receipt} (retried once, the answer was lost)");
    println!("emails sent: {}", EMAILS.load(Ordering::SeqCst));
    assert_eq!(EMAILS.load(Ordering::SeqCst), 1);
    println!("stats: {}", guard.stats());
    Ok(())
}
