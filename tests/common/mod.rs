//! Test harness: a real upstream on port 0, a real redis-server on a free
//! port, the real proxy in-process via `idemgate::run`, and an HTTP client.
#![allow(dead_code, unused_imports)]

pub mod binary;
pub mod certs;
pub mod redis_server;
pub mod upstream;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub use redis_server::RedisServer;
pub use upstream::TestUpstream;

/// `name{labels} value` lines of the exposition, summed for a metric whose
/// labels contain every `wanted` pair.
pub fn sample(text: &str, name: &str, wanted: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b'{')
                    || l.as_bytes().get(name.len()) == Some(&b' '))
        })
        .filter(|l| {
            wanted
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A local address that refuses connections for as long as this lives: the
/// port is bound, so no test running alongside can take it, but nothing
/// listens on it. (A port bound and released at once can be handed to the
/// next test's upstream, which then answers in its place.)
pub struct ClosedPort(tokio::net::TcpSocket);

impl ClosedPort {
    pub fn new() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind("127.0.0.1:0".parse().expect("an address"))
            .expect("bind a local port");
        ClosedPort(socket)
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.local_addr().expect("a bound socket has an address")
    }
}

/// Which store a parametrised test runs against.
pub enum Backend {
    Memory,
    Redis(RedisServer),
}

impl Backend {
    pub fn memory() -> Backend {
        Backend::Memory
    }

    pub async fn redis() -> Backend {
        Backend::Redis(RedisServer::start().await)
    }

    /// The `store:` block for a config.
    pub fn store_yaml(&self) -> String {
        match self {
            Backend::Memory => "store: { backend: memory }".to_owned(),
            // A fresh prefix per test, so tests may share one REDIS_URL.
            Backend::Redis(redis) => format!(
                "store: {{ backend: redis, url: \"{}\", op_timeout: 500ms, key_prefix: \"t{}:\" }}",
                redis.url(),
                fastrand::u64(..)
            ),
        }
    }
}

/// Generates `mod memory` and `mod redis`, each running every listed
/// `async fn name(backend: Backend)` against that store.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::memory()).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::redis().await).await
                }
            )*
        }
    };
}

/// A running proxy; stops (gracefully) when dropped or `stop`ped.
pub struct TestProxy {
    pub addr: SocketAddr,
    /// The admin listener, when the config has an `admin` block (bound on port 0).
    pub admin: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    /// Starts idemgate in-process on 127.0.0.1:0 with this YAML.
    pub async fn start(yaml: &str) -> TestProxy {
        TestProxy::start_with(yaml, None).await
    }

    /// Starts from a file, which `POST /reload` re-reads.
    pub async fn start_file(path: &std::path::Path) -> TestProxy {
        let yaml = std::fs::read_to_string(path).unwrap();
        TestProxy::start_with(&yaml, Some(path.to_owned())).await
    }

    async fn start_with(yaml: &str, path: Option<std::path::PathBuf>) -> TestProxy {
        let config = idemgate::Config::parse(yaml)
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{yaml}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().unwrap();
        let admin = match config.admin {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.expect("bind port 0")),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let listeners = idemgate::server::Listeners {
            proxy: listener,
            admin,
        };
        let task = tokio::spawn(async move {
            idemgate::server::serve(
                config,
                listeners,
                async {
                    let _ = rx.await;
                },
                path.map(idemgate::server::Reloads::new),
            )
            .await
            .expect("proxy run");
        });
        TestProxy {
            addr,
            admin: admin_addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.admin.expect("the config has an admin block")
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET /metrics` on the admin listener: the exposition's text.
    pub async fn metrics(&self) -> String {
        let reply = TestClient::new()
            .send("GET", &self.admin_url("/metrics"), &[], Bytes::new())
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        String::from_utf8(reply.body.to_vec()).expect("UTF-8 metrics")
    }

    /// `POST /reload` on the admin listener with bearer `token`.
    pub async fn reload(&self, token: &str) -> Reply {
        let bearer = format!("Bearer {token}");
        TestClient::new()
            .send(
                "POST",
                &self.admin_url("/reload"),
                &[("authorization", bearer.as_str())],
                Bytes::new(),
            )
            .await
    }

    /// Stops accepting and waits for the drain to end.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("proxy task");
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A config with one upstream `up` and the given routes (YAML list items).
pub fn config(store: &str, upstream: SocketAddr, defaults: &str, routes: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nshutdown_grace: 5s\n{store}\nupstreams:\n  up: {{ url: \"http://{upstream}\", connect_timeout: 500ms }}\ndefaults:\n{defaults}\nroutes:\n{routes}\n"
    )
}

/// An answer, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The problem `code` of an idemgate error response.
    pub fn code(&self) -> String {
        assert_eq!(
            self.headers
                .get("content-type")
                .map(|v| v.to_str().unwrap()),
            Some("application/problem+json"),
            "not a problem response: {self:?}"
        );
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// A tiny HTTP/1.1 client.
#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for TestClient {
    fn default() -> Self {
        TestClient::new()
    }
}

impl TestClient {
    pub fn new() -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// [`TestClient::send`] in a task of its own, for the caller to go on.
    pub fn spawn_send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &'static str,
    ) -> tokio::task::JoinHandle<Reply> {
        let (client, method, url) = (self.clone(), method.to_owned(), url.to_owned());
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        tokio::spawn(async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            client.send(&method, &url, &headers, body).await
        })
    }

    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut request = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.into())).unwrap();
        let response = self.client.request(request).await.expect("request sent");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("whole body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// POST with an idempotency key and a JSON body.
    pub async fn post_key(&self, url: &str, key: &str, body: &str) -> Reply {
        self.send(
            "POST",
            url,
            &[
                ("idempotency-key", key),
                ("content-type", "application/json"),
            ],
            body.to_owned(),
        )
        .await
    }
}

/// On one connection: `first` (a request), its answer's first bytes read,
/// then `then`; returns both answers, the second read until the connection
/// closes (within 10 s).
pub async fn two_on_one(addr: SocketAddr, first: &[u8], then: &[u8]) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(first).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = conn.read(&mut answer).await.unwrap();
    conn.write_all(then).await.unwrap();
    let mut second = String::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut second))
        .await
        .expect("the connection is closed")
        .unwrap();
    (String::from_utf8_lossy(&answer[..n]).into_owned(), second)
}

/// On one connection: `head`, then `size` bytes of body (the proxy must
/// take them all within 30 s, whatever it answers), then `next`; returns
/// what comes back until `until` appears in it (within 15 s of each read).
pub async fn upload_then(
    addr: std::net::SocketAddr,
    head: &str,
    size: usize,
    next: &str,
    until: &str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), stream.write_all(&vec![b'x'; size]))
        .await
        .expect("the body is taken within 30 s")
        .expect("the connection stays open while the body is sent");
    stream.write_all(next.as_bytes()).await.unwrap();
    let mut answers = Vec::new();
    while !String::from_utf8_lossy(&answers).contains(until) {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(15), stream.read(&mut chunk)).await;
        let n = read.expect("the answers within 15 s").unwrap();
        assert!(n > 0, "closed after: {}", String::from_utf8_lossy(&answers));
        answers.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&answers).into_owned()
}

/// Sends with `send` until `done` holds for the reply (every 20 ms, at most
/// `limit`); returns the last reply for the caller's assertions.
pub async fn resend_until<F, Fut>(
    limit: Duration,
    mut send: F,
    done: impl Fn(&Reply) -> bool,
) -> Reply
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Reply>,
{
    let start = Instant::now();
    loop {
        let reply = send().await;
        if done(&reply) || start.elapsed() >= limit {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it returns true, failing after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
