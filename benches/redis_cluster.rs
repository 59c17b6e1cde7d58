//! Budget decisions per second: one Redis vs a three-master Redis Cluster, same machine, same
//! clients (one `RedisStore` each, 50 decisions in flight), then how the cluster's script
//! calls spread over its masters (`INFO commandstats`).
//!
//! Run: `cargo bench --bench redis_cluster --features redis-cluster` (needs `redis-server`
//! and `redis-cli` on the PATH; starts its own server and cluster on free loopback ports).
//!
//! Two kinds of decision: a task draw alone (one script call on either), and a task and a
//! user draw (one script on one Redis; on the cluster the two keys live in different slots,
//! so two script calls, sent at once). Numbers: BENCHMARKS.md.

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/redis_support/cluster.rs"]
mod cluster;
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/redis_support/server.rs"]
mod server;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, Throughput};
use tower_retry_guard::RedisStore;
use tower_retry_guard::budget::{BudgetStore, Draw, Grant, Limit, Scope};

use self::cluster::RedisCluster;
use self::server::RedisServer;

const IN_FLIGHT: u64 = 50;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A task draw (and a user draw) that are always granted, on rotating keys.
fn draws(with_user: bool) -> Vec<Draw> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut d = vec![Draw {
        amount: 1,
        scope: Scope::Task,
        key: format!("task-{}", n % 1000),
        limit: Limit::Count {
            max: u32::MAX,
            ttl: Duration::from_secs(60),
        },
    }];
    if with_user {
        d.push(Draw {
            amount: 1,
            scope: Scope::User,
            key: format!("user-{}", n % 100),
            limit: Limit::Rate {
                tokens: 1_000_000,
                per: Duration::from_secs(1),
                burst: 1_000_000,
            },
        });
    }
    d
}

async fn fifty_decisions(store: &RedisStore, with_user: bool) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let s = store.clone();
        set.spawn(async move {
            let grant = s.draw(&draws(with_user)).await;
            assert_eq!(black_box(grant), Ok(Grant::Granted));
        });
    }
    while let Some(r) = set.join_next().await {
        assert!(r.is_ok());
    }
}

fn main() {
    let single = RedisServer::start();
    let cluster = RedisCluster::start(3, 0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let (one, many) = rt.block_on(async {
        let one = single.store("bench:").timeout(Duration::from_secs(5));
        let many = cluster.store("bench:").timeout(Duration::from_secs(5));
        for s in [&one, &many] {
            for _ in 0..100 {
                if s.ping().await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        (one, many)
    });

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("redis_cluster");
        g.throughput(Throughput::Elements(IN_FLIGHT));
        for (name, store) in [("one_redis", &one), ("cluster_3_masters", &many)] {
            g.bench_function(format!("{name}/task/50_in_flight"), |b| {
                b.to_async(&rt).iter(|| fifty_decisions(store, false))
            });
            g.bench_function(format!("{name}/task_and_user/50_in_flight"), |b| {
                b.to_async(&rt).iter(|| fifty_decisions(store, true))
            });
        }
        g.finish();
    }
    c.final_summary();

    let masters = cluster.masters();
    let calls: Vec<u64> = masters
        .iter()
        .map(|&m| RedisCluster::script_calls(m))
        .collect();
    let total: u64 = calls.iter().sum();
    println!("cluster script calls per master (INFO commandstats): {calls:?} of {total}");
    for c in &calls {
        let share = *c as f64 / total.max(1) as f64;
        println!("  {:.1}%", share * 100.0);
    }
}
