//! The binary as an operator runs it: kill -9 mid-flight, SIGTERM and SIGINT
//! drain, startup failures, log flags, secrets kept out of the log,
//! and the access log.

mod common;

use std::time::Duration;

use common::binary::{Binary, Process};
use common::{RedisServer, TestClient, TestUpstream, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn write_config(
    dir: &tempfile::TempDir,
    redis: &RedisServer,
    upstream: &TestUpstream,
    lease: &str,
) -> std::path::PathBuf {
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nshutdown_grace: 10s\nstore: {{ backend: redis, url: \"{}\" }}\nupstreams:\n  up: {{ url: \"http://{}\" }}\nroutes:\n  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up, timeouts: {{ response: 5s, total: 10s }}, idempotency: {{ lease: {lease} }} }}\n",
        redis.url(),
        upstream.addr
    );
    let path = dir.path().join("idemgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `store` (a YAML flow mapping), route `orders` on `/api`, no admin.
fn write_store_config(
    dir: &tempfile::TempDir,
    store: &str,
    upstream: &TestUpstream,
) -> std::path::PathBuf {
    write_memory_config_at(dir, upstream, "127.0.0.1:0", &format!("store: {store}\n"))
}

/// The memory store, route `orders` on `/api`.
fn write_memory_config(dir: &tempfile::TempDir, upstream: &TestUpstream) -> std::path::PathBuf {
    let yaml = format!(
        "listen: 127.0.0.1:0\nupstreams:\n  up: {{ url: \"http://{}\" }}\nroutes:\n  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up }}\n",
        upstream.addr
    );
    let path = dir.path().join("idemgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_flight_then_restart_then_lease_end_is_unknown() {
    let redis = RedisServer::start().await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &redis, &upstream, "1s");
    let mut first = Binary::serve(&path);
    let client = TestClient::new();
    let url = first.url("/api/o");
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move {
            let headers = [
                ("idempotency-key", "k-kill9"),
                ("content-type", "application/json"),
                ("x-test-delay-ms", "3000"),
            ];
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                client.send("POST", &url, &headers, "{}"),
            )
            .await;
        })
    };
    eventually(
        Duration::from_secs(10),
        "request reached the upstream",
        || async { upstream.hits() == 1 },
    )
    .await;
    first.child.kill().unwrap(); // SIGKILL: no chance to record anything
    first.child.wait().unwrap();
    in_flight.abort();

    let second = Binary::serve(&path);
    let during = client
        .post_key(&second.url("/api/o"), "k-kill9", "{}")
        .await;
    assert_eq!(
        during.code(),
        "request_in_progress",
        "the dead attempt still holds its lease"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await; // the lease under test
    // Listed as unknown, not also as in flight (regression, an audit).
    let admin = second.admin.expect("admin listener");
    let listed = |state: &'static str| {
        let client = client.clone();
        async move {
            let url = format!("http://{admin}/keys?state={state}");
            client.send("GET", &url, &[], "").await.json()
        }
    };
    assert_eq!(listed("in_flight").await, serde_json::json!([]));
    assert_eq!(listed("unknown").await[0]["key"], "k-kill9");
    let after = client
        .post_key(&second.url("/api/o"), "k-kill9", "{}")
        .await;
    assert_eq!(
        (after.status.as_u16(), after.code().as_str()),
        (409, "outcome_unknown")
    );
    assert_eq!(upstream.hits(), 1, "never sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_slow_requests_records_them_and_exits_0() {
    let redis = RedisServer::start().await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &redis, &upstream, "30s");
    let mut proxy = Binary::serve(&path);
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            let headers = [
                ("idempotency-key", "k-term"),
                ("x-test-delay-ms", "800"),
                ("authorization", "Bearer planted-secret-71"),
            ];
            client
                .send("POST", &url, &headers, "{\"card\":\"planted-body-secret\"}")
                .await
        })
    };
    eventually(
        Duration::from_secs(10),
        "request reached the upstream",
        || async { upstream.hits() == 1 },
    )
    .await;
    proxy.signal("TERM");
    let readyz = format!("http://{}/readyz", proxy.admin.expect("admin listener"));
    let draining = common::resend_until(
        Duration::from_secs(5),
        || client.send("GET", &readyz, &[], bytes::Bytes::new()),
        |r| r.status == 503,
    )
    .await;
    assert_eq!(
        draining.code(),
        "shutting_down",
        "load balancers are told while in-flight requests drain"
    );
    let reply = slow.await.unwrap();
    assert_eq!(
        reply.status, 201,
        "the in-flight request finished: {reply:?}"
    );
    assert_eq!(proxy.wait_exit(Duration::from_secs(15)), Some(0));

    // Recorded before exit: a new instance replays it.
    let again = Binary::serve(&path);
    let headers = [
        ("idempotency-key", "k-term"),
        ("authorization", "Bearer planted-secret-71"),
    ];
    let replay = client
        .send(
            "POST",
            &again.url("/api/o"),
            &headers,
            "{\"card\":\"planted-body-secret\"}",
        )
        .await;
    assert_eq!(
        replay.header("idempotent-replayed"),
        Some("true"),
        "{replay:?}"
    );
    assert_eq!(upstream.hits(), 1);

    // One JSON access line per request, with no secret in any line.
    let log = proxy.log();
    let access = proxy.access_lines();
    assert_eq!(access.len(), 1, "{log:?}");
    let line = &access[0];
    for field in [
        "client",
        "route",
        "method",
        "path",
        "status",
        "outcome",
        "key",
        "upstream_ms",
        "total_ms",
        "trace_id",
    ] {
        assert!(!line[field].is_null(), "access log has {field}: {line}");
    }
    assert_eq!(line["outcome"], "forwarded");
    assert_eq!(line["client"], "127.0.0.1", "the peer's address: {line}");
    for l in log.iter().chain(again.log().iter()) {
        assert!(
            !l.contains("planted-secret-71") && !l.contains("planted-body-secret"),
            "secret in log: {l}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_valid_file_and_keeps_the_old_one_on_an_invalid_file() {
    let a = TestUpstream::start().await;
    let b = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idemgate.yaml");
    let write = |target: &TestUpstream| {
        let yaml = format!(
            "listen: 127.0.0.1:0\nupstreams:\n  up: {{ url: \"http://{}\" }}\ndefaults: {{ idempotency: off }}\nroutes:\n  - {{ name: main, match: {{ path_prefix: / }}, upstream: up }}\n",
            target.addr
        );
        std::fs::write(&path, yaml).unwrap();
    };
    write(&a);
    let proxy = Binary::serve(&path);
    let client = TestClient::new();
    let slow = {
        let (client, url) = (client.clone(), proxy.url("/slow"));
        tokio::spawn(async move {
            client
                .send(
                    "GET",
                    &url,
                    &[("x-test-delay-ms", "500")],
                    bytes::Bytes::new(),
                )
                .await
        })
    };
    eventually(Duration::from_secs(5), "slow request at a", || async {
        a.hits() == 1
    })
    .await;
    write(&b);
    proxy.signal("HUP");
    let b_ref = &b;
    eventually(Duration::from_secs(5), "the reload took effect", || {
        let (client, url) = (client.clone(), proxy.url("/x"));
        async move {
            client.send("GET", &url, &[], bytes::Bytes::new()).await;
            b_ref.hits() > 0
        }
    })
    .await;
    assert_eq!(
        slow.await.unwrap().status,
        201,
        "the request in flight finished on the old upstream"
    );

    std::fs::write(&path, "listen: nope\n").unwrap();
    proxy.signal("HUP");
    eventually(
        Duration::from_secs(5),
        "the rejection was logged",
        || async { proxy.log().iter().any(|l| l.contains("reload rejected")) },
    )
    .await;
    let before = b.hits();
    assert_eq!(
        client
            .send("GET", &proxy.url("/y"), &[], bytes::Bytes::new())
            .await
            .status,
        201
    );
    assert_eq!(b.hits(), before + 1, "the old configuration stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_log_line_of_a_request_carries_its_trace_id() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config(&dir, &upstream);
    let proxy = Binary::serve(&path);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace}-b7ad6b7169203331-01");
    let headers = [
        ("idempotency-key", "k-trace"),
        ("traceparent", traceparent.as_str()),
        ("x-test-reset", "1"),
    ];
    let reply = TestClient::new()
        .send("POST", &proxy.url("/api/o"), &headers, "{}")
        .await;
    assert_eq!(reply.code(), "upstream_failed");
    eventually(Duration::from_secs(5), "the access line", || async {
        proxy.log().iter().any(|l| l.contains("idemgate::access"))
    })
    .await;
    let lines: Vec<String> = proxy
        .log()
        .into_iter()
        // Everything but the startup lines belongs to the one request.
        .filter(|l| {
            !l.contains("listening")
                && !l.contains("store backend is memory")
                && !l.contains("open-file limit")
        })
        .collect();
    assert!(
        lines.len() >= 3,
        "access line, connection broke, outcome unknown: {lines:#?}"
    );
    for line in &lines {
        assert!(line.contains(trace), "no trace id in: {line}");
    }
    // And which upstream failed (regression, the TLS audit: a handshake's
    // "UnknownIssuer" alone, no upstream named).
    let broke = lines
        .iter()
        .find(|l| l.contains("\"message\":\"upstream connection broke\""));
    assert!(
        broke.is_some_and(|l| l.contains("\"upstream\":\"up\"")),
        "{lines:#?}"
    );
}

/// Programs started from a shell get a soft open-file limit of 1,024, which
/// caps a proxy at about 500 clients: `serve` raises it to the hard limit
/// and says what it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_raises_the_open_file_limit_to_the_hard_one() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config(&dir, &upstream);
    let proxy = Binary::serve_wrapped(&path, &["prlimit", "--nofile=256:"]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.child.id())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line")
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(
        open_files[0], open_files[1],
        "soft limit raised to the hard one: {limits}"
    );
    assert_ne!(open_files[0], "256");
    let said = proxy.log().into_iter().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(&l).ok()?;
        (v["message"] == "idemgate listening").then(|| v["open_files"].to_string())
    });
    assert_eq!(said.as_deref(), Some(open_files[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_flag_and_env_size_the_runtime_and_one_worker_serves() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config(&dir, &upstream);
    let client = TestClient::new();
    type Env<'a> = &'a [(&'a str, &'a str)];
    let runs: [(&[&str], Env, u64); 2] = [
        (&["--workers", "3"], &[], 3),
        (&[], &[("IDEMGATE_WORKERS", "1")], 1),
    ];
    for (args, env, want) in runs {
        let mut proxy = Binary::serve_with(&path, args, env);
        let workers = proxy.log().iter().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["message"] == "idemgate listening").then(|| v["workers"].as_u64())?
        });
        assert_eq!(workers, Some(want));
        for i in 0..10 {
            let key = format!("k-workers-{want}-{i}");
            let headers = [("idempotency-key", key.as_str())];
            for _ in 0..2 {
                let reply = client
                    .send("POST", &proxy.url("/api/o"), &headers, "{}")
                    .await;
                assert_eq!(reply.status, 201, "{:?}", reply.body);
            }
        }
        proxy.signal("TERM");
        assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    }
    assert_eq!(
        upstream.hits(),
        20,
        "every key forwarded once, its duplicate replayed"
    );
    // Regression: `--workers 100000` started as many threads and never
    // got to listening.
    for bad in ["0", "1025", "100000"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .args(["serve", "--workers", bad, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "--workers {bad} is a usage error"
        );
    }
}

#[test]
fn a_bad_rust_log_is_said_in_a_warning_and_info_is_kept() {
    // It was replaced by info without a word, and a lone typo ("debg") was
    // taken for a target name: every line silenced.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["check", "--config", "config.example.yaml"])
        .env("RUST_LOG", "debg")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    // `check` logs to stderr: its stdout is its report.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warning = stderr
        .lines()
        .find(|l| l.contains("RUST_LOG is not a valid filter"))
        .unwrap_or_else(|| panic!("no warning in {stderr}"));
    assert!(
        warning.contains("\"WARN\"") && warning.contains("debg"),
        "{warning}"
    );
}

#[test]
fn a_mistyped_log_level_is_a_usage_error_not_silence() {
    let run = |level: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .args([
                "--log-level",
                level,
                "check",
                "--config",
                "config.example.yaml",
            ])
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    for bad in ["debg", "idemgate=loud", "info,"] {
        let out = run(bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.contains("--log-level") && err.contains("write a level (trace, debug"),
            "{bad}: {err}"
        );
    }
    for good in ["debug", "warn,idemgate=debug"] {
        let out = run(good);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{good}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The memory store, route `orders` on `/api`, listening on `listen`.
fn write_memory_config_at(
    dir: &tempfile::TempDir,
    upstream: &TestUpstream,
    listen: &str,
    extra: &str,
) -> std::path::PathBuf {
    let yaml = format!(
        "listen: {listen}\n{extra}upstreams:\n  up: {{ url: \"http://{}\" }}\nroutes:\n  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up }}\n",
        upstream.addr
    );
    let path = dir.path().join("idemgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `shutdown_grace` and a Redis store on `redis` with a 200 ms
/// `op_timeout`, for a shutdown while Redis is paused.
fn paused_store(redis: &RedisServer, grace: &str) -> String {
    format!(
        "shutdown_grace: {grace}\nstore: {{ backend: redis, url: \"{}\", op_timeout: 200ms }}\n",
        redis.url()
    )
}

fn is_json_object(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_defaults_to_json_when_stdout_is_piped_and_pretty_is_not_json() {
    let upstream = TestUpstream::start().await;
    let client = TestClient::new();
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", common::redis_server::free_port());
    let path = write_memory_config_at(&dir, &upstream, &addr, "");
    let config = path.to_str().unwrap();
    let limit = Duration::from_secs(20);
    // One request served, so the log has an access line too.
    let serve_one = || async {
        let reply = client
            .send("GET", &format!("http://{addr}/api/x"), &[], "")
            .await;
        assert_eq!(reply.status, 201, "{reply:?}");
    };

    let default = Process::start(&["serve", "--config", config], &[]);
    default.wait_for_line(limit, |l| l.contains("idemgate listening"));
    serve_one().await;
    let (stdout, _) = default.stop();
    assert!(stdout.len() >= 3, "{stdout:?}");
    for line in &stdout {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }

    let pretty = Process::start(
        &["serve", "--log-format", "pretty", "--config", config],
        &[],
    );
    pretty.wait_for_line(limit, |l| l.contains("idemgate listening"));
    serve_one().await;
    let (stdout, _) = pretty.stop();
    assert!(stdout.len() >= 3, "{stdout:?}");
    for line in &stdout {
        assert!(
            !is_json_object(line),
            "JSON under --log-format pretty: {line}"
        );
    }
    assert!(
        stdout
            .iter()
            .any(|l| l.contains("INFO") && l.contains("stopped")),
        "{stdout:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_warn_leaves_out_the_access_line_that_info_writes() {
    let upstream = TestUpstream::start().await;
    let client = TestClient::new();
    for (level, want_access) in [("warn", false), ("info", true)] {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", common::redis_server::free_port());
        let path = write_memory_config_at(&dir, &upstream, &addr, "");
        // The flag wins over RUST_LOG.
        let proxy = Process::start(
            &[
                "serve",
                "--log-level",
                level,
                "--config",
                path.to_str().unwrap(),
            ],
            &[("RUST_LOG", "debug")],
        );
        // A warning, so written at both levels, and after the bind.
        proxy.wait_for_line(Duration::from_secs(20), |l| {
            l.contains("store backend is memory")
        });
        let key = format!("k-level-{level}");
        let reply = client
            .send(
                "POST",
                &format!("http://{addr}/api/o"),
                &[("idempotency-key", key.as_str())],
                "{}",
            )
            .await;
        assert_eq!(reply.status, 201, "{reply:?}");
        let (stdout, _) = proxy.stop();
        let access = stdout.iter().any(|l| l.contains("idemgate::access"));
        assert_eq!(access, want_access, "--log-level {level}: {stdout:#?}");
        let listening = stdout.iter().any(|l| l.contains("idemgate listening"));
        assert_eq!(listening, want_access, "--log-level {level}: {stdout:#?}");
        assert!(
            !stdout.iter().any(|l| l.contains("\"level\":\"DEBUG\"")),
            "--log-level {level} lets RUST_LOG=debug through: {stdout:#?}"
        );
    }
}

#[test]
fn serve_exits_1_naming_an_invalid_config_or_an_address_in_use() {
    let upstream_addr = "127.0.0.1:9";
    let dir = tempfile::tempdir().unwrap();
    let run = |yaml: &str| {
        let path = dir.path().join("idemgate.yaml");
        std::fs::write(&path, yaml).unwrap();
        let mut proxy = Process::start(&["serve", "--config", path.to_str().unwrap()], &[]);
        let code = proxy.wait_exit(Duration::from_secs(10));
        // The reader threads end at EOF, shortly after the exit.
        let start = std::time::Instant::now();
        while std::sync::Arc::strong_count(&proxy.stderr) > 1 {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
        let stderr = proxy.stderr.lock().unwrap().join("\n");
        (code, stderr, path)
    };
    let rest = format!(
        "upstreams:\n  up: {{ url: \"http://{upstream_addr}\" }}\nroutes:\n  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up }}\n"
    );

    let (code, stderr, path) = run(&format!("listen: nope\n{rest}"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: {}: ", path.display()))
            && stderr.contains("listen (line 1, column 9)"),
        "{stderr}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, stderr, _) = run(&format!("listen: 127.0.0.1:{port}\n{rest}"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot bind listen address 127.0.0.1:{port}")),
        "{stderr}"
    );

    let (code, stderr, _) = run(&format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:{port} }}\n{rest}"
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot bind the admin listener 127.0.0.1:{port}")),
        "{stderr}"
    );
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_warns_at_startup_that_records_do_not_survive_a_restart() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config(&dir, &upstream);
    let proxy = Binary::serve(&path);
    let warned = |log: &[String]| {
        log.iter().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["level"] == "WARN"
                    && v["message"].as_str().is_some_and(|m| {
                        m.contains("store backend is memory")
                            && m.contains("do not survive a restart")
                    })
            })
        })
    };
    eventually(
        Duration::from_secs(5),
        "the memory-store warning",
        || async { warned(&proxy.log()) },
    )
    .await;
}

/// Regression: with Redis not answering, shutdown waited the whole grace
/// for a claim's undo retried in the background, and said nothing of why
/// (its end-of-grace warning named running exchanges only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_names_store_writes_still_retried_at_the_end_of_the_grace() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config_at(&dir, &upstream, "127.0.0.1:0", &paused_store(&redis, "1s"));
    let mut proxy = Binary::serve(&path);
    let client = TestClient::new();
    assert_eq!(
        client
            .post_key(&proxy.url("/api/o"), "k-warm", "{}")
            .await
            .status,
        201
    );
    redis.pause();
    let refused = client
        .post_key(&proxy.url("/api/o"), "k-paused", "{}")
        .await;
    assert_eq!(refused.code(), "store_unavailable");
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    redis.resume();
    let log = proxy.log();
    assert!(
        log.iter()
            .any(|l| l.contains("store writes still retried at the end of shutdown_grace")),
        "{log:#?}"
    );
}

/// Regression (an audit): an attempt the upstream had answered, whose
/// record the store (paused) had not taken by the end of the grace, was
/// named as an "upstream exchange still running", and no `pending` warning
/// came: whoever resolved its `unknown` record was told the upstream never
/// answered. It is named with what the upstream answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_names_a_completion_still_retried_with_the_upstreams_answer() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config_at(&dir, &upstream, "127.0.0.1:0", &paused_store(&redis, "2s"));
    let mut proxy = Binary::serve(&path);
    let client = TestClient::new();
    let answered = client.spawn_send(
        "POST",
        &proxy.url("/api/o"),
        &[
            ("idempotency-key", "k-answered"),
            ("x-test-delay-ms", "500"),
        ],
        "{}",
    );
    eventually(Duration::from_secs(10), "the attempt upstream", || async {
        upstream.hits() == 1
    })
    .await;
    redis.pause();
    proxy.signal("TERM");
    assert_eq!(answered.await.unwrap().status, 201);
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    redis.resume();
    let log = proxy.log();
    let named = |what: &str| log.iter().filter(|l| l.contains(what)).count();
    assert_eq!(
        named("the upstream answered 201, but the store had not taken its record"),
        1,
        "{log:#?}"
    );
    assert_eq!(named("upstream exchange still running"), 0, "{log:#?}");
    assert_eq!(
        named("store writes still retried at the end of shutdown_grace"),
        1,
        "{log:#?}"
    );
}

/// Regression: a reload's restart warnings compared the new file with the
/// last one reloaded, not with what runs: reloading a changed
/// `shutdown_grace` twice warned once, and going back to the running
/// value warned that it needed a restart. Also: a SIGHUP sent right after
/// the listening line, before the reload task listened, was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_warns_of_settings_that_differ_from_the_running_ones() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config_at(&dir, &upstream, "127.0.0.1:0", "shutdown_grace: 5s\n");
    let proxy = Binary::serve(&path);
    let count = |log: &[String], what: &str| log.iter().filter(|l| l.contains(what)).count();
    let reload_to = |grace: &str, reloads: usize| {
        write_memory_config_at(
            &dir,
            &upstream,
            "127.0.0.1:0",
            &format!("shutdown_grace: {grace}\n"),
        );
        proxy.signal("HUP");
        let proxy = &proxy;
        async move {
            eventually(Duration::from_secs(10), "the reload", || async {
                count(&proxy.log(), "configuration reloaded") == reloads
            })
            .await;
            count(&proxy.log(), "only after a restart")
        }
    };
    assert_eq!(reload_to("9s", 1).await, 1, "9s is not what runs");
    assert_eq!(
        reload_to("9s", 2).await,
        2,
        "nor is it after a second reload"
    );
    assert_eq!(reload_to("5s", 3).await, 2, "5s is what runs: no warning");
}

/// Regression (an audit): a reload that took protection off a route (or a
/// method off its `methods`) said nothing, though retries of completed
/// requests then reach the upstream again (a rename was said).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_takes_protection_off_says_so() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config_at(&dir, &upstream, "127.0.0.1:0", "");
    let proxy = Binary::serve(&path);
    let off = "defaults: { idempotency: off }\n";
    write_memory_config_at(&dir, &upstream, "127.0.0.1:0", off);
    proxy.signal("HUP");
    eventually(Duration::from_secs(10), "the reload", || async {
        proxy
            .log()
            .iter()
            .any(|l| l.contains("configuration reloaded"))
    })
    .await;
    let said: Vec<String> = (proxy.log().into_iter())
        .filter(|l| l.contains("no longer protects"))
        .collect();
    assert!(
        said.len() == 1 && said[0].contains("route orders: no longer protects POST, PATCH"),
        "{said:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_accepting_and_exits_0_when_shutdown_grace_ends() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config_at(&dir, &upstream, "127.0.0.1:0", "shutdown_grace: 1s\n");
    let mut proxy = Binary::serve(&path);
    let addr = proxy.addr;
    // A request the upstream answers only after the grace period.
    let mut in_flight = tokio::net::TcpStream::connect(addr).await.unwrap();
    in_flight
        .write_all(
            b"POST /api/o HTTP/1.1\r\nhost: x\r\nidempotency-key: k-int\r\nx-test-delay-ms: 5000\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "request reached the upstream",
        || async { upstream.hits() == 1 },
    )
    .await;

    let signalled = std::time::Instant::now();
    proxy.signal("INT");
    eventually(Duration::from_secs(2), "the drain began", || async {
        proxy.log().iter().any(|l| l.contains("shutting down"))
    })
    .await;
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "still draining within the grace period"
    );
    // No new connection is served while the old one drains.
    if let Ok(mut late) = tokio::net::TcpStream::connect(addr).await {
        late.write_all(b"GET /api/x HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap_or_default();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), late.read_to_end(&mut answer)).await;
        assert!(
            !answer.starts_with(b"HTTP/"),
            "a connection made after SIGINT was answered: {}",
            String::from_utf8_lossy(&answer)
        );
    }

    assert_eq!(proxy.wait_exit(Duration::from_secs(4)), Some(0));
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "exited {took:?} after SIGINT with shutdown_grace 1s"
    );
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), in_flight.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 2"),
        "the upstream had not answered: {}",
        String::from_utf8_lossy(&answer)
    );
    let log = proxy.log();
    assert!(
        log.iter().any(|l| l.contains("SIGINT received")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("connections still open at the end of shutdown_grace")),
        "{log:#?}"
    );
    // The exchange still waiting on the upstream is named, key and all.
    assert!(
        log.iter()
            .any(|l| l.contains("upstream exchange still running") && l.contains("key=k-int")),
        "{log:#?}"
    );
    // Regression: the request cut off was logged as 499, the status of a
    // client that went away, though its client had stayed.
    let access: Vec<_> = log
        .iter()
        .filter(|l| l.contains("idemgate::access") && l.contains("k-int"))
        .collect();
    assert_eq!(access.len(), 1, "{log:#?}");
    assert!(access[0].contains("\"status\":503"), "{}", access[0]);
    // Logged before "stopped" (regression, an audit: after it, as the
    // runtime dropped the connection's task after the last line).
    let at = |says: &dyn Fn(&String) -> bool| log.iter().position(says);
    let logged = at(&|l| l.contains("idemgate::access") && l.contains("k-int"));
    let stopped = at(&|l| l.contains("\"stopped\""));
    assert!(stopped.is_some() && logged < stopped, "{log:#?}");
}

/// Regression: a protected request whose body was still arriving held the
/// drain (until its body stalled 10 s, or the grace ended) though nothing
/// was claimed for it: it is answered `503 shutting_down` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_body_still_arriving_at_shutdown_is_answered_at_once() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config_at(&dir, &upstream, "127.0.0.1:0", "shutdown_grace: 1h\n");
    let mut proxy = Binary::serve(&path);
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(
        b"POST /api/o HTTP/1.1\r\nhost: x\r\nidempotency-key: k-slow-body\r\ncontent-length: 10\r\n\r\n{\"a\"",
    )
    .await
    .unwrap();
    // The head is read, the body waited for: a request is in flight.
    eventually(Duration::from_secs(5), "the request seen", || async {
        let mut other = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        other
            .write_all(b"GET /healthz-nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = other.read_to_end(&mut answer).await;
        !answer.is_empty()
    })
    .await;
    proxy.signal("TERM");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer));
    read.await.expect("answered at once").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("shutting_down") && answer.contains("retry-after: 1"),
        "{answer}"
    );
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)), Some(0));
    assert_eq!(upstream.hits(), 0);
}

/// Regressions (audit): admin calls left no trail, refused tokens
/// included; and a `/keys/...` call with a bad `scope` got 400 before a
/// wrong method's 405 or a missing token's 401. A call that changes
/// something, or is refused its token, is logged with the peer, never the
/// token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_are_logged_and_judged_method_then_token_then_scope() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = "admin: { listen: 127.0.0.1:0, token: s3cret-4417 }\n";
    let path = write_memory_config_at(&dir, &upstream, "127.0.0.1:0", extra);
    let proxy = Binary::serve(&path);
    let admin = proxy.admin.expect("an admin listener");
    let client = TestClient::new();
    let url = |p: &str| format!("http://{admin}{p}");
    let patch = client
        .send("PATCH", &url("/keys/orders/k?scope=bad"), &[], "")
        .await;
    assert_eq!(patch.status, 405, "{patch:?}");
    let unauthorized = client
        .send("DELETE", &url("/keys/orders/k?scope=bad"), &[], "")
        .await;
    assert_eq!(unauthorized.status, 401, "{unauthorized:?}");
    let bearer = [("authorization", "Bearer s3cret-4417")];
    let purge = client
        .send("DELETE", &url("/keys/orders/k"), &bearer, "")
        .await;
    assert_eq!(purge.status, 404, "{purge:?}");
    eventually(Duration::from_secs(5), "the admin calls logged", || async {
        proxy
            .log()
            .iter()
            .filter(|l| l.contains("idemgate::admin"))
            .count()
            == 3
    })
    .await;
    let log = proxy.log();
    let calls: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("idemgate::admin"))
        .collect();
    assert!(
        calls[1].contains("\"status\":401") && calls[1].contains("127.0.0.1"),
        "{calls:?}"
    );
    assert!(
        calls[2].contains("\"status\":404") && calls[2].contains("DELETE"),
        "{calls:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("s3cret-4417")),
        "the token logged"
    );
}

/// Regression: a second SIGTERM/SIGINT during the drain was ignored, so a
/// shutdown under a long `shutdown_grace` could be ended only by SIGKILL.
/// It ends the grace at once: what still runs is cut off and named, and
/// the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_the_shutdown_grace_at_once() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config_at(&dir, &upstream, "127.0.0.1:0", "shutdown_grace: 1h\n");
    let mut proxy = Binary::serve(&path);
    let mut in_flight = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    in_flight
        .write_all(
            b"POST /api/o HTTP/1.1\r\nhost: x\r\nidempotency-key: k-twice\r\nx-test-delay-ms: 60000\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the request upstream", || async {
        upstream.hits() == 1
    })
    .await;
    proxy.signal("TERM");
    eventually(Duration::from_secs(5), "the drain began", || async {
        proxy.log().iter().any(|l| l.contains("shutting down"))
    })
    .await;
    assert!(proxy.child.try_wait().unwrap().is_none(), "draining");
    proxy.signal("INT");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    let log = proxy.log();
    assert!(
        log.iter()
            .any(|l| l.contains("SIGINT received while shutting down")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("upstream exchange still running")
                && l.contains("key=k-twice")
                && l.contains("lost with the memory store")),
        "{log:#?}"
    );
    drop(in_flight);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_authorization_and_scope_header_values_never_reach_the_logs() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nupstreams:\n  up: {{ url: \"http://{}\" }}\nroutes:\n  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up, idempotency: {{ scope: {{ headers: [x-tenant] }}, fingerprint: {{ headers: [content-type, x-tenant] }} }} }}\n",
        upstream.addr
    );
    let path = dir.path().join("idemgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut proxy = Binary::serve_with(&path, &["--log-level", "debug"], &[]);
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    let headers = |key: &'static str| {
        [
            ("idempotency-key", key),
            ("content-type", "application/json"),
            ("cookie", "session=planted-cookie-123"),
            ("x-tenant", "planted-tenant-456"),
            ("authorization", "Bearer planted-auth-789"),
        ]
    };
    let body = "{\"card\":\"planted-body-321\"}";
    let first = client.send("POST", &url, &headers("k-secret"), body).await;
    assert_eq!(first.status, 201, "{first:?}");
    let replay = client.send("POST", &url, &headers("k-secret"), body).await;
    assert_eq!(
        replay.header("idempotent-replayed"),
        Some("true"),
        "{replay:?}"
    );
    let mismatch = client.send("POST", &url, &headers("k-secret"), "{}").await;
    assert_eq!(mismatch.status, 422, "{mismatch:?}");
    let broken = client
        .send(
            "POST",
            &url,
            &[&headers("k-secret-reset")[..], &[("x-test-reset", "1")]].concat(),
            body,
        )
        .await;
    assert!(broken.status.is_server_error(), "{broken:?}");
    let missing_key = client
        .send("POST", &url, &headers("k-unused")[1..], body)
        .await;
    assert_eq!(missing_key.status, 400, "{missing_key:?}");
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    let log = {
        // The reader threads end at EOF, shortly after the exit.
        let start = std::time::Instant::now();
        while std::sync::Arc::strong_count(&proxy.lines) > 1 {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
        proxy.log()
    };
    let access = log
        .iter()
        .filter(|l| l.contains("idemgate::access"))
        .count();
    assert_eq!(access, 5, "one access line per request: {log:#?}");
    assert!(
        log.iter().any(|l| l.contains("\"level\":\"DEBUG\"")),
        "debug lines are written: {log:#?}"
    );
    for line in &log {
        for secret in [
            "planted-cookie-123",
            "planted-tenant-456",
            "planted-auth-789",
            "planted-body-321",
        ] {
            assert!(!line.contains(secret), "{secret} in the log: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_the_listening_line_still_drains_and_exits_0() {
    // The handlers were installed only when the accept loop first ran, after
    // the listening line: a signal in between killed the process by the
    // signal's default action (SIGHUP's too), with no drain and no exit 0.
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config(&dir, &upstream);
    for _ in 0..5 {
        let mut proxy = Binary::serve(&path);
        proxy.signal("HUP");
        proxy.signal("TERM");
        assert_eq!(
            proxy.wait_exit(Duration::from_secs(10)),
            Some(0),
            "killed by the signal's default action: {:#?}",
            proxy.log()
        );
    }
}

/// Regression: with a wrong Redis password each request waited out
/// `op_timeout` on the connection's retries and was logged as "store
/// operation timed out". It fails at once, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_redis_password_is_said_per_request_not_a_timeout() {
    // A user Redis does not know: its AUTH fails as a wrong password does.
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url().replace("redis://", "redis://nobody:wrong@");
    let store = format!("{{ backend: redis, url: \"{url}\", op_timeout: 5s }}");
    let path = write_store_config(&dir, &store, &upstream);
    let mut proxy = Binary::serve(&path);
    let client = TestClient::new();
    let started = std::time::Instant::now();
    let refused = client.post_key(&proxy.url("/api/o"), "k-auth", "{}").await;
    assert_eq!(refused.code(), "store_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered before op_timeout, not after it"
    );
    // Regression: the refused claim, never sent, was undone in the
    // background anyway (20 tries), holding the shutdown some 10 s.
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)), Some(0));
    let log = proxy.log();
    let line = log
        .iter()
        .find(|l| l.contains("idempotency store unavailable"))
        .unwrap_or_else(|| panic!("{log:#?}"));
    assert!(line.contains("AuthenticationFailed"), "{line}");
    assert!(!line.contains("wrong"), "the password stays out: {line}");
    assert!(
        !log.iter().any(|l| l.contains("could not settle")),
        "nothing to undo: {log:#?}"
    );
}

/// Regression (an audit): a Redis Cluster whose connection could not be
/// made (every seed refusing, or a user without `+cluster`) failed claims
/// that were never sent, yet each was undone in the background (20 tries),
/// holding the shutdown some 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_refused_by_an_unreachable_cluster_is_not_undone() {
    let upstream = TestUpstream::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let store =
        format!("{{ backend: redis, cluster: [\"redis://127.0.0.1:{port}\"], op_timeout: 5s }}");
    let path = write_store_config(&dir, &store, &upstream);
    let mut proxy = Binary::serve(&path);
    let refused = TestClient::new()
        .post_key(&proxy.url("/api/o"), "k-cluster-down", "{}")
        .await;
    assert_eq!(refused.code(), "store_unavailable");
    proxy.signal("TERM");
    assert_eq!(
        proxy.wait_exit(Duration::from_secs(5)),
        Some(0),
        "no undoing to wait for: {:#?}",
        proxy.log()
    );
    let log = proxy.log();
    assert!(
        !log.iter()
            .any(|l| l.contains("could not undo") || l.contains("could not settle")),
        "nothing to undo: {log:#?}"
    );
    assert_eq!(upstream.hits(), 0);
}

/// Regression (the TLS audit): a Redis that accepts connections but never
/// finishes its handshake (TLS, or `HELLO`) cut every claim off at
/// `op_timeout` before any command was sent, yet each was taken as one that
/// may have landed and undone in the background: a shutdown waited 10-15 s
/// and logged "could not undo" per key. Standalone and cluster alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_cut_off_before_a_connection_was_made_is_not_undone() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    // Accepts, holds every connection open, and never says a word.
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().collect();
        drop(held);
    });
    let stores = [
        format!("{{ backend: redis, url: \"redis://127.0.0.1:{port}/0\", op_timeout: 300ms }}"),
        format!("{{ backend: redis, cluster: [\"redis://127.0.0.1:{port}\"], op_timeout: 300ms }}"),
    ];
    for store in stores {
        let upstream = TestUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let path = write_store_config(&dir, &store, &upstream);
        let mut proxy = Binary::serve(&path);
        for i in 0..3 {
            let url = proxy.url("/api/o");
            let refused = TestClient::new()
                .post_key(&url, &format!("k-silent-{i}"), "{}")
                .await;
            assert_eq!(refused.code(), "store_unavailable", "{store}");
        }
        proxy.signal("TERM");
        assert_eq!(
            proxy.wait_exit(Duration::from_secs(5)),
            Some(0),
            "{store}: no undoing to wait for: {:#?}",
            proxy.log()
        );
        let log = proxy.log();
        assert!(
            !log.iter().any(|l| l.contains("could not undo")),
            "{store}: nothing to undo: {log:#?}"
        );
        assert_eq!(upstream.hits(), 0);
    }
}

/// A config on `redis` as user `idem` (password `s3cret-pw`), allowed all
/// but what `rule` takes away (`-info`).
async fn config_as_redis_user(
    redis: &RedisServer,
    rule: &str,
    dir: &tempfile::TempDir,
    upstream: &TestUpstream,
) -> std::path::PathBuf {
    let mut admin = redis.connection().await;
    let rules = [
        "SETUSER",
        "idem",
        "on",
        ">s3cret-pw",
        "~*",
        "&*",
        "+@all",
        rule,
    ];
    let _: String = redis::cmd("ACL")
        .arg(&rules)
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = redis.url().replace("redis://", "redis://idem:s3cret-pw@");
    write_store_config(
        dir,
        &format!("{{ backend: redis, url: \"{url}\" }}"),
        upstream,
    )
}

/// Regression (a multi-instance audit): a Redis user allowed `SUBSCRIBE`
/// but not `PUBLISH` was never told: its scripts' publishes failed unseen
/// (`pcall`), and other instances' waiters polled. Said once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_not_allowed_publish_is_told_waiters_poll() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = config_as_redis_user(&redis, "-publish", &dir, &upstream).await;
    let mut proxy = Binary::serve(&path);
    let told = |log: &[String]| {
        (log.iter())
            .filter(|l| l.contains("may not PUBLISH"))
            .count()
    };
    eventually(Duration::from_secs(10), "the warning", || async {
        told(&proxy.log()) == 1
    })
    .await;
    let reply = TestClient::new()
        .post_key(&proxy.url("/api/o"), "k-publish", "{}")
        .await;
    assert_eq!(reply.status, 201, "protected as before");
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    let log = proxy.log();
    assert_eq!(told(&log), 1, "{log:#?}");
    assert!(!log.iter().any(|l| l.contains("s3cret-pw")), "{log:#?}");
}

/// Regression (an audit): a Redis user not allowed `INFO` turned the
/// eviction check off without a word (`idemgate_store_evicting` at 0, its
/// alert silent, whatever the policy). It is said once, with what to grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_not_allowed_info_is_told_the_eviction_check_is_off() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = config_as_redis_user(&redis, "-info", &dir, &upstream).await;
    let mut proxy = Binary::serve(&path);
    let refused = |log: &[String]| {
        (log.iter())
            .filter(|l| l.contains("Redis refused INFO"))
            .count()
    };
    eventually(Duration::from_secs(10), "the warning", || async {
        refused(&proxy.log()) == 1
    })
    .await;
    // Said once, not on every reading (one each 5 s).
    let reply = TestClient::new()
        .post_key(&proxy.url("/api/o"), "k-info", "{}")
        .await;
    assert_eq!(reply.status, 201, "protected as before");
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    let log = proxy.log();
    assert_eq!(refused(&log), 1, "{log:#?}");
    let line = log
        .iter()
        .find(|l| l.contains("Redis refused INFO"))
        .unwrap();
    assert!(line.contains("WARN") && line.contains("+info"), "{line}");
    assert!(
        !line.contains("s3cret-pw"),
        "the password stays out: {line}"
    );
}

/// A client cut off by `send_timeout` is said in the log: its access line
/// keeps the answer's status (the head went out), so nothing else told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_off_by_send_timeout_is_logged() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config_at(&dir, &upstream, "127.0.0.1:0", "send_timeout: 1s\n");
    let mut proxy = Binary::serve(&path);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(proxy.addr).await.unwrap();
    let head = "GET /api/big HTTP/1.1\r\nhost: x\r\nx-test-body-bytes: 67108864\r\n\r\n";
    stalled.write_all(head.as_bytes()).await.unwrap();
    eventually(Duration::from_secs(10), "the cut-off is logged", || async {
        proxy
            .log()
            .iter()
            .any(|l| l.contains("client connection cut off"))
    })
    .await;
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    drop(stalled);
}

/// The warning that other instances' transitions are not heard (Redis
/// down) gets its end when the subscription comes back (regression:
/// nothing said so, and an operator could not tell it had recovered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearing_other_instances_again_after_redis_returns_is_said() {
    let mut redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nshutdown_grace: 1s\nstore: {{ backend: redis, url: \"{}\" }}\nupstreams:\n  up: {{ url: \"http://{}\" }}\nroutes:\n  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up }}\n",
        redis.url(),
        upstream.addr
    );
    let path = dir.path().join("idemgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut proxy = Binary::serve(&path);
    redis.kill();
    eventually(Duration::from_secs(10), "the outage is said", || async {
        proxy
            .log()
            .iter()
            .any(|l| l.contains("not hearing other instances"))
    })
    .await;
    // In words ("Connection refused (os error 111)", "timed out"), not the
    // error's kind ("Io"). (Flaky when it asked for "refused": the first
    // failure after the kill may be another.)
    let log = proxy.log();
    let said = log
        .iter()
        .find(|l| l.contains("not hearing other instances"))
        .expect("the outage line");
    let line: serde_json::Value = serde_json::from_str(said).expect("a JSON line");
    let error = line["error"].as_str().unwrap_or_default();
    assert!(error.contains(' '), "the error in words: {said}");
    redis.restart().await;
    eventually(Duration::from_secs(10), "the recovery is said", || async {
        proxy
            .log()
            .iter()
            .any(|l| l.contains("hearing other instances' transitions again"))
    })
    .await;
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
}

/// An HTTP/1.1 connection of its own to `addr`.
async fn connection(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(tcp);
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// A protected POST of `key` on `sender`'s connection: its status and body.
async fn post_on(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    key: &str,
    extra: &[(&str, &str)],
) -> (u16, String) {
    use http_body_util::BodyExt;
    let mut request = http::Request::post("/api/o")
        .header("host", "x")
        .header("idempotency-key", key);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let request = request.body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")));
    sender.ready().await.unwrap();
    let response = sender.send_request(request.unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sets a process's `RLIMIT_NOFILE` (when `new` is given); the one before.
fn nofile(pid: libc::pid_t, new: Option<libc::rlimit>) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new = new
        .as_ref()
        .map_or(std::ptr::null(), |n| n as *const libc::rlimit);
    // SAFETY: plain structs that outlive the call; a child of this test.
    let done = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, new, &mut old) };
    assert_eq!(done, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

/// libfaketime's preloadable library (Debian's `faketime` package), which
/// fakes the wall clock of the process it is loaded into.
fn libfaketime() -> &'static str {
    const PLACES: [&str; 3] = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ];
    PLACES
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .expect("libfaketime is missing: apt-get install -y faketime (the wall-clock step test needs it)")
}

/// Regression (a review): the memory store judged leases on the wall clock,
/// so a step forward longer than a lease (NTP, a VM resumed) ended a
/// running attempt's lease: under `on_unknown: release` its duplicate was
/// forwarded and the upstream ran the request twice (under `lock` it got
/// `outcome_unknown` while the attempt ran). The store's clock only moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_does_not_end_a_running_attempts_lease() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy =
        "defaults: { idempotency: { lease: 60s, on_unknown: release, concurrent: reject } }\n";
    let path = write_memory_config_at(&dir, &upstream, "127.0.0.1:0", policy);
    let clock = dir.path().join("faketime");
    std::fs::write(&clock, "+0\n").unwrap();
    let preload = format!("LD_PRELOAD={}", libfaketime());
    let clock_file = format!("FAKETIME_TIMESTAMP_FILE={}", clock.display());
    let wrapper = [
        "env",
        &preload,
        &clock_file,
        "FAKETIME_NO_CACHE=1",
        "DONT_FAKE_MONOTONIC=1",
    ];
    let proxy = Binary::serve_wrapped(&path, &wrapper);
    let client = TestClient::new();
    let url = proxy.url("/api/o");
    let headers = [("idempotency-key", "k-step"), ("x-test-delay-ms", "1500")];
    let first = client.spawn_send("POST", &url, &headers, "{}");
    eventually(Duration::from_secs(10), "the attempt upstream", || async {
        upstream.hits() == 1
    })
    .await;
    // The wall clock steps two minutes on, past the 60 s lease.
    std::fs::write(&clock, "+120\n").unwrap();
    let duplicate = client.send("POST", &url, &headers, "{}").await;
    assert_eq!(duplicate.code(), "request_in_progress", "{duplicate:?}");
    assert_eq!(first.await.unwrap().status, 201);
    let retry = client.send("POST", &url, &headers, "{}").await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.hits(), 1, "the upstream ran it once");
}

/// Regression (an audit): out of file descriptors, the proxy listener
/// warned "accept failed" 20 times a second without saying what to do, and
/// the admin listener said nothing. Each listener warns at most once a
/// second, names itself and the limit, and serves its waiting clients once
/// descriptors are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_failures_are_warned_once_a_second_on_both_listeners() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = "admin: { listen: 127.0.0.1:0 }\n";
    let path = write_memory_config_at(&dir, &upstream, "127.0.0.1:0", admin);
    let proxy = Binary::serve(&path);
    let pid = proxy.child.id() as libc::pid_t;
    let used: std::collections::BTreeSet<i64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let free = (0..).find(|n| !used.contains(n)).unwrap() as u64;
    let before = nofile(pid, None);
    let limited = std::time::Instant::now();
    nofile(
        pid,
        Some(libc::rlimit {
            rlim_cur: free,
            rlim_max: before.rlim_max,
        }),
    );
    let admin = proxy.admin.expect("admin listener");
    let waiting = (connection(proxy.addr).await, connection(admin).await);
    let warned = |listener: &str| {
        let said = format!("\"listener\":\"{listener}\"");
        (proxy.log().into_iter())
            .filter(|l| l.contains("accept failed") && l.contains(&said))
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(5), "both listeners warn", || async {
        !warned("proxy").is_empty() && !warned("admin").is_empty()
    })
    .await;
    // Not a wait for readiness: the time over which warnings are counted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (proxy_lines, admin_lines) = (warned("proxy"), warned("admin"));
    let bound = limited.elapsed().as_secs_f64().ceil() as usize + 1;
    nofile(pid, Some(before));
    assert!(proxy_lines.len() <= bound, "{proxy_lines:#?}");
    assert!(admin_lines.len() <= bound, "{admin_lines:#?}");
    assert!(
        proxy_lines[0].contains("out of file descriptors")
            && proxy_lines[0].contains("LimitNOFILE"),
        "{proxy_lines:#?}"
    );
    // The clients that waited in the backlog are served.
    let (mut on_proxy, _) = waiting;
    assert_eq!(post_on(&mut on_proxy, "k-backlog", &[]).await.0, 201);
    let healthz = format!("http://{admin}/healthz");
    let reply = TestClient::new()
        .send("GET", &healthz, &[], bytes::Bytes::new())
        .await;
    assert_eq!(reply.status, 200);
}

/// Regression (an audit): at its file-descriptor limit the proxy answered
/// `502 upstream_unreachable`, blamed the upstream and opened its circuit,
/// which stayed open after the descriptors came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_is_not_the_upstreams_failure() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nupstreams:\n  up: {{ url: \"http://{}\", circuit_breaker: {{ consecutive_failures: 1, open_for: 1h }} }}\nroutes:\n  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up }}\n",
        upstream.addr
    );
    let path = dir.path().join("idemgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let proxy = Binary::serve(&path);
    let pid = proxy.child.id() as libc::pid_t;
    let (mut first, mut second) = (connection(proxy.addr).await, connection(proxy.addr).await);
    assert_eq!(post_on(&mut first, "k-warm", &[]).await.0, 201);
    // No descriptor left: the limit at the lowest free number.
    let used: std::collections::BTreeSet<i64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let free = (0..).find(|n| !used.contains(n)).unwrap() as u64;
    let before = nofile(pid, None);
    nofile(
        pid,
        Some(libc::rlimit {
            rlim_cur: free,
            rlim_max: before.rlim_max,
        }),
    );
    // The pooled upstream connection is busy: the next request needs a new one.
    let slow =
        tokio::spawn(
            async move { post_on(&mut first, "k-slow", &[("x-test-delay-ms", "1000")]).await },
        );
    eventually(
        Duration::from_secs(5),
        "the slow request upstream",
        || async { upstream.hits() == 2 },
    )
    .await;
    let (status, body) = post_on(&mut second, "k-fd", &[]).await;
    nofile(pid, Some(before));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("upstream_overloaded"), "{body}");
    assert_eq!(slow.await.unwrap().0, 201);
    // Nothing blamed on the upstream, nothing claimed: the retry goes through.
    let (status, body) = post_on(&mut second, "k-fd", &[]).await;
    assert_eq!(status, 201, "{body}");
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("out of file descriptors")),
        "an error says why"
    );
}

/// Regression (an audit): a passed-through answer whose upstream broke off
/// after its head was logged as a plain 200 (the access line is written
/// with the head), and nothing said the client's answer had been cut
/// short. A warning now says so, with the request's trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_broken_after_its_head_is_logged() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Binary::serve(&write_memory_config(&dir, &upstream));
    // Passed through (a GET), and protected with a status not stored (a 500
    // streamed as it comes, the key released).
    let cases = [
        ("GET", "4bf92f3577b34da6a3ce929d0e0e4736", "", "201"),
        (
            "POST",
            "5cf92f3577b34da6a3ce929d0e0e4737",
            "idempotency-key: k-broken\r\nx-test-status: 500\r\ncontent-length: 0\r\n",
            "500",
        ),
    ];
    for (method, trace, more, status) in cases {
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!(
            "{method} /api/o HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{trace}-00f067aa0ba902b7-01\r\nx-test-break-body-after-ms: 50\r\n{more}\r\n"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got))
            .await
            .expect("the connection is closed")
            .ok();
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with(&format!("HTTP/1.1 {status}")), "{got}");
        assert!(!got.ends_with("0\r\n\r\n"), "cut short, not ended: {got}");
        let warned = || {
            proxy
                .log()
                .into_iter()
                .find(|l| l.contains("broke off after its head") && l.contains(trace))
        };
        eventually(Duration::from_secs(5), "the warning", || {
            let found = warned().is_some();
            async move { found }
        })
        .await;
        let warning = warned().unwrap();
        assert!(warning.contains("\"WARN\""), "{warning}");
    }
}

/// Regression (an observability audit): a passed-through upload's time on
/// the client's side was the upstream's latency: a body dripped over 2 s
/// logged `upstream_ms: 2001` (and fed the upstream latency histogram and
/// its alert), though the upstream answered at once when it had it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_the_upstreams_latency() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Binary::serve(&write_memory_config(&dir, &upstream));
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // PUT is not a protected method: passed through, its body streamed.
    tcp.write_all(
        b"PUT /api/o HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    for byte in b"hello" {
        tokio::time::sleep(Duration::from_millis(400)).await;
        tcp.write_all(&[*byte]).await.unwrap();
    }
    let mut got = Vec::new();
    tcp.read_to_end(&mut got).await.unwrap();
    let took = started.elapsed().as_millis() as u64;
    assert!(
        got.starts_with(b"HTTP/1.1 201"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    eventually(Duration::from_secs(5), "the access line", || async {
        !proxy.access_lines().is_empty()
    })
    .await;
    let line = proxy.access_lines().remove(0);
    let upstream_ms = line["upstream_ms"].as_u64().expect("an upstream time");
    assert!(line["total_ms"].as_u64().unwrap() >= 1600, "{line}");
    assert!(
        upstream_ms < took / 2,
        "the upload took {took} ms, the upstream's part of it {upstream_ms}: {line}"
    );
}

/// Regression (an observability audit): a passed-through upload whose
/// client left after 2 of its 100 bytes logged `upstream_ms: 0` and fed
/// the latency histogram, though the upstream never had it whole nor
/// answered: the body's error was taken for its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_its_client_broke_off_has_no_upstream_time() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Binary::serve(&write_memory_config(&dir, &upstream));
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = b"PUT /api/o HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nxx";
    tcp.write_all(head).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the upload reached the upstream",
        || async { upstream.hits() == 1 },
    )
    .await;
    drop(tcp);
    eventually(Duration::from_secs(5), "the access line", || async {
        !proxy.access_lines().is_empty()
    })
    .await;
    let line = proxy.access_lines().remove(0);
    assert_eq!(line["status"], 499, "{line}");
    // The same time feeds the upstream latency histogram.
    assert!(line.get("upstream_ms").is_none(), "{line}");
}

/// Regression (an observability audit): a protected request's 504 logged
/// no `upstream_ms` (a pass-through one's did); the late answer's real time
/// still goes into the latency histogram, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_504_logs_the_time_waited_and_times_the_answer_once() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nupstreams:\n  up: {{ url: \"http://{}\" }}\nroutes:\n  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up, timeouts: {{ response: 300ms, total: 5s }} }}\n",
        upstream.addr
    );
    let path = dir.path().join("idemgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let proxy = Binary::serve(&path);
    let headers = [("idempotency-key", "k-504"), ("x-test-delay-ms", "900")];
    let reply = TestClient::new()
        .send("POST", &proxy.url("/api/o"), &headers, "{}")
        .await;
    assert_eq!(reply.status, 504);
    eventually(Duration::from_secs(5), "the access line", || async {
        !proxy.access_lines().is_empty()
    })
    .await;
    let line = proxy.access_lines().remove(0);
    let waited = line["upstream_ms"].as_u64().expect("the time waited");
    assert!(waited >= 300, "{line}");
    let metrics_url = format!("http://{}/metrics", proxy.admin.unwrap());
    let latency_count = || async {
        let text = TestClient::new()
            .send("GET", &metrics_url, &[], "")
            .await
            .body;
        common::sample(
            &String::from_utf8_lossy(&text),
            "idemgate_upstream_latency_seconds_count",
            &[],
        )
    };
    // Once the late answer is recorded, its duplicate is replayed.
    let (client, url) = (TestClient::new(), proxy.url("/api/o"));
    let again = common::resend_until(
        Duration::from_secs(10),
        || client.send("POST", &url, &headers, "{}"),
        |r| r.status == 201,
    )
    .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    // Timed once: the answer's time, not also the 504's wait.
    assert_eq!(latency_count().await, 1.0);
}

/// Regression (an observability audit): a completion the store could not
/// take is logged as an error and tried again in the background; when the
/// retry landed, nothing said so, and a key that was fine looked lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_recorded_in_the_background_after_all_is_said() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &redis, &upstream, "60s");
    let proxy = Binary::serve(&path);
    let client = TestClient::new();
    let headers = [("idempotency-key", "k-later"), ("x-test-delay-ms", "400")];
    let in_flight = client.spawn_send("POST", &proxy.url("/api/o"), &headers, "{}");
    eventually(Duration::from_secs(5), "the request upstream", || async {
        upstream.hits() == 1
    })
    .await;
    // Redis hangs from before the upstream answers until after op_timeout.
    redis.pause();
    let reply = in_flight.await.unwrap();
    redis.resume();
    assert_eq!(reply.status, 201);
    eventually(
        Duration::from_secs(10),
        "the news that it came right",
        || async {
            proxy
                .log()
                .iter()
                .any(|l| l.contains("settled in the background after all") && l.contains("k-later"))
        },
    )
    .await;
    let log = proxy.log();
    assert!(
        log.iter()
            .any(|l| l.contains("could not record the response")),
        "the failure was said first: {log:#?}"
    );
}

/// Replaces the file at `path` with a FIFO: a reload reading it waits for
/// a writer.
fn make_fifo(path: &std::path::Path) {
    std::fs::remove_file(path).unwrap();
    let fifo = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
}

/// The FIFO at `path` opened for writing, once a reload reads it (`what`).
async fn fifo_writer(path: &std::path::Path, what: &str) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let mut writer = None;
    eventually(Duration::from_secs(10), what, || {
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
        let ready = opened.is_ok();
        if let Ok(file) = opened {
            writer = Some(file);
        }
        async move { ready }
    })
    .await;
    writer.expect("the FIFO opened")
}

/// Regression (a reload audit): a reload stuck reading its file (a FIFO
/// here; a hung NFS or secrets mount in life) kept the process from ever
/// exiting: "stopped" was logged, and it lived on until SIGKILL, the
/// runtime waiting for the blocking read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_stuck_reading_its_file_does_not_keep_the_process_alive() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config(&dir, &upstream);
    let with_admin = |extra_route: &str| {
        let yaml = std::fs::read_to_string(dir.path().join("base.yaml")).unwrap();
        format!("admin: {{ listen: 127.0.0.1:0, token: t0k }}\n{yaml}{extra_route}")
    };
    std::fs::copy(&path, dir.path().join("base.yaml")).unwrap();
    std::fs::write(&path, with_admin("")).unwrap();
    let mut proxy = Binary::serve(&path);
    make_fifo(&path);
    proxy.signal("HUP");
    // Held open, unwritten, the writer keeps the reload's read waiting.
    let writer = fifo_writer(&path, "the reload reading the FIFO").await;
    // A reload of a real file meanwhile is not held up by the stuck one
    // (regression, the verification audit: every later reload waited out
    // its 10 s behind the stuck one's lock, and failed).
    std::fs::remove_file(&path).unwrap();
    let route =
        "  - { name: later, match: { path_prefix: /later }, upstream: up, idempotency: off }\n";
    std::fs::write(&path, with_admin(route)).unwrap();
    let admin = format!("http://{}/reload", proxy.admin.unwrap());
    let started = std::time::Instant::now();
    let reload = TestClient::new()
        .send("POST", &admin, &[("authorization", "Bearer t0k")], "")
        .await;
    assert_eq!(reload.status, 200, "{:?}", reload.body);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let later = TestClient::new()
        .send("GET", &proxy.url("/later/x"), &[], "")
        .await;
    assert_eq!(later.status, 201);
    // Given up after 10 s; its read ending later (EOF: an empty file) says
    // only that (regression, an audit: logged as the empty file's errors).
    eventually(Duration::from_secs(20), "the reload given up", || {
        let said = proxy
            .log()
            .iter()
            .any(|l| l.contains("the reload is given up"));
        async move { said }
    })
    .await;
    drop(writer);
    eventually(Duration::from_secs(10), "the late read's end", || {
        let said =
            (proxy.log().iter()).any(|l| l.contains("given up earlier has finished reading"));
        async move { said }
    })
    .await;
    assert!(
        !proxy.log().iter().any(|l| l.contains("no routes")),
        "{:?}",
        proxy.log()
    );
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0));
}

/// Regression (an operations audit): of two reloads at once, the one that
/// began first and was overtaken (the later one, which read the file later,
/// applied first) answered `400` with an error logged, though the file was
/// valid and what runs is that file as read later. It is a `200` that says
/// so. The first reload's read is held on a FIFO until the second applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_overtaken_by_a_later_one_is_not_a_failure() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_memory_config(&dir, &upstream);
    let base = std::fs::read_to_string(&path).unwrap();
    let with_admin = |extra_route: &str| {
        format!("admin: {{ listen: 127.0.0.1:0, token: t0k }}\n{base}{extra_route}")
    };
    std::fs::write(&path, with_admin("")).unwrap();
    let mut proxy = Binary::serve(&path);
    make_fifo(&path);
    let admin = format!("http://{}/reload", proxy.admin.unwrap());
    let token = [("authorization", "Bearer t0k")];
    let first = TestClient::new().spawn_send("POST", &admin, &token, "");
    let mut writer = fifo_writer(&path, "the first reload reading").await;
    std::fs::remove_file(&path).unwrap();
    let route = "  - { name: later, match: { path_prefix: /later }, upstream: up }\n";
    std::fs::write(&path, with_admin(route)).unwrap();
    let second = TestClient::new().send("POST", &admin, &token, "").await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    // The first read ends now, with a valid file (the one without `later`).
    std::io::Write::write_all(&mut writer, with_admin("").as_bytes()).unwrap();
    drop(writer);
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert!(first.json()["overtaken"].is_string(), "{:?}", first.body);
    // The later read runs.
    let later = TestClient::new()
        .send("GET", &proxy.url("/later/x"), &[], "")
        .await;
    assert_eq!(later.status, 201);
    assert!(
        !proxy.log().iter().any(|l| l.contains("reload rejected")),
        "{:?}",
        proxy.log()
    );
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0));
}

/// Regression (the Redis deployments audit): a duplicate waiting on another
/// instance's attempt logged a warning at every poll the store failed
/// (16 waiters: 1,200 lines in a 30 s outage). Once per waiter now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_says_once_that_the_store_fails_its_polls() {
    let redis = RedisServer::start_own().await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &redis, &upstream, "30s");
    let yaml = std::fs::read_to_string(&path)
        .unwrap()
        .replace("lease: 30s", "lease: 30s, concurrent: wait");
    std::fs::write(&path, yaml).unwrap();
    let (runs, waits) = (Binary::serve(&path), Binary::serve(&path));
    let client = TestClient::new();
    let slow = [("idempotency-key", "k-noisy"), ("x-test-delay-ms", "3000")];
    let first = client.spawn_send("POST", &runs.url("/api/o"), &slow, "{}");
    eventually(Duration::from_secs(5), "the attempt upstream", || async {
        upstream.hits() == 1
    })
    .await;
    let key = [("idempotency-key", "k-noisy")];
    let duplicate = client.spawn_send("POST", &waits.url("/api/o"), &key, "{}");
    // Its polls fail while Redis hangs (250 ms each), for a second and a half.
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.pause();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.resume();
    assert_eq!(first.await.unwrap().status, 201);
    let replay = duplicate.await.unwrap();
    assert_eq!(
        replay.header("idempotent-replayed"),
        Some("true"),
        "{replay:?}"
    );
    let warned = (waits.log().iter())
        .filter(|l| l.contains("a waiting duplicate's claim failed"))
        .count();
    assert_eq!(warned, 1, "{:#?}", waits.log());
    assert_eq!(upstream.hits(), 1);
}
