//! Clients that go away before their answer: hyper drops the request's
//! future, and nothing the request held may be left behind.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::binary::Binary;
use crate::common::{Backend, RedisServer, TestClient, TestUpstream, eventually, resend_until};
use crate::{Setup, both_stores};

/// A protected POST with `key` written raw, so that the test can drop the
/// connection whenever it likes.
async fn raw_post(addr: std::net::SocketAddr, key: &str, extra: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /api/orders?x=1 HTTP/1.1\r\nhost: x\r\nidempotency-key: {key}\r\ncontent-type: application/json\r\n{extra}content-length: 2\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// What the proxy writes on `stream` until it closes it (within 10 s).
async fn answer_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    let _ = read.await.expect("answered and closed");
    String::from_utf8_lossy(&answer).into_owned()
}

fn requests(metrics: &str, outcome: &str) -> f64 {
    crate::common::sample(
        metrics,
        "idemgate_requests_total",
        &[("route", "orders"), ("outcome", outcome)],
    )
}

/// Regression: a client that went away while its claim was on its way to
/// Redis left the key `in_flight` with no exchange behind it, so its retry
/// got `request_in_progress` and then, at the lease's end, `outcome_unknown`
/// although nothing had been forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_during_the_claim_leaves_no_ownerless_claim() {
    let backend = Backend::Redis(RedisServer::start_own().await);
    // A long op_timeout: the client must be gone while the claim still waits.
    let store = backend
        .store_yaml()
        .replace("op_timeout: 500ms", "op_timeout: 10s")
        + "\nadmin: { listen: 127.0.0.1:0 }";
    let s = Setup::with_store(backend, &store, "", "lease: 1s, on_unknown: lock", "").await;
    // Connected, with the scripts loaded, before Redis stops answering.
    assert_eq!(s.post("k-warm", "{}", &[]).await.status, 201);
    let Backend::Redis(redis) = &s._backend else {
        unreachable!("a Redis backend")
    };
    redis.pause();
    let stream = raw_post(s.proxy.addr, "k-gone-claim", "").await;
    // The claim is on its way once it waits, unread, in the paused server's socket.
    eventually(
        Duration::from_secs(5),
        "the claim sent to Redis",
        || async { redis.unread_bytes() > 0 },
    )
    .await;
    drop(stream);
    // The dropped request is counted (with whatever outcome it had: none yet).
    eventually(Duration::from_secs(5), "the dropped request", || async {
        requests(&s.metrics().await, "error") == 1.0
    })
    .await;
    // Redis now runs the claim, then (with the fix) its undoing release.
    redis.resume();
    let retry = resend_until(
        Duration::from_secs(5),
        || s.post("k-gone-claim", "{}", &[]),
        |r| r.status != 409,
    )
    .await;
    assert_eq!(retry.status, 201, "the retry is forwarded: {retry:?}");
    assert!(retry.header("idempotent-replayed").is_none());
    assert_eq!(s.upstream.hits(), 2, "k-warm and the retry");
}

/// Regression: a request whose client disconnected while its exchange ran
/// had no access log line and was not counted (SPEC 7: one line per request).
async fn client_gone_mid_exchange_is_logged_and_counted_once(backend: Backend) {
    let upstream = TestUpstream::start().await;
    let store = backend.store_yaml() + "\nadmin: { listen: 127.0.0.1:0 }";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idemgate.yaml");
    std::fs::write(&path, crate::yaml(&store, &upstream, "", "")).unwrap();
    let proxy = Binary::serve(&path);
    let client = TestClient::new();
    let metrics_url = format!("http://{}/metrics", proxy.admin.expect("an admin listener"));
    let metrics = || async {
        let reply = client.send("GET", &metrics_url, &[], "").await;
        String::from_utf8(reply.body.to_vec()).unwrap()
    };
    let access = || proxy.access_lines();

    let stream = raw_post(proxy.addr, "k-gone-log", "x-test-delay-ms: 400\r\n").await;
    eventually(Duration::from_secs(5), "the request upstream", || async {
        upstream.hits() == 1
    })
    .await;
    drop(stream);
    eventually(Duration::from_secs(5), "the late completion", || async {
        crate::common::sample(&metrics().await, "idemgate_late_completions_total", &[]) == 1.0
    })
    .await;
    eventually(Duration::from_secs(5), "an access line", || async {
        !access().is_empty()
    })
    .await;
    let lines = access();
    assert_eq!(lines.len(), 1, "exactly one line: {lines:?}");
    assert_eq!(lines[0]["status"], 499, "{}", lines[0]);
    assert_eq!(lines[0]["outcome"], "forwarded");
    assert_eq!(lines[0]["key"], "k-gone-log");
    let text = metrics().await;
    assert_eq!(requests(&text, "forwarded"), 1.0, "counted once: {text}");
    assert_eq!(
        crate::common::sample(
            &text,
            "idemgate_responses_total",
            &[("route", "orders"), ("class", "4xx")]
        ),
        1.0
    );
}

/// Regression: a duplicate waiting on the first attempt (`concurrent:
/// wait`) whose client went away was logged and counted with outcome
/// `error`, as if the store had failed: it is a `conflict`.
async fn a_waiting_duplicate_whose_client_leaves_is_a_conflict(backend: Backend) {
    let store = backend.store_yaml() + "\nadmin: { listen: 127.0.0.1:0 }";
    let s = Setup::with_store(backend, &store, "", "concurrent: wait", "").await;
    let first = raw_post(s.proxy.addr, "k-wait-gone", "x-test-delay-ms: 3000\r\n").await;
    eventually(
        Duration::from_secs(5),
        "the first attempt upstream",
        || async { s.upstream.hits() == 1 },
    )
    .await;
    let duplicate = raw_post(s.proxy.addr, "k-wait-gone", "").await;
    // Its claim takes milliseconds; then it waits on the first attempt (a
    // second's margin for a loaded machine; the attempt runs 3 s).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    drop(duplicate);
    eventually(Duration::from_secs(5), "the duplicate counted", || async {
        requests(&s.metrics().await, "conflict") == 1.0
    })
    .await;
    assert_eq!(requests(&s.metrics().await, "error"), 0.0);
    drop(first);
}

both_stores!(
    client_gone_mid_exchange_is_logged_and_counted_once,
    a_waiting_duplicate_whose_client_leaves_is_a_conflict,
);

/// Regression: a client that went away in the middle of its request body
/// was logged and counted as a `408` the proxy answered (`request_timeout`),
/// as if its body had stalled; it is the client's doing: `499`.
#[tokio::test]
async fn a_client_gone_mid_body_is_logged_499_not_408() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idemgate.yaml");
    std::fs::write(
        &path,
        crate::yaml(&Backend::memory().store_yaml(), &upstream, "", ""),
    )
    .unwrap();
    let proxy = Binary::serve(&path);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = "POST /api/orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-half\r\ncontent-length: 100\r\n\r\n{\"a\"";
    stream.write_all(head.as_bytes()).await.unwrap();
    drop(stream);
    eventually(Duration::from_secs(5), "an access line", || async {
        !proxy.access_lines().is_empty()
    })
    .await;
    let lines = proxy.access_lines();
    assert_eq!(lines.len(), 1, "exactly one line: {lines:?}");
    assert_eq!(lines[0]["status"], 499, "{}", lines[0]);
    assert_eq!(lines[0]["key"], "k-half");
    assert_eq!(upstream.hits(), 0, "nothing forwarded");
}

/// Regression (audit): a body whose chunked framing is invalid was taken
/// for a client gone: answered `408` ("did not arrive in time") on a
/// protected route, and logged as 499 on both kinds of route, though the
/// client was there for its answer. It is a `400 bad_request`, logged 400.
#[tokio::test]
async fn a_malformed_chunked_body_is_a_400_not_a_client_gone() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idemgate.yaml");
    let yaml = crate::yaml(&Backend::memory().store_yaml(), &upstream, "", "").replace(
        "routes:\n",
        "routes:\n  - { name: plain, match: { path_prefix: /plain }, upstream: up, idempotency: off }\n",
    );
    std::fs::write(&path, yaml).unwrap();
    let proxy = Binary::serve(&path);
    for (path, key) in [
        ("/api/orders", "idempotency-key: k-chunk\r\n"),
        ("/plain", ""),
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\n{key}transfer-encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = answer_until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("bad_request"), "{path}: {answer}");
    }
    eventually(Duration::from_secs(5), "two access lines", || async {
        proxy.access_lines().len() == 2
    })
    .await;
    for line in proxy.access_lines() {
        assert_eq!(line["status"], 400, "{line}");
    }
    assert_eq!(upstream.answered(), 0, "no request went whole upstream");
}

/// Regression (a verification audit): a client that half-closed in the
/// middle of its protected body (its end never to come) was told `408`
/// ("did not arrive in time"), where a pass-through got `400`; both are
/// `400 bad_request` now.
#[tokio::test]
async fn a_body_ended_early_by_a_half_close_is_a_400() {
    let upstream = TestUpstream::start().await;
    let yaml = crate::yaml(&Backend::memory().store_yaml(), &upstream, "", "");
    let proxy = crate::common::TestProxy::start(&yaml).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = "POST /api/orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-half-closed\r\ncontent-length: 10\r\n\r\n{\"a\"";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    let answer = answer_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("broke off"), "{answer}");
    assert_eq!(upstream.hits(), 0);
}
