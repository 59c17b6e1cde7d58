//! A local Redis Cluster of our own: `redis-server --cluster-enabled yes` processes on free
//! loopback ports, joined by `redis-cli --cluster create`, killed (and their files removed) on
//! drop. Every wait is bounded.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tower_retry_guard::RedisStore;

/// The cluster's node timeout (ms): a master unreachable this long is failed over.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// One `redis-server` of the cluster.
pub struct Node {
    pub port: u16,
    child: Option<Child>,
}

/// A running cluster; killed on drop.
pub struct RedisCluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
static SHARED: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());

/// A free loopback port whose cluster bus port (+10000) is free too.
fn free_cluster_port(taken: &[u16]) -> u16 {
    for _ in 0..200 {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(port) = l.local_addr().map(|a| a.port()) else {
            continue;
        };
        if port > 55_000 || taken.contains(&port) || taken.contains(&(port + 10_000)) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

/// `redis-cli -p <port> <args>`, its output (`None` if it could not run or the node is down).
pub fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run redis-cli ({e}): install redis-tools (scripts/test.sh does)")
        });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

/// Polls `probe` every 50 ms for at most `limit`.
fn wait_until(limit: Duration, what: &str, mut probe: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if probe() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {limit:?}");
}

impl RedisCluster {
    /// A cluster shared by the tests of one binary that do not kill nodes (3 masters, no
    /// replicas; each test uses its own prefix); stopped when the last user drops it.
    pub fn shared() -> Arc<RedisCluster> {
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.upgrade() {
            return c;
        }
        let c = Arc::new(RedisCluster::start(3, 0));
        *slot = Arc::downgrade(&c);
        c
    }

    /// Starts `masters` masters with `replicas` replicas each and waits until every node
    /// says `cluster_state:ok` and every replica is in sync.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "trg-cluster-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("a cluster directory");
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        let mut taken = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let port = free_cluster_port(&taken);
            taken.extend([port, port + 10_000]);
            cluster.nodes.push(cluster.spawn(port));
        }
        for n in &cluster.nodes {
            let port = n.port;
            wait_until(Duration::from_secs(5), "node answers", || {
                cli(port, &["PING"]).is_some_and(|a| a.contains("PONG"))
            });
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli --cluster create");
        let start = Instant::now();
        let status = loop {
            if let Ok(Some(s)) = create.try_wait() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = create.kill();
                panic!("redis-cli --cluster create did not finish within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "redis-cli --cluster create: {status}");
        let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
        wait_until(
            Duration::from_secs(20),
            "cluster_state:ok everywhere",
            || {
                ports.iter().all(|&p| {
                    cli(p, &["CLUSTER", "INFO"]).is_some_and(|i| {
                        i.contains("cluster_state:ok")
                            && i.contains(&format!("cluster_known_nodes:{}", ports.len()))
                    })
                })
            },
        );
        if replicas > 0 {
            wait_until(Duration::from_secs(20), "replicas in sync", || {
                cluster.masters().len() == masters
                    && cluster.masters().iter().all(|&m| {
                        cli(m, &["INFO", "replication"])
                            .is_some_and(|i| i.matches("state=online").count() == replicas)
                    })
            });
        }
        cluster
    }

    fn spawn(&self, port: u16) -> Node {
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir).expect("a node directory");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            // The other masters keep serving their slots while one is down.
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .args([
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): install it (scripts/test.sh does)")
            });
        Node {
            port,
            child: Some(child),
        }
    }

    /// `redis://127.0.0.1:<port>/` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }

    /// A cluster store on every node, with `prefix`.
    pub fn store(&self, prefix: &str) -> RedisStore {
        RedisStore::cluster(self.urls())
            .expect("a cluster store")
            .prefix(prefix)
    }

    /// The nodes alive now whose role is master.
    pub fn masters(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .filter(|n| cli(n.port, &["ROLE"]).is_some_and(|r| r.starts_with("master")))
            .map(|n| n.port)
            .collect()
    }

    /// A replica (port) of the master on `port`, from `CLUSTER NODES`.
    pub fn replica_of(&self, master: u16) -> Option<u16> {
        self.replicas_of(master).first().copied()
    }

    /// Every replica (port) of the master on `port`, from `CLUSTER NODES`.
    pub fn replicas_of(&self, master: u16) -> Vec<u16> {
        let Some(nodes) = cli(master, &["CLUSTER", "NODES"]) else {
            return Vec::new();
        };
        let Some(id) = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .and_then(|l| l.split(' ').next())
        else {
            return Vec::new();
        };
        nodes
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let addr = f.get(1)?;
                (f.get(3) == Some(&id))
                    .then(|| addr.split(['@', ':']).nth(1)?.parse().ok())
                    .flatten()
            })
            .collect()
    }

    /// The port of the master serving `slot`, from `CLUSTER NODES` as `via` sees it.
    pub fn master_of_slot(&self, via: u16, slot: u16) -> Option<u16> {
        let nodes = cli(via, &["CLUSTER", "NODES"])?;
        nodes.lines().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let flags = f.get(2)?;
            if !flags.contains("master") || flags.contains("fail") {
                return None;
            }
            let owns = f.iter().skip(8).any(|range| {
                let mut ends = range.split('-').filter_map(|x| x.parse::<u16>().ok());
                match (ends.next(), ends.next()) {
                    (Some(a), Some(b)) => (a..=b).contains(&slot),
                    (Some(a), None) => a == slot,
                    _ => false,
                }
            });
            owns.then(|| f.get(1)?.split(['@', ':']).nth(1)?.parse().ok())
                .flatten()
        })
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`, asked of `via`).
    pub fn slot(via: u16, key: &str) -> Option<u16> {
        cli(via, &["CLUSTER", "KEYSLOT", key])?.trim().parse().ok()
    }

    /// The process id of the node on `port` (for SIGSTOP / SIGCONT).
    pub fn pid(&self, port: u16) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .and_then(|n| n.child.as_ref())
            .map(Child::id)
    }

    /// Kills the node on `port` with SIGKILL (by its pid) and waits for it to exit.
    pub fn kill(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Keys matching `pattern` on the node `port` (`--scan`).
    pub fn keys(port: u16, pattern: &str) -> Vec<String> {
        cli(port, &["--scan", "--pattern", pattern])
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Calls of `EVALSHA` and `EVAL` the node `port` served (`INFO commandstats`).
    pub fn script_calls(port: u16) -> u64 {
        let stats = cli(port, &["INFO", "commandstats"]).unwrap_or_default();
        stats
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split([':', ','])
                    .find_map(|kv| kv.strip_prefix("calls="))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
