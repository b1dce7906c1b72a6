//! Timeouts, disconnects, leases and broken connections: recorded, unknown or released.

use std::time::Duration;

use crate::common::{Backend, TestClient, TestProxy, config, eventually, resend_until};
use crate::{Setup, both_stores};

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
    let s = Setup::new(backend, "lease: 1s, on_unknown: lock", "response: 100ms").await;
    let first = s
        .post("k-lease", "{}", &[("x-test-delay-ms", "3000")])
        .await;
    assert_eq!(first.code(), "upstream_timeout");
    assert_eq!(
        s.post("k-lease", "{}", &[]).await.code(),
        "request_in_progress"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await; // the lease under test
    let reply = s.post("k-lease", "{}", &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.code().as_str()),
        (409, "outcome_unknown")
    );
    assert_eq!(s.upstream.hits(), 1);
}

/// A lease shorter than the route's timeouts ends the wait first: the 504
/// says the outcome is unknown. Regression: it said only that the upstream
/// did not answer in time, as for a client timeout, whose retry replays the
/// real outcome; here the retry gets `outcome_unknown`.
async fn a_lease_ending_before_the_answer_says_the_outcome_is_unknown(backend: Backend) {
    let s = Setup::new(backend, "lease: 1s, on_unknown: lock", "response: 5s").await;
    let first = s
        .post("k-short", "{}", &[("x-test-delay-ms", "3000")])
        .await;
    assert_eq!(first.code(), "upstream_timeout");
    assert_unknown_outcome_said(&first);
    let retry = s.post("k-short", "{}", &[]).await;
    assert_eq!(retry.code(), "outcome_unknown", "{retry:?}");
    assert_eq!(s.upstream.hits(), 1);
}

/// Regression: a lease that ended while a stored status's body was still
/// arriving (head at once, body 3 s later, the connection sound) was
/// answered `502 upstream_failed`, "the upstream connection broke"; it is
/// a timeout: `504`, `Retry-After`, the outcome unknown.
async fn a_lease_ending_while_the_body_arrives_is_a_timeout_not_a_break(backend: Backend) {
    let s = Setup::new(backend, "lease: 1s, on_unknown: lock", "response: 5s").await;
    let first = s
        .post("k-slow-body", "{}", &[("x-test-slow-body-ms", "3000")])
        .await;
    assert_eq!(
        (first.status.as_u16(), first.code().as_str()),
        (504, "upstream_timeout"),
        "{first:?}"
    );
    assert!(first.header("retry-after").is_some());
    assert_unknown_outcome_said(&first);
    let retry = s.post("k-slow-body", "{}", &[]).await;
    assert_eq!(retry.code(), "outcome_unknown", "{retry:?}");
    assert_eq!(s.upstream.hits(), 1);
}

/// The 504's detail says the outcome is unknown (not "retry for the real outcome").
fn assert_unknown_outcome_said(reply: &crate::common::Reply) {
    let detail = reply.json()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(detail.contains("outcome is unknown"), "{detail}");
}

/// Regression: the in-flight record expired `ttl` after its claim, so with
/// `ttl` as long as `lease` it was gone when the lease ended, and the retry
/// reached the upstream while the first attempt was still running. Now the
/// outcome stays unknown for the ttl from the lease's end, then expires.
async fn an_unknown_outcome_outlives_a_lease_as_long_as_the_ttl(backend: Backend) {
    let s = Setup::new(
        backend,
        "lease: 1s, ttl: 1s, on_unknown: lock",
        "response: 100ms",
    )
    .await;
    let first = s.post("k-ttl", "{}", &[("x-test-delay-ms", "4000")]).await;
    assert_eq!(first.code(), "upstream_timeout");
    tokio::time::sleep(Duration::from_millis(1100)).await; // the lease under test
    let reply = s.post("k-ttl", "{}", &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.code().as_str()),
        (409, "outcome_unknown"),
        "{reply:?}"
    );
    assert_eq!(s.upstream.hits(), 1);
    // "until an operator resolves it or the ttl passes": then a new attempt.
    let later = resend_until(
        Duration::from_secs(5),
        || s.post("k-ttl", "{}", &[]),
        |r| r.status != 409,
    )
    .await;
    assert_eq!(later.status, 201, "{later:?}");
    assert_eq!(s.upstream.hits(), 2);
}

async fn lease_end_releases_under_release(backend: Backend) {
    let s = Setup::new(backend, "lease: 1s, on_unknown: release", "response: 100ms").await;
    assert_eq!(
        s.post("k-lr", "{}", &[("x-test-delay-ms", "3000")])
            .await
            .code(),
        "upstream_timeout"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await; // the lease under test
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
    let closed = crate::common::ClosedPort::new();
    let routes = "  - { name: orders, match: { path_prefix: /api }, upstream: up }";
    let yaml = config(
        &(backend.store_yaml() + "\nadmin: { listen: 127.0.0.1:0 }"),
        closed.addr(),
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
    // Regression: counted (and logged) as `forwarded`, though nothing went out.
    let metrics = proxy.metrics().await;
    let requests = |outcome| {
        crate::common::sample(
            &metrics,
            "idemgate_requests_total",
            &[("route", "orders"), ("outcome", outcome)],
        )
    };
    assert_eq!(
        (requests("error"), requests("forwarded")),
        (2.0, 0.0),
        "{metrics}"
    );
    // Nor timed as an upstream's latency (request sent → response head).
    assert_eq!(
        crate::common::sample(&metrics, "idemgate_upstream_latency_seconds_count", &[]),
        0.0,
        "{metrics}"
    );
}

both_stores!(
    a_lease_ending_before_the_answer_says_the_outcome_is_unknown,
    a_lease_ending_while_the_body_arrives_is_a_timeout_not_a_break,
    late_completion_after_504_is_replayed,
    client_disconnect_still_recorded,
    lease_end_locks_as_unknown,
    an_unknown_outcome_outlives_a_lease_as_long_as_the_ttl,
    lease_end_releases_under_release,
    reset_after_send_is_unknown,
    reset_after_send_releases_under_release,
    unreachable_upstream_releases_the_key,
);
