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

async fn oversized_response_is_streamed_and_tombstoned(backend: Backend) {
    let s = Setup::new(backend, "max_response_body: 1KiB", "").await;
    let first = s
        .post("k-big", "{}", &[("x-test-body-bytes", "50000")])
        .await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body.len(), 50000, "the client gets the whole body");
    let dup = s.post("k-big", "{}", &[]).await;
    assert_eq!(
        (dup.status.as_u16(), dup.code().as_str()),
        (409, "response_not_stored")
    );
    assert_eq!(dup.json()["original_status"], 201);
    assert_eq!(s.upstream.hits(), 1);
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

#[tokio::test]
async fn a_stalled_protected_body_is_408_and_nothing_is_claimed() {
    let s = Setup::new(Backend::memory(), "", "").await;
    let head = "POST /api/orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-stall\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"a\":";
    // The body stalls for the spec's 10 s.
    let answer = raw_exchange(s.proxy.addr, head).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"));
    assert_eq!(s.upstream.hits(), 0);
    // Nothing was claimed: the same key goes through.
    assert_eq!(s.post("k-stall", "{\"a\":1234}", &[]).await.status, 201);
}

both_stores!(
    server_errors_release_and_client_errors_are_stored,
    oversized_response_is_streamed_and_tombstoned,
    ttl_expiry_allows_a_new_attempt,
    request_body_limit_is_413,
);
