//! TLS everywhere (SPEC.md section 7): an HTTPS listener (h1 and h2 by
//! ALPN), HTTPS upstreams with a custom CA and client certificates, and the
//! gate over `rediss://`. Certificates are made per test with rcgen.

mod common;

use std::process::Command;

use bytes::Bytes;
use common::certs::Pki;
use common::{TestClient, TestProxy, TestUpstream};
use http_body_util::{BodyExt, Full};

fn upstream_yaml(store: &str, url: &str, tls: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\n{store}\nupstreams:\n  up: {{ url: \"{url}\", connect_timeout: 1s{tls} }}\nroutes:\n  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up }}\n"
    )
}

/// A TLS listener in front of `upstream`, every path passed through.
fn tls_listener_yaml(pki: &Pki, upstream: &TestUpstream) -> String {
    format!(
        "listen: {{ address: \"127.0.0.1:0\", tls: {{ cert_file: \"{}\", key_file: \"{}\" }} }}\nupstreams:\n  up: {{ url: \"http://{}\" }}\ndefaults: {{ idempotency: off }}\nroutes:\n  - {{ name: all, match: {{ path_prefix: / }}, upstream: up }}\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        upstream.addr
    )
}

/// An HTTPS client trusting the test CA, offering h2 or http/1.1 by ALPN.
async fn https_get(pki: &Pki, h2: bool, url: &str) -> (http::Version, http::StatusCode) {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(pki.client_config())
        .https_only();
    let connector = if h2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let response = client
        .request(http::Request::get(url).body(Full::default()).unwrap())
        .await
        .expect("https request");
    let version = response.version();
    let status = response.status();
    response.into_body().collect().await.unwrap();
    (version, status)
}

#[tokio::test]
async fn https_listener_serves_http1_and_h2_by_alpn() {
    let pki = Pki::new();
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&tls_listener_yaml(&pki, &upstream)).await;
    let url = format!("https://localhost:{}/x", proxy.addr.port());
    assert_eq!(
        https_get(&pki, true, &url).await,
        (http::Version::HTTP_2, http::StatusCode::CREATED)
    );
    assert_eq!(
        https_get(&pki, false, &url).await,
        (http::Version::HTTP_11, http::StatusCode::CREATED)
    );
    assert_eq!(
        upstream.last_headers().get("x-forwarded-proto").unwrap(),
        "https"
    );
}

/// A TLS connection to `proxy` offering only `alpn`, made `after` its TCP connect.
async fn tls_connect(
    pki: &Pki,
    proxy: &TestProxy,
    alpn: &[u8],
    after: std::time::Duration,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut config = pki.client_config();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(after).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.expect("the handshake")
}

/// Regressions on the TLS listener: a client offering only ALPN `http/1.0`
/// was refused the handshake (`no_application_protocol`), though HTTP/1.0
/// is served; and the 10 s a head has counted from the handshake's end, not
/// from the connection's start, so a slow client held it about 20 s.
#[tokio::test]
async fn tls_serves_http_1_0_and_times_the_head_from_the_connect() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&tls_listener_yaml(&pki, &upstream)).await;
    let mut old = tls_connect(&pki, &proxy, b"http/1.0", std::time::Duration::ZERO).await;
    old.write_all(b"GET /x HTTP/1.0\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = old.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 201") || answer.starts_with("HTTP/1.0 201"),
        "{answer}"
    );

    let connected = std::time::Instant::now();
    // The slow client under test: 6 s to begin its handshake.
    let mut slow = tls_connect(&pki, &proxy, b"http/1.1", std::time::Duration::from_secs(6)).await;
    slow.write_all(b"GET /x HTTP/1.1\r\nhost: lo")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        slow.read_to_end(&mut rest),
    );
    let _ = read.await.expect("the proxy closes the connection");
    let held = connected.elapsed();
    assert!(
        held < std::time::Duration::from_secs(12),
        "held {held:?}: the head's 10 s count from the connect"
    );
}

#[tokio::test]
async fn https_upstream_with_custom_ca() {
    let pki = Pki::new();
    let upstream = TestUpstream::start_tls(pki.server_config(false)).await;
    let tls = format!(", tls: {{ ca_file: \"{}\" }}", pki.ca.display());
    let url = format!("https://localhost:{}", upstream.addr.port());
    let proxy = TestProxy::start(&upstream_yaml("", &url, &tls)).await;
    let client = TestClient::new();
    assert_eq!(
        client
            .post_key(&proxy.url("/api/o"), "k-tls", "{}")
            .await
            .status,
        201
    );
    assert_eq!(
        client
            .post_key(&proxy.url("/api/o"), "k-tls", "{}")
            .await
            .header("idempotent-replayed"),
        Some("true")
    );
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn mtls_upstream_rejects_a_missing_client_certificate_and_accepts_the_right_one() {
    let pki = Pki::new();
    let upstream = TestUpstream::start_tls(pki.server_config(true)).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let client = TestClient::new();

    let without = format!(", tls: {{ ca_file: \"{}\" }}", pki.ca.display());
    let proxy = TestProxy::start(&upstream_yaml("", &url, &without)).await;
    for _ in 0..2 {
        // A refused handshake is a connect failure: the key is released, never unknown.
        let refused = client.post_key(&proxy.url("/api/o"), "k-mtls", "{}").await;
        assert_eq!(
            (refused.status.as_u16(), refused.code().as_str()),
            (502, "upstream_unreachable")
        );
    }
    assert_eq!(upstream.hits(), 0);
    proxy.stop().await;

    let with = format!(
        ", tls: {{ ca_file: \"{}\", client_cert_file: \"{}\", client_key_file: \"{}\" }}",
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let proxy = TestProxy::start(&upstream_yaml("", &url, &with)).await;
    assert_eq!(
        client
            .post_key(&proxy.url("/api/o"), "k-mtls", "{}")
            .await
            .status,
        201
    );
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn wrong_ca_is_502_upstream_unreachable_and_releases_the_key() {
    let pki = Pki::new();
    let upstream = TestUpstream::start_tls(pki.server_config(false)).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let tls = format!(", tls: {{ ca_file: \"{}\" }}", pki.other_ca.display());
    let proxy = TestProxy::start(&upstream_yaml("", &url, &tls)).await;
    let client = TestClient::new();
    for _ in 0..2 {
        // The second attempt is not told request_in_progress or outcome_unknown: the key was released.
        let reply = client.post_key(&proxy.url("/api/o"), "k-ca", "{}").await;
        assert_eq!(
            (reply.status.as_u16(), reply.code().as_str()),
            (502, "upstream_unreachable")
        );
    }
    assert_eq!(upstream.hits(), 0);
}

/// A TCP listener that accepts and then says nothing, holding every
/// connection open: to a TLS client, a handshake that never completes.
struct SilentListener {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentListener {
    async fn start() -> SilentListener {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(stream);
            }
        });
        SilentListener {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SilentListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Regression: `connect_timeout` bounded only the TCP connect, so an https
/// upstream that accepted TCP and stalled the handshake gave `504` and left
/// the key `unknown`, although the upstream never saw the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshake_is_a_connect_failure_within_connect_timeout() {
    let pki = Pki::new();
    let silent = SilentListener::start().await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nupstreams:\n  up: {{ url: \"https://localhost:{}\", connect_timeout: 300ms, circuit_breaker: off, tls: {{ ca_file: \"{}\" }} }}\ndefaults:\n  timeouts: {{ response: 3s, total: 4s }}\n  idempotency: {{ lease: 4s, on_unknown: lock }}\nroutes:\n  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up }}\n",
        silent.addr.port(),
        pki.ca.display()
    );
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    for attempt in 1..=2 {
        let started = std::time::Instant::now();
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.post_key(&proxy.url("/api/o"), "k-stall", "{}"),
        )
        .await
        .expect("an answer");
        // The second attempt is forwarded again: the key was released, not left unknown.
        assert_eq!(
            (reply.status.as_u16(), reply.code().as_str()),
            (502, "upstream_unreachable"),
            "attempt {attempt}: {reply:?}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_millis(1500),
            "attempt {attempt} took {:?}, past connect_timeout",
            started.elapsed()
        );
        assert_eq!(silent.accepted(), attempt, "a new connection per attempt");
    }
}

/// A private redis-server with a TLS port of its own (and a plain one, by
/// which the test knows the server is its own and up).
struct TlsRedis {
    _server: common::RedisServer,
    tls_port: u16,
}

impl TlsRedis {
    async fn start(pki: &Pki) -> TlsRedis {
        let tls_port = std::sync::Mutex::new(0);
        let server = common::RedisServer::start_own_with(|| {
            let port = common::redis_server::free_port();
            *tls_port.lock().unwrap() = port;
            [
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                pki.server_cert.to_str().unwrap(),
                "--tls-key-file",
                pki.server_key.to_str().unwrap(),
                "--tls-ca-cert-file",
                pki.ca.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
            ]
            .map(String::from)
            .to_vec()
        })
        .await;
        let tls_port = *tls_port.lock().unwrap();
        TlsRedis {
            _server: server,
            tls_port,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_works_over_rediss() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki).await;
    let upstream = TestUpstream::start().await;
    let store = format!(
        "store: {{ backend: redis, url: \"rediss://localhost:{}/0\", op_timeout: 2s, tls: {{ ca_file: \"{}\" }} }}",
        redis.tls_port,
        pki.ca.display()
    );
    let proxy = TestProxy::start(&upstream_yaml(
        &store,
        &format!("http://{}", upstream.addr),
        "",
    ))
    .await;
    let client = TestClient::new();
    let first = client
        .post_key(&proxy.url("/api/o"), "k-rediss", "{}")
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    let second = client
        .post_key(&proxy.url("/api/o"), "k-rediss", "{}")
        .await;
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.hits(), 1);
}

#[test]
fn check_names_bad_pem_files() {
    let pki = Pki::new();
    let junk = pki.dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let cases = [
        format!(
            "listen: {{ address: \"127.0.0.1:0\", tls: {{ cert_file: \"{}\", key_file: \"{}\" }} }}\n",
            junk.display(),
            pki.server_key.display()
        ),
        format!(
            "listen: {{ address: \"127.0.0.1:0\", tls: {{ cert_file: \"{}\", key_file: \"{}\" }} }}\n",
            pki.server_cert.display(),
            pki.dir.path().join("absent.key").display()
        ),
    ];
    for (case, name) in cases.iter().zip(["junk.pem", "absent.key"]) {
        let path = pki.dir.path().join("c.yaml");
        let yaml = format!(
            "{case}upstreams: {{ up: {{ url: \"https://localhost:1\", tls: {{ ca_file: \"{}\" }} }} }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: up }} ]\n",
            junk.display()
        );
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "names {name}: {err}");
        assert!(
            err.contains("upstreams.up.tls") && err.contains("junk.pem"),
            "{err}"
        );
    }
}

/// Regressions (audit): a TLS file named by `${VAR}` was shown as the
/// variable expanded to (a secret's path); a combined PEM (cert_file and
/// key_file one file) without a key blamed cert_file; a lone
/// client_cert_file had no line.
#[test]
fn tls_file_errors_quote_the_file_as_written_and_blame_the_right_field() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let run = |yaml: String, env: (&str, &str)| {
        let path = dir.join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .args(["check", "--config"])
            .arg(&path)
            .env(env.0, env.1)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let routes = "upstreams: { up: { url: \"http://127.0.0.1:1\" } }\nroutes: [ { name: a, match: { path: /a }, upstream: up } ]\n";
    let secret = dir.join("SECRET-part-7731").join("cert.pem");
    let err = run(
        format!(
            "listen: {{ address: \"127.0.0.1:0\", tls: {{ cert_file: \"${{TLS_TEST_CERT_7731}}\", key_file: \"{}\" }} }}\n{routes}",
            pki.server_key.display()
        ),
        ("TLS_TEST_CERT_7731", secret.to_str().unwrap()),
    );
    assert!(
        !err.contains("SECRET-part-7731"),
        "the expanded path shown: {err}"
    );
    assert!(
        err.contains("listen.tls.cert_file") && err.contains("${TLS_TEST_CERT_7731}"),
        "{err}"
    );
    let combined = pki.server_cert.display().to_string();
    let err = run(
        format!(
            "listen: {{ address: \"127.0.0.1:0\", tls: {{ cert_file: \"{combined}\", key_file: \"{combined}\" }} }}\n{routes}"
        ),
        ("UNUSED_7731", ""),
    );
    assert!(
        err.contains("listen.tls.key_file"),
        "the key's field: {err}"
    );
    let err = run(
        format!(
            "upstreams: {{ up: {{ url: \"https://127.0.0.1:1\", tls: {{ client_cert_file: \"{combined}\" }} }} }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: up }} ]\n"
        ),
        ("UNUSED_7731", ""),
    );
    assert!(
        err.contains("go together") && err.contains("(line 1"),
        "{err}"
    );
}

#[tokio::test]
async fn listener_certificates_are_re_read_on_reload() {
    let old = Pki::new();
    let new = Pki::new();
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    let install = |pki: &Pki| {
        std::fs::copy(&pki.server_cert, &cert).unwrap();
        std::fs::copy(&pki.server_key, &key).unwrap();
    };
    install(&old);
    let path = dir.path().join("idemgate.yaml");
    let yaml = format!(
        "listen: {{ address: \"127.0.0.1:0\", tls: {{ cert_file: \"{}\", key_file: \"{}\" }} }}\nadmin: {{ listen: 127.0.0.1:0, token: t }}\nupstreams:\n  up: {{ url: \"http://{}\" }}\ndefaults: {{ idempotency: off }}\nroutes:\n  - {{ name: all, match: {{ path_prefix: / }}, upstream: up }}\n",
        cert.display(),
        key.display(),
        upstream.addr
    );
    std::fs::write(&path, yaml).unwrap();
    let proxy = TestProxy::start_file(&path).await;
    let url = format!("https://localhost:{}/x", proxy.addr.port());
    assert_eq!(
        https_get(&old, false, &url).await.1,
        http::StatusCode::CREATED
    );
    install(&new);
    assert_eq!(proxy.reload("t").await.status, 200);
    assert_eq!(
        https_get(&new, false, &url).await.1,
        http::StatusCode::CREATED,
        "the new certificate is served"
    );
}

/// A TCP relay to `to` that holds each connection `delay` before it passes
/// bytes: to a TLS client, a handshake that takes that long.
async fn slow_relay(to: std::net::SocketAddr, delay: std::time::Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut outbound = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    addr
}

/// `timeouts.response` runs from the request being sent (SPEC 4.4):
/// establishing the connection has its own `connect_timeout`. Regression:
/// a 400 ms TLS handshake ate a 300 ms response timeout, and a fast upstream
/// got a 504 (and a breaker failure, and on a protected route an exchange
/// left waiting).
#[tokio::test]
async fn connecting_does_not_count_against_the_response_timeout() {
    let pki = Pki::new();
    let upstream = TestUpstream::start_tls(pki.server_config(false)).await;
    let relay = slow_relay(upstream.addr, std::time::Duration::from_millis(400)).await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nupstreams:\n  up: {{ url: \"https://localhost:{}\", connect_timeout: 2s, tls: {{ ca_file: \"{}\" }} }}\ndefaults:\n  timeouts: {{ response: 300ms, total: 5s }}\nroutes:\n  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up }}\n  - {{ name: all, match: {{ path_prefix: / }}, upstream: up, idempotency: off }}\n",
        relay.port(),
        pki.ca.display()
    );
    // A proxy each, so that each request needs a new upstream connection.
    let client = TestClient::new();
    let proxy = TestProxy::start(&yaml).await;
    let passed = client
        .send("GET", &proxy.url("/x"), &[], Bytes::new())
        .await;
    assert_eq!(passed.status, 201, "passed through: {passed:?}");
    let proxy = TestProxy::start(&yaml).await;
    let protected = client
        .post_key(&proxy.url("/api/o"), "k-slow-connect", "{}")
        .await;
    assert_eq!(protected.status, 201, "protected: {protected:?}");
    assert_eq!(upstream.hits(), 2);
}

/// Regression: a reload kept an upstream whose settings had not changed,
/// with the TLS configuration built from its files at start, so a CA (or
/// client certificate) replaced in place was not taken up until a restart.
#[tokio::test]
async fn upstream_tls_files_are_re_read_on_reload() {
    let pki = Pki::new();
    let upstream = TestUpstream::start_tls(pki.server_config(false)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::copy(&pki.other_ca, &ca).unwrap(); // the wrong CA first
    let path = dir.path().join("idemgate.yaml");
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0, token: t }}\nupstreams:\n  up: {{ url: \"https://localhost:{}\", circuit_breaker: off, tls: {{ ca_file: \"{}\" }} }}\ndefaults: {{ idempotency: off }}\nroutes:\n  - {{ name: all, match: {{ path_prefix: / }}, upstream: up }}\n",
        upstream.addr.port(),
        ca.display()
    );
    std::fs::write(&path, yaml).unwrap();
    let proxy = TestProxy::start_file(&path).await;
    let client = TestClient::new();
    let url = proxy.url("/x");
    let get = || client.send("GET", &url, &[], Bytes::new());
    assert_eq!(get().await.code(), "upstream_unreachable");
    std::fs::copy(&pki.ca, &ca).unwrap();
    assert_eq!(proxy.reload("t").await.status, 200);
    assert_eq!(get().await.status, 201, "the new CA is used");
    assert_eq!(upstream.hits(), 1);
}

#[test]
fn store_tls_with_the_memory_backend_is_a_warning_not_silence() {
    let pki = Pki::new();
    let store = format!(
        "store: {{ backend: memory, tls: {{ ca_file: \"{}\" }} }}",
        pki.ca.display()
    );
    let config =
        idemgate::Config::parse(&upstream_yaml(&store, "http://127.0.0.1:9", "")).expect("valid");
    assert!(
        config.warnings.iter().any(|w| w.contains("store.tls")),
        "{:?}",
        config.warnings
    );
}

/// Regression (an admin and TLS audit): `store.tls` with a `redis://` URL
/// is "ignored, with a warning", `check` said, and `serve` refused to start
/// ("store.url is not a valid Redis URL"); a cluster's `redis://` seeds
/// likewise. It is ignored: the gate works over plain Redis.
#[tokio::test]
async fn store_tls_with_a_plain_redis_url_is_ignored_not_fatal() {
    let pki = Pki::new();
    let redis = common::RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let store = format!(
        "store: {{ backend: redis, url: \"{}\", tls: {{ ca_file: \"{}\" }} }}",
        redis.url(),
        pki.ca.display()
    );
    let yaml = upstream_yaml(&store, &format!("http://{}", upstream.addr), "");
    let config = idemgate::Config::parse(&yaml).expect("valid");
    assert!(
        config.warnings.iter().any(|w| w.contains("store.tls")),
        "{:?}",
        config.warnings
    );
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    assert_eq!(
        client
            .post_key(&proxy.url("/api/o"), "k-plain", "{}")
            .await
            .status,
        201
    );
    let again = client.post_key(&proxy.url("/api/o"), "k-plain", "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    // A cluster's plain seeds too: the proxy starts (its connection is lazy).
    let closed = common::ClosedPort::new();
    let cluster = format!(
        "store: {{ backend: redis, cluster: [\"redis://{}\"], tls: {{ ca_file: \"{}\" }} }}",
        closed.addr(),
        pki.ca.display()
    );
    let proxy = TestProxy::start(&upstream_yaml(
        &cluster,
        &format!("http://{}", upstream.addr),
        "",
    ))
    .await;
    proxy.stop().await;
}

/// Regression: `check` only looked for PEM blocks in `store.tls`, so a CA
/// whose body is not a certificate, or a client key that does not match
/// its certificate, passed; `serve` then failed blaming `store.url`, or ran
/// and never reached the store. Both are checked as `serve` builds them.
#[test]
fn check_refuses_store_tls_files_serve_cannot_use() {
    let pki = Pki::new();
    let ca = std::fs::read_to_string(&pki.ca).unwrap();
    let mut lines: Vec<String> = ca.lines().map(str::to_owned).collect();
    lines[2] = "A".repeat(lines[2].len()); // valid base64, broken DER
    let corrupt = pki.dir.path().join("corrupt-ca.pem");
    std::fs::write(&corrupt, lines.join("\n") + "\n").unwrap();
    let cases = [
        format!("ca_file: \"{}\"", corrupt.display()),
        format!(
            "client_cert_file: \"{}\", client_key_file: \"{}\"",
            pki.client_cert.display(),
            pki.server_key.display()
        ),
    ];
    for tls in cases {
        let path = pki.dir.path().join("c.yaml");
        let yaml = format!(
            "listen: 127.0.0.1:0\nstore: {{ backend: redis, url: \"rediss://localhost:6390/0\", tls: {{ {tls} }} }}\nupstreams: {{ up: {{ url: \"http://127.0.0.1:1\" }} }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: up }} ]\n"
        );
        std::fs::write(&path, yaml).unwrap();
        for command in ["check", "serve"] {
            let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
                .args([command, "--config"])
                .arg(&path)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{command} {tls}: {err}");
            assert!(err.contains("store.tls"), "{command} {tls}: {err}");
            assert!(!err.contains("not a valid Redis URL"), "{command}: {err}");
        }
    }
}

/// Regression: TLS files were looked at only once everything else was
/// valid, so a file with another mistake was reported a run later, and
/// without a line. They are reported with the rest, each at its field.
#[test]
fn tls_file_errors_come_with_the_others_at_their_field() {
    let missing = "/nonexistent/idemgate-ca.pem";
    let yaml = format!(
        "upstreams:\n  up:\n    url: \"https://localhost:1\"\n    connect_timeout: 3x\n    tls:\n      ca_file: \"{missing}\"\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: up }} ]\n"
    );
    let errors = idemgate::Config::parse(&yaml).expect_err("invalid").0;
    let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
    assert!(
        paths.contains(&"upstreams.up.connect_timeout"),
        "{errors:#?}"
    );
    let tls = errors
        .iter()
        .find(|e| e.path == "upstreams.up.tls.ca_file")
        .unwrap_or_else(|| panic!("{errors:#?}"));
    assert_eq!(tls.position.map(|p| p.0), Some(6), "{tls}");
    assert!(tls.to_string().contains(missing), "{tls}");
    // Every bad file of one block (regression: the first hid the others).
    let both = yaml.replace(
        "      ca_file:",
        "      client_cert_file: \"/nonexistent/c.pem\"\n      client_key_file: \"/nonexistent/k.pem\"\n      ca_file:",
    );
    let errors = idemgate::Config::parse(&both).expect_err("invalid").0;
    for field in ["ca_file", "client_cert_file", "client_key_file"] {
        let path = format!("upstreams.up.tls.{field}");
        assert!(errors.iter().any(|e| e.path == path), "{path}: {errors:#?}");
    }
}

/// Regression: a listener certificate whose body is not a certificate was
/// blamed on `key_file` ("does not match the certificate").
#[test]
fn a_corrupt_listener_certificate_is_blamed_on_cert_file() {
    let pki = Pki::new();
    let cert = std::fs::read_to_string(&pki.server_cert).unwrap();
    let mut lines: Vec<String> = cert.lines().map(str::to_owned).collect();
    lines[2] = "A".repeat(lines[2].len()); // valid base64, broken DER
    let corrupt = pki.dir.path().join("corrupt-server.pem");
    std::fs::write(&corrupt, lines.join("\n") + "\n").unwrap();
    let yaml = format!(
        "listen: {{ address: \"127.0.0.1:0\", tls: {{ cert_file: \"{}\", key_file: \"{}\" }} }}\nupstreams: {{ up: {{ url: \"http://127.0.0.1:1\" }} }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: up }} ]\n",
        corrupt.display(),
        pki.server_key.display()
    );
    let errors = idemgate::Config::parse(&yaml).expect_err("invalid").0;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].path, "listen.tls.cert_file", "{}", errors[0]);
}

/// Regression (an audit): with both listener files missing, only
/// `cert_file` was reported; the key's trouble showed once it was fixed.
#[test]
fn both_missing_listener_files_are_reported_at_once() {
    let yaml = "listen: { address: \"127.0.0.1:0\", tls: { cert_file: /nonexistent/cert.pem, key_file: /nonexistent/key.pem } }\nupstreams: { up: { url: \"http://127.0.0.1:1\" } }\nroutes: [ { name: a, match: { path: /a }, upstream: up } ]\n";
    let errors = idemgate::Config::parse(yaml).expect_err("invalid").0;
    for path in ["listen.tls.cert_file", "listen.tls.key_file"] {
        let e = errors.iter().find(|e| e.path == path);
        assert!(
            e.is_some_and(|e| e.position.is_some()),
            "{path}: {errors:#?}"
        );
    }
}

/// Regression: an encrypted private key was "no usable private key: no
/// items found", with a hint to point at a readable PEM file.
#[test]
fn an_encrypted_key_is_named_as_one() {
    let pki = Pki::new();
    let key = pki.dir.path().join("encrypted.key");
    std::fs::write(
        &key,
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    let yaml = format!(
        "listen: {{ address: \"127.0.0.1:0\", tls: {{ cert_file: \"{}\", key_file: \"{}\" }} }}\nupstreams: {{ up: {{ url: \"http://127.0.0.1:1\" }} }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: up }} ]\n",
        pki.server_cert.display(),
        key.display()
    );
    let errors = idemgate::Config::parse(&yaml).expect_err("invalid").0;
    let e = errors[0].to_string();
    assert_eq!(errors[0].path, "listen.tls.key_file", "{e}");
    assert!(e.contains("encrypted private key"), "{e}");
}

/// Regression: a truncated PEM file was "missing section end marker:
/// [67, 69, 82, ...]", the marker as a list of byte values.
#[test]
fn a_truncated_pem_file_is_said_in_words() {
    let pki = Pki::new();
    let truncated = pki.dir.path().join("truncated.pem");
    std::fs::write(&truncated, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    let yaml = format!(
        "upstreams: {{ up: {{ url: \"https://localhost:1\", tls: {{ ca_file: \"{}\" }} }} }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: up }} ]\n",
        truncated.display()
    );
    let errors = idemgate::Config::parse(&yaml).expect_err("invalid").0;
    let e = errors[0].to_string();
    assert!(
        e.contains("\"-----END CERTIFICATE-----\" line is missing"),
        "{e}"
    );
}

/// A self-signed certificate for localhost valid from `from` to `to`
/// (seconds from now), and its key, written to `dir`.
fn cert_valid(dir: &std::path::Path, name: &str, from: i64, to: i64) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(from);
    params.not_after = now + time::Duration::seconds(to);
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    )
}

/// Regression (an audit): an expired listener certificate was served
/// without a word (every client then refuses the handshake), and so was
/// one about to expire, or one not valid yet. `check`, `serve` and reloads
/// warn, naming the file and the date; so for an upstream client certificate.
#[test]
fn certificates_out_of_their_validity_or_near_its_end_are_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let day = 86_400;
    let routes = "upstreams:\n  up: { url: \"http://127.0.0.1:9\" }\nroutes: [ { name: a, match: { path: /a }, upstream: up } ]\n";
    let listener = |(cert, key): (String, String)| {
        format!(
            "listen: {{ address: \"127.0.0.1:0\", tls: {{ cert_file: \"{cert}\", key_file: \"{key}\" }} }}\n{routes}"
        )
    };
    let cases = [
        ("expired", -30 * day, -day, "expired on"),
        ("soon", -30 * day, 3 * day, "expires on"),
        ("later", day, 90 * day, "valid only from"),
    ];
    for (name, from, to, said) in cases {
        let (cert, key) = cert_valid(dir.path(), name, from, to);
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, listener((cert.clone(), key))).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "a warning, not an error: {text}");
        assert!(
            text.contains(said) && text.contains(&cert),
            "{name}: {text}"
        );
    }
    let (cert, key) = cert_valid(dir.path(), "fine", -day, 90 * day);
    let fine = idemgate::Config::parse(&listener((cert, key))).expect("valid");
    assert!(fine.warnings.is_empty(), "{:?}", fine.warnings);
    let (cert, key) = cert_valid(dir.path(), "client", -30 * day, -day);
    let client = idemgate::Config::parse(&format!(
        "upstreams:\n  up: {{ url: \"https://127.0.0.1:9\", tls: {{ client_cert_file: \"{cert}\", client_key_file: \"{key}\" }} }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: up }} ]\n"
    ))
    .expect("valid");
    assert_eq!(client.warnings.len(), 1, "{:?}", client.warnings);
    assert!(
        client.warnings[0].contains("expired on"),
        "{:?}",
        client.warnings
    );
    assert!(
        client.warnings[0].contains("then reload"),
        "{:?}",
        client.warnings
    );
    // The store's client certificate too (regression, an audit: not warned),
    // renewed by a restart: the store reads it once (regression, the TLS
    // audit: "renew it, then reload", and the reload left the old one in use).
    let store_yaml = format!(
        "store: {{ backend: redis, url: \"rediss://127.0.0.1:6380/0\", tls: {{ client_cert_file: \"{cert}\", client_key_file: \"{key}\" }} }}\nupstreams:\n  up: {{ url: \"http://127.0.0.1:9\" }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: up }} ]\n"
    );
    let store = idemgate::Config::parse(&store_yaml).expect("valid");
    assert!(
        store.warnings.iter().any(|w| w.contains("expired on")
            && w.contains(&cert)
            && w.contains("then restart idemgate")),
        "{:?}",
        store.warnings
    );
    // Renewed in place: a reload says it takes a restart.
    let (fresh, fresh_key) = cert_valid(dir.path(), "renewed", -day, 90 * day);
    std::fs::copy(&fresh, &cert).unwrap();
    std::fs::copy(&fresh_key, &key).unwrap();
    let renewed = idemgate::Config::parse(&store_yaml).expect("valid");
    assert!(renewed.warnings.is_empty(), "{:?}", renewed.warnings);
    assert_eq!(
        store.restart_needed(&renewed),
        vec!["store.tls (its settings or files)"]
    );
    assert!(renewed.restart_needed(&renewed).is_empty());
}

/// Regression (a shutdown audit): a client silent in its TLS handshake held
/// a shutdown for up to the head's 10 s (and past a short grace, was
/// reported as a connection whose requests were cut off), though no request
/// of it could be in flight; a plain listener's closed at once.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_tls_handshake() {
    let pki = Pki::new();
    let upstream = TestUpstream::start().await;
    let yaml = format!(
        "shutdown_grace: 30s\n{}",
        tls_listener_yaml(&pki, &upstream)
    );
    let proxy = TestProxy::start(&yaml).await;
    let silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // Accepted (its task running) before the shutdown begins.
    let reply = https_get(&pki, false, &proxy.url("/x").replace("http:", "https:")).await;
    assert_eq!(reply.1, 201);
    tokio::time::timeout(std::time::Duration::from_secs(5), proxy.stop())
        .await
        .expect("shutdown ends well before the handshake's 10 s");
    drop(silent);
}
