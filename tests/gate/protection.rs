//! The gate and the guards in front of the upstream (SPEC.md section 5):
//! what the circuit breaker hears of protected requests, replays while the
//! upstream is overloaded, and fail-open requests turned away.

use std::time::{Duration, Instant};

use crate::common::{Backend, RedisServer, eventually, sample};
use crate::{Setup, both_stores};

const BREAKER: &str = "circuit_breaker: { consecutive_failures: 2, open_for: 30s }";

/// Regression: the breaker heard of a response timeout only when the late
/// response came (or the lease ended), so an upstream that hung kept
/// getting requests for as long as it hung.
async fn response_timeouts_open_the_breaker_when_they_fire(backend: Backend) {
    let store = backend.store_yaml();
    let s = Setup::with_store(backend, &store, BREAKER, "", "response: 100ms").await;
    for key in ["k-slow-1", "k-slow-2"] {
        let reply = s.post(key, "{}", &[("x-test-delay-ms", "1500")]).await;
        assert_eq!(reply.code(), "upstream_timeout");
    }
    let started = Instant::now();
    let third = s.post("k-third", "{}", &[]).await;
    assert_eq!(
        (third.status.as_u16(), third.code().as_str()),
        (503, "upstream_circuit_open"),
        "{third:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000) && s.upstream.answered() == 0,
        "the breaker opened before the late responses came"
    );
    assert_eq!(s.upstream.hits(), 2);
}

/// A response timeout is one failure: the late response that follows it
/// is not counted again.
async fn a_response_timeout_counts_once(backend: Backend) {
    let store = backend.store_yaml();
    let breaker = "circuit_breaker: { consecutive_failures: 3, open_for: 30s }";
    let s = Setup::with_store(backend, &store, breaker, "", "response: 100ms").await;
    for key in ["k-once-1", "k-once-2"] {
        let reply = s.post(key, "{}", &[("x-test-delay-ms", "300")]).await;
        assert_eq!(reply.code(), "upstream_timeout");
    }
    // Both late responses recorded (and the breaker told whatever it is told).
    for key in ["k-once-1", "k-once-2"] {
        let replay = crate::common::resend_until(
            Duration::from_secs(5),
            || s.post(key, "{}", &[]),
            |r| r.status != 409,
        )
        .await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    }
    let third = s.post("k-once-3", "{}", &[]).await;
    assert_eq!(
        third.status, 201,
        "two failures of three: closed: {third:?}"
    );
}

/// Regression: a protected response whose body broke off counted as a
/// success (the breaker was told from the head alone).
async fn a_body_broken_off_is_a_breaker_failure(backend: Backend) {
    let store = backend.store_yaml();
    let s = Setup::with_store(backend, &store, BREAKER, "", "").await;
    for key in ["k-mid-1", "k-mid-2"] {
        let reply = s
            .post(key, "{}", &[("x-test-break-body-after-ms", "100")])
            .await;
        assert_eq!(reply.code(), "upstream_failed");
    }
    let third = s.post("k-mid-3", "{}", &[]).await;
    assert_eq!(third.code(), "upstream_circuit_open", "{third:?}");
    assert_eq!(s.upstream.hits(), 2);
}

/// Replays never depend on the upstream: with its one bulkhead permit
/// held by a slow request, a new key is turned away and a replay is not.
async fn replays_are_served_while_the_upstream_is_overloaded(backend: Backend) {
    let store = backend.store_yaml();
    let s = Setup::with_store(backend, &store, "max_in_flight: 1", "", "").await;
    assert_eq!(s.post("k-done", "{}", &[]).await.status, 201);
    let slow = {
        let (client, url) = (s.client.clone(), s.url());
        tokio::spawn(async move {
            let headers = [("idempotency-key", "k-hold"), ("x-test-delay-ms", "1000")];
            client.send("POST", &url, &headers, "{}").await
        })
    };
    eventually(
        Duration::from_secs(5),
        "the slow request upstream",
        || async { s.upstream.hits() == 2 },
    )
    .await;
    let turned = s.post("k-new", "{}", &[]).await;
    assert_eq!(turned.code(), "upstream_overloaded");
    let replay = s.post("k-done", "{}", &[]).await;
    assert_eq!(
        (replay.status.as_u16(), replay.header("idempotent-replayed")),
        (201, Some("true")),
        "{replay:?}"
    );
    assert_eq!(slow.await.unwrap().status, 201);
    assert_eq!(s.upstream.hits(), 2);
}

/// Regression: a request forwarded unprotected (`on_unavailable: forward`)
/// that the bulkhead turned away was counted as `passthrough` (and as a
/// fail-open forward) instead of `rejected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_request_turned_away_is_counted_rejected() {
    let mut redis = RedisServer::start_own().await;
    let store = format!(
        "store: {{ backend: redis, url: \"{}\", op_timeout: 200ms, on_unavailable: forward }}\nadmin: {{ listen: 127.0.0.1:0 }}",
        redis.url()
    );
    redis.kill();
    let s = Setup::with_store(Backend::Redis(redis), &store, "max_in_flight: 1", "", "").await;
    let slow = {
        let (client, url) = (s.client.clone(), s.url());
        tokio::spawn(async move {
            let headers = [("idempotency-key", "k-fo-1"), ("x-test-delay-ms", "1000")];
            client.send("POST", &url, &headers, "{}").await
        })
    };
    eventually(
        Duration::from_secs(5),
        "the slow request upstream",
        || async { s.upstream.hits() == 1 },
    )
    .await;
    let turned = s.post("k-fo-2", "{}", &[]).await;
    assert_eq!(turned.code(), "upstream_overloaded");
    assert_eq!(slow.await.unwrap().status, 201);
    let text = s.metrics().await;
    let requests = |outcome: &str| {
        sample(
            &text,
            "idemgate_requests_total",
            &[("route", "orders"), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("rejected"), 1.0, "{text}");
    assert_eq!(requests("passthrough"), 1.0);
    assert_eq!(
        sample(
            &text,
            "idemgate_fail_open_forwards_total",
            &[("route", "orders")]
        ),
        1.0
    );
}

both_stores!(
    response_timeouts_open_the_breaker_when_they_fire,
    a_response_timeout_counts_once,
    a_body_broken_off_is_a_breaker_failure,
    replays_are_served_while_the_upstream_is_overloaded,
);
