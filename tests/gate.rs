//! The idempotency gate end to end (SPEC.md section 4), against the memory
//! store and a real redis-server alike.

mod common;

use std::time::Duration;

use common::{Backend, TestClient, TestProxy, TestUpstream, config, eventually, resend_until};

/// A proxy with one protected route `/api` (settings in `idempotency`,
/// YAML flow mapping entries) in front of a fresh upstream.
struct Setup {
    upstream: TestUpstream,
    proxy: TestProxy,
    client: TestClient,
    _backend: Backend,
}

impl Setup {
    async fn new(backend: Backend, idempotency: &str, timeouts: &str) -> Setup {
        let upstream = TestUpstream::start().await;
        let routes = format!(
            "  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up, timeouts: {{ {timeouts} }}, idempotency: {{ {idempotency} }} }}"
        );
        let yaml = config(
            &backend.store_yaml(),
            upstream.addr,
            "  timeouts: { response: 5s, total: 10s }\n  idempotency: { lease: 5s, ttl: 1h }",
            &routes,
        );
        let proxy = TestProxy::start(&yaml).await;
        Setup {
            upstream,
            proxy,
            client: TestClient::new(),
            _backend: backend,
        }
    }

    fn url(&self) -> String {
        self.proxy.url("/api/orders?x=1")
    }

    async fn post(&self, key: &str, body: &str, extra: &[(&str, &str)]) -> common::Reply {
        let mut headers = vec![
            ("idempotency-key", key),
            ("content-type", "application/json"),
        ];
        headers.extend_from_slice(extra);
        self.client
            .send("POST", &self.url(), &headers, body.to_owned())
            .await
    }
}

async fn replay_is_byte_identical(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    let first = s.post("k-replay", "{\"a\":1}", &[]).await;
    assert_eq!(first.status, 201);
    assert!(
        first.header("idempotent-replayed").is_none(),
        "the first response is not a replay"
    );
    let second = s.post("k-replay", "{\"a\":1}", &[]).await;
    assert_eq!(second.status, first.status);
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    let mut replayed = second.headers.clone();
    replayed.remove("idempotent-replayed");
    replayed.remove("x-request-id");
    let mut original = first.headers.clone();
    original.remove("x-request-id");
    assert_eq!(
        replayed, original,
        "headers replayed as they came (incl. both set-cookie lines)"
    );
    assert_eq!(first.headers.get_all("set-cookie").iter().count(), 2);
    assert_eq!(s.upstream.hits(), 1);
}

async fn key_missing_and_invalid_are_400(backend: Backend) {
    let s = Setup::new(backend, "key_max_length: 8", "").await;
    let missing = s.client.send("POST", &s.url(), &[], "{}").await;
    assert_eq!(
        (missing.status.as_u16(), missing.code().as_str()),
        (400, "idempotency_key_missing")
    );
    for bad in ["has space", "waytoolongkey", "\"unterminated"] {
        let reply = s.post(bad, "{}", &[]).await;
        assert_eq!(
            (reply.status.as_u16(), reply.code().as_str()),
            (400, "idempotency_key_invalid"),
            "{bad}"
        );
    }
    let twice = s
        .client
        .send(
            "POST",
            &s.url(),
            &[("idempotency-key", "a"), ("idempotency-key", "b")],
            "{}",
        )
        .await;
    assert_eq!(twice.code(), "idempotency_key_invalid");
    assert_eq!(s.upstream.hits(), 0);
    // A Structured-Field string is the same key unquoted.
    assert_eq!(s.post("\"sf\"", "{}", &[]).await.status, 201);
    assert_eq!(
        s.post("sf", "{}", &[]).await.header("idempotent-replayed"),
        Some("true")
    );
}

async fn keyless_requests_pass_when_not_required(backend: Backend) {
    let s = Setup::new(backend, "require_key: false", "").await;
    assert_eq!(s.client.send("POST", &s.url(), &[], "{}").await.status, 201);
    assert_eq!(s.client.send("POST", &s.url(), &[], "{}").await.status, 201);
    assert_eq!(s.upstream.hits(), 2);
}

async fn methods_outside_the_list_pass_through(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    for _ in 0..2 {
        let reply = s
            .client
            .send("PUT", &s.url(), &[("idempotency-key", "k")], "{}")
            .await;
        assert_eq!(reply.status, 201);
    }
    assert_eq!(s.upstream.hits(), 2);
}

async fn reused_key_with_other_request_is_422(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    // While the first attempt is in flight...
    let slow = {
        let (client, url) = (s.client.clone(), s.url());
        tokio::spawn(async move {
            client
                .send(
                    "POST",
                    &url,
                    &[("idempotency-key", "k-reuse"), ("x-test-delay-ms", "600")],
                    "one",
                )
                .await
        })
    };
    eventually(
        Duration::from_secs(5),
        "first attempt reached the upstream",
        || async { s.upstream.hits() == 1 },
    )
    .await;
    assert_eq!(
        s.post("k-reuse", "two", &[]).await.code(),
        "idempotency_key_reused"
    );
    assert_eq!(slow.await.unwrap().status, 201);
    // ...and after it completed.
    let reply = s.post("k-reuse", "two", &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.code().as_str()),
        (422, "idempotency_key_reused")
    );
    assert_eq!(s.upstream.hits(), 1);
}

async fn thirty_concurrent_duplicates_reject(backend: Backend) {
    let s = Setup::new(backend, "concurrent: reject", "").await;
    let replies = burst(&s, 30, "k-burst", &[("x-test-delay-ms", "400")]).await;
    assert_eq!(s.upstream.hits(), 1, "the upstream acted once");
    let created = replies.iter().filter(|r| r.status == 201).count();
    let in_progress: Vec<_> = replies.iter().filter(|r| r.status == 409).collect();
    assert!(created >= 1);
    assert_eq!(created + in_progress.len(), 30, "{replies:?}");
    for r in in_progress {
        assert_eq!(r.code(), "request_in_progress");
        assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    }
}

async fn thirty_concurrent_duplicates_wait(backend: Backend) {
    let s = Setup::new(backend, "concurrent: wait", "").await;
    let replies = burst(&s, 30, "k-wait", &[("x-test-delay-ms", "400")]).await;
    assert_eq!(s.upstream.hits(), 1);
    let body = &replies[0].body;
    for r in &replies {
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(&r.body, body, "everyone gets the same response");
    }
}

async fn waiters_claim_afresh_when_the_attempt_is_released(backend: Backend) {
    let s = Setup::new(backend, "concurrent: wait", "").await;
    let first = {
        let (client, url) = (s.client.clone(), s.url());
        tokio::spawn(async move {
            let headers = [
                ("idempotency-key", "k-rel"),
                ("content-type", "application/json"),
                ("x-test-delay-ms", "400"),
                ("x-test-status", "503"),
            ];
            client.send("POST", &url, &headers, "{}").await
        })
    };
    eventually(
        Duration::from_secs(5),
        "first attempt in flight",
        || async { s.upstream.hits() == 1 },
    )
    .await;
    let waiters = burst(&s, 5, "k-rel", &[]).await;
    assert_eq!(
        first.await.unwrap().status,
        503,
        "the 503 is passed on and releases the key"
    );
    assert_eq!(
        s.upstream.hits(),
        2,
        "exactly one waiter made the new attempt"
    );
    for r in &waiters {
        assert_eq!(r.status, 201, "{r:?}");
    }
}

async fn burst(s: &Setup, n: usize, key: &str, extra: &[(&str, &str)]) -> Vec<common::Reply> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, url, key) = (s.client.clone(), s.url(), key.to_owned());
        let extra: Vec<(String, String)> = extra
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut headers = vec![
                ("idempotency-key", key.as_str()),
                ("content-type", "application/json"),
            ];
            headers.extend(extra.iter().map(|(a, b)| (a.as_str(), b.as_str())));
            client.send("POST", &url, &headers, "{}").await
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    replies
}

async fn late_completion_after_504_is_replayed(backend: Backend) {
    let s = Setup::new(backend, "", "response: 200ms").await;
    let first = s.post("k-late", "{}", &[("x-test-delay-ms", "700")]).await;
    assert_eq!(
        (first.status.as_u16(), first.code().as_str()),
        (504, "upstream_timeout")
    );
    assert!(first.header("retry-after").is_some());
    eventually(Duration::from_secs(5), "the exchange finished", || async {
        s.upstream.answered() == 1
    })
    .await;
    // Until the record lands, a retry is told request_in_progress.
    let retry = resend_until(
        Duration::from_secs(5),
        || s.post("k-late", "{}", &[]),
        |r| r.status != 409,
    )
    .await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(s.upstream.hits(), 1);
}

async fn client_disconnect_still_recorded(backend: Backend) {
    use tokio::io::AsyncWriteExt;
    let s = Setup::new(backend, "", "").await;
    let mut stream = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    let request = "POST /api/orders?x=1 HTTP/1.1\r\nhost: x\r\nidempotency-key: k-gone\r\ncontent-type: application/json\r\nx-test-delay-ms: 300\r\ncontent-length: 2\r\n\r\n{}";
    stream.write_all(request.as_bytes()).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "request reached the upstream",
        || async { s.upstream.hits() == 1 },
    )
    .await;
    drop(stream);
    eventually(Duration::from_secs(5), "the upstream answered", || async {
        s.upstream.answered() == 1
    })
    .await;
    // Until the record lands, a retry is told request_in_progress.
    let retry = resend_until(
        Duration::from_secs(5),
        || s.post("k-gone", "{}", &[]),
        |r| r.status != 409,
    )
    .await;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(s.upstream.hits(), 1);
}

async fn lease_end_locks_as_unknown(backend: Backend) {
    let s = Setup::new(backend, "lease: 300ms, on_unknown: lock", "response: 100ms").await;
    let first = s
        .post("k-lease", "{}", &[("x-test-delay-ms", "1500")])
        .await;
    assert_eq!(first.code(), "upstream_timeout");
    assert_eq!(
        s.post("k-lease", "{}", &[]).await.code(),
        "request_in_progress"
    );
    tokio::time::sleep(Duration::from_millis(400)).await; // the lease under test
    let reply = s.post("k-lease", "{}", &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.code().as_str()),
        (409, "outcome_unknown")
    );
    assert_eq!(s.upstream.hits(), 1);
}

async fn lease_end_releases_under_release(backend: Backend) {
    let s = Setup::new(
        backend,
        "lease: 300ms, on_unknown: release",
        "response: 100ms",
    )
    .await;
    assert_eq!(
        s.post("k-lr", "{}", &[("x-test-delay-ms", "1200")])
            .await
            .code(),
        "upstream_timeout"
    );
    tokio::time::sleep(Duration::from_millis(400)).await; // the lease under test
    let second = s.post("k-lr", "{}", &[]).await;
    assert_eq!(
        second.status, 201,
        "a new attempt after the lease: {second:?}"
    );
    assert_eq!(second.header("x-upstream-hit"), Some("2"));
    // The first attempt was abandoned at its lease end; the record is the new owner's.
    let third = s.post("k-lr", "{}", &[]).await;
    assert_eq!(third.header("idempotent-replayed"), Some("true"));
    assert_eq!(third.header("x-upstream-hit"), Some("2"));
}

async fn reset_after_send_is_unknown(backend: Backend) {
    let s = Setup::new(backend, "on_unknown: lock", "").await;
    let first = s.post("k-reset", "{}", &[("x-test-reset", "1")]).await;
    assert_eq!(
        (first.status.as_u16(), first.code().as_str()),
        (502, "upstream_failed")
    );
    assert_eq!(s.post("k-reset", "{}", &[]).await.code(), "outcome_unknown");
    let mid = s
        .post("k-mid", "{}", &[("x-test-reset-mid-body", "1")])
        .await;
    assert_eq!(mid.code(), "upstream_failed");
    assert_eq!(s.post("k-mid", "{}", &[]).await.code(), "outcome_unknown");
    assert_eq!(s.upstream.hits(), 2);
}

async fn reset_after_send_releases_under_release(backend: Backend) {
    let s = Setup::new(backend, "on_unknown: release", "").await;
    assert_eq!(
        s.post("k-rr", "{}", &[("x-test-reset", "1")]).await.code(),
        "upstream_failed"
    );
    assert_eq!(s.post("k-rr", "{}", &[]).await.status, 201);
    assert_eq!(s.upstream.hits(), 2);
}

async fn unreachable_upstream_releases_the_key(backend: Backend) {
    let closed = common::redis_server::free_port();
    let routes = "  - { name: orders, match: { path_prefix: /api }, upstream: up }";
    let yaml = config(
        &backend.store_yaml(),
        format!("127.0.0.1:{closed}").parse().unwrap(),
        "  timeouts: { response: 5s, total: 10s }",
        routes,
    );
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    for _ in 0..2 {
        let reply = client
            .post_key(&proxy.url("/api/x"), "k-unreach", "{}")
            .await;
        assert_eq!(
            (reply.status.as_u16(), reply.code().as_str()),
            (502, "upstream_unreachable")
        );
    }
}

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
    let s = Setup::new(backend, "ttl: 300ms", "").await;
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

async fn scopes_keep_callers_apart(backend: Backend) {
    let s = Setup::new(backend, "", "").await;
    let alice = s
        .post("k-scope", "{\"a\":1}", &[("authorization", "Bearer alice")])
        .await;
    let bob = s
        .post("k-scope", "{\"b\":2}", &[("authorization", "Bearer bob")])
        .await;
    assert_eq!((alice.status.as_u16(), bob.status.as_u16()), (201, 201));
    assert!(
        bob.header("idempotent-replayed").is_none(),
        "bob never sees alice's record"
    );
    let again = s
        .post("k-scope", "{\"a\":1}", &[("authorization", "Bearer alice")])
        .await;
    assert_eq!(again.body, alice.body);
    assert_eq!(s.upstream.hits(), 2);
}

async fn forwarded_request_carries_key_budget_and_forwarding_headers(backend: Backend) {
    let s = Setup::new(backend, "", "total: 10s").await;
    assert_eq!(s.post("\"k-fwd\"", "{}", &[]).await.status, 201);
    let h = s.upstream.last_headers();
    assert_eq!(
        h.get("idempotency-key").unwrap(),
        "\"k-fwd\"",
        "the key is forwarded unchanged"
    );
    let budget: u64 = h
        .get("x-request-timeout-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(budget > 0 && budget <= 10_000);
    assert!(h.get("x-forwarded-for").is_some());
    assert!(h.get("traceparent").is_some());
}

both_stores!(
    replay_is_byte_identical,
    key_missing_and_invalid_are_400,
    keyless_requests_pass_when_not_required,
    methods_outside_the_list_pass_through,
    reused_key_with_other_request_is_422,
    thirty_concurrent_duplicates_reject,
    thirty_concurrent_duplicates_wait,
    waiters_claim_afresh_when_the_attempt_is_released,
    late_completion_after_504_is_replayed,
    client_disconnect_still_recorded,
    lease_end_locks_as_unknown,
    lease_end_releases_under_release,
    reset_after_send_is_unknown,
    reset_after_send_releases_under_release,
    unreachable_upstream_releases_the_key,
    server_errors_release_and_client_errors_are_stored,
    oversized_response_is_streamed_and_tombstoned,
    ttl_expiry_allows_a_new_attempt,
    request_body_limit_is_413,
    scopes_keep_callers_apart,
    forwarded_request_carries_key_budget_and_forwarding_headers,
);

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
