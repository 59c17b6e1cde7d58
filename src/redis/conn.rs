//! The connection under a [`RedisStore`](super::RedisStore): one Redis through a
//! reconnecting [`ConnectionManager`], or (feature `redis-cluster`) a Redis Cluster through
//! the `redis` crate's async cluster connection.

use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Cmd, RedisResult, ScriptInvocation, Value};

/// Where the store's commands go. Clones share the connection (both kinds multiplex).
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis: the keys keep their single-node layout.
    Single(ConnectionManager),
    /// A Redis Cluster: keys are hash-tagged so that each script call touches one slot.
    #[cfg(feature = "redis-cluster")]
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl Conn {
    /// A lazy connection manager on the Redis at `url`: reconnection attempts back off from
    /// 50 ms up to 1 s; each gives up after 1 s.
    pub(super) fn single(url: &str) -> RedisResult<Conn> {
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(6)
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None);
        ConnectionManager::new_lazy_with_config(client, config).map(Conn::Single)
    }

    /// A lazy cluster connection seeded by `nodes`: it connects (and reads the slot map) in
    /// the background. A command that meets a moved slot, a dead node or a failover is
    /// re-routed and sent again after a short wait (10 to 100 ms) for as long as its caller
    /// waits; the store's timeout bounds that.
    #[cfg(feature = "redis-cluster")]
    pub(super) fn cluster(nodes: &[String]) -> RedisResult<Conn> {
        use ::redis::cluster::{ClusterClient, ClusterConfig};
        let client = ClusterClient::builder(nodes.iter().map(String::as_str))
            .min_retry_wait(10)
            .max_retry_wait(100)
            .retry_wait_formula(10, 2)
            .connection_timeout(Duration::from_secs(1))
            .build()?;
        let config = ClusterConfig::new().set_connection_timeout(Duration::from_secs(1));
        Ok(Conn::Cluster(
            client.get_pending_async_connection_with_config(config),
        ))
    }

    /// Whether keys are laid out for a cluster (hash tags, one slot per script call).
    pub(super) fn is_cluster(&self) -> bool {
        match self {
            Conn::Single(_) => false,
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(_) => true,
        }
    }

    /// Runs a script (`EVALSHA`, loading it on `NOSCRIPT`). On a cluster it goes to the
    /// master of its first key's slot; `SCRIPT LOAD` goes to every master, so a promoted
    /// replica, whose script cache starts empty, loads it on first use.
    pub(super) async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> RedisResult<Value> {
        match self {
            Conn::Single(m) => invocation.invoke_async(&mut m.clone()).await,
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => invocation.invoke_async(&mut c.clone()).await,
        }
    }

    /// Runs one command (on a cluster, routed as the `redis` crate routes it: `PING` goes to
    /// every node).
    pub(super) async fn query(&self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Single(m) => cmd.query_async(&mut m.clone()).await,
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }
}
