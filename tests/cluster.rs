//! The gate on a real three-master Redis Cluster: scripts routed by the
//! record's hash tag, duplicates reaching the upstream once, listings that
//! SCAN every master, a seed that never answers, and a failover away from
//! a master that hangs (three masters with a replica each).

mod common;

use bytes::Bytes;
use common::redis_server::RedisCluster;
use common::{TestClient, TestProxy, TestUpstream, config, eventually, resend_until};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_works_on_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let upstream = TestUpstream::start().await;
    let store = cluster_store(&cluster, "1s");
    let routes = "  - { name: orders, match: { path_prefix: /api }, upstream: up, idempotency: { concurrent: wait } }";
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n{}",
        config(&store, upstream.addr, "", routes)
    );
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();

    // Keys that hash to different slots, hence different masters.
    for i in 0..20 {
        let key = format!("k-{i}");
        assert_eq!(
            client
                .post_key(&proxy.url("/api/o"), &key, "{}")
                .await
                .status,
            201
        );
        let replay = client.post_key(&proxy.url("/api/o"), &key, "{}").await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    }
    assert_eq!(upstream.hits(), 20);

    let mut tasks = Vec::new();
    for _ in 0..30 {
        let (client, url) = (client.clone(), proxy.url("/api/o"));
        tasks.push(tokio::spawn(async move {
            let headers = [("idempotency-key", "k-dup"), ("x-test-delay-ms", "300")];
            client.send("POST", &url, &headers, "{}").await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 201);
    }
    assert_eq!(upstream.hits(), 21, "30 duplicates, one execution");

    let failed = client
        .send(
            "POST",
            &proxy.url("/api/o"),
            &[("idempotency-key", "k-lost"), ("x-test-reset", "1")],
            "{}",
        )
        .await;
    assert_eq!(failed.code(), "upstream_failed");
    let unknown = client
        .send(
            "GET",
            &proxy.admin_url("/keys?state=unknown"),
            &[],
            Bytes::new(),
        )
        .await
        .json();
    assert_eq!(unknown.as_array().unwrap().len(), 1, "{unknown}");
    let all = client
        .send(
            "GET",
            &proxy.admin_url("/keys?route=orders"),
            &[],
            Bytes::new(),
        )
        .await
        .json();
    assert_eq!(
        all.as_array().unwrap().len(),
        22,
        "SCAN covers every master"
    );

    // Regression: the readiness ping read a cluster's INFO (a map, one
    // text per node) as one string and failed every time: `/readyz` was
    // always 503, and every `keys` command (which pings first) failed.
    let ready = client
        .send("GET", &proxy.admin_url("/readyz"), &[], Bytes::new())
        .await;
    assert_eq!(ready.status, 200, "{ready:?}");
    // One master that may evict is enough, read from the cluster's map of
    // node texts (the warning names it: noticed by an audit).
    let mut one = cluster.nodes[1].connection().await;
    for (name, value) in [("maxmemory", "1gb"), ("maxmemory-policy", "allkeys-lru")] {
        let _: () = ::redis::cmd("CONFIG")
            .arg(&["SET", name, value])
            .query_async(&mut one)
            .await
            .unwrap();
    }
    common::eventually(Duration::from_secs(15), "the evicting gauge", || async {
        common::sample(&proxy.metrics().await, "idemgate_store_evicting", &[]) == 1.0
    })
    .await;
    let keys = |args: &[&str]| keys_cli(&yaml, args);
    let unknown = keys(&["keys", "unknown", "--json"]);
    let out = String::from_utf8_lossy(&unknown.stdout);
    assert!(
        unknown.status.success(),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    assert!(out.contains("k-lost"), "{out}");
    let got = keys(&["keys", "get", "--route", "orders", "--key", "k-dup"]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
}

/// Regression (an audit of Redis Cluster): the cluster connection was made
/// within the first calls' `op_timeout`, and a seed that accepts
/// connections and never answers holds its making up longer: every call
/// cut it short, so it was never made, and a process started then answered
/// `503 store_unavailable` to every request (`keys` failed too), the
/// cluster healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_that_never_answers_does_not_keep_the_cluster_away() {
    let cluster = RedisCluster::start().await;
    let upstream = TestUpstream::start().await;
    // Connections complete in its backlog; nothing ever answers them.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut urls = vec![format!("\"redis://{}\"", hung.local_addr().unwrap())];
    urls.extend(cluster.urls().iter().map(|u| format!("\"{u}\"")));
    let store = format!(
        "store: {{ backend: redis, cluster: [{}], op_timeout: 250ms }}",
        urls.join(", ")
    );
    let routes = "  - { name: orders, match: { path_prefix: /api }, upstream: up }";
    let yaml = config(&store, upstream.addr, "", routes);
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    let post = || client.post_key(&url, "k-hung-seed", "{}");
    let reply = resend_until(Duration::from_secs(10), post, |r| r.status != 503).await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    let got = keys_cli(
        &yaml,
        &["keys", "get", "--route", "orders", "--key", "k-hung-seed"],
    );
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    drop(hung);
}

/// Regression (an audit of Redis Cluster): the cluster client sends a
/// slot's commands to the master it knows until that master answers or its
/// connection breaks, so after a master that hangs (a stopped process, a
/// partition) was replaced by its replica, its slots' keys still got `503
/// store_unavailable`, for as long as it hung. A watch on the cluster's
/// masters now makes the connection anew once a replica has taken the
/// slots over (`cluster-node-timeout` 1 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_away_from_a_master_that_hangs_is_followed() {
    let cluster = RedisCluster::start_replicated().await;
    let upstream = TestUpstream::start().await;
    let store = cluster_store(&cluster, "250ms");
    let routes = "  - { name: orders, match: { path_prefix: /api }, upstream: up }";
    let proxy = TestProxy::start(&config(&store, upstream.addr, "", routes)).await;
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    let post_until_201 = |key: String, limit: Duration| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let post = || client.post_key(&url, &key, "{}");
            let reply = resend_until(limit, post, |r| r.status == 201).await;
            assert_eq!(reply.status, 201, "{key}: {:?}", reply.body);
        }
    };
    post_until_201("k-before".into(), Duration::from_secs(10)).await;
    let masters_before = cluster.masters().await;
    let keys_before = cluster.dbsizes().await;
    let master = cluster.a_master().await;
    cluster.nodes[master].pause();
    // Keys on every master's slots, the hung one's among them: all stored
    // within 30 s of the pause (the promotion takes a few seconds).
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..24 {
        let limit = deadline.saturating_duration_since(Instant::now());
        post_until_201(format!("k-after-{i}"), limit).await;
    }
    // The hung master's slots were served by its promoted replica.
    let promoted: Vec<usize> = cluster
        .masters()
        .await
        .into_iter()
        .filter(|i| !masters_before.contains(i))
        .collect();
    assert_eq!(promoted.len(), 1, "one replica promoted: {promoted:?}");
    let keys_after = cluster.dbsizes().await;
    assert!(
        keys_after[promoted[0]] > keys_before[promoted[0]],
        "keys stored on the promoted replica: {keys_before:?} -> {keys_after:?}"
    );
    cluster.nodes[master].resume();
}

/// `idemgate <args> --config <a file holding yaml>`, as an operator runs it.
fn keys_cli(yaml: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idemgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(args)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap()
}

/// Regression (the Redis deployments audit): with a master dead and no
/// replica to take its slots, every claim failed (`503 store_unavailable`)
/// while `/readyz` said ready: the cluster's own PING went only to the
/// masters its connection still reached. Readiness asks every master that
/// holds slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_makes_the_proxy_unready() {
    let mut cluster = RedisCluster::start().await;
    let upstream = TestUpstream::start().await;
    let store = cluster_store(&cluster, "1s");
    let routes =
        "  - { name: orders, match: { path_prefix: /api }, upstream: up, idempotency: { } }";
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n{}",
        config(&store, upstream.addr, "", routes)
    );
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    let readyz = proxy.admin_url("/readyz");
    let ready = || client.send("GET", &readyz, &[], Bytes::new());
    assert_eq!(ready().await.status, 200);
    let master = cluster.a_master().await;
    cluster.nodes[master].kill();
    let unready = resend_until(Duration::from_secs(10), ready, |r| r.status != 200).await;
    assert_eq!(unready.status, 503, "{unready:?}");
    assert!(
        String::from_utf8_lossy(&unready.body).contains("store_unavailable"),
        "{unready:?}"
    );
}

/// Regression (the Redis deployments audit): `store.tls` with `redis://`
/// seeds made the cluster client speak TLS to them, though the
/// configuration check says it is ignored for such URLs (as it is for one
/// server). A plain cluster with a `tls:` block works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_tls_is_ignored_for_redis_urls_of_a_cluster() {
    let cluster = RedisCluster::start().await;
    let upstream = TestUpstream::start().await;
    let pki = common::certs::Pki::new();
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let store = format!(
        "store: {{ backend: redis, cluster: [{}], op_timeout: 1s, tls: {{ ca_file: \"{}\" }} }}",
        urls.join(", "),
        pki.ca.display()
    );
    let routes =
        "  - { name: orders, match: { path_prefix: /api }, upstream: up, idempotency: { } }";
    let proxy = TestProxy::start(&config(&store, upstream.addr, "", routes)).await;
    let client = TestClient::new();
    let first = client.post_key(&proxy.url("/api/o"), "k-plain", "{}").await;
    assert_eq!(first.status, 201, "{first:?}");
    let again = client.post_key(&proxy.url("/api/o"), "k-plain", "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
}

/// Regression (the cluster operations audit): a master restarted with its
/// nodes.conf lost left its old identity listed without an address
/// (`:0`, `noaddr`) as the master of its slots; the watch took that for a
/// change of masters and made the cluster connection anew around it, and
/// the cluster client, reading the address as port 0 of the node it asked,
/// then refreshed its slots without end: every key got `503
/// store_unavailable`, the healthy masters' too. The watch keeps the
/// connection and says why. (The cluster client may still read that
/// address on a refresh of its own: docs/operations.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_listed_without_an_address_is_not_connected_around() {
    let mut cluster = RedisCluster::start().await;
    let upstream = TestUpstream::start().await;
    let store = cluster_store(&cluster, "250ms");
    let routes = "  - { name: orders, match: { path_prefix: /api }, upstream: up }";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idemgate.yaml");
    std::fs::write(&path, config(&store, upstream.addr, "", routes)).unwrap();
    let proxy = common::binary::Binary::serve(&path);
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    assert_eq!(client.post_key(&url, "k-before", "{}").await.status, 201);
    let wiped = cluster.a_master().await;
    let healthy = (wiped + 1) % cluster.nodes.len();
    cluster.restart_wiped(wiped).await;
    let said = |what: &'static str| {
        let proxy = &proxy;
        async move { proxy.log().iter().any(|l| l.contains(what)) }
    };
    eventually(
        Duration::from_secs(20),
        "the warning of an address-less master",
        || said("a Redis Cluster master holding slots has no address"),
    )
    .await;
    let seen = cluster.nodes_seen_by(healthy).await;
    assert!(seen.contains(":0@0 master,noaddr"), "{seen}");
    assert!(
        !said("masters changed").await,
        "made anew around it: {:#?}",
        proxy.log()
    );
}

/// Regressions (the cluster operations audit): a listing SCANs the
/// masters one after another, and a record found on two of them (a key
/// moved between their SCANs during a reshard) was listed twice; and a
/// master flagged `fail` while it still held its slots was left out, so
/// the listing answered `200` without its records. A record is listed once
/// (here it is found twice as a slot's keys are being imported: a copy
/// written to the importing master), and a listing that cannot SCAN a
/// master holding slots fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_name_each_record_once_and_fail_without_a_master() {
    let cluster = RedisCluster::start().await;
    let upstream = TestUpstream::start().await;
    let store = cluster_store(&cluster, "500ms");
    let routes = "  - { name: orders, match: { path_prefix: /api }, upstream: up }";
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n{}",
        config(&store, upstream.addr, "", routes)
    );
    let proxy = TestProxy::start(&yaml).await;
    let client = TestClient::new();
    for i in 0..10 {
        let reply = client
            .post_key(&proxy.url("/api/o"), &format!("k-{i}"), "{}")
            .await;
        assert_eq!(reply.status, 201);
    }
    let list = || async {
        let url = proxy.admin_url("/keys?route=orders");
        client.send("GET", &url, &[], Bytes::new()).await
    };
    assert_eq!(list().await.json().as_array().unwrap().len(), 10);

    // One record's key copied to another master that imports its slot.
    let (owner, name) = {
        let mut found = None;
        for (i, node) in cluster.nodes.iter().enumerate() {
            let keys: Vec<String> = node
                .ask(::redis::cmd("KEYS").arg("*k-0}").to_owned())
                .await
                .unwrap();
            if let Some(name) = keys.into_iter().next() {
                found = Some((i, name));
            }
        }
        found.expect("the record of k-0")
    };
    let other = (owner + 1) % cluster.nodes.len();
    let ask = |i: usize, args: &[&str]| {
        let mut cmd = ::redis::cmd(args[0]);
        cmd.arg(&args[1..]);
        cluster.nodes[i].ask::<::redis::Value>(cmd)
    };
    let slot = match ask(owner, &["CLUSTER", "KEYSLOT", &name]).await {
        Some(::redis::Value::Int(slot)) => slot.to_string(),
        other => panic!("CLUSTER KEYSLOT: {other:?}"),
    };
    let owner_id: String = cluster.nodes[owner]
        .ask(::redis::cmd("CLUSTER").arg("MYID").to_owned())
        .await
        .unwrap();
    let value: Vec<u8> = cluster.nodes[owner]
        .ask(::redis::cmd("GET").arg(&name).to_owned())
        .await
        .unwrap();
    ask(
        other,
        &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &owner_id],
    )
    .await
    .unwrap();
    let mut conn = cluster.nodes[other].connection().await;
    let (): () = ::redis::pipe()
        .cmd("ASKING")
        .ignore()
        .cmd("SET")
        .arg(&name)
        .arg(value)
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let listed = list().await.json();
    let named = (listed.as_array().unwrap().iter())
        .filter(|r| r["key"] == "k-0")
        .count();
    assert_eq!(named, 1, "{listed}");
    assert_eq!(listed.as_array().unwrap().len(), 10, "{listed}");

    // A master that hangs, flagged `fail` by the others, still holding its slots.
    for node in &cluster.nodes {
        let mut set = ::redis::cmd("CONFIG");
        set.arg(&["SET", "cluster-require-full-coverage", "no"]);
        let _: Option<String> = node.ask(set).await;
    }
    let hung = (owner + 2) % cluster.nodes.len();
    cluster.nodes[hung].pause();
    let seen = other;
    let start = Instant::now();
    while !cluster
        .nodes_seen_by(seen)
        .await
        .lines()
        .any(|l| l.contains("master,fail ") && !l.contains("myself"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no master flagged fail"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = list().await;
    cluster.nodes[hung].resume();
    assert_eq!(
        failed.status,
        503,
        "{:?}",
        String::from_utf8_lossy(&failed.body)
    );
    assert_eq!(failed.code(), "store_unavailable");
}

/// `store:` with `cluster`'s nodes as seeds and `op_timeout`.
fn cluster_store(cluster: &RedisCluster, op_timeout: &str) -> String {
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "store: {{ backend: redis, cluster: [{}], op_timeout: {op_timeout} }}",
        urls.join(", ")
    )
}
