//! Redis-only behaviour: several proxy instances sharing one Redis, and the
//! store failing under a running proxy.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{RedisServer, TestClient, TestProxy, TestUpstream, config, eventually, sample};

fn yaml(
    redis: &RedisServer,
    upstream: &TestUpstream,
    store_extra: &str,
    idempotency: &str,
) -> String {
    let store = format!(
        "store: {{ backend: redis, url: \"{}\", op_timeout: 300ms, key_prefix: \"f{}:\"{store_extra} }}",
        redis.url(),
        fastrand::u64(..)
    );
    let routes = format!(
        "  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up, idempotency: {{ {idempotency} }} }}"
    );
    config(
        &store,
        upstream.addr,
        "  timeouts: { response: 5s, total: 10s }",
        &routes,
    )
}

/// `yaml` with an admin listener (for `/readyz` and `/metrics`).
fn with_admin(yaml: String) -> String {
    format!("admin: {{ listen: 127.0.0.1:0 }}\n{yaml}")
}

async fn duplicates_across_two_instances(idempotency: &str) -> (TestUpstream, Vec<common::Reply>) {
    let redis = RedisServer::start().await;
    let upstream = TestUpstream::start().await;
    let config = yaml(&redis, &upstream, "", idempotency);
    // Both instances must share one key prefix: reuse the same YAML.
    let a = TestProxy::start(&config).await;
    let b = TestProxy::start(&config).await;
    let client = TestClient::new();
    let mut tasks = Vec::new();
    for i in 0..30 {
        let url = if i % 2 == 0 {
            a.url("/api/o")
        } else {
            b.url("/api/o")
        };
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let headers = [("idempotency-key", "k-multi"), ("x-test-delay-ms", "400")];
            client.send("POST", &url, &headers, "{}").await
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    (upstream, replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_waiting_duplicates_reach_the_upstream_once() {
    let (upstream, replies) = duplicates_across_two_instances("concurrent: wait").await;
    assert_eq!(upstream.hits(), 1);
    assert!(
        replies
            .iter()
            .all(|r| r.status == 201 && r.body == replies[0].body),
        "{replies:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_rejecting_duplicates_reach_the_upstream_once() {
    let (upstream, replies) = duplicates_across_two_instances("concurrent: reject").await;
    assert_eq!(upstream.hits(), 1);
    assert!(
        replies.iter().all(|r| r.status == 201 || r.status == 409),
        "{replies:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_killed_mid_flight_still_answers_then_fails_closed_then_recovers() {
    let mut redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&yaml(&redis, &upstream, "", "")).await;
    let client = TestClient::new();
    let in_flight = {
        let (client, url) = (client.clone(), proxy.url("/api/o"));
        tokio::spawn(async move {
            client
                .send(
                    "POST",
                    &url,
                    &[("idempotency-key", "k-kill"), ("x-test-delay-ms", "500")],
                    "{}",
                )
                .await
        })
    };
    eventually(
        Duration::from_secs(5),
        "request reached the upstream",
        || async { upstream.hits() == 1 },
    )
    .await;
    redis.kill();
    let reply = in_flight.await.unwrap();
    assert_eq!(
        reply.status, 201,
        "the client still gets the upstream's answer: {reply:?}"
    );

    let refused = client.post_key(&proxy.url("/api/o"), "k-new", "{}").await;
    assert_eq!(
        (refused.status.as_u16(), refused.code().as_str()),
        (503, "store_unavailable")
    );
    assert!(refused.header("retry-after").is_some());
    assert_eq!(
        upstream.hits(),
        1,
        "nothing forwarded while the store is down"
    );

    redis.restart().await;
    let url = proxy.url("/api/o");
    let reply = common::resend_until(
        Duration::from_secs(5),
        || client.post_key(&url, "k-after", "{}"),
        |r| r.status == 201,
    )
    .await;
    assert_eq!(
        reply.status, 201,
        "the connection recovers without a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_forwards_unprotected_when_the_store_is_down() {
    let mut redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let closed = common::ClosedPort::new();
    // A second route whose upstream cannot be reached.
    let gone = format!(
        "  gone: {{ url: \"http://{}\" }}\ndefaults:\n",
        closed.addr()
    );
    let yaml = yaml(&redis, &upstream, ", on_unavailable: forward", "")
        .replace("defaults:\n", &gone)
        .replace(
            "routes:\n",
            "routes:\n  - { name: dead, match: { path_prefix: /dead }, upstream: gone }\n",
        )
        + "admin: { listen: 127.0.0.1:0 }\n";
    let proxy = TestProxy::start(&yaml).await;
    redis.kill();
    let client = TestClient::new();
    for _ in 0..2 {
        let reply = client.post_key(&proxy.url("/api/o"), "k-open", "{}").await;
        assert_eq!(reply.status, 201);
    }
    assert_eq!(upstream.hits(), 2, "forwarded, unprotected");
    // Regression: a request whose upstream could not be reached was
    // counted as forwarded unprotected (the critical alert fired), though
    // nothing was sent.
    let unreachable = client.post_key(&proxy.url("/dead/o"), "k-dead", "{}").await;
    assert_eq!(unreachable.code(), "upstream_unreachable");
    let text = proxy.metrics().await;
    let forwards = |route| {
        common::sample(
            &text,
            "idemgate_fail_open_forwards_total",
            &[("route", route)],
        )
    };
    assert_eq!((forwards("orders"), forwards("dead")), (2.0, 0.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_is_a_500_not_a_panic() {
    use idemgate::idempotency::fingerprint::fingerprint;
    use idemgate::idempotency::key::{StorageKey, scope_hash};
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    // Fail-open: a damaged record must still not be taken for an outage
    // and forwarded around (regression: a state no version writes was).
    let yaml = yaml(&redis, &upstream, ", on_unavailable: forward", "");
    let prefix = key_prefix(&yaml);
    let proxy = TestProxy::start(&yaml).await;
    // A completed record with no response fields, as a broken writer might leave it.
    let mut headers = http::HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    let fp = fingerprint(
        &http::Method::POST,
        &"/api/o".parse().unwrap(),
        true,
        &headers,
        &[http::header::CONTENT_TYPE],
        b"{}",
    );
    let mut conn = redis.connection().await;
    let client = TestClient::new();
    // Completed without a response; a state no version of idemgate writes.
    for (name, state) in [("k-damaged", "completed"), ("k-bad-state", "Completed")] {
        let key = StorageKey {
            route: "orders".into(),
            scope: scope_hash(&headers, &[http::header::AUTHORIZATION]),
            key: name.into(),
        };
        let _: () = redis::cmd("HSET")
            .arg(key.encode(&prefix))
            .arg(&["state", state, "fp", fp.as_str(), "token", "t"])
            .query_async(&mut conn)
            .await
            .unwrap();
        let reply = client.post_key(&proxy.url("/api/o"), name, "{}").await;
        assert_eq!(
            (reply.status.as_u16(), reply.code().as_str()),
            (500, "internal_error"),
            "{name}: {reply:?}"
        );
    }
    // A string not in the format, and a key of another type (regression:
    // a list at the key was taken for no record, and every duplicate was
    // forwarded with nothing claimed).
    let other = |name: &str| StorageKey {
        route: "orders".into(),
        scope: scope_hash(&headers, &[http::header::AUTHORIZATION]),
        key: name.into(),
    };
    for (name, command) in [("k-string", "SET"), ("k-list", "RPUSH")] {
        let _: () = redis::cmd(command)
            .arg(other(name).encode(&prefix))
            .arg("not a record")
            .query_async(&mut conn)
            .await
            .unwrap();
        for _ in 0..2 {
            let reply = client.post_key(&proxy.url("/api/o"), name, "{}").await;
            assert_eq!(
                (reply.status.as_u16(), reply.code().as_str()),
                (500, "internal_error"),
                "{name}: {reply:?}"
            );
        }
    }
    assert_eq!(
        upstream.hits(),
        0,
        "nothing forwarded around a damaged record"
    );
    assert_eq!(
        client
            .post_key(&proxy.url("/api/o"), "k-fine", "{}")
            .await
            .status,
        201,
        "still serving"
    );
    assert_eq!(upstream.hits(), 1);
}

/// The store's `key_prefix` in a config made by [`yaml`].
fn key_prefix(yaml: &str) -> String {
    let after = yaml.split("key_prefix: \"").nth(1).expect("a key_prefix");
    after.split('"').next().unwrap().to_owned()
}

/// Regression: a listing (`GET /keys`, `keys unknown`) failed whole, as
/// `store_unavailable`, on one damaged record among good ones, and a damaged
/// record could not be deleted with the admin API or the CLI (their lookup
/// failed too), though every request with its key gets `500` until it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_is_listed_and_can_be_deleted() {
    use idemgate::idempotency::key::{StorageKey, scope_hash};
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0, token: t0k }}\n{}",
        yaml(&redis, &upstream, "", "")
    );
    let prefix = key_prefix(&yaml);
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    let api = proxy.url("/api/o");
    assert_eq!(client.post_key(&api, "k-good", "{}").await.status, 201);
    // The scope of a request without credentials, as the client's below.
    let scope = scope_hash(&http::HeaderMap::new(), &[http::header::AUTHORIZATION]);
    let mut conn = redis.connection().await;
    for (name, command) in [("k-string", "SET"), ("k-list", "RPUSH")] {
        let key = StorageKey {
            route: "orders".into(),
            scope: scope.clone(),
            key: name.into(),
        };
        let _: () = redis::cmd(command)
            .arg(key.encode(&prefix))
            .arg("not a record")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // An earlier version's record format with a state no version writes
    // (regression, an audit: `PUT` overwrote it into a completed record
    // whose empty fingerprint refused every request with 422).
    hset(
        &mut conn,
        &prefix,
        &scope,
        "k-hash",
        &["state", "bogus", "fp", "zz"],
    )
    .await;
    // A completed one without its response: damaged in filtered listings
    // too (regression: only the unfiltered listing and lookups said so).
    hset(
        &mut conn,
        &prefix,
        &scope,
        "k-hash-done",
        &["state", "completed", "fp", "zz"],
    )
    .await;
    let admin = |path: &str| proxy.admin_url(path);
    let list = |path: String| {
        let client = &client;
        async move {
            let reply = client.send("GET", &path, &[], "").await;
            assert_eq!(reply.status, 200, "{path}: {reply:?}");
            let list: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            let mut rows: Vec<(String, String)> = list
                .as_array()
                .expect("a list")
                .iter()
                .map(|r| {
                    (
                        r["key"].as_str().unwrap().into(),
                        r["state"].as_str().unwrap().into(),
                    )
                })
                .collect();
            rows.sort();
            rows
        }
    };
    let damaged = [
        ("k-hash".to_owned(), "damaged".to_owned()),
        ("k-hash-done".to_owned(), "damaged".to_owned()),
        ("k-list".to_owned(), "damaged".to_owned()),
        ("k-string".to_owned(), "damaged".to_owned()),
    ];
    let mut every = damaged.to_vec();
    every.push(("k-good".into(), "completed".into()));
    every.sort();
    assert_eq!(list(admin("/keys")).await, every);
    assert_eq!(list(admin("/keys?state=unknown")).await, damaged);
    assert_eq!(list(admin("/keys?state=damaged")).await, damaged);
    assert_eq!(
        list(admin("/keys?state=completed")).await,
        [("k-good".to_owned(), "completed".to_owned())]
    );
    assert_eq!(list(admin("/keys/orders/k-list")).await, damaged[2..3]);
    let one = client
        .send(
            "GET",
            &admin(&format!("/keys/orders/k-string?scope={scope}")),
            &[],
            "",
        )
        .await;
    let one: serde_json::Value = serde_json::from_slice(&one.body).unwrap();
    assert_eq!(
        (one["state"].as_str(), one["detail"].is_string()),
        (Some("damaged"), true),
        "{one}"
    );

    // Deleted by hand (not overwritten), each key is served again.
    let put_by_hand = |name: &str| {
        let url = admin(&format!("/keys/orders/{name}?scope={scope}"));
        let client = &client;
        async move {
            let by_hand = r#"{"status":201,"body":"by hand"}"#;
            client
                .send("PUT", &url, &[("authorization", "Bearer t0k")], by_hand)
                .await
        }
    };
    for name in ["k-string", "k-list", "k-hash"] {
        assert_eq!(client.post_key(&api, name, "{}").await.status, 500);
        let put = put_by_hand(name).await;
        assert_eq!(
            (put.status.as_u16(), put.code().as_str()),
            (500, "internal_error"),
            "{put:?}"
        );
        let purged = client
            .send(
                "DELETE",
                &admin(&format!("/keys/orders/{name}")),
                &[("authorization", "Bearer t0k")],
                "",
            )
            .await;
        assert_eq!(purged.status, 200, "{purged:?}");
        assert_eq!(purged.body, r#"{"purged":1}"#);
        assert_eq!(client.post_key(&api, name, "{}").await.status, 201);
    }
    // A completed hash without its response is damaged to `PUT` too, as to
    // a lookup (regression, the verification audit: overwritten).
    hset(
        &mut conn,
        &prefix,
        &scope,
        "k-bare",
        &["state", "completed"],
    )
    .await;
    let put = put_by_hand("k-bare").await;
    assert_eq!(put.code(), "internal_error", "{put:?}");
    assert_eq!(upstream.hits(), 4);
}

/// Writes route `orders`' record of `key` under `scope` as a hash of
/// `fields` (an earlier version's record format), by hand.
async fn hset(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    scope: &str,
    key: &str,
    fields: &[&str],
) {
    let key = idemgate::idempotency::key::StorageKey {
        route: "orders".into(),
        scope: scope.into(),
        key: key.into(),
    };
    let _: () = redis::cmd("HSET")
        .arg(key.encode(prefix))
        .arg(fields)
        .query_async(conn)
        .await
        .unwrap();
}

/// A TCP relay to `to` that holds each chunk of the server's replies for
/// `delay_ms` (read at each chunk) before passing it on: every round trip
/// then takes that much longer.
async fn reply_delaying_relay(to: &str, delay_ms: Arc<AtomicU64>) -> String {
    // redis://host:port/db
    let to = to.split('/').nth(2).expect("a redis:// URL").to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = tokio::net::TcpStream::connect(&to).await.unwrap();
            let (mut from_client, mut to_client) = inbound.into_split();
            let (mut from_server, mut to_server) = outbound.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
            });
            let delay_ms = delay_ms.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0; 64 * 1024];
                while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                    let delay = delay_ms.load(Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    format!("redis://{addr}")
}

/// A claim whose `SET` finds a record to judge runs the claim script after
/// it: both round trips share one `op_timeout`. Here every reply of Redis
/// takes 300 ms longer and `op_timeout` is 500 ms, so the claim of a key
/// holding an earlier version's record hash (`WRONGTYPE`, then the script)
/// must end at 500 ms with `store_unavailable`; bounded each (regression:
/// a claim that read first did so), it would be claimed at 600 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_needs_the_script_is_bounded_by_one_op_timeout() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let delay_ms = Arc::new(AtomicU64::new(0));
    let relay = reply_delaying_relay(redis.url(), delay_ms.clone()).await;
    let yaml = yaml(&redis, &upstream, "", "")
        .replace("op_timeout: 300ms", "op_timeout: 500ms")
        .replace(redis.url(), &relay);
    let prefix = yaml
        .split("key_prefix: \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let scope = idemgate::idempotency::key::scope_hash(
        &http::HeaderMap::new(),
        &[http::header::AUTHORIZATION],
    );
    let key = |name: &str| {
        let key = idemgate::idempotency::key::StorageKey {
            route: "orders".into(),
            scope: scope.clone(),
            key: name.into(),
        };
        key.encode(prefix)
    };
    // Hashes with no state: the script claims them afresh, when it gets to run.
    let mut admin = redis.connection().await;
    for name in ["k-warm", "k-slow"] {
        let _: () = redis::cmd("HSET")
            .arg(key(name))
            .arg(&["left", "over"])
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    // Undelayed: the connection is made and the scripts are loaded.
    assert_eq!(client.post_key(&url, "k-warm", "{}").await.status, 201);

    delay_ms.store(300, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let reply = client.post_key(&url, "k-slow", "{}").await;
    let took = started.elapsed();
    assert_eq!(
        (reply.status.as_u16(), reply.code().as_str()),
        (503, "store_unavailable"),
        "{reply:?}"
    );
    assert!(
        took < Duration::from_millis(750),
        "the claim took {took:?}, past one op_timeout (500ms)"
    );
    assert_eq!(upstream.hits(), 1, "only the warm-up was forwarded");
}

/// A proxy with an admin listener, a pass-through route (`/plain`,
/// `idempotency: off`) and a route protecting POST only (`/api`).
fn passthrough_yaml(redis: &RedisServer, upstream: &TestUpstream) -> String {
    let store = format!(
        "store: {{ backend: redis, url: \"{}\", op_timeout: 300ms, key_prefix: \"p{}:\" }}",
        redis.url(),
        fastrand::u64(..)
    );
    let routes = "  - { name: plain, match: { path_prefix: /plain }, upstream: up, idempotency: off }\n  - { name: orders, match: { path_prefix: /api }, upstream: up, idempotency: { methods: [POST] } }";
    with_admin(config(
        &store,
        upstream.addr,
        "  timeouts: { response: 5s, total: 10s }",
        routes,
    ))
}

/// Store operations other than the readiness ping, counted by the latency histogram.
fn store_ops(text: &str) -> Vec<(&'static str, f64)> {
    [
        "claim",
        "complete",
        "release",
        "mark_unknown",
        "resolve",
        "get",
        "purge",
        "list",
    ]
    .into_iter()
    .map(|op| {
        (
            op,
            sample(text, "idemgate_store_latency_seconds_count", &[("op", op)]),
        )
    })
    .collect()
}

/// SPEC 3: a request on an `idempotency: off` route, or with a method the
/// route does not protect, is proxied with no store access: it is answered
/// while Redis hangs, and no store operation is timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passed_through_requests_never_touch_the_store() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&passthrough_yaml(&redis, &upstream)).await;
    let client = TestClient::new();
    // One protected request first, so that the claim series exists.
    let first = client.post_key(&proxy.url("/api/o"), "k-warm", "{}").await;
    assert_eq!(first.status, 201, "{first:?}");
    let before = proxy.metrics().await;
    assert_eq!(
        sample(
            &before,
            "idemgate_store_latency_seconds_count",
            &[("op", "claim")]
        ),
        1.0,
        "{before}"
    );

    redis.pause();
    let plain = client
        .send(
            "GET",
            &proxy.url("/plain/r"),
            &[("idempotency-key", "k-plain")],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        (plain.status.as_u16(), plain.header("x-upstream-hit")),
        (201, Some("2")),
        "idempotency: off is answered by the upstream: {plain:?}"
    );
    let put = client
        .send(
            "PUT",
            &proxy.url("/api/o"),
            &[
                ("idempotency-key", "k-put"),
                ("content-type", "application/json"),
            ],
            "{}",
        )
        .await;
    assert_eq!(
        (put.status.as_u16(), put.header("x-upstream-hit")),
        (201, Some("3")),
        "a method outside idempotency.methods is answered by the upstream: {put:?}"
    );
    assert_eq!(put.json()["method"], "PUT");
    let after = proxy.metrics().await;
    assert_eq!(store_ops(&after), store_ops(&before), "{after}");
    for route in ["plain", "orders"] {
        assert_eq!(
            sample(
                &after,
                "idemgate_requests_total",
                &[("route", route), ("outcome", "passthrough")]
            ),
            1.0,
            "{route}: {after}"
        );
    }

    // The store really is out of reach: a protected request is refused.
    let refused = client.post_key(&proxy.url("/api/o"), "k-post", "{}").await;
    assert_eq!(
        (refused.status.as_u16(), refused.code().as_str()),
        (503, "store_unavailable")
    );
    assert_eq!(upstream.hits(), 3);
    redis.resume();
}

/// Checks a `store_unavailable` problem: `status` in the body is the HTTP
/// status, and nothing of the Redis connection (address, port, error) shows.
fn assert_store_problem(reply: &common::Reply, redis: &RedisServer, what: &str) {
    assert_eq!(
        (reply.status.as_u16(), reply.code().as_str()),
        (503, "store_unavailable"),
        "{what}: {reply:?}"
    );
    let body = reply.json();
    assert_eq!(body["status"], 503, "{what}: {body}");
    for field in ["type", "title", "detail"] {
        assert!(body[field].is_string(), "{what}: {field} in {body}");
    }
    let text = String::from_utf8_lossy(&reply.body).to_lowercase();
    let port = redis.port.to_string();
    for leak in [
        port.as_str(),
        "127.0.0.1",
        "redis",
        "refused",
        "timed out",
        "os error",
        "io error",
    ] {
        assert!(!text.contains(leak), "{what}: {leak:?} leaked into {text}");
    }
}

/// SPEC 6: a `store_unavailable` problem, from the proxy or the admin API,
/// whether Redis hangs (op_timeout) or is gone (connection refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_unavailable_problems_name_no_redis_internals() {
    let mut redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&passthrough_yaml(&redis, &upstream)).await;
    let client = TestClient::new();
    assert_eq!(
        client
            .post_key(&proxy.url("/api/o"), "k-up", "{}")
            .await
            .status,
        201
    );

    redis.pause();
    let hung = client.post_key(&proxy.url("/api/o"), "k-hung", "{}").await;
    assert_store_problem(&hung, &redis, "claim while Redis hangs");
    redis.resume();

    redis.kill();
    let gone = client.post_key(&proxy.url("/api/o"), "k-gone", "{}").await;
    assert_store_problem(&gone, &redis, "claim while Redis is gone");
    let ready = client
        .send("GET", &proxy.admin_url("/readyz"), &[], Bytes::new())
        .await;
    assert_store_problem(&ready, &redis, "/readyz");
    let record = client
        .send(
            "GET",
            &proxy.admin_url("/keys/orders/k-up"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_store_problem(&record, &redis, "GET /keys");
    assert_eq!(upstream.hits(), 1);
}

/// Regression: a duplicate waiting (`concurrent: wait`) for an attempt in
/// flight gave up at the first store error while it polled: with
/// `on_unavailable: forward` it was forwarded unprotected (the upstream ran
/// twice), with `reject` it got `503` with most of its budget left. Known
/// to be a duplicate, it waits on through the error and gets the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_duplicate_waits_through_a_store_error_and_is_never_forwarded() {
    let redis = RedisServer::start_own().await;
    let conn = redis.connection().await;
    let upstream = TestUpstream::start().await;
    let yaml = with_admin(yaml(
        &redis,
        &upstream,
        ", on_unavailable: forward",
        "concurrent: wait",
    ));
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    // Ready: its one-time check of scripts (an EVALSHA) is behind it.
    let ready = client
        .send("GET", &proxy.admin_url("/readyz"), &[], Bytes::new())
        .await;
    assert_eq!(ready.status, 200, "{ready:?}");
    let evalsha_calls = |conn: &::redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let stats: String = ::redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut conn)
                .await
                .unwrap();
            (stats.lines())
                .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
                .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        }
    };
    let before = evalsha_calls(&conn).await;
    let first = [
        ("idempotency-key", "k-wait-fault"),
        ("x-test-delay-ms", "2500"),
    ];
    let first = client.spawn_send("POST", &proxy.url("/api/o"), &first, "{}");
    eventually(
        Duration::from_secs(5),
        "the first attempt is out",
        || async { upstream.hits() == 1 },
    )
    .await;
    let duplicate = [("idempotency-key", "k-wait-fault")];
    let duplicate = client.spawn_send("POST", &proxy.url("/api/o"), &duplicate, "{}");
    // The duplicate's first claim found the attempt in flight: that is the
    // claim script (a new key's claim is a plain SET).
    eventually(Duration::from_secs(5), "the duplicate waits", || async {
        evalsha_calls(&conn).await > before
    })
    .await;
    redis.pause();
    tokio::time::sleep(Duration::from_millis(1000)).await; // the outage under test: several polls fail
    redis.resume();
    assert_eq!(first.await.unwrap().status, 201);
    let replay = duplicate.await.unwrap();
    assert_eq!(
        (replay.status.as_u16(), replay.header("idempotent-replayed")),
        (201, Some("true")),
        "{replay:?}"
    );
    assert_eq!(upstream.hits(), 1, "never forwarded around the store");
}

/// SPEC 4.5: a completion the store cannot take still answers the client
/// with the upstream's response, and the failure is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_the_store_cannot_take_still_answers_and_is_counted() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let yaml = with_admin(yaml(&redis, &upstream, "", ""));
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    let headers = [("idempotency-key", "k-hung"), ("x-test-delay-ms", "500")];
    let in_flight = client.spawn_send("POST", &proxy.url("/api/o"), &headers, "{}");
    eventually(
        Duration::from_secs(5),
        "request reached the upstream",
        || async { upstream.hits() == 1 },
    )
    .await;
    // Redis hangs from before the upstream answers until after op_timeout.
    redis.pause();
    let reply = in_flight.await.unwrap();
    redis.resume();
    assert_eq!(reply.status, 201, "the client gets the upstream's answer");
    let errors = sample(
        &proxy.metrics().await,
        "idemgate_store_errors_total",
        &[("op", "complete")],
    );
    assert_eq!(errors, 1.0, "the failed completion is counted");
    // Tried again in the background once Redis answers, the completion
    // lands: a retry is replayed. Regression: it was tried once, and the
    // key stayed in flight until its lease ended, then turned unknown.
    let url = proxy.url("/api/o");
    let retry = common::resend_until(
        Duration::from_secs(8),
        || client.send("POST", &url, &[("idempotency-key", "k-hung")], "{}"),
        |r| r.status != 409,
    )
    .await;
    assert_eq!(
        (retry.status.as_u16(), retry.header("idempotent-replayed")),
        (201, Some("true")),
        "{retry:?}"
    );
    assert_eq!(retry.body, reply.body);
    assert_eq!(upstream.hits(), 1);
}

/// Regression: after Redis dropped the proxy's connection (a restart, a
/// `CLIENT KILL`, a firewall's idle cut), the next command failed on the dead
/// connection though Redis was back: a new key got `503`, and a completion
/// was lost, leaving the key in flight. A dropped connection's command is
/// now sent once more, on the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_redis_connection_loses_no_operation() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&yaml(&redis, &upstream, "", "")).await;
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    assert_eq!(client.post_key(&url, "k-warm", "{}").await.status, 201);
    let mut conn = redis.connection().await;
    RedisServer::kill_clients(&mut conn).await;
    let claimed = client.post_key(&url, "k-new", "{}").await;
    assert_eq!(claimed.status, 201, "a claim after the drop: {claimed:?}");

    let headers = [
        ("idempotency-key", "k-slow"),
        ("content-type", "application/json"),
        ("x-test-delay-ms", "500"),
    ];
    let first = client.spawn_send("POST", &url, &headers, "{}");
    eventually(
        Duration::from_secs(5),
        "the request reached the upstream",
        || async { upstream.hits() == 3 },
    )
    .await;
    RedisServer::kill_clients(&mut conn).await;
    let first = first.await.unwrap();
    assert_eq!(first.status, 201);
    let retry = client.post_key(&url, "k-slow", "{}").await;
    assert_eq!(
        (retry.status.as_u16(), retry.header("idempotent-replayed")),
        (201, Some("true")),
        "the completion after the drop was recorded at once: {retry:?}"
    );
    assert_eq!(upstream.hits(), 3);
}

/// README "Sizing Redis": a Redis at `maxmemory` with `noeviction` refuses
/// writes. New keys then fail closed (`store_unavailable`, nothing sent to
/// the upstream, no Redis wording in the answer), while retries of keys it
/// already holds are still replayed (a claim that finds a completed record
/// writes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_fails_new_keys_closed_and_still_replays_what_it_holds() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&yaml(&redis, &upstream, "", "")).await;
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    let first = client.post_key(&url, "k-held", "{}").await;
    assert_eq!(first.status, 201);
    let busy = [
        ("idempotency-key", "k-busy"),
        ("content-type", "application/json"),
        ("x-test-delay-ms", "3000"),
    ];
    let busy = client.spawn_send("POST", &url, &busy, "{}");
    eventually(
        Duration::from_secs(5),
        "the slow request reached the upstream",
        || async { upstream.hits() == 2 },
    )
    .await;

    let mut admin = redis.connection().await;
    for (name, value) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        let _: String = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let refused = client.post_key(&url, "k-new", "{}").await;
    assert_store_problem(&refused, &redis, "a new key while Redis is full");
    assert_eq!(upstream.hits(), 2, "nothing forwarded for the refused key");
    // A duplicate of an attempt in flight is still judged (regression: a full
    // Redis made it a store failure, forwarded under `on_unavailable: forward`).
    let duplicate = client.post_key(&url, "k-busy", "{}").await;
    assert_eq!(
        (duplicate.status.as_u16(), duplicate.code().as_str()),
        (409, "request_in_progress"),
        "{duplicate:?}"
    );

    let retry = client.post_key(&url, "k-held", "{}").await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.hits(), 2);
    // Its completion is refused too: the client still gets its answer.
    assert_eq!(busy.await.unwrap().status, 201);
}

/// After a warm-up request, sends `key`'s request with the test header
/// `name: value` (its upstream answers after 1 s), holds Redis's writes
/// (`CLIENT PAUSE WRITE`) from when it reaches the upstream until the proxy
/// has answered it, past `op_timeout`, then kills the proxy's Redis
/// connections with the exchange's transition unrun and lets Redis go: only
/// a transition tried again in the background can still settle the key.
/// Returns the first answer.
async fn answer_with_writes_held(
    redis: &RedisServer,
    client: &TestClient,
    url: &str,
    upstream: &TestUpstream,
    key: &str,
    name: &str,
    value: &str,
) -> common::Reply {
    assert_eq!(client.post_key(url, "k-warm", "{}").await.status, 201);
    let mut conn = redis.connection().await;
    let headers = [
        ("idempotency-key", key),
        ("content-type", "application/json"),
        (name, value),
        ("x-test-delay-ms", "1000"),
    ];
    let first = client.spawn_send("POST", url, &headers, "{}");
    eventually(
        Duration::from_secs(5),
        "the request reached the upstream",
        || async { upstream.hits() == 2 },
    )
    .await;
    let _: () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "10000", "WRITE"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let first = first.await.unwrap();
    RedisServer::kill_clients(&mut conn).await;
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut conn)
        .await
        .unwrap();
    first
}

/// A release the store did not take (its reply lost with the connection) is
/// tried again in the background. Regression: the exchange tried once, so
/// after an upstream's 503 (not stored: the key is released) the key stayed
/// in flight, refusing every retry until the lease ended, then `unknown`.
/// Redis holds writes (`CLIENT PAUSE WRITE`) while the exchange releases,
/// past `op_timeout`, then the proxy's connection is killed with the
/// release still unrun, so only a new attempt can release the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_the_store_did_not_take_is_tried_again() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&yaml(&redis, &upstream, "", "lease: 30s")).await;
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    let first = answer_with_writes_held(
        &redis,
        &client,
        &url,
        &upstream,
        "k-rel",
        "x-test-status",
        "503",
    )
    .await;
    // The 503 came once the release had waited out op_timeout (300 ms).
    assert_eq!(first.status, 503, "{first:?}");
    let retry = common::resend_until(
        Duration::from_secs(8),
        || client.post_key(&url, "k-rel", "{}"),
        // 503 while the killed connection is made anew; 409 while the key is held.
        |r| r.status != 409 && r.status != 503,
    )
    .await;
    assert_eq!(retry.status, 201, "the key was released: {retry:?}");
    assert_eq!(upstream.hits(), 3);
}

/// An `unknown` the store did not take at once, made in the background, is
/// counted in `idemgate_unknown_outcomes_total` like one made at once.
/// Regression: only the exchange's own transition was counted. Redis holds
/// writes while the exchange turns the key unknown (its upstream dropped
/// the connection after taking the request): [`answer_with_writes_held`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_made_in_the_background_is_counted() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let yaml = with_admin(yaml(&redis, &upstream, "", "lease: 30s"));
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    let first = answer_with_writes_held(
        &redis,
        &client,
        &url,
        &upstream,
        "k-lost",
        "x-test-reset",
        "1",
    )
    .await;
    assert_eq!(first.status, 502, "{first:?}");
    let retry = common::resend_until(
        Duration::from_secs(8),
        || client.post_key(&url, "k-lost", "{}"),
        // 503 while the killed connection is made anew.
        |r| r.status != 503 && r.code() != "request_in_progress",
    )
    .await;
    assert_eq!(
        (retry.status.as_u16(), retry.code().as_str()),
        (409, "outcome_unknown"),
        "{retry:?}"
    );
    // The retry may have been told by this instance, from the record on its
    // way to the store: the background transition is counted once made.
    counted(
        &proxy,
        15,
        "the background transition counted",
        "idemgate_unknown_outcomes_total",
        &[("route", "orders")],
        1.0,
    )
    .await;
    assert_eq!(upstream.hits(), 2);
}

/// The version check behind `/readyz` (`SET .. NX GET` needs Redis 7.0) reads
/// `INFO`, which a least-privilege Redis user may not be allowed: such a
/// user's proxy is still ready and protects requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_not_allowed_info_is_still_ready() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let mut admin = redis.connection().await;
    let _: String = redis::cmd("ACL")
        .arg(&[
            "SETUSER", "idem", "on", ">secret", "~*", "&*", "+@all", "-info",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = redis.url().replace("redis://", "redis://idem:secret@");
    let yaml = with_admin(yaml(&redis, &upstream, "", "")).replace(redis.url(), &url);
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    let ready = client
        .send("GET", &proxy.admin_url("/readyz"), &[], Bytes::new())
        .await;
    assert_eq!(ready.status, 200, "{ready:?}");
    let first = client.post_key(&proxy.url("/api/o"), "k-acl", "{}").await;
    assert_eq!(first.status, 201);
    let again = client.post_key(&proxy.url("/api/o"), "k-acl", "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.hits(), 1);
}

/// Waits up to `secs` for the counter `name` with `labels` to read `value`.
async fn counted(
    proxy: &TestProxy,
    secs: u64,
    what: &str,
    name: &str,
    labels: &[(&str, &str)],
    value: f64,
) {
    eventually(Duration::from_secs(secs), what, || async {
        sample(&proxy.metrics().await, name, labels) == value
    })
    .await;
}

/// Sends `headers`' POST in a task of its own and returns once the
/// upstream has it: the attempt runs.
async fn attempt_upstream(
    client: &TestClient,
    proxy: &TestProxy,
    upstream: &TestUpstream,
    headers: &[(&str, &str)],
) -> tokio::task::JoinHandle<common::Reply> {
    let first = client.spawn_send("POST", &proxy.url("/api/o"), headers, "{}");
    eventually(Duration::from_secs(5), "the attempt upstream", || async {
        upstream.hits() == 1
    })
    .await;
    first
}

/// Regression (an exactly-once audit): Redis restarted empty under a
/// running attempt; its waiting duplicates (`concurrent: wait`) found no
/// record, one claimed the key and ran the request again, and the first
/// client's answer differed from the one replayed to all the others.
/// Waiters on the instance that runs the attempt do not ask the store
/// until it has ended, and then replay its answer, written whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_the_attempts_instance_never_rerun_it_after_redis_lost_its_record() {
    let mut redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let proxy =
        TestProxy::start(&yaml(&redis, &upstream, "", "concurrent: wait, lease: 20s")).await;
    let client = TestClient::new();
    let slow = [("idempotency-key", "k-lost"), ("x-test-delay-ms", "4000")];
    let first = attempt_upstream(&client, &proxy, &upstream, &slow).await;
    let waiters: Vec<_> = (0..5)
        .map(|_| client.spawn_send("POST", &proxy.url("/api/o"), &slow, "{}"))
        .collect();
    // The waiters' first claims find the attempt in flight (milliseconds;
    // a second's margin for a loaded machine).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    redis.restart().await;
    let first = first.await.unwrap();
    assert_eq!(first.status, 201, "{first:?}");
    for waiter in waiters {
        let reply = waiter.await.unwrap();
        assert_eq!(reply.header("x-upstream-hit"), Some("1"), "{reply:?}");
    }
    assert_eq!(upstream.hits(), 1, "the request ran once");
}

/// Regression (an operations audit): Redis died under a running attempt
/// and came back empty after it ended. The completion failed (it is tried
/// again in the background); the waiting duplicates on the attempt's
/// instance then asked the store, found no record, and one ran the request
/// again. They replay the attempt's answer, which this process holds; so
/// does a duplicate sent anew once Redis is back, before the background
/// write has been tried again (regression, the verification audit: it
/// claimed the empty key and ran the request again, 3 of 3 runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_the_attempts_instance_replay_it_when_its_record_could_not_be_written() {
    let mut redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let proxy =
        TestProxy::start(&yaml(&redis, &upstream, "", "concurrent: wait, lease: 20s")).await;
    let client = TestClient::new();
    let slow = [
        ("idempotency-key", "k-unwritten"),
        ("x-test-delay-ms", "2000"),
    ];
    let first = attempt_upstream(&client, &proxy, &upstream, &slow).await;
    let waiters: Vec<_> = (0..3)
        .map(|_| client.spawn_send("POST", &proxy.url("/api/o"), &slow, "{}"))
        .collect();
    // The waiters' first claims find the attempt in flight (milliseconds;
    // half a second's margin for a loaded machine).
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    let first = first.await.unwrap();
    assert_eq!(first.status, 201, "{first:?}");
    redis.restart().await;
    let anew = client.send("POST", &proxy.url("/api/o"), &slow, "{}").await;
    assert_eq!(anew.header("x-upstream-hit"), Some("1"), "{anew:?}");
    for waiter in waiters {
        let reply = waiter.await.unwrap();
        assert_eq!(reply.status, 201, "{reply:?}");
        assert_eq!(reply.header("x-upstream-hit"), Some("1"), "{reply:?}");
        assert_eq!(
            reply.header("idempotent-replayed"),
            Some("true"),
            "{reply:?}"
        );
    }
    assert_eq!(upstream.hits(), 1, "the request ran once");
}

/// Regression (the verification audit): an attempt's completion that the
/// store did not take in its 20 background tries was given up with a log
/// line only, and a retry after Redis came back empty ran the request
/// again without a trace. It is counted in
/// `idemgate_superseded_attempts_total`, which has the critical alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_given_up_in_the_background_is_counted() {
    let mut redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let yaml = with_admin(yaml(&redis, &upstream, "", "lease: 60s"));
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    let slow = [
        ("idempotency-key", "k-given-up"),
        ("x-test-delay-ms", "500"),
    ];
    let first = attempt_upstream(&client, &proxy, &upstream, &slow).await;
    redis.kill();
    assert_eq!(first.await.unwrap().status, 201);
    // 20 tries, 500 ms apart, each refused at once.
    counted(
        &proxy,
        30,
        "the write given up and counted",
        "idemgate_superseded_attempts_total",
        &[("route", "orders")],
        1.0,
    )
    .await;
    redis.restart().await;
}

/// Regression (the focused check of the background writes): an answer that
/// came after its client's 504, and that the store took only in the
/// background, was never counted in `idemgate_late_completions_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_recorded_in_the_background_is_counted_late() {
    let mut redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let yaml = with_admin(yaml(&redis, &upstream, "", "lease: 60s"))
        .replace("response: 5s", "response: 300ms");
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    let slow = [("idempotency-key", "k-late"), ("x-test-delay-ms", "1500")];
    let first = attempt_upstream(&client, &proxy, &upstream, &slow).await;
    assert_eq!(first.await.unwrap().status, 504);
    // The answer comes while Redis is down: its completion fails.
    redis.kill();
    eventually(
        Duration::from_secs(10),
        "the completion refused",
        || async {
            let text = proxy.metrics().await;
            sample(&text, "idemgate_store_errors_total", &[("op", "complete")]) >= 1.0
        },
    )
    .await;
    redis.restart().await;
    counted(
        &proxy,
        15,
        "the late completion counted",
        "idemgate_late_completions_total",
        &[("route", "orders")],
        1.0,
    )
    .await;
    let retry = client
        .send(
            "POST",
            &proxy.url("/api/o"),
            &slow,
            Bytes::from_static(b"{}"),
        )
        .await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.hits(), 1);
}

/// `CONFIG SET requirepass` through a connection authenticated with `auth`.
async fn set_password(redis: &RedisServer, auth: &str, password: &str) {
    let url = redis
        .url()
        .replace("redis://", &format!("redis://:{auth}@"));
    let url = if auth.is_empty() {
        redis.url().to_owned()
    } else {
        url
    };
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("an admin connection");
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", password])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Regression (the Redis deployments audit): once a reconnect failed to
/// authenticate (the password rotated on the server first), the store kept
/// that failure for good: every request `503 store_unavailable` after the
/// password was put right, until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_authentication_is_tried_again_once_the_password_is_right() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    set_password(&redis, "", "pw-one").await;
    let with_password = redis.url().replace("redis://", "redis://:pw-one@");
    let yaml = yaml(&redis, &upstream, "", "").replace(redis.url(), &with_password);
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    assert_eq!(client.post_key(&url, "k-auth-1", "{}").await.status, 201);
    // Rotated on the server first: the reconnect fails to authenticate.
    set_password(&redis, "pw-one", "pw-two").await;
    let refused = client.post_key(&url, "k-auth-2", "{}").await;
    assert_eq!(refused.code(), "store_unavailable", "{refused:?}");
    set_password(&redis, "pw-two", "pw-one").await;
    let back = common::resend_until(
        Duration::from_secs(5),
        || client.post_key(&url, "k-auth-3", "{}"),
        |r| r.status != 503,
    )
    .await;
    assert_eq!(back.status, 201, "{back:?}");
    assert_eq!(upstream.hits(), 2);
}

/// A proxy on `redis` as the ACL user `user` (password `secret`), made
/// with `rules`.
async fn proxy_as_user(
    redis: &RedisServer,
    upstream: &TestUpstream,
    user: &str,
    rules: &[&str],
) -> TestProxy {
    let mut admin = redis.connection().await;
    let _: String = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg(&["on", ">secret", "~*", "&*"])
        .arg(rules)
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = redis
        .url()
        .replace("redis://", &format!("redis://{user}:secret@"));
    let yaml = with_admin(yaml(redis, upstream, "", "")).replace(redis.url(), &url);
    TestProxy::start(&yaml).await
}

/// Regression (the Redis deployments audit): a Redis user not allowed
/// scripts claimed new keys (a plain `SET`) and then failed every
/// completion and every other claim, while `/readyz` said ready. It is
/// not ready now; a user with the categories README names works whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_not_allowed_scripts_is_not_ready() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let client = TestClient::new();
    let denied = proxy_as_user(&redis, &upstream, "noscript", &["+@all", "-@scripting"]).await;
    let ready = client
        .send("GET", &denied.admin_url("/readyz"), &[], Bytes::new())
        .await;
    assert_eq!(ready.status, 503, "{ready:?}");
    let documented = [
        "+@read",
        "+@write",
        "+@scripting",
        "+@keyspace",
        "+@connection",
        "+time",
    ];
    let lean = proxy_as_user(&redis, &upstream, "lean", &documented).await;
    let ready = client
        .send("GET", &lean.admin_url("/readyz"), &[], Bytes::new())
        .await;
    assert_eq!(ready.status, 200, "{ready:?}");
    let first = client.post_key(&lean.url("/api/o"), "k-lean", "{}").await;
    assert_eq!(first.status, 201, "{first:?}");
    let again = client.post_key(&lean.url("/api/o"), "k-lean", "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let listed = client
        .send(
            "GET",
            &lean.admin_url("/keys?route=orders"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(listed.status, 200, "{listed:?}");
    assert_eq!(upstream.hits(), 1);
}

/// Regression: the eviction policy was read once, when Redis was first
/// reached: a policy changed afterwards (`CONFIG SET`, a failover to a
/// node configured otherwise) let records be evicted, and retries run
/// again, with nothing said. The pings read it again every few seconds:
/// `idemgate_store_evicting` follows it both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_policy_set_after_start_is_noticed() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let yaml = with_admin(yaml(&redis, &upstream, "", ""));
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    let evicting = || async {
        // Each /readyz pings the store, which reads the policy when due.
        let ready = client
            .send("GET", &proxy.admin_url("/readyz"), &[], Bytes::new())
            .await;
        assert_eq!(ready.status, 200, "{ready:?}");
        sample(&proxy.metrics().await, "idemgate_store_evicting", &[])
    };
    assert_eq!(evicting().await, 0.0, "noeviction at start");
    let admin = redis.connection().await;
    let set = |policy: &'static str| {
        let mut admin = admin.clone();
        async move {
            for (name, value) in [("maxmemory", "64mb"), ("maxmemory-policy", policy)] {
                let _: String = (redis::cmd("CONFIG").arg("SET").arg(name).arg(value))
                    .query_async(&mut admin)
                    .await
                    .unwrap();
            }
        }
    };
    set("volatile-lru").await;
    eventually(
        Duration::from_secs(20),
        "the policy changed to volatile-lru is noticed",
        || async { evicting().await == 1.0 },
    )
    .await;
    set("noeviction").await;
    eventually(
        Duration::from_secs(20),
        "the policy changed back to noeviction is noticed",
        || async { evicting().await == 0.0 },
    )
    .await;
}
