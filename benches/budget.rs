//! Budget draws: the in-memory store against a bare `DashMap<String, u64>` and a
//! `Mutex<HashMap<String, u64>>`, on one hot key and spread over 1,000,000 keys, on one
//! thread and on two; and the process retry ratio, measured through the layer.
//!
//! Run: `cargo bench --bench budget -- --warm-up-time 1 --measurement-time 3`
//!
//! Every figure is per draw (per update); with two threads it is the wall time of all draws
//! of both threads divided by their number, so `elem/s` is the aggregate rate.
//!
//! - `memory_store`: `MemoryStore::draw` with one [`Draw`] (a per-user count that never runs
//!   out), its future polled once with a no-op waker (it never waits);
//! - `dashmap`: `get_mut` and `+= 1` on a `DashMap<String, u64>` (the key already there, as
//!   after the first draw: no allocation);
//! - `mutex_hashmap`: the same under one `Mutex<HashMap<String, u64>>`.
//!
//! The process ratio is crate-private: `ratio/*` runs a service that fails (503) every other
//! call through the layer with a zero backoff, with the default budgets (ratio on, no task or
//! user id, so no store draw) and with `Budgets::none()`; the difference is the ratio's
//! deposit + withdraw + result, per logical call.

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dashmap::DashMap;
use http::{Request, Response, StatusCode};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_retry_guard::budget::MemoryStore;
use tower_retry_guard::budget::{BudgetStore, Draw, Grant, Limit, Scope};
use tower_retry_guard::{Backoff, Budgets, RetryLayer, RetryPolicy};

const SPREAD: usize = 1_000_000;

/// A limit that never refuses within a benchmark (and never expires one).
const LIMIT: Limit = Limit::Count {
    max: u32::MAX,
    ttl: Duration::from_secs(3600),
};

fn key(i: usize) -> String {
    format!("user-{i:08}")
}

/// Polls a future that never waits to completion.
fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// What is benchmarked: one update of key `i`.
trait Target: Sync {
    fn update(&self, i: usize);
}

struct Store {
    store: MemoryStore,
    draws: Vec<[Draw; 1]>,
}

impl Target for Store {
    fn update(&self, i: usize) {
        let granted = now_or_never(self.store.draw(&self.draws[i]));
        debug_assert_eq!(granted, Ok(Grant::Granted));
        black_box(granted).ok();
    }
}

struct Dash {
    map: DashMap<String, u64>,
    keys: Vec<String>,
}

impl Target for Dash {
    fn update(&self, i: usize) {
        let k = &self.keys[i];
        match self.map.get_mut(k.as_str()) {
            Some(mut v) => *v += 1,
            None => {
                *self.map.entry(k.clone()).or_insert(0) += 1;
            }
        }
    }
}

struct Locked {
    map: Mutex<HashMap<String, u64>>,
    keys: Vec<String>,
}

impl Target for Locked {
    fn update(&self, i: usize) {
        let k = &self.keys[i];
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(k.as_str()) {
            Some(v) => *v += 1,
            None => {
                map.insert(k.clone(), 1);
            }
        }
    }
}

fn targets(n: usize) -> Vec<(&'static str, Box<dyn Target>)> {
    let keys: Vec<String> = (0..n).map(key).collect();
    let store = Store {
        store: MemoryStore::new(),
        draws: keys
            .iter()
            .map(|k| {
                [Draw {
                    amount: 1,
                    scope: Scope::User,
                    key: k.clone(),
                    limit: LIMIT,
                }]
            })
            .collect(),
    };
    let dash = Dash {
        map: DashMap::new(),
        keys: keys.clone(),
    };
    let locked = Locked {
        map: Mutex::new(HashMap::new()),
        keys,
    };
    let all: Vec<(&'static str, Box<dyn Target>)> = vec![
        ("memory_store", Box::new(store)),
        ("dashmap", Box::new(dash)),
        ("mutex_hashmap", Box::new(locked)),
    ];
    // Every key is tracked before measuring: the figures are of updates, not inserts.
    for (_, t) in &all {
        for i in 0..n {
            t.update(i);
        }
    }
    all
}

/// `iters` updates spread over `threads` threads; wall time of all of them.
fn run(target: &dyn Target, keys: usize, threads: usize, iters: u64) -> Duration {
    let per_thread = iters.div_ceil(threads as u64);
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let barrier = &barrier;
            s.spawn(move || {
                // Each thread walks the keys from its own offset (a stride coprime with the
                // key count, so that a spread run touches scattered keys).
                let mut i = (t * keys / threads.max(1)) % keys;
                barrier.wait();
                for _ in 0..per_thread {
                    target.update(i);
                    i = (i + 7919) % keys;
                }
            });
        }
        barrier.wait();
        let start = Instant::now();
        // The scope joins the threads before returning.
        start
    })
    .elapsed()
}

fn draws(c: &mut Criterion) {
    for (label, n) in [("hot_key", 1usize), ("spread_1m", SPREAD)] {
        let all = targets(n);
        for threads in [1usize, 2] {
            let mut g = c.benchmark_group(format!("draw/{label}/{threads}_thread"));
            g.throughput(Throughput::Elements(1));
            for (name, target) in &all {
                g.bench_function(BenchmarkId::from_parameter(name), |b| {
                    if threads == 1 {
                        let mut i = 0usize;
                        b.iter(|| {
                            target.update(i);
                            i = (i + 7919) % n;
                        })
                    } else {
                        b.iter_custom(|iters| run(target.as_ref(), n, threads, iters))
                    }
                });
            }
            g.finish();
        }
    }
}

type Req = Request<String>;
type Res = Response<String>;
type Err = Box<dyn std::error::Error + Send + Sync>;

fn ratio(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let policy = RetryPolicy::builder()
        .backoff(Backoff::Constant(Duration::ZERO))
        .build()
        .unwrap_or_else(|e| panic!("policy: {e}"));
    let mut g = c.benchmark_group("ratio");
    g.throughput(Throughput::Elements(1));
    for (name, budgets) in [
        ("fail_once_default_budgets", Budgets::default()),
        ("fail_once_no_budgets", Budgets::none()),
    ] {
        // Fails every other call: on one thread, each logical call fails once, then succeeds.
        let flip = Arc::new(AtomicBool::new(false));
        let inner = tower::service_fn(move |_req: Req| {
            let fail = !flip.fetch_xor(true, Ordering::Relaxed);
            let mut res = Response::new(String::new());
            if fail {
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            std::future::ready(Ok::<Res, Err>(res))
        });
        let svc = ServiceBuilder::new()
            .layer(
                RetryLayer::new()
                    .policy(policy.clone())
                    .budgets(budgets)
                    .info_on_success(false),
            )
            .service(inner);
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let mut s = svc.clone();
                async move {
                    let req = Request::get("http://127.0.0.1/v1/models")
                        .body(String::new())
                        .unwrap_or_default();
                    let ok = match s.ready().await {
                        Ok(s) => s.call(req).await.map(|r| r.status().is_success()),
                        Err(_) => Ok(false),
                    };
                    assert!(matches!(ok, Ok(true)), "the retry must succeed");
                    black_box(ok.is_ok())
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, draws, ratio);
criterion_main!(benches);
