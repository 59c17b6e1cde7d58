//! Budgets that bound what retries cost, not only how many there are.
//!
//! One agent task sends 200 LLM calls of mixed prompt sizes (most short, some of 50k-200k
//! tokens) to a provider that fails 40% of attempts with a 503 (seeded: the same numbers
//! on every run). The task's retries are budgeted twice:
//!
//! - by count only: at most 60 retries for the task. A retry of a 200k-token prompt counts
//!   as one, like a retry of a 500-token one;
//! - by count and by cost: also at most 400k tokens of retries for the task. Each request
//!   carries its cost (prompt tokens + `max_tokens`) as a `Cost` extension, read only when
//!   a retry is considered.
//!
//! ```text
//! cargo run --example cost_budget
//! ```
//!
//! Virtual time (a paused runtime): the backoff sleeps cost nothing, and it runs in well
//! under a second.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_retry_guard::budget::{Budgets, Cost, Limit, MemoryStore, Scope};
use tower_retry_guard::{RetryInfo, RetryLayer, RetryPolicy};

const CALLS: usize = 200;
const FAILURE_RATE: f64 = 0.4;
const MAX_TOKENS: u64 = 1_000;
/// The count budget of both runs.
const TASK_RETRIES: u32 = 60;
/// The cost budget of the second run, in tokens.
const TASK_RETRY_TOKENS: u64 = 400_000;
const SEED: u64 = 18;

/// What one run spent.
struct Spent {
    succeeded: usize,
    retries: u64,
    retry_tokens: u64,
    denied_count: u64,
    denied_cost: u64,
}

/// The task's prompts: 80% of 500-2,000 tokens, 20% of 50k-200k.
fn prompts() -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(SEED);
    (0..CALLS)
        .map(|_| {
            if rng.random_bool(0.2) {
                rng.random_range(50_000..=200_000)
            } else {
                rng.random_range(500..=2_000)
            }
        })
        .collect()
}

fn run(budgets: Budgets) -> Result<Spent, Box<dyn std::error::Error + Send + Sync>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    rt.block_on(async move {
        // The same failures in both runs.
        let flips = Arc::new(Mutex::new(SmallRng::seed_from_u64(SEED + 1)));
        let provider = service_fn(move |_: Request<String>| {
            let fail = flips
                .lock()
                .map(|mut r| r.random_bool(FAILURE_RATE))
                .unwrap_or(false);
            async move {
                let status = if fail {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                let mut res = Response::new(String::new());
                *res.status_mut() = status;
                Ok::<_, std::io::Error>(res)
            }
        });
        let policy = RetryPolicy::builder()
            .max_retries(3)
            .max_total_time(Duration::from_secs(60))
            .seed(7)
            .build()?;
        let layer = RetryLayer::new().policy(policy).budgets(budgets);
        let stats = layer.stats();
        let mut svc = layer.layer(provider);
        let mut spent = Spent {
            succeeded: 0,
            retries: 0,
            retry_tokens: 0,
            denied_count: 0,
            denied_cost: 0,
        };
        for prompt in prompts() {
            let mut req = Request::post("/v1/chat/completions")
                .header("x-task-id", "report-42")
                .body(String::new())?;
            req.extensions_mut().insert(Cost(prompt + MAX_TOKENS));
            let res = svc.ready().await?.call(req).await?;
            if res.status().is_success() {
                spent.succeeded += 1;
            }
            if let Some(info) = res.extensions().get::<RetryInfo>() {
                spent.retry_tokens += info.retry_cost;
            }
        }
        let totals = stats.totals("POST /v1/chat/completions");
        // The stats say the same as the calls' infos.
        assert_eq!(totals.retry_cost, spent.retry_tokens);
        spent.retries = totals.retries;
        spent.denied_count = totals.denied(Scope::Task);
        spent.denied_cost = totals.denied(Scope::TaskCost);
        Ok(spent)
    })
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let count_only = Budgets::none().per_task(Some(Limit::Count {
        max: TASK_RETRIES,
        ttl: Duration::from_secs(3600),
    }));
    // A store of its own: clones of `Budgets` share theirs.
    let with_cost = count_only
        .clone()
        .store(MemoryStore::new())
        .task_cost(TASK_RETRY_TOKENS, Duration::from_secs(3600));
    let prompts = prompts();
    let long = prompts.iter().filter(|p| **p >= 50_000).count();
    println!(
        "one task, {CALLS} calls ({long} long prompts), {:.0}% of attempts fail (seed {SEED})",
        FAILURE_RATE * 100.0
    );
    println!(
        "{:<34} {:>9} {:>7} {:>14} {:>13} {:>12}",
        "budget", "succeeded", "retries", "retry tokens", "denied:count", "denied:cost"
    );
    for (name, budgets) in [
        (format!("count only ({TASK_RETRIES} retries)"), count_only),
        (
            format!("count + cost ({TASK_RETRY_TOKENS} tokens)"),
            with_cost,
        ),
    ] {
        let cost_limited = name.starts_with("count + cost");
        let s = run(budgets)?;
        println!(
            "{name:<34} {:>9} {:>7} {:>14} {:>13} {:>12}",
            s.succeeded, s.retries, s.retry_tokens, s.denied_count, s.denied_cost
        );
        if cost_limited {
            assert!(
                s.retry_tokens <= TASK_RETRY_TOKENS,
                "the cost budget holds the task's retry spend"
            );
        }
    }
    Ok(())
}
