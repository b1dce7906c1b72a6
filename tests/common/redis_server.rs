//! A private redis-server per test on a free port (or `REDIS_URL` when set).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    url: String,
    child: Option<Child>,
    /// Arguments after `--port` (kept for a restart).
    args: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server --port <free> --save '' --appendonly no`, or uses
    /// `REDIS_URL`. Fails (never skips) when redis-server is missing.
    pub async fn start() -> RedisServer {
        if let Ok(url) = std::env::var("REDIS_URL") {
            return RedisServer {
                port: 0,
                url,
                child: None,
                args: Vec::new(),
            };
        }
        Self::start_own().await
    }

    /// Always a private server (for tests that stop or pause it). A port
    /// taken by another test's server in the meantime makes this one exit,
    /// and it starts again on another port: a test never shares a server it
    /// believes its own.
    pub async fn start_own() -> RedisServer {
        Self::start_own_with(Vec::new).await
    }

    /// [`start_own`](Self::start_own) with more arguments, made afresh for
    /// every attempt (e.g. a TLS port of its own, which may be taken too).
    pub async fn start_own_with(args: impl Fn() -> Vec<String>) -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                port,
                url: format!("redis://127.0.0.1:{port}/0"),
                child: None,
                args: args(),
            };
            server.spawn();
            if server.wait_ready().await {
                return server;
            }
        }
        panic!("redis-server found its ports taken five times in a row");
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut args = vec!["--port", &port];
        args.extend(self.args.iter().map(String::as_str));
        self.child = Some(spawn_redis(&args));
    }

    /// Waits until our own child answers on the port (true), or exits (false:
    /// the port was taken).
    async fn wait_ready(&mut self) -> bool {
        let start = Instant::now();
        let pid = self.child.as_ref().expect("a spawned redis-server").id();
        loop {
            let child = self.child.as_mut().expect("a spawned redis-server");
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if self.server_pid().await == Some(pid) {
                return true;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server on port {} did not start",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `process_id` of the server answering on the port, if one does.
    async fn server_pid(&self) -> Option<u32> {
        let client = redis::Client::open(self.url.as_str()).ok()?;
        let connect = client.get_multiplexed_async_connection();
        let mut conn = tokio::time::timeout(Duration::from_millis(500), connect)
            .await
            .ok()?
            .ok()?;
        let mut info = redis::cmd("INFO");
        info.arg("server");
        let info = tokio::time::timeout(
            Duration::from_millis(500),
            info.query_async::<String>(&mut conn),
        )
        .await
        .ok()?
        .ok()?;
        info.lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
    }

    pub async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return false;
        };
        let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_millis(500),
            client.get_multiplexed_async_connection(),
        )
        .await
        else {
            return false;
        };
        let pong: Result<Result<String, _>, _> = tokio::time::timeout(
            Duration::from_millis(500),
            redis::cmd("PING").query_async(&mut conn),
        )
        .await;
        matches!(pong, Ok(Ok(_)))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills the server (SIGKILL): the store is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        assert!(
            self.wait_ready().await,
            "port {} was taken while redis-server was down",
            self.port
        );
    }

    /// SIGSTOP: the server hangs (connections stay open, nothing answers).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Bytes that reached the server's connections and that it has not read
    /// (the kernel's receive queues, from `/proc/net/tcp`): while it is
    /// paused, proof that a command was sent to it.
    pub fn unread_bytes(&self) -> u64 {
        let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        let port = format!(":{:04X}", self.port);
        tcp.lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // local address, state 01 (established), tx_queue:rx_queue
                let local = fields.get(1)?;
                (local.ends_with(&port) && fields.get(3) == Some(&"01")).then_some(())?;
                let rx = fields.get(4)?.split_once(':')?.1;
                u64::from_str_radix(rx, 16).ok()
            })
            .sum()
    }

    fn signal(&self, name: &str) {
        assert!(self.signalled(name), "kill -{name} failed");
    }

    /// Whether the signal reached the server (not when it has exited).
    fn signalled(&self, name: &str) -> bool {
        let pid = self.child.as_ref().expect("a private redis-server").id();
        Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Kills every normal client connection but `conn` (`CLIENT KILL`): the
    /// proxy's connections drop, as on a Redis restart or a firewall's cut.
    pub async fn kill_clients(conn: &mut redis::aio::MultiplexedConnection) {
        let _: u64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query_async(conn)
            .await
            .unwrap();
    }

    /// A connection for direct inspection in tests.
    /// `cmd`'s answer within 500 ms (none from a paused server).
    pub async fn ask<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Option<T> {
        let client = redis::Client::open(self.url.as_str()).ok()?;
        let asked = async {
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            cmd.query_async(&mut conn).await.ok()
        };
        tokio::time::timeout(Duration::from_millis(500), asked)
            .await
            .ok()
            .flatten()
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }
}

impl Drop for RedisServer {
    /// Resumed if paused, then killed. A server that exited on its own (its
    /// port taken, as `start_own_with` retries) is not there to resume
    /// (regression: the failed `kill -CONT` panicked the retry).
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signalled("CONT");
        }
        self.kill();
    }
}

/// `redis-server --bind 127.0.0.1 --save '' --appendonly no` plus `args`,
/// quiet; fails with a how-to when redis-server is missing (never skips).
pub fn spawn_redis(args: &[&str]) -> Child {
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start redis-server ({e}). The Redis tests need it: install it with \
                 `apt-get install -y redis-server` (Debian/Ubuntu) or `brew install redis`, \
                 or point REDIS_URL at a Redis you can flush"
            )
        })
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A three-master Redis Cluster on free ports, made with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        RedisCluster::start_with(0).await
    }

    /// Three masters with a replica each, a replica taking over a master
    /// that has not answered for 1 s (`cluster-node-timeout`).
    pub async fn start_replicated() -> RedisCluster {
        let cluster = RedisCluster::start_with(1).await;
        // Replicas in sync, so that one may take over.
        let start = Instant::now();
        for node in &cluster.nodes {
            loop {
                let mut conn = node.connection().await;
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "replica not in sync: {info}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        cluster
    }

    /// The index of a node that is a master now.
    pub async fn a_master(&self) -> usize {
        *self.masters().await.first().expect("no master")
    }

    /// The indices of the nodes that say they are masters now (a paused
    /// node says nothing).
    pub async fn masters(&self) -> Vec<usize> {
        let mut masters = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let role: Option<Vec<redis::Value>> = node.ask(redis::cmd("ROLE")).await;
            if matches!(role.as_deref().and_then(<[_]>::first), Some(redis::Value::BulkString(b)) if b == b"master")
            {
                masters.push(i);
            }
        }
        masters
    }

    /// Each node's number of keys (0 for a paused node).
    pub async fn dbsizes(&self) -> Vec<u64> {
        let mut sizes = Vec::new();
        for node in &self.nodes {
            sizes.push(node.ask(redis::cmd("DBSIZE")).await.unwrap_or(0));
        }
        sizes
    }

    async fn start_with(replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..3 * (1 + replicas) {
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let node_dir = node_dir.to_str().unwrap().to_owned();
            let node = RedisServer::start_own_with(|| {
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    "--dir",
                ]
                .into_iter()
                .map(String::from)
                .chain([node_dir.clone()])
                .collect()
            })
            .await;
            nodes.push(node);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli (package redis-tools) is needed for the cluster tests");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let start = Instant::now();
        for node in &nodes {
            loop {
                let mut conn = node.connection().await;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "cluster did not converge: {info}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        RedisCluster { nodes, _dir: dir }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url().to_owned()).collect()
    }

    /// Kills node `i` and starts it again on its port with its
    /// `nodes.conf` gone: a new, empty node, while the others still list
    /// its old identity (without an address once they notice, `noaddr`)
    /// as the master of its slots.
    pub async fn restart_wiped(&mut self, i: usize) {
        self.nodes[i].kill();
        std::fs::remove_file(self._dir.path().join(format!("n{i}/nodes.conf"))).unwrap();
        self.nodes[i].restart().await;
    }

    /// `CLUSTER NODES` as node `i` sees the cluster.
    pub async fn nodes_seen_by(&self, i: usize) -> String {
        (self.nodes[i]
            .ask(redis::cmd("CLUSTER").arg("NODES").to_owned())
            .await)
            .unwrap_or_default()
    }
}
