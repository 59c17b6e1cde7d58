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
//!   a retry is considered;
//! - the same limits, the cost estimated by the layer from the request's JSON body
//!   (`RetryLayer::llm_cost`: body bytes / 4 + `max_tokens`, priced one unit a token), and
//!   each retry that succeeded settled from the `usage` of its response (`UsageBody`): the
//!   tokens it reserved but did not use go back to the task (`refunded`), and the task's
//!   ledger shows what its retries really spent, still at or under the 400k.
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
use http_body_util::BodyExt;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_retry_guard::budget::{Budgets, Cost, Limit, LlmCost, MemoryStore, Scope, UsageBody};
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
    /// What the retries took from the task's cost ledger: reserved, less what was settled
    /// back.
    retry_tokens: u64,
    denied_count: u64,
    denied_cost: u64,
    /// Given back by settlements from the responses' usage.
    refunded: u64,
}

/// Where a retry's cost comes from.
#[derive(Clone, Copy, PartialEq)]
enum Pricing {
    /// The `Cost` extension (prompt + max_tokens), never settled.
    Extension,
    /// The layer's estimate from the body, settled from the usage.
    EstimateAndSettle,
}

/// A chat request whose JSON body holds a prompt of `tokens` tokens (4 bytes each).
fn chat_body(tokens: u64) -> String {
    let text = "x".repeat(usize::try_from(tokens * 4).unwrap_or(0));
    format!(
        r#"{{"model":"gpt-x","max_tokens":{MAX_TOKENS},"messages":[{{"role":"user","content":"{text}"}}]}}"#
    )
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

fn run(
    budgets: Budgets,
    pricing: Pricing,
) -> Result<Spent, Box<dyn std::error::Error + Send + Sync>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    rt.block_on(async move {
        // The same failures in both runs.
        let flips = Arc::new(Mutex::new(SmallRng::seed_from_u64(SEED + 1)));
        let provider = service_fn(move |req: Request<String>| {
            let (fail, completion) = flips
                .lock()
                .map(|mut r| (r.random_bool(FAILURE_RATE), r.random_range(100..=MAX_TOKENS)))
                .unwrap_or((false, MAX_TOKENS));
            // The usage a provider reports: the prompt (4 bytes a token), and the answer.
            let prompt = req.body().len() as u64 / 4;
            async move {
                let mut res = Response::new(String::new());
                if fail {
                    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                } else {
                    *res.body_mut() = format!(
                        r#"{{"model":"gpt-x","usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion}}}}}"#
                    );
                }
                Ok::<_, std::io::Error>(res)
            }
        });
        let policy = RetryPolicy::builder()
            .max_retries(3)
            .max_total_time(Duration::from_secs(60))
            .seed(7)
            .build()?;
        // One unit a token, whatever the model.
        let prices = LlmCost::new().fallback(1_000_000, 1_000_000);
        let mut layer = RetryLayer::new().policy(policy).budgets(budgets.clone());
        if pricing == Pricing::EstimateAndSettle {
            layer = layer.llm_cost(prices.clone());
        }
        let stats = layer.stats();
        let mut svc = layer.layer(provider);
        let mut spent = Spent {
            succeeded: 0,
            retries: 0,
            retry_tokens: 0,
            denied_count: 0,
            denied_cost: 0,
            refunded: 0,
        };
        for prompt in prompts() {
            let mut req = Request::post("/v1/chat/completions")
                .header("x-task-id", "report-42")
                .body(chat_body(prompt))?;
            if pricing == Pricing::Extension {
                req.extensions_mut().insert(Cost(prompt + MAX_TOKENS));
            }
            let res = svc.ready().await?.call(req).await?;
            if res.status().is_success() {
                spent.succeeded += 1;
            }
            let info = res.extensions().get::<RetryInfo>().cloned();
            if let Some(info) = &info {
                spent.retry_tokens += info.retry_cost;
            }
            if let (Pricing::EstimateAndSettle, Some(info)) = (pricing, info) {
                // Read the answer as any caller would; its end settles the last retry.
                let body = UsageBody::new(res.into_body(), &info, &budgets, &prices);
                let bytes = body.collect().await?.to_bytes();
                if info.reserved() > 0 {
                    if let Some(used) = prices.usage_cost(&bytes) {
                        spent.refunded += info.reserved().saturating_sub(used);
                    }
                }
                // The settlement is spawned: let it run before the next call.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let totals = stats.totals("POST /v1/chat/completions");
        // The stats say the same as the calls' infos (what was reserved).
        assert_eq!(totals.retry_cost, spent.retry_tokens);
        spent.retry_tokens -= spent.refunded;
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
    // Its own store again.
    let settled = with_cost.clone().store(MemoryStore::new());
    println!(
        "{:<42} {:>9} {:>7} {:>14} {:>13} {:>12} {:>9}",
        "budget", "succeeded", "retries", "retry tokens", "denied:count", "denied:cost", "refunded"
    );
    for (name, budgets, pricing) in [
        (
            format!("count only ({TASK_RETRIES} retries)"),
            count_only,
            Pricing::Extension,
        ),
        (
            format!("count + cost ({TASK_RETRY_TOKENS} tokens)"),
            with_cost,
            Pricing::Extension,
        ),
        (
            "count + cost, estimated + settled".to_owned(),
            settled,
            Pricing::EstimateAndSettle,
        ),
    ] {
        let cost_limited = name.starts_with("count + cost");
        let s = run(budgets, pricing)?;
        println!(
            "{name:<42} {:>9} {:>7} {:>14} {:>13} {:>12} {:>9}",
            s.succeeded, s.retries, s.retry_tokens, s.denied_count, s.denied_cost, s.refunded
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
