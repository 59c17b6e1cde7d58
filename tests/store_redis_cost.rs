//! Cost limits are exact under races, in memory, in Redis and on a Redis Cluster: many
//! concurrent decisions of random (seeded) cost on one task never spend more than its
//! limit, and what is left afterwards is the limit minus what was granted, to the unit.
//!
//! Settling (a refund, a charge past the limit) does the same in memory and in Redis.
//!
//! Needs `redis-server` on the PATH (as `store_redis.rs`). Real time: nothing here sleeps.
#![cfg(feature = "redis")]

mod redis_support;

use tower_retry_guard::budget::MemoryStore;

use redis_support::server::*;
use redis_support::suites::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cost_limit_is_exact_under_races_in_memory() {
    for seed in [1, 2, 3] {
        cost_race_suite(MemoryStore::new(), seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cost_limit_is_exact_under_races_in_redis() {
    let server = RedisServer::start();
    for seed in [1, 2, 3] {
        cost_race_suite(server.store(&format!("cost{seed}:")), seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_refunds_and_charges_the_same_in_memory_and_in_redis() {
    let server = RedisServer::start();
    settle_suite(MemoryStore::new()).await;
    settle_suite(server.store("settle:")).await;
}

#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cost_limit_is_exact_under_races_on_a_cluster() {
    use redis_support::cluster::RedisCluster;
    // The task's count and cost share a slot; the user's cost is in another: each decision
    // is two script calls, and a refusal by one gives the other's draws back.
    let cluster = RedisCluster::shared();
    for seed in [1, 2] {
        let store = cluster.store(&format!("cost{seed}:"));
        assert!(store.is_cluster());
        cost_race_suite(store, seed).await;
    }
}
