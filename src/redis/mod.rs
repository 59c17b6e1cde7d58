//! The Redis store (feature `redis`): task and user budgets, and idempotency keys, shared by
//! every process that talks to one Redis, or (feature `redis-cluster`) to one Redis Cluster.
//!
//! # One round trip per decision
//!
//! Every method is **one** Lua script call (`EVALSHA`; [`redis::Script`] loads the script
//! and calls again when Redis answers `NOSCRIPT`, e.g. after a restart or on a promoted
//! replica). A script runs atomically in Redis, so a budget decision over several draws is
//! all or nothing without locks or refunds: the script checks every draw first and writes
//! only if all pass. On a cluster, the one exception is a decision whose draws live in
//! different slots (see below).
//!
//! # Clock
//!
//! Time is Redis's own (`TIME`, in microseconds), never the replicas' clocks, which disagree.
//! Expiry is Redis's (`PX`): a key holds nothing worth keeping once it is gone.
//!
//! # Keys and values
//!
//! Every key starts with the store's prefix (default `trg:`):
//!
//! | key | value | expires |
//! |---|---|---|
//! | `<prefix>b:c:<scope>:<id>` ([`Limit::Count`]; an id longer than 64 bytes or outside `[A-Za-z0-9._:@/+=-]` as `#` + its XXH3-128 in hex) | the count, decimal | `ttl` after the last granted draw |
//! | `<prefix>b:r:<scope>:<id>` ([`Limit::Rate`]) | GCRA's theoretical arrival time, µs of Redis time | when the bucket is full again |
//! | `<prefix>b:u:<scope>:<id>` ([`Limit::Cost`]; scope `task_cost`, `user_cost`) | the units summed, decimal (at most 2^53 - 1) | `ttl` after the last granted draw |
//! | `<prefix>b:v:<scope>:<id>` ([`Limit::CostRate`]) | GCRA's theoretical arrival time, µs of Redis time (one unit = `per / units` µs, rounded up) | when the bucket is full again |
//! | `<prefix>i:<scoped key>` (idempotency) | a hash: `s` state (`F` in flight, `D` done), `f` fingerprint and `t` claim token (16 bytes each, big endian), `l` lease end (ms, Redis clock) while in flight, `r` the response once done | the claim's record (the TTL, so an abandoned claim answers "outcome unknown" and is never simply claimed again); then the result's TTL |
//! | `<prefix>ip:<principal>` (`g`, or `p:<length>:<principal>`) | a sorted set of the principal's idempotency keys, scored by their expiry (ms): its share ([`RedisStore::max_keys_per_principal`]) | with its longest-lived key |
//!
//! A finished response is encoded as: a version byte (`1`), the status (`u16`), the header
//! count (`u32`), each header as name length (`u16`), name, value length (`u32`), value;
//! then the body (the rest). Integers are big endian. A stored value that does not decode is
//! a [`StoreError`], never a panic.
//!
//! # On Redis Cluster
//!
//! A script may touch only keys of one slot, and a slot lives on one master. The cluster
//! layout ([`RedisStore::cluster`]) puts a hash tag (`{...}`: the part Redis hashes) in every
//! key, chosen so that each script call touches one slot while the keys, and so the load,
//! spread over every master:
//!
//! | key | tag |
//! |---|---|
//! | `<prefix>b:c:{<scope>:<id>}`, `<prefix>b:r:{<scope>:<id>}` | the scope and id: each task and each user its own slot |
//! | `<prefix>b:u:task_cost:{task:<id>}`, `<prefix>b:v:user_cost:{user:<id>}` (cost limits) | the task's (user's) tag: its count and its cost in one slot, one script |
//! | `<prefix>i:{<t>}:<scoped key>` | `t` = `g:<b>` (no principal) or `p:<XXH3-64 of the principal, hex>:<b>`, with `b` = XXH3-64 of the scoped key mod 16 |
//! | `<prefix>ip:{<t>}` (`g`), `<prefix>ip:{<t>}:<length>:<principal>` | the same `t`: a share set sits in the slot of the keys it counts |
//!
//! *Idempotency*: each step on a key is still one script, in one slot. A principal's share
//! set must be in its keys' slot, but one set per principal would put all of a tenant's
//! keys (and its load) on one master. So each principal has 16 buckets, each a slot of its
//! own with its own set, and a key's bucket comes from the key: one tenant spreads over 16
//! slots, and many tenants over all of them. The share is then enforced per bucket:
//! `ceil(max / 16)` keys each, so a principal holds at most `16 * ceil(max / 16)` keys and is
//! refused a new one when that key's bucket is full (with thousands of keys, within a few
//! percent of `max`; with a small `max`, sooner, as keys fall unevenly into buckets).
//!
//! *Budgets*: one decision draws a task and a user, and neither id can go into the other's
//! key: tagging both by the user would count a task drawn under two users twice over (an id
//! would widen a budget), and tagging by the task would split each user's budget across its
//! tasks. So each scope and id has its own slot, and a decision whose draws share a slot (one
//! draw, or the same tag) is one script as on one Redis. A decision over several slots sends
//! one script per slot, all at once (one round trip of latency, one call per slot); if one
//! refuses or fails, the draws the others took are given back (a count decremented, a rate's
//! arrival time moved back) before the decision answers, so it stays all or nothing. Between
//! a take and its give-back, a concurrent decision may see the draw taken and be refused: an
//! error on the side of fewer retries, never more; a give-back that fails leaves the draw
//! spent, the same way.
//!
//! A prefix with its own tag (e.g. `{trg}:`) pins every key to that tag's slot: correct,
//! but one master does all the work.
//!
//! Run the cluster with `cluster-require-full-coverage no`, so the other masters keep
//! answering while one master's slots fail over.
//!
//! # Failures
//!
//! Every call is bounded by the store's [timeout](RedisStore::timeout) (default 250 ms); an
//! error, a timeout or a malformed answer is a [`StoreError`]. The [`ConnectionManager`]
//! reconnects in the background, so the store recovers by itself once Redis is back. On a
//! cluster, a call that lost the cluster (an I/O error, a timeout, a cluster error) has the
//! store make a fresh cluster connection (at most every 200 ms), which reads the slot map
//! from the live nodes: after a master dies, calls for its slots fail until its replica is
//! promoted, then succeed (measured: within 0.2 s of the promotion, `tests/store_redis_cluster.rs`).
//! The cluster client may send a command again after a dropped connection; `begin` knows its
//! own token, so a claim sent twice is still the caller's, and a budget draw sent twice is
//! spent twice (fewer retries, never more).
//!
//! Redis replicates asynchronously: a write acknowledged by a master that dies before its
//! replica has it is lost in the failover. A lost claim is re-made by its holder's next
//! renewal (every third of the lease) and a lost result by nothing: a retry of that request
//! could then run it again. The window is the replication lag (well under a millisecond on a
//! healthy link). [`RedisStore::wait_for_replicas`] closes it: a claim or a result counts
//! only once a replica holds it (`WAIT`), at the price of a round trip and of holding the
//! connection while it waits. What a
//! [`StoreError`] means for a retry is [`Budgets::on_store_error`](crate::Budgets::on_store_error)
//! (fail closed by default); the [`IdempotencyLayer`](crate::server::IdempotencyLayer) answers
//! 503.
//!
//! A call that timed out may still run in Redis when its bytes arrive (Redis was slow, not
//! gone): a budget draw is then spent though the retry did not happen, which errs on the side
//! of fewer retries, never more. An idempotency `begin` that timed out is released again by
//! its claim token (the release queues behind it on the same connection), so it never locks
//! a key that nobody holds; `renew`, `complete` and `release` act only under their own token.
//!
//! Configure Redis with `maxmemory-policy noeviction` (or no `maxmemory`): an evicted
//! idempotency key would let a retry run its request again.
//!
//! Requires Redis 5 or later (scripts that call `TIME` and then write).

mod budget;
mod codec;
mod conn;
mod idempotency;
mod keys;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::{Script, Value};

use self::conn::Conn;
use crate::server::ScopedKey;
use crate::store::StoreError;

/// Budgets and idempotency keys in Redis, shared by every process that uses the same Redis
/// and prefix. Implements [`BudgetStore`](crate::budget::BudgetStore) and [`IdempotencyStore`](crate::server::IdempotencyStore).
///
/// Each call is one atomic Lua script (one round trip), timed by Redis's clock, bounded by a
/// timeout; see the `redis` module source (`src/redis/`) for the keys, values and scripts.
///
/// Clones share the connection (a multiplexed [`ConnectionManager`] that reconnects, or a
/// cluster connection that is made afresh when it loses the cluster).
///
/// ```no_run
/// use std::time::Duration;
/// use tower_retry_guard::{Budgets, RedisStore, RetryLayer};
/// use tower_retry_guard::server::IdempotencyLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_retry_guard::budget::StoreError> {
/// let store = RedisStore::new("redis://127.0.0.1:6379/")?
///     .prefix("myapp:")
///     .timeout(Duration::from_millis(100));
/// // Client side: task and user budgets shared by every replica.
/// let retry = RetryLayer::new().budgets(Budgets::default().store(store.clone()));
/// // Provider side: one execution per idempotency key across every replica.
/// let dedupe = IdempotencyLayer::new(store);
/// # let _ = (retry, dedupe);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: Arc<str>,
    timeout: Duration,
    max_keys_per_principal: u64,
    /// Replicas that must hold an idempotency claim or result before it counts, and how
    /// long to wait for them (`WAIT`).
    replicas: Option<(u32, Duration)>,
}

/// The default share of idempotency keys one principal may hold in Redis.
const DEFAULT_MAX_KEYS_PER_PRINCIPAL: u64 = 25_000;

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("max_keys_per_principal", &self.max_keys_per_principal)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

fn store_error(what: &str, e: impl fmt::Display) -> StoreError {
    StoreError::new(format!("redis {what}: {e}"))
}

impl RedisStore {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "trg:";
    /// The default per-call timeout.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

    /// A store on the Redis at `url` (`redis://host:port/db`), with the default prefix
    /// (`trg:`) and timeout (250 ms).
    ///
    /// Connects lazily, in the background: this never waits for Redis, and a Redis that is
    /// down at start-up is a [`StoreError`] per call until it is up. Reconnection attempts
    /// back off from 50 ms up to 1 s; each gives up after 1 s. Must be called within a Tokio
    /// runtime (an error otherwise). For other settings, build a [`ConnectionManager`] and use
    /// [`RedisStore::from_manager`].
    pub fn new(url: &str) -> Result<Self, StoreError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::new(
                "RedisStore::new must be called within a Tokio runtime",
            ));
        }
        Conn::single(url)
            .map(RedisStore::with)
            .map_err(|e| store_error("url", e))
    }

    /// A store on an existing connection manager, with the default prefix and timeout.
    pub fn from_manager(manager: ConnectionManager) -> Self {
        RedisStore::with(Conn::Single(manager))
    }

    /// A store on the Redis Cluster that `nodes` belong to (`redis://host:port/` each; one
    /// reachable node is enough to learn the others), with the default prefix and timeout.
    ///
    /// Keys are hash-tagged so that each script call touches one slot while the keys spread
    /// over every master (the key table in `src/redis/mod.rs`). Connects lazily, in the
    /// background, as [`RedisStore::new`] does; a node that dies, a moved slot or a failover
    /// is followed without a restart: a call in the gap is a [`StoreError`] within the
    /// timeout. Must be called within a Tokio runtime (an error otherwise).
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn cluster<I, S>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::new(
                "RedisStore::cluster must be called within a Tokio runtime",
            ));
        }
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        if nodes.is_empty() {
            return Err(StoreError::new(
                "RedisStore::cluster needs at least one node",
            ));
        }
        Conn::cluster(&nodes)
            .map(RedisStore::with)
            .map_err(|e| store_error("cluster nodes", e))
    }

    /// A store on a Redis Cluster through a client built with your own settings (TLS,
    /// credentials, timeouts), with the default prefix and timeout; keys take the cluster
    /// layout. The store makes its connections from it, lazily, and makes a new one after a
    /// call that lost the cluster (a dead node, a failover), at most every 200 ms.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn from_cluster_client(client: ::redis::cluster::ClusterClient) -> Self {
        RedisStore::with(Conn::from_cluster_client(client))
    }

    /// Whether this store talks to a Redis Cluster (and lays its keys out for one).
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    fn with(conn: Conn) -> Self {
        RedisStore {
            conn,
            prefix: Arc::from(Self::DEFAULT_PREFIX),
            timeout: Self::DEFAULT_TIMEOUT,
            max_keys_per_principal: DEFAULT_MAX_KEYS_PER_PRINCIPAL,
            replicas: None,
        }
    }

    /// Makes idempotency claims and results survive a failover: after each claim and each
    /// result it writes, the store waits (Redis `WAIT`) until `replicas` replicas hold the
    /// write, at most `timeout`. Fewer acknowledgments are a [`StoreError`]: a claim is then
    /// released and its request answered 503 (the layer's store-error answer), a result is
    /// written again while the claim is kept. Off by default (`0` turns it off).
    ///
    /// Why: Redis replicates asynchronously. A master that dies after acknowledging a claim
    /// but before its replica has it is replaced by a replica that never saw the claim, and
    /// a retry of the request would run its handler a second time. With `WAIT`, a claim
    /// counts only once a replica holds it (Redis Cluster and Sentinel promote the most
    /// up-to-date replica).
    ///
    /// The cost: one more round trip per claim and per result, and `WAIT` holds the
    /// connection it runs on, so the store's other calls queue behind it (with healthy
    /// replicas, for one replication round trip; with none answering, for `timeout`: keep
    /// it well under the store's timeout). Budget draws are not waited for (a lost draw
    /// only gives back retries).
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// Waits (if asked: [`RedisStore::wait_for_replicas`]) until enough replicas hold this
    /// connection's writes, the last of them on the node of idempotency key `key`.
    async fn replicated(&self, what: &str, key: &ScopedKey) -> Result<(), StoreError> {
        let Some((replicas, timeout)) = self.replicas else {
            return Ok(());
        };
        let key = self.idempotency_keys(key).key;
        let mut wait = ::redis::cmd("WAIT");
        // `WAIT n 0` would block for ever: at least 1 ms.
        wait.arg(replicas).arg(millis(timeout));
        // Bounded: the store's timeout on top of the wait Redis was asked for.
        let bound = self.timeout.saturating_add(timeout);
        let answer = match tokio::time::timeout(bound, self.conn.wait(&wait, &key)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.conn.failed(Some(&e));
                return Err(store_error(what, e));
            }
            Err(_) => {
                self.conn.failed(None);
                return Err(store_error(
                    what,
                    format!("no answer to WAIT within {bound:?}"),
                ));
            }
        };
        match answer {
            Value::Int(n) if n >= i64::from(replicas) => Ok(()),
            Value::Int(n) => Err(store_error(
                what,
                format!("{n} of {replicas} replicas acknowledged the write within {timeout:?}"),
            )),
            other => Err(store_error(
                what,
                format!("unexpected answer to WAIT {other:?}"),
            )),
        }
    }

    /// The most idempotency keys (claims and results) one principal may hold (default
    /// 25 000; the global scope counts as one principal; `0`: no limit). A new key beyond it
    /// is refused with [`StoreError::full`] naming the principal, so one tenant cannot fill
    /// Redis for the others. Responses are at most the layer's `max_response_body` each, so
    /// this also bounds a principal's bytes; size Redis's `maxmemory` for it.
    pub fn max_keys_per_principal(mut self, max: u64) -> Self {
        self.max_keys_per_principal = max;
        self
    }

    /// The prefix of every key this store writes (default `trg:`). Stores that should share
    /// budgets and keys must use the same prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    /// How long one call may take, connecting included (default 250 ms). Past it, the call
    /// is a [`StoreError`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The per-call timeout.
    pub fn call_timeout(&self) -> Duration {
        self.timeout
    }

    /// Checks that Redis answers (`PING`) within the timeout: for readiness probes.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let answer = self
            .bounded("ping", self.conn.query(&::redis::cmd("PING")))
            .await?;
        match &answer {
            Value::SimpleString(s) if s == "PONG" => Ok(()),
            Value::BulkString(b) if b == b"PONG" => Ok(()),
            _ => Err(store_error("ping", format!("unexpected answer {answer:?}"))),
        }
    }

    /// Runs `call` within the timeout, turning every failure into a [`StoreError`].
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.conn.failed(Some(&e));
                Err(store_error(what, e))
            }
            Err(_) => {
                self.conn.failed(None);
                Err(store_error(
                    what,
                    format!("no answer within {:?}", self.timeout),
                ))
            }
        }
    }

    /// Runs one idempotency script that answers an integer.
    async fn int_script(
        &self,
        what: &str,
        script: &Script,
        key: &ScopedKey,
        args: &[&[u8]],
    ) -> Result<i64, StoreError> {
        let keys = self.idempotency_keys(key);
        let mut invocation = script.prepare_invoke();
        invocation.key(keys.key).key(keys.share);
        for a in args {
            invocation.arg(*a);
        }
        let value = self.bounded(what, self.conn.invoke(&invocation)).await?;
        match value {
            Value::Int(n) => Ok(n),
            other => Err(store_error(what, format!("unexpected answer {other:?}"))),
        }
    }
}

/// The longest expiry, in ms (about 317 years; Redis rejects expiries that overflow).
const MAX_EXPIRY_MS: u64 = 10_000_000_000_000;

/// Whole milliseconds, rounded up, at least 1 and at most [`MAX_EXPIRY_MS`].
fn millis(d: Duration) -> u64 {
    let ms = d.as_micros().div_ceil(1000);
    u64::try_from(ms)
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_EXPIRY_MS)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
