//! Budget decisions per second against Redis on loopback, next to plain `INCR`s through the
//! same client and `redis-benchmark -t incr` on the same server.
//!
//! Run: `cargo bench --bench redis --features redis` (needs `redis-server` and
//! `redis-benchmark` on the PATH; the bench starts its own server on a free port).
//!
//! A decision is one `RedisStore::draw` of a task count and a user rate: one `EVALSHA`.
//! Criterion reports elements per second (`thrpt`); "1 in flight" is latency-bound (one
//! caller), "50 in flight" matches `redis-benchmark`'s default of 50 clients.
//!
//! One run on a 2-core VM (Redis 7.0, bench and server sharing the cores): decisions
//! 12.5 k/s with 1 in flight (80 µs) and 21.4 k/s with 50; `redis-benchmark -t incr -n 100000
//! -q` 89.5 k/s (-c 50) and 48.0 k/s (-c 1): a ratio of 0.24 (0.26 with one caller). The
//! script alone, driven by `redis-benchmark` with `EVALSHA`, peaks near 39 k/s on that box:
//! the server-side cost of the script (TIME, two GETs, two SETs) is most of the gap.

use std::hint::black_box;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, Throughput};
use tower_retry_guard::RedisStore;
use tower_retry_guard::budget::{BudgetStore, Draw, Grant, Limit, Scope};

/// A `redis-server` on a free loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): install it (scripts/test.sh does)")
            });
        let server = Server { child, port };
        for _ in 0..100 {
            if ping(port).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not answer on port {port}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ping(port: u16) -> io::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf)?;
    if buf[..n].starts_with(b"+PONG") {
        Ok(())
    } else {
        Err(io::Error::other("no PONG"))
    }
}

const IN_FLIGHT: u64 = 50;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A task draw and a user draw that are always granted, on rotating keys.
fn draws() -> [Draw; 2] {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    [
        Draw {
            amount: 1,
            scope: Scope::Task,
            key: format!("task-{}", n % 1000),
            limit: Limit::Count {
                max: u32::MAX,
                ttl: Duration::from_secs(60),
            },
        },
        Draw {
            amount: 1,
            scope: Scope::User,
            key: format!("user-{}", n % 100),
            limit: Limit::Rate {
                tokens: 1_000_000,
                per: Duration::from_secs(1),
                burst: 1_000_000,
            },
        },
    ]
}

async fn decide(store: &RedisStore) {
    let grant = store.draw(&draws()).await;
    assert_eq!(black_box(grant), Ok(Grant::Granted));
}

async fn incr(conn: &mut redis::aio::ConnectionManager) {
    let n: redis::RedisResult<i64> = redis::cmd("INCR")
        .arg("bench:counter")
        .query_async(conn)
        .await;
    assert!(black_box(n).is_ok());
}

fn main() {
    let server = Server::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let (store, conn) = rt.block_on(async {
        let store = RedisStore::new(&url)
            .unwrap_or_else(|e| panic!("store: {e}"))
            .prefix("bench:")
            .timeout(Duration::from_secs(5));
        store.ping().await.unwrap_or_else(|e| panic!("ping: {e}"));
        let client = redis::Client::open(url.as_str()).unwrap_or_else(|e| panic!("{e}"));
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (store, conn)
    });

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("redis");
        g.throughput(Throughput::Elements(1));
        g.bench_function("budget_decision/1_in_flight", |b| {
            b.to_async(&rt).iter(|| decide(&store))
        });
        g.bench_function("incr_same_client/1_in_flight", |b| {
            b.to_async(&rt).iter(|| {
                let mut conn = conn.clone();
                async move { incr(&mut conn).await }
            })
        });
        g.throughput(Throughput::Elements(IN_FLIGHT));
        g.bench_function("budget_decision/50_in_flight", |b| {
            b.to_async(&rt).iter(|| {
                let store = store.clone();
                async move {
                    let mut set = tokio::task::JoinSet::new();
                    for _ in 0..IN_FLIGHT {
                        let s = store.clone();
                        set.spawn(async move { decide(&s).await });
                    }
                    while let Some(r) = set.join_next().await {
                        assert!(r.is_ok());
                    }
                }
            })
        });
        g.bench_function("incr_same_client/50_in_flight", |b| {
            b.to_async(&rt).iter(|| {
                let conn = conn.clone();
                async move {
                    let mut set = tokio::task::JoinSet::new();
                    for _ in 0..IN_FLIGHT {
                        let mut conn = conn.clone();
                        set.spawn(async move { incr(&mut conn).await });
                    }
                    while let Some(r) = set.join_next().await {
                        assert!(r.is_ok());
                    }
                }
            })
        });
        g.finish();
    }
    c.final_summary();

    // The server's own yardstick, on the same server.
    let port = server.port.to_string();
    for clients in ["50", "1"] {
        let out = Command::new("redis-benchmark")
            .args([
                "-p", &port, "-t", "incr", "-n", "100000", "-q", "-c", clients,
            ])
            .output();
        match out {
            Ok(o) => println!(
                "redis-benchmark -t incr -n 100000 -q -c {clients}: {}",
                String::from_utf8_lossy(&o.stdout).trim()
            ),
            Err(e) => println!("redis-benchmark not run: {e}"),
        }
    }
}
