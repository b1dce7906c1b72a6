//! What is recorded: stored and released statuses, oversized responses, ttl, body limits.

use std::time::Duration;

use crate::common::Backend;
use crate::{Setup, both_stores};

async fn server_errors_release_and_client_errors_are_stored(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    for status in ["503", "429"] {
        let key = format!("k-{status}");
        assert_eq!(
            s.post(&key, "{}", &[("x-test-status", status)])
                .await
                .status
                .as_str(),
            status
        );
        let retry = s.post(&key, "{}", &[]).await;
        assert_eq!(retry.status, 201, "released after {status}");
        assert!(retry.header("idempotent-replayed").is_none());
    }
    assert_eq!(
        s.post("k-400", "{}", &[("x-test-status", "400")])
            .await
            .status,
        400
    );
    let replay = s.post("k-400", "{}", &[]).await;
    assert_eq!(
        (replay.status.as_u16(), replay.header("idempotent-replayed")),
        (400, Some("true"))
    );
    assert_eq!(s.upstream.hits(), 5);
}

/// A custom `store_statuses` replaces the default 2xx and 4xx: with
/// `["2xx", "409"]` a 400 releases the key (its retry reaches the upstream
/// again), while a 409 (an exact status) and a 201 are stored and replayed.
async fn custom_store_statuses_decide_what_is_stored(backend: Backend) {
    let s = Setup::new(backend, "store_statuses: [\"2xx\", \"409\"]", "").await;
    let first = s.post("k-400", "{}", &[("x-test-status", "400")]).await;
    assert_eq!(first.status, 400);
    let retry = s.post("k-400", "{}", &[]).await;
    assert_eq!(retry.status, 201, "400 is outside store_statuses: released");
    assert!(retry.header("idempotent-replayed").is_none(), "{retry:?}");
    assert_eq!(retry.header("x-upstream-hit"), Some("2"));
    assert_eq!(s.upstream.hits(), 2);
    // The 201 of that second attempt is stored: a third send replays it.
    let replay = s.post("k-400", "{}", &[]).await;
    assert_eq!(
        (replay.status.as_u16(), replay.header("idempotent-replayed")),
        (201, Some("true"))
    );
    assert_eq!(replay.body, retry.body);
    assert_eq!(s.upstream.hits(), 2);

    assert_eq!(
        s.post("k-409", "{}", &[("x-test-status", "409")])
            .await
            .status,
        409
    );
    let replay = s.post("k-409", "{}", &[]).await;
    assert_eq!(
        (replay.status.as_u16(), replay.header("idempotent-replayed")),
        (409, Some("true")),
        "an exact status in store_statuses is stored"
    );
    assert_eq!(replay.header("x-upstream-hit"), Some("3"));
    assert_eq!(s.upstream.hits(), 3);
}

/// A `release_statuses` entry inside 2xx: a 202 releases the key instead of
/// being stored, while the other 2xx (201) are still stored; the list
/// replaces the default one, so a 429 is stored.
async fn release_statuses_inside_2xx_release_the_key(backend: Backend) {
    let s = Setup::new(backend, "release_statuses: [202]", "").await;
    let first = s.post("k-202", "{}", &[("x-test-status", "202")]).await;
    assert_eq!(first.status, 202);
    assert!(first.header("idempotent-replayed").is_none());
    let retry = s.post("k-202", "{}", &[]).await;
    assert_eq!(retry.status, 201, "a 202 is released: a new attempt");
    assert!(retry.header("idempotent-replayed").is_none(), "{retry:?}");
    assert_eq!(retry.header("x-upstream-hit"), Some("2"));
    assert_eq!(s.upstream.hits(), 2);
    let replay = s.post("k-202", "{}", &[]).await;
    assert_eq!(
        (replay.status.as_u16(), replay.header("idempotent-replayed")),
        (201, Some("true")),
        "a 201 is still stored"
    );
    assert_eq!(replay.body, retry.body);
    assert_eq!(s.upstream.hits(), 2);
    // The route's list replaces the default one (408, 425, 429) whole.
    let first = s.post("k-429", "{}", &[("x-test-status", "429")]).await;
    assert_eq!(first.status, 429);
    let replay = s.post("k-429", "{}", &[]).await;
    assert_eq!(
        (replay.status.as_u16(), replay.header("idempotent-replayed")),
        (429, Some("true")),
        "429 is no longer a release status on this route"
    );
    assert_eq!(s.upstream.hits(), 3);
}

/// `timeouts.response` ends at the response's head (SPEC 4.4): a head
/// within it and a body slower than it, but within `total`, is delivered
/// whole and stored, not turned into a 504.
async fn response_timeout_ends_at_the_head_not_the_body(backend: Backend) {
    let s = Setup::new(backend, "", "response: 200ms, total: 3s").await;
    let started = std::time::Instant::now();
    let first = s
        .post("k-slow-body", "{}", &[("x-test-slow-body-ms", "600")])
        .await;
    let took = started.elapsed();
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(
        first.json(),
        serde_json::json!({ "hit": 1, "method": "POST", "body_len": 2 })
    );
    assert!(
        took >= Duration::from_millis(600),
        "the body came after 600 ms, past the response timeout: {took:?}"
    );
    let replay = s.post("k-slow-body", "{}", &[]).await;
    assert_eq!(
        (replay.status.as_u16(), replay.header("idempotent-replayed")),
        (201, Some("true"))
    );
    assert_eq!(replay.body, first.body);
    assert_eq!(s.upstream.hits(), 1);
}

async fn oversized_response_is_streamed_and_tombstoned(backend: Backend) {
    let store = backend.store_yaml() + "\nadmin: { listen: 127.0.0.1:0 }";
    let s = Setup::with_store(backend, &store, "", "max_response_body: 1KiB", "").await;
    // Regression: a body without a Content-Length (chunked) was listed with
    // the size read when the limit was hit; its size is unknown: null.
    for (key, chunked, size) in [
        ("k-big", None, serde_json::json!(50000)),
        (
            "k-big-chunked",
            Some(("x-test-slow-body-ms", "1")),
            serde_json::Value::Null,
        ),
    ] {
        let mut headers = vec![("x-test-body-bytes", "50000")];
        headers.extend(chunked);
        let first = s.post(key, "{}", &headers).await;
        assert_eq!(first.status, 201);
        assert_eq!(first.body.len(), 50000, "the client gets the whole body");
        let dup = s.post(key, "{}", &[]).await;
        assert_eq!(
            (dup.status.as_u16(), dup.code().as_str()),
            (409, "response_not_stored")
        );
        assert_eq!(dup.json()["original_status"], 201);
        let url = s.proxy.admin_url(&format!("/keys/orders/{key}"));
        let records = s.client.send("GET", &url, &[], "").await.json();
        assert_eq!(records[0]["body_stored"], false, "{records}");
        assert_eq!(records[0]["body_size"], size, "{records}");
    }
    assert_eq!(s.upstream.hits(), 2);
}

/// Regression (an audit): an answer over `max_response_body` whose upstream
/// broke off reached its first client as an empty reply (no status line:
/// hyper dropped the connection at the body's error with the head still
/// unwritten), though the access line said 200; and one declared over the
/// limit that broke off before it was `unknown`, not `response_not_stored`.
async fn an_oversized_answer_that_breaks_off_reaches_its_client_short(backend: Backend) {
    let s = Setup::new(backend, "max_response_body: 1KiB", "").await;
    // Content-Length 100000; 5000 bytes (past the limit) or 500 (before it), then the close.
    for (key, sent) in [("k-broken-late", "5000"), ("k-broken-early", "500")] {
        let head = format!(
            "POST /api/orders HTTP/1.1\r\nhost: x\r\nidempotency-key: {key}\r\nx-test-reset-mid-body: 1\r\nx-test-body-bytes: {sent}\r\ncontent-length: 2\r\n\r\n{{}}"
        );
        let answer = raw_exchange(s.proxy.addr, &head).await;
        assert!(answer.starts_with("HTTP/1.1 201"), "{key}: {answer:?}");
        let dup = raw_exchange(s.proxy.addr, &head).await;
        assert!(dup.starts_with("HTTP/1.1 409"), "{key}: {dup:?}");
        assert!(dup.contains("response_not_stored"), "{key}: {dup:?}");
    }
    assert_eq!(s.upstream.hits(), 2);
}

async fn ttl_expiry_allows_a_new_attempt(backend: Backend) {
    // A ttl below the lease is refused (the claim would expire mid-attempt).
    let s = Setup::new(backend, "ttl: 300ms, lease: 300ms", "").await;
    assert_eq!(s.post("k-ttl", "{}", &[]).await.status, 201);
    assert_eq!(
        s.post("k-ttl", "{}", &[])
            .await
            .header("idempotent-replayed"),
        Some("true")
    );
    tokio::time::sleep(Duration::from_millis(450)).await; // the ttl under test
    let after = s.post("k-ttl", "{}", &[]).await;
    assert!(after.header("idempotent-replayed").is_none());
    assert_eq!(s.upstream.hits(), 2);
}

async fn request_body_limit_is_413(backend: Backend) {
    let s = Setup::new(backend, "max_request_body: 1KiB", "").await;
    let big = "x".repeat(2000);
    let reply = s.post("k-413", &big, &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.code().as_str()),
        (413, "request_too_large")
    );
    // Nothing was stored: a fitting body with the same key goes through.
    assert_eq!(s.post("k-413", "{}", &[]).await.status, 201);
    assert_eq!(s.upstream.hits(), 1);
}

/// Raw request bytes to the proxy; returns the first bytes of its answer (within 15 s).
async fn raw_exchange(addr: std::net::SocketAddr, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut out = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(15), stream.read(&mut out)).await;
    let n = read.expect("an answer").unwrap();
    String::from_utf8_lossy(&out[..n]).into_owned()
}

#[tokio::test]
async fn declared_content_length_over_the_limit_is_413_before_reading() {
    let s = Setup::new(Backend::memory(), "max_request_body: 1KiB", "").await;
    // The body is never sent: the answer must not wait for it.
    let head = "POST /api/orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-cl\r\ncontent-length: 1000000\r\n\r\n";
    let answer = raw_exchange(s.proxy.addr, head).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request_too_large"));
    assert_eq!(s.upstream.hits(), 0);
}

/// Regression (an audit): with a limit larger than memory, a request
/// declaring a body that size had its buffer reserved at once, and the
/// refused allocation aborted the whole process. Its 3 bytes then its
/// client's close break it off; the proxy answers the next request.
#[tokio::test]
async fn a_declared_body_larger_than_memory_does_not_abort_the_process() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Setup::new(Backend::memory(), "max_request_body: 1PiB", "").await;
    let mut stream = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    let head = format!(
        "POST /api/orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-huge\r\ncontent-length: {}\r\n\r\nabc",
        1u64 << 50
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer));
    read.await.expect("the connection ends").unwrap();
    assert_eq!(s.post("k-next", "{}", &[]).await.status, 201);
    assert_eq!(s.upstream.hits(), 1, "only the second request is forwarded");
}

/// Regression: a client sending a body over the limit without waiting for
/// `100 Continue` had its connection closed under it after the `413` (its
/// next write failed with a broken pipe or a reset, so most clients never
/// read the answer). The body is now read to its end and thrown away, and
/// the connection serves the client's next request.
#[tokio::test]
async fn a_body_over_the_limit_can_be_sent_whole_and_the_413_read() {
    let s = Setup::new(Backend::memory(), "max_request_body: 1KiB", "").await;
    let size = 16 << 20;
    let head = format!(
        "POST /api/orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-linger\r\ncontent-length: {size}\r\n\r\n"
    );
    let next = "POST /api/orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-linger\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    let answers = crate::common::upload_then(s.proxy.addr, &head, size, next, "HTTP/1.1 201").await;
    assert!(answers.starts_with("HTTP/1.1 413"), "{answers}");
    assert!(answers.contains("request_too_large"), "{answers}");
    assert_eq!(s.upstream.hits(), 1, "only the second request is forwarded");
}

#[tokio::test]
async fn a_stalled_protected_body_is_408_and_nothing_is_claimed() {
    // A total past the stall's 10 s (regression, flaky: with the default
    // total of 10 s the two raced, and the total's 504 sometimes won).
    let s = Setup::new(Backend::memory(), "", "total: 30s").await;
    let head = "POST /api/orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-stall\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"a\":";
    // The body stalls for the spec's 10 s.
    let answer = raw_exchange(s.proxy.addr, head).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"));
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(s.upstream.hits(), 0);
    // Nothing was claimed: the same key goes through.
    assert_eq!(s.post("k-stall", "{\"a\":1234}", &[]).await.status, 201);
}

both_stores!(
    server_errors_release_and_client_errors_are_stored,
    custom_store_statuses_decide_what_is_stored,
    release_statuses_inside_2xx_release_the_key,
    response_timeout_ends_at_the_head_not_the_body,
    oversized_response_is_streamed_and_tombstoned,
    an_oversized_answer_that_breaks_off_reaches_its_client_short,
    ttl_expiry_allows_a_new_attempt,
    request_body_limit_is_413,
);
