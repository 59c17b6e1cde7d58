//! What the Redis store tests share: a `redis-server` of our own, a local Redis Cluster of
//! six, and the semantic suites every store must pass with the same transcript.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "redis-cluster")]
pub mod cluster;
pub mod server;
pub mod suites;
