//! Concurrent duplicates: reject and wait, and waiters claiming afresh after a release.

use std::time::Duration;

use crate::common::{Backend, eventually};
use crate::{Setup, both_stores};

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
    let headers = [
        ("idempotency-key", "k-rel"),
        ("content-type", "application/json"),
        ("x-test-delay-ms", "400"),
        ("x-test-status", "503"),
    ];
    let first = s.client.spawn_send("POST", &s.url(), &headers, "{}");
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

async fn burst(
    s: &Setup,
    n: usize,
    key: &str,
    extra: &[(&str, &str)],
) -> Vec<crate::common::Reply> {
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

both_stores!(
    a_waiter_is_answered_when_shutdown_begins,
    a_waiter_is_not_woken_by_other_keys,
    thirty_concurrent_duplicates_reject,
    thirty_concurrent_duplicates_wait,
    waiters_claim_afresh_when_the_attempt_is_released,
);

/// Claims the proxy has made so far (its store metrics).
async fn claims(s: &Setup) -> f64 {
    crate::common::sample(
        &s.metrics().await,
        "idemgate_store_latency_seconds_count",
        &[("op", "claim")],
    )
}

/// Regression: each transition in the memory store woke every waiter of
/// `concurrent: wait`, whatever its key, and each claimed again: with many
/// waiters, a claim per waiter per transition. A waiter now wakes for its
/// own key's slot (one in 64) and its backoff steps (at most 100 ms) only;
/// on Redis too, where this process's transitions now wake its waiters.
async fn a_waiter_is_not_woken_by_other_keys(backend: Backend) {
    let store = backend.store_yaml() + "\nadmin: { listen: 127.0.0.1:0 }";
    // Nothing ends while the test runs, however slow the machine.
    let s = Setup::with_store(
        backend,
        &store,
        "",
        "concurrent: wait, lease: 60s",
        "response: 60s, total: 70s",
    )
    .await;
    let slow = || {
        let (client, url) = (s.client.clone(), s.url());
        tokio::spawn(async move {
            let headers = [
                ("idempotency-key", "k-slow"),
                ("content-type", "application/json"),
                ("x-test-delay-ms", "60000"),
            ];
            client.send("POST", &url, &headers, "{}").await
        })
    };
    let first = slow();
    eventually(
        Duration::from_secs(5),
        "first attempt in flight",
        || async { s.upstream.hits() == 1 },
    )
    .await;
    let waiter = slow();
    eventually(
        Duration::from_secs(5),
        "the waiter's first claim",
        || async { claims(&s).await >= 2.0 },
    )
    .await;
    let (before, started) = (claims(&s).await, std::time::Instant::now());
    let others = 100;
    for i in 0..others {
        assert_eq!(s.post(&format!("k-other-{i}"), "{}", &[]).await.status, 201);
    }
    let waiter_claims = claims(&s).await - before - f64::from(others);
    // Backoff: a claim per 100 ms at most (after 5, 10, .. ms), and a few
    // other keys in the waiter's shard.
    let backoff = 10.0 + started.elapsed().as_millis() as f64 / 100.0;
    assert!(
        waiter_claims <= backoff + 10.0,
        "the waiter claimed {waiter_claims} times during {others} other keys' transitions"
    );
    assert!(!waiter.is_finished(), "still waiting for k-slow");
    waiter.abort();
    first.abort();
}

/// Regression: a waiting duplicate (`concurrent: wait`) held the shutdown
/// until `shutdown_grace` ended, and was then cut off without an answer.
/// When shutdown begins it is told at once to retry (`409
/// request_in_progress`, `Retry-After: 1`; another instance waits for the
/// attempt), while the attempt itself finishes and is recorded. Its answer
/// says `Connection: close` (regression, an audit: the waiters were let go
/// before the connections were told to finish, and a waiter answered first
/// went out without it, its connection closed right after).
async fn a_waiter_is_answered_when_shutdown_begins(backend: Backend) {
    let store = backend.store_yaml() + "\nadmin: { listen: 127.0.0.1:0 }";
    let s = Setup::with_store(backend, &store, "", "concurrent: wait", "").await;
    let headers = [
        ("idempotency-key", "k-stop"),
        ("content-type", "application/json"),
        ("x-test-delay-ms", "3000"),
    ];
    let first = s.client.spawn_send("POST", &s.url(), &headers, "{}");
    eventually(
        Duration::from_secs(5),
        "first attempt in flight",
        || async { s.upstream.hits() == 1 },
    )
    .await;
    let waiter = s.client.spawn_send("POST", &s.url(), &headers[..2], "{}");
    eventually(Duration::from_secs(5), "the duplicate waits", || async {
        claims(&s).await >= 2.0
    })
    .await;
    let Setup {
        upstream, proxy, ..
    } = s;
    let stopped = tokio::spawn(proxy.stop());
    let answer = waiter.await.unwrap();
    assert!(!first.is_finished(), "answered before the attempt ended");
    assert_eq!(answer.code(), "request_in_progress", "{answer:?}");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
    assert_eq!(first.await.unwrap().status, 201);
    stopped.await.unwrap();
    assert_eq!(upstream.hits(), 1);
}
