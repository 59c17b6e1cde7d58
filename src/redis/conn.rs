//! The connection under a [`RedisStore`](super::RedisStore): one Redis through a
//! reconnecting [`ConnectionManager`], or (feature `redis-cluster`) a Redis Cluster through
//! the `redis` crate's async cluster connection.

use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Cmd, RedisError, RedisResult, ScriptInvocation, Value};

#[cfg(feature = "redis-cluster")]
pub(super) use self::cluster::ClusterConn;

/// Where the store's commands go. Clones share the connection (both kinds multiplex).
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis: the keys keep their single-node layout.
    Single(ConnectionManager),
    /// A Redis Cluster: keys are hash-tagged so that each script call touches one slot.
    #[cfg(feature = "redis-cluster")]
    Cluster(std::sync::Arc<ClusterConn>),
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
            Conn::Cluster(c) => invocation.invoke_async(&mut c.current()).await,
        }
    }

    /// Runs one command (on a cluster, routed as the `redis` crate routes it: `PING` goes to
    /// every node).
    pub(super) async fn query(&self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Single(m) => cmd.query_async(&mut m.clone()).await,
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => cmd.query_async(&mut c.current()).await,
        }
    }

    /// Runs `WAIT` on the connection that wrote `key` (on a cluster: its slot's master).
    pub(super) async fn wait(&self, wait: &Cmd, key: &str) -> RedisResult<Value> {
        match self {
            Conn::Single(m) => {
                let _ = key;
                wait.query_async(&mut m.clone()).await
            }
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => {
                use ::redis::cluster_routing::{
                    Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
                };
                let route = Route::with_key(key, SlotAddr::Master);
                c.current()
                    .route_command(
                        wait.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await
            }
        }
    }

    /// A call failed with `error` (`None`: it timed out). A cluster connection that may have
    /// lost track of the cluster (a dead node, a failover) is rebuilt.
    pub(super) fn failed(&self, error: Option<&RedisError>) {
        match self {
            // The connection manager reconnects by itself.
            Conn::Single(_) => {
                let _ = error;
            }
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => {
                let lost = error.is_none_or(|e| {
                    e.is_io_error()
                        || e.is_timeout()
                        || e.is_connection_dropped()
                        || e.is_connection_refusal()
                        || e.is_cluster_error()
                });
                if lost {
                    c.rebuild();
                }
            }
        }
    }
}

#[cfg(feature = "redis-cluster")]
mod cluster {
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use ::redis::RedisResult;
    use ::redis::cluster::{ClusterClient, ClusterConfig};
    use ::redis::cluster_async::ClusterConnection;

    use super::Conn;

    /// Rebuilds happen at most this often.
    const REBUILD_EVERY: Duration = Duration::from_millis(200);

    /// A cluster connection that is replaced by a fresh one (which reads the slot map from
    /// the seed nodes again) after a call that lost the cluster, at most every 200 ms.
    ///
    /// Why: the `redis` crate's cluster connection re-reads the slot map when a node
    /// redirects it, but a call to a master that died keeps failing until the connection
    /// happens to refresh; under load we saw it keep the dead master's slots for good after
    /// a failover. A fresh connection asks the live nodes, so the store follows a failover
    /// within one rebuild of the replica's promotion.
    pub(in crate::redis) struct ClusterConn {
        client: ClusterClient,
        state: Mutex<(ClusterConnection, Instant)>,
    }

    impl ClusterConn {
        fn connect(client: &ClusterClient) -> ClusterConnection {
            let config = ClusterConfig::new().set_connection_timeout(Duration::from_secs(1));
            client.get_pending_async_connection_with_config(config)
        }

        /// The connection to use now (a clone: clones share the multiplexed connection).
        pub(in crate::redis) fn current(&self) -> ClusterConnection {
            self.state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .0
                .clone()
        }

        /// Replaces the connection, unless it was replaced less than 200 ms ago.
        pub(in crate::redis) fn rebuild(&self) {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.1.elapsed() >= REBUILD_EVERY {
                *state = (Self::connect(&self.client), Instant::now());
                tracing::debug!("redis cluster connection rebuilt after a failed call");
            }
        }
    }

    impl Conn {
        /// A lazy cluster connection seeded by `nodes`: it connects (and reads the slot map)
        /// in the background. A command that meets a moved slot, a dead node or a failover is
        /// re-routed and sent again after a short wait (10 to 100 ms) for as long as its
        /// caller waits (the store's timeout bounds that); a call that fails or times out has
        /// the connection rebuilt (see [`ClusterConn`]).
        pub(in crate::redis) fn cluster(nodes: &[String]) -> RedisResult<Conn> {
            let client = ClusterClient::builder(nodes.iter().map(String::as_str))
                .min_retry_wait(10)
                .max_retry_wait(100)
                .retry_wait_formula(10, 2)
                .connection_timeout(Duration::from_secs(1))
                .build()?;
            Ok(Conn::from_cluster_client(client))
        }

        /// A cluster connection from a client built with your own settings.
        pub(in crate::redis) fn from_cluster_client(client: ClusterClient) -> Conn {
            let connection = ClusterConn::connect(&client);
            Conn::Cluster(Arc::new(ClusterConn {
                client,
                state: Mutex::new((connection, Instant::now())),
            }))
        }
    }
}
