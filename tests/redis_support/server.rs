//! A `redis-server` of our own, on a free loopback port, and helpers to talk to it.

use std::fmt::Debug;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tower_retry_guard::RedisStore;
// ---------------------------------------------------------------------------------------
// A redis-server of our own.

/// A `redis-server` child process on a loopback port; killed on drop.
pub struct RedisServer {
    pub child: Option<Child>,
    pub port: u16,
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

pub static STARTED: AtomicUsize = AtomicUsize::new(0);

impl RedisServer {
    /// Starts a server on a free port (a few tries, in case another test takes the port).
    pub fn start() -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            match RedisServer::try_start(free_port()) {
                Ok(s) => return s,
                Err(e) => last = e,
            }
        }
        panic!("could not start redis-server: {last}");
    }

    /// Starts a server on `port` (e.g. again after [`RedisServer::kill`]).
    pub fn start_on(port: u16) -> Self {
        let mut last = String::new();
        // The old server's socket may take a moment to be free.
        for _ in 0..20 {
            match RedisServer::try_start(port) {
                Ok(s) => return s,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not start redis-server on port {port}: {last}");
    }

    /// Starts a replica of the server on `master`, on a free port, and waits (up to 10 s)
    /// until its replication link is up.
    pub fn start_replica_of(master: u16) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            match RedisServer::try_start_with(
                free_port(),
                &["--replicaof", "127.0.0.1", &master.to_string()],
            ) {
                Ok(s) => {
                    for _ in 0..200 {
                        if ask(s.port, "INFO replication\r\n")
                            .is_ok_and(|i| i.contains("master_link_status:up"))
                        {
                            return s;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    panic!("the replica on {} did not sync within 10 s", s.port);
                }
                Err(e) => last = e,
            }
        }
        panic!("could not start a replica: {last}");
    }

    /// The process id (for SIGSTOP / SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn try_start(port: u16) -> Result<Self, String> {
        RedisServer::try_start_with(port, &[])
    }

    pub fn try_start_with(port: u16, extra: &[&str]) -> Result<Self, String> {
        // A name unique to this server, to tell it from another test's server on the port.
        let tag = format!(
            "trg-{}-{}.rdb",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::SeqCst)
        );
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dbfilename", &tag])
            .args(extra)
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                "redis-server is not installed (not on PATH): the Redis store tests need it. \
                 Run scripts/test.sh (it installs redis-server with apt-get) or install it \
                 yourself (apt-get install redis-server)."
            ),
            Err(e) => panic!("could not run redis-server: {e}"),
        };
        let mut server = RedisServer {
            child: Some(child),
            port,
        };
        // Up to 5 s for the server to answer, and to be ours.
        for _ in 0..100 {
            if let Some(c) = server.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    server.child = None;
                    return Err(format!("redis-server exited: {status}"));
                }
            }
            if let Ok(answer) = ask(port, "CONFIG GET dbfilename\r\n") {
                if answer.contains(&tag) {
                    return Ok(server);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("redis-server did not answer within 5 s".into())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn store(&self, prefix: &str) -> RedisStore {
        RedisStore::new(&self.url())
            .expect("a redis store")
            .prefix(prefix)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends an inline command and reads the answer (bounded by a timeout).
pub fn ask(port: u16, command: &str) -> io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(command.as_bytes())?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Polls `probe` every 100 ms, up to `tries` times, until it succeeds.
pub async fn eventually<F, Fut, T, E: Debug>(tries: u32, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut last = None;
    for _ in 0..tries {
        match probe().await {
            Ok(v) => return v,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never succeeded; last error: {last:?}");
}
