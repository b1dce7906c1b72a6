//! Configuration loading: every error kind named with its field and line,
//! all errors at once, `${VAR}`, merging, and `idemgate check`'s exit codes.

use std::process::Command;
use std::time::Duration;

use idemgate::config::{Concurrent, Config, ConfigError, OnUnknown, PathMatch, StatusPattern};

const BASE: &str = "upstreams:\n  erp: { url: \"http://127.0.0.1:9000\" }\n";

fn errors(yaml: &str) -> Vec<ConfigError> {
    Config::parse(yaml).expect_err("invalid").0
}

fn error_at<'a>(errors: &'a [ConfigError], path: &str) -> &'a ConfigError {
    errors
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no error for {path}: {errors:#?}"))
}

#[test]
fn every_error_of_a_file_is_reported_at_once_with_path_line_and_fix() {
    let yaml = r#"listen: nope
admin: { listen: "127.0.0.1:x" }
store: { backend: redis, url: "http://secret@host", op_timeout: 0s, on_unavailable: maybe }
upstreams:
  erp: { url: "ftp://x", connect_timeout: 3x }
defaults:
  idempotency: { ttl: forever, store_statuses: ["2xx", "7xx"], release_statuses: [999] }
routes:
  - name: a
    match: { path_prefix: api }
    upstream: missing
    timeouts: { response: 10 }
  - name: b
    match: { path: /b, methods: ["P OST"] }
    upstream: erp
    idempotency: { concurrent: sometimes, on_unknown: maybe, max_request_body: lots, header: "bad header" }
  - name: "bad name"
    match: { path: /c, path_prefix: /c }
    upstream: erp
  - name: b
    match: { path: /d }
    upstream: erp
"#;
    let errs = errors(yaml);
    let expected = [
        ("listen", 1),
        ("admin.listen", 2),
        ("store.url", 3),
        ("store.op_timeout", 3),
        ("store.on_unavailable", 3),
        ("upstreams.erp.url", 5),
        ("upstreams.erp.connect_timeout", 5),
        ("defaults.idempotency.ttl", 7),
        ("defaults.idempotency.store_statuses[1]", 7),
        ("defaults.idempotency.release_statuses[0]", 7),
        ("routes[0].match.path_prefix", 10),
        ("routes[0].upstream", 11),
        ("routes[0].timeouts.response", 12),
        ("routes[1].match.methods[0]", 14),
        ("routes[1].idempotency.concurrent", 16),
        ("routes[1].idempotency.on_unknown", 16),
        ("routes[1].idempotency.max_request_body", 16),
        ("routes[1].idempotency.header", 16),
        ("routes[2].name", 17),
        ("routes[3].name", 20),
    ];
    for (path, line) in expected {
        let e = error_at(&errs, path);
        assert_eq!(e.position.map(|p| p.0), Some(line), "{e}");
        assert!(!e.hint.is_empty(), "{e} says how to fix it");
    }
    error_at(&errs, "routes[2].match");
    // The Redis URL may hold a password: it is never echoed.
    assert!(
        !errs.iter().any(|e| e.to_string().contains("secret")),
        "{errs:#?}"
    );
}

#[test]
fn unknown_fields_are_errors_with_line_and_column() {
    let errs = errors(&format!(
        "{BASE}routes:\n  - name: a\n    match: {{ path: /a }}\n    upstream: erp\n    timeout: 3s\n"
    ));
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].message.contains("unknown field `timeout`"),
        "{}",
        errs[0]
    );
    assert_eq!(errs[0].position, Some((7, 5)));
}

/// SPEC section 1: an invalid file gets a message naming the field.
/// Regression: a value of the wrong type (`require_key: maybe`, `methods:
/// POST`, `max_in_flight: abc`) gave the place only ("invalid boolean"),
/// and an unknown field its bare name, without the mapping it was in.
/// Each says how to fix it in the file's words (regression, an audit: "fix
/// the YAML at this place" for `maybe` and for a list or mapping written as
/// a word; a status out of range was hinted "such as 64").
#[test]
fn shape_errors_name_the_field() {
    let route = "routes: [ { name: a, match: { path: /a }, upstream: erp } ]\n";
    let cases = [
        (
            format!("defaults:\n  idempotency:\n    require_key: maybe\n{BASE}{route}"),
            "defaults.idempotency.require_key",
            3,
            "write true or false",
        ),
        (
            format!(
                "{BASE}routes:\n  - {{ name: a, match: {{ path: /a, methods: POST }}, upstream: erp }}\n"
            ),
            "routes[0].match.methods",
            4,
            "write a list here",
        ),
        (
            format!("{BASE}routes:\n  - {{ name: a, match: /a, upstream: erp }}\n"),
            "routes[0].match",
            4,
            "write a mapping here",
        ),
        (
            format!("defaults:\n  idempotency:\n    release_statuses: [408, 70000]\n{BASE}{route}"),
            "defaults.idempotency.release_statuses[1]",
            3,
            "write an HTTP status",
        ),
        (
            format!(
                "upstreams:\n  erp: {{ url: \"http://127.0.0.1:9000\", max_in_flight: abc }}\n{route}"
            ),
            "upstreams.erp.max_in_flight",
            2,
            "such as 64",
        ),
        (
            // Regression: "invalid u32", a Rust type for a YAML author.
            format!(
                "upstreams:\n  erp: {{ url: \"http://127.0.0.1:9000\", max_in_flight: -1 }}\n{route}"
            ),
            "upstreams.erp.max_in_flight",
            2,
            "such as 64",
        ),
        (
            format!("store: {{ backend: memory, bogus: 1 }}\n{BASE}{route}"),
            "store.bogus",
            1,
            "remove the field",
        ),
    ];
    for (yaml, path, line, hint) in cases {
        let errs = errors(&yaml);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(!errs[0].message.contains("invalid u"), "{}", errs[0]);
        assert_eq!(errs[0].path, path, "{}", errs[0]);
        assert_eq!(errs[0].position.map(|p| p.0), Some(line), "{}", errs[0]);
        assert!(errs[0].hint.contains(hint), "{}", errs[0]);
        if path.contains("_statuses[") {
            // 70000 is a whole number (the verification audit).
            assert_eq!(errs[0].message, "not an HTTP status", "{}", errs[0]);
        }
    }
    let twice = errors(&format!("{BASE}{BASE}{route}"));
    assert!(
        twice[0]
            .to_string()
            .contains("duplicate mapping key: upstreams; write each key once"),
        "{}",
        twice[0]
    );
}

/// Regression: `check` accepted routes no request could ever match (requests
/// are matched in normal form, without their query), so a protected route's
/// traffic silently went to a later route, unprotected.
#[test]
fn paths_no_request_could_match_are_errors() {
    let route = |m: &str| format!("{BASE}routes:\n  - {{ name: a, match: {m}, upstream: erp }}\n");
    let cases = [
        (
            "{ path_prefix: '/api/%6Frders' }",
            "path_prefix",
            "write /api/orders",
        ),
        ("{ path: '/x/../y' }", "path", "write /y"),
        ("{ path_prefix: '//dbl' }", "path_prefix", "write /dbl"),
        ("{ path: '/q?a=1' }", "path", "query"),
        ("{ path: '/a b' }", "path", "not a valid URL path"),
        ("{ path: /a, methods: [] }", "methods", "methods is empty"),
        // Regression: escapes in lower case, and encoded slashes (routed
        // as `/`), were accepted, and no request matched them.
        (
            "{ path_prefix: '/caf%c3%a9' }",
            "path_prefix",
            "write /caf%C3%A9",
        ),
        ("{ path: '/a%2Fb' }", "path", "write /a/b"),
        (
            "{ path_prefix: '/api%5corders' }",
            "path_prefix",
            "write /api/orders",
        ),
        // Path parameters: requests are routed without them (a
        // verification audit: the message spoke of an encoded slash).
        (
            "{ path_prefix: '/api/orders;v=2' }",
            "path_prefix",
            "holds path parameters",
        ),
    ];
    for (m, field, says) in cases {
        let errs = errors(&route(m));
        assert_eq!(errs.len(), 1, "{m}: {errs:#?}");
        assert_eq!(errs[0].path, format!("routes[0].match.{field}"), "{m}");
        assert!(errs[0].to_string().contains(says), "{m}: {}", errs[0]);
    }
    for fine in [
        "{ path_prefix: /api/orders/ }",
        "{ path: /a/b/ }",
        "{ path: '/caf%C3%A9' }",
        "{ path: '/a%20b' }",
    ] {
        Config::parse(&route(fine)).unwrap_or_else(|e| panic!("{fine}: {e}"));
    }
}

/// Regression (an audit): a route behind an earlier one that takes every
/// request it would match was accepted, even a protected route behind a
/// pass-through prefix, whose requests then all went unprotected.
#[test]
fn a_route_an_earlier_one_shadows_is_an_error() {
    let routes = |first: &str, second: &str| {
        format!(
            "{BASE}routes:\n  - {{ name: first, match: {first}, upstream: erp, idempotency: off }}\n  - {{ name: second, match: {second}, upstream: erp }}\n"
        )
    };
    for (first, second) in [
        ("{ path_prefix: /api }", "{ path_prefix: /api/payments }"),
        (
            "{ path_prefix: /api/orders }",
            "{ path_prefix: /api/orders/ }",
        ),
        ("{ path_prefix: / }", "{ path: /x }"),
        ("{ path: /x }", "{ path: /x, methods: [POST] }"),
        (
            "{ path_prefix: /a, methods: [POST, PUT] }",
            "{ path_prefix: /a/b, methods: [post] }",
        ),
        (
            "{ path_prefix: /a }",
            "{ path_prefix: /a, host: pay.example }",
        ),
        (
            "{ path_prefix: /a, host: pay.example }",
            "{ path_prefix: /a, host: 'pay.example:8443' }",
        ),
    ] {
        let errs = errors(&routes(first, second));
        assert_eq!(errs.len(), 1, "{first} then {second}: {errs:#?}");
        assert_eq!(errs[0].path, "routes[1].match");
        assert_eq!(errs[0].position.map(|p| p.0), Some(5), "{}", errs[0]);
        let text = errs[0].to_string();
        assert!(
            text.contains("\"second\" can never be taken") && text.contains("\"first\""),
            "{text}"
        );
    }
    for (first, second) in [
        ("{ path_prefix: /api/payments }", "{ path_prefix: /api }"),
        ("{ path_prefix: /api }", "{ path_prefix: /apix }"),
        ("{ path: /x }", "{ path_prefix: /x }"),
        (
            "{ path_prefix: /a, methods: [POST] }",
            "{ path_prefix: /a }",
        ),
        (
            "{ path_prefix: /a, host: pay.example }",
            "{ path_prefix: /a }",
        ),
        (
            "{ path_prefix: /a, host: 'pay.example:8443' }",
            "{ path_prefix: /a, host: pay.example }",
        ),
    ] {
        Config::parse(&routes(first, second))
            .unwrap_or_else(|e| panic!("{first} then {second}: {e}"));
    }
}

#[test]
fn yaml_syntax_errors_have_a_position() {
    let errs = errors("listen: [unclosed\n");
    assert!(errs[0].position.is_some(), "{}", errs[0]);
}

#[test]
fn env_vars_are_expanded_and_a_missing_one_is_named() {
    // SAFETY: this test binary sets only variables of its own, unique names.
    unsafe { std::env::set_var("IDEMGATE_TEST_TOKEN_8731", "s3cret") };
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:9090, token: \"${{IDEMGATE_TEST_TOKEN_8731}}\" }}\n{BASE}routes: [ {{ name: a, match: {{ path: /a }}, upstream: erp }} ]\n"
    );
    let config = Config::parse(&yaml).expect("valid");
    assert_eq!(config.admin.unwrap().token.as_deref(), Some("s3cret"));
    let errs = errors(&yaml.replace("IDEMGATE_TEST_TOKEN_8731", "IDEMGATE_TEST_UNSET_8731"));
    let e = error_at(&errs, "admin.token");
    assert!(e.message.contains("IDEMGATE_TEST_UNSET_8731"), "{e}");
    // Regression (an audit): a shell default was taken for the name, even
    // with the variable set, and `export NAME:-x=...` given as the fix.
    let errs = errors(&yaml.replace("_8731}", "_8731:-fallback}"));
    let e = error_at(&errs, "admin.token").to_string();
    assert!(
        e.contains("not a variable's name") && e.contains("not supported"),
        "{e}"
    );
    assert!(!e.contains("fallback") && !e.contains("s3cret"), "{e}");
    // No name before the odd character: the fix names none either (the
    // verification audit: `write ${}`, itself an error); no digit first.
    for odd in ["${ IDEMGATE_X}", "${1ABC}"] {
        let errs = errors(&yaml.replace("${IDEMGATE_TEST_TOKEN_8731}", odd));
        let e = error_at(&errs, "admin.token").to_string();
        assert!(e.contains("write ${NAME}"), "{odd}: {e}");
    }
}

/// Regression (audit): a token with a trailing newline (a Kubernetes
/// secret made `--from-file`) was taken in, and no bearer header could
/// carry it: every mutating admin call got 401. It is an error that never
/// shows the value.
#[test]
fn an_admin_token_with_whitespace_is_an_error_that_hides_it() {
    // SAFETY: this test binary sets only variables of its own, unique names.
    unsafe { std::env::set_var("IDEMGATE_TEST_TOKEN_NL_4471", "tok-nl-4471\n") };
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:9090, token: \"${{IDEMGATE_TEST_TOKEN_NL_4471}}\" }}\n{BASE}routes: [ {{ name: a, match: {{ path: /a }}, upstream: erp }} ]\n"
    );
    let errs = errors(&yaml);
    let e = error_at(&errs, "admin.token");
    assert!(e.to_string().contains("whitespace"), "{e}");
    assert!(
        !e.to_string().contains("tok-nl-4471"),
        "the secret shown: {e}"
    );
    let errs = errors(&format!(
        "admin: {{ listen: 127.0.0.1:9090, token: \"a b\" }}\n{BASE}routes: [ {{ name: a, match: {{ path: /a }}, upstream: erp }} ]\n"
    ));
    error_at(&errs, "admin.token");
}

#[test]
fn route_settings_override_defaults_field_by_field() {
    let yaml = format!(
        r#"{BASE}defaults:
  timeouts: {{ response: 5s, total: 20s }}
  idempotency:
    concurrent: wait
    fingerprint: {{ headers: [content-type, x-tenant], query: true }}
    store_statuses: ["2xx"]
routes:
  - name: a
    match: {{ path_prefix: /a/ }}
    upstream: erp
    timeouts: {{ response: 1s }}
    idempotency: {{ fingerprint: {{ query: false }}, on_unknown: release, ttl: 1h }}
  - name: b
    match: {{ path: /b }}
    upstream: erp
    idempotency: off
  - name: c
    match: {{ path: /c }}
    upstream: erp
    idempotency: false
  - name: d
    match: {{ path: /d }}
    upstream: erp
"#
    );
    let config = Config::parse(&yaml).expect("valid");
    let a = &config.routes[0];
    assert_eq!(a.matcher.path, PathMatch::Prefix("/a".into()));
    assert_eq!(a.timeouts.response, Duration::from_secs(1));
    assert_eq!(
        a.timeouts.total,
        Duration::from_secs(20),
        "total kept from defaults"
    );
    let p = a.idempotency.as_ref().unwrap();
    assert!(!p.fingerprint_query);
    assert_eq!(
        p.fingerprint_headers.len(),
        2,
        "fingerprint.headers kept from defaults"
    );
    assert_eq!(p.concurrent, Concurrent::Wait);
    assert_eq!(p.on_unknown, OnUnknown::Release);
    assert_eq!(p.ttl, Duration::from_secs(3600));
    assert_eq!(p.store_statuses, vec![StatusPattern::Class(2)]);
    assert_eq!(p.lease, Duration::from_secs(60), "built-in default");
    assert_eq!(p.release_statuses, vec![408, 425, 429]);
    assert!(config.routes[1].idempotency.is_none());
    assert!(config.routes[2].idempotency.is_none());
    assert_eq!(
        config.routes[3].idempotency.as_ref().unwrap().on_unknown,
        OnUnknown::Lock
    );
    assert_eq!(config.upstreams[0].connect_timeout, Duration::from_secs(1));
    assert_eq!(config.upstreams[0].max_in_flight, 256);
    assert_eq!(config.shutdown_grace, Duration::from_secs(30));
    assert_eq!(config.send_timeout, Duration::from_secs(60));
}

#[test]
fn a_lease_shorter_than_total_is_a_warning_not_an_error() {
    let yaml = format!(
        "{BASE}routes: [ {{ name: a, match: {{ path: /a }}, upstream: erp, timeouts: {{ total: 2m }}, idempotency: {{ lease: 30s }} }} ]\n"
    );
    let config = Config::parse(&yaml).expect("valid");
    assert_eq!(config.warnings.len(), 1);
    assert!(config.warnings[0].contains("lease"));
}

/// Regression (an audit): `[POTS, PATCH]` was taken without a word, and
/// POST went unprotected. A method no registry knows is a warning (an API
/// may have its own); registered ones, in any case, are not.
#[test]
fn an_unregistered_method_is_a_warning() {
    let route = |m: &str, p: &str| {
        format!("{BASE}routes: [ {{ name: a, match: {{ path: /a{m} }}, upstream: erp{p} }} ]\n")
    };
    let typo =
        Config::parse(&route("", ", idempotency: { methods: [POTS, PATCH] }")).expect("valid");
    assert_eq!(typo.warnings.len(), 1, "{:?}", typo.warnings);
    assert!(
        typo.warnings[0].contains("idempotency.methods names POTS"),
        "{:?}",
        typo.warnings
    );
    let matched = Config::parse(&route(", methods: [GET, FETCH]", "")).expect("valid");
    assert_eq!(matched.warnings.len(), 1, "{:?}", matched.warnings);
    assert!(
        matched.warnings[0].contains("match.methods names FETCH"),
        "{:?}",
        matched.warnings
    );
    let fine = Config::parse(&route(
        ", methods: [get, PROPFIND, QUERY]",
        ", idempotency: { methods: [post, PUT, DELETE] }",
    ))
    .expect("valid");
    assert!(fine.warnings.is_empty(), "{:?}", fine.warnings);
}

/// Regressions (an audit of Redis Cluster): `check` said valid to a
/// database a cluster refuses (every call then failed), and to a prefix
/// whose hash tag put every record in one slot.
#[test]
fn cluster_urls_with_a_database_and_prefixes_with_a_hash_tag_are_caught() {
    let routes = "routes: [ { name: a, match: { path: /a }, upstream: erp } ]\n";
    let cluster = |urls: &str, prefix: &str| {
        format!("store: {{ backend: redis, cluster: [{urls}]{prefix} }}\n{BASE}{routes}")
    };
    let errs = errors(&cluster(
        "\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001/2\"",
        "",
    ));
    let e = error_at(&errs, "store.cluster[1]");
    assert!(e.message.contains("database 0 only"), "{e}");
    assert_eq!(e.position.map(|p| p.0), Some(1), "{e}");
    // Every seed's error at once, a bad port beside two databases
    // (regression, the config audit: the port alone, then the databases).
    let errs = errors(&cluster(
        "\"redis://127.0.0.1:7000/3\", \"redis://h2:notport\", \"redis://127.0.0.1:7002/2\"",
        "",
    ));
    for i in 0..3 {
        error_at(&errs, &format!("store.cluster[{i}]"));
    }
    assert!(
        error_at(&errs, "store.cluster[2]")
            .message
            .contains("database 0 only")
    );
    let fine = Config::parse(&cluster("\"redis://127.0.0.1:7000/0\"", "")).expect("valid");
    assert!(fine.warnings.is_empty(), "{:?}", fine.warnings);
    let tagged = Config::parse(&cluster(
        "\"redis://127.0.0.1:7000\"",
        ", key_prefix: \"{t-a}:\"",
    ))
    .expect("valid");
    assert_eq!(tagged.warnings.len(), 1, "{:?}", tagged.warnings);
    assert!(
        tagged.warnings[0].contains("hash tag {t-a}"),
        "{:?}",
        tagged.warnings
    );
    for untagged in ["{}:", "t-a{:", "t-a}{"] {
        let prefix = format!(", key_prefix: \"{untagged}\"");
        let config = Config::parse(&cluster("\"redis://127.0.0.1:7000\"", &prefix)).expect("valid");
        assert!(
            config.warnings.is_empty(),
            "{untagged}: {:?}",
            config.warnings
        );
    }
}

/// Regression (the Redis deployments audit): a first seed without the
/// password the others carry was valid to `check`, and every call of
/// `serve` then failed with NOAUTH. Seeds must agree on the credentials.
#[test]
fn cluster_seeds_with_different_credentials_are_an_error() {
    let routes = "routes: [ { name: a, match: { path: /a }, upstream: erp } ]\n";
    let cluster =
        |urls: &str| format!("store: {{ backend: redis, cluster: [{urls}] }}\n{BASE}{routes}");
    for urls in [
        "\"redis://127.0.0.1:7000\", \"redis://:pw@127.0.0.1:7001\"",
        "\"redis://:pw@127.0.0.1:7000\", \"redis://127.0.0.1:7001\"",
        "\"redis://a:pw@127.0.0.1:7000\", \"redis://b:pw@127.0.0.1:7001\"",
    ] {
        let errs = errors(&cluster(urls));
        let e = error_at(&errs, "store.cluster");
        assert!(
            e.message.contains("do not make one Redis Cluster"),
            "{urls}: {e}"
        );
        assert!(
            !e.to_string().contains("pw"),
            "no password in the message: {e}"
        );
    }
    let same = "\"redis://a:pw@127.0.0.1:7000\", \"redis://a:pw@127.0.0.1:7001\"";
    Config::parse(&cluster(same)).expect("the same credentials");
}

/// Regression (an audit): accepted silently, as if it bounded Redis.
#[test]
fn max_records_on_redis_is_a_warning() {
    let routes = "routes: [ { name: a, match: { path: /a }, upstream: erp } ]\n";
    let yaml = format!(
        "store: {{ backend: redis, url: \"redis://127.0.0.1:1/0\", max_records: 2 }}\n{BASE}{routes}"
    );
    let config = Config::parse(&yaml).expect("valid");
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert!(config.warnings[0].contains("store.max_records bounds the memory store only"));
    let memory = format!("store: {{ backend: memory, max_records: 2 }}\n{BASE}{routes}");
    assert!(Config::parse(&memory).expect("valid").warnings.is_empty());
}

#[test]
fn the_example_config_is_valid() {
    let config = Config::load(std::path::Path::new("config.example.yaml"))
        .expect("config.example.yaml is valid");
    assert!(!config.routes.is_empty());
}

/// Regression (the panics audit): a file that never ends was read until
/// memory ran out (a reload given up after 10 s went on reading). A
/// configuration or TLS file is read to 16 MiB at most.
#[test]
fn a_file_that_never_ends_is_refused_not_read_for_good() {
    let endless = Config::load(std::path::Path::new("/dev/zero"))
        .expect_err("refused")
        .0;
    assert!(
        endless[0].message.contains("larger than 16 MiB"),
        "{endless:?}"
    );
    let errs = errors(
        "upstreams:\n  erp: { url: \"https://127.0.0.1:9443\", tls: { ca_file: /dev/zero } }\nroutes: [ { name: a, match: { path: /a }, upstream: erp } ]\n",
    );
    let e = error_at(&errs, "upstreams.erp.tls.ca_file");
    assert!(e.message.contains("larger than 16 MiB"), "{e}");
}

fn idemgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(args)
        .output()
        .expect("run idemgate")
}

#[test]
fn check_exit_codes_and_output() {
    let ok = idemgate(&["check", "--config", "config.example.yaml"]);
    assert_eq!(ok.status.code(), Some(0));
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        out.contains("route orders") && out.contains("idempotency: off"),
        "{out}"
    );
    // The store's, the upstreams' and the top-level settings too (a README
    // walkthrough: only routes were printed, so their defaults could not
    // be checked).
    for said in [
        "store: key_prefix \"idemgate:\", op_timeout 250ms, on_unavailable reject",
        "shutdown_grace 30s, send_timeout 1m",
        "upstream erp: http://127.0.0.1:9000, connect_timeout 1s, idle_timeout 4s",
        "circuit_breaker 5 failures, open for 30s",
    ] {
        assert!(out.contains(said), "{said}: {out}");
    }

    let dir = tempfile::tempdir().unwrap();
    // Never a store URL: it may hold a password.
    let redis = dir.path().join("redis.yaml");
    std::fs::write(
        &redis,
        format!("store: {{ backend: redis, url: \"redis://:s3cret-pw@127.0.0.1:1/0\" }}\n{BASE}routes: [ {{ name: a, match: {{ path: /a }}, upstream: erp }} ]\n"),
    )
    .unwrap();
    let out = idemgate(&["check", "--config", redis.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("store: key_prefix") && !text.contains("s3cret"),
        "{text}"
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "listen: nope\nroutes: []\n").unwrap();
    let invalid = idemgate(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(invalid.status.code(), Some(1));
    let err = String::from_utf8_lossy(&invalid.stderr);
    assert!(err.contains("listen (line 1, column 9)"), "{err}");

    let missing = idemgate(&["check", "--config", "/nonexistent/idemgate.yaml"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(idemgate(&["check", "--bogus"]).status.code(), Some(2));
    for sub in [
        &["serve", "--help"][..],
        &["check", "--help"],
        &["keys", "get", "--help"],
        &["keys", "purge", "--help"],
        &["keys", "unknown", "--help"],
    ] {
        assert_eq!(idemgate(sub).status.code(), Some(0), "{sub:?}");
    }
}

#[test]
fn config_path_comes_from_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .arg("check")
        .env("IDEMGATE_CONFIG", "config.example.yaml")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One upstream and one route on `BASE`, with `route` appended to the route.
fn with_route(head: &str, route: &str) -> String {
    format!("{head}{BASE}routes:\n  - {{ name: a, match: {{ path: /a }}, upstream: erp{route} }}\n")
}

#[test]
fn huge_durations_are_refused_instead_of_panicking_on_every_request() {
    let yaml = "shutdown_grace: 2d\nstore: { op_timeout: 25h }\nsend_timeout: 25h\nupstreams:\n  erp: { url: \"http://127.0.0.1:9000\", connect_timeout: 500000000y, circuit_breaker: { open_for: 1000y } }\nroutes:\n  - { name: a, match: { path: /a }, upstream: erp, timeouts: { response: 2d, total: 500000000y }, idempotency: { ttl: 366d, lease: 25h } }\n";
    let errs = errors(yaml);
    for (path, line) in [
        ("shutdown_grace", 1),
        ("store.op_timeout", 2),
        ("send_timeout", 3),
        ("upstreams.erp.connect_timeout", 5),
        ("upstreams.erp.circuit_breaker.open_for", 5),
        ("routes[0].timeouts.response", 7),
        ("routes[0].timeouts.total", 7),
        ("routes[0].idempotency.ttl", 7),
        ("routes[0].idempotency.lease", 7),
    ] {
        let e = error_at(&errs, path);
        assert_eq!(e.position.map(|p| p.0), Some(line), "{e}");
        assert!(e.message.contains("longer than the maximum"), "{e}");
    }
    // The bounds themselves are allowed.
    let config = Config::parse(&with_route(
        "shutdown_grace: 1day\n",
        ", timeouts: { response: 24h, total: 24h }, idempotency: { ttl: 365d, lease: 24h }",
    ))
    .expect("valid");
    assert_eq!(config.routes[0].timeouts.total, Duration::from_secs(86400));
}

#[test]
fn a_ttl_shorter_than_the_lease_is_allowed() {
    // The in-flight record outlives its lease by the ttl, so nothing
    // expires while an attempt runs (tests/store.rs).
    let config =
        Config::parse(&with_route("", ", idempotency: { ttl: 30s, lease: 5m }")).expect("valid");
    let policy = config.routes[0].idempotency.as_ref().expect("protected");
    assert_eq!(
        (policy.ttl, policy.lease),
        (Duration::from_secs(30), Duration::from_secs(300))
    );
}

#[test]
fn a_redis_address_without_backend_redis_is_an_error_not_the_memory_store() {
    let errs = errors(&with_route("store:\n  url: redis://127.0.0.1:6379/0\n", ""));
    let e = error_at(&errs, "store.url");
    assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
    assert!(e.hint.contains("add backend: redis"), "{e}");

    let errs = errors(&with_route(
        "store:\n  backend: memory\n  cluster: [redis://10.0.0.1:7000]\n",
        "",
    ));
    assert_eq!(
        error_at(&errs, "store.cluster").position.map(|p| p.0),
        Some(3)
    );
    Config::parse(&with_route("store: { backend: memory }\n", "")).expect("valid");
}

#[test]
fn check_refuses_the_redis_urls_that_serve_refuses_without_echoing_the_password() {
    for url in [
        "redis://:hunter2@127.0.0.1:notaport/0",
        "redis://:hunter2@127.0.0.1:6379/notadb",
    ] {
        let errs = errors(&with_route(
            &format!("store: {{ backend: redis, url: \"{url}\" }}\n"),
            "",
        ));
        let e = error_at(&errs, "store.url");
        assert_eq!(e.position.map(|p| p.0), Some(1), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
    let errs = errors(&with_route(
        "store: { backend: redis, cluster: [\"redis://:hunter2@10.0.0.1:7000\", \"redis://:hunter2@10.0.0.2:x\"] }\n",
        "",
    ));
    let e = error_at(&errs, "store.cluster[1]");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    Config::parse(&with_route(
        "store: { backend: redis, url: \"rediss://:p%40ss@127.0.0.1:6380/2\" }\n",
        "",
    ))
    .expect("valid");
}

#[test]
fn upstream_urls_with_user_and_password_are_refused_without_echoing_them() {
    let errs = errors(
        "upstreams:\n  erp: { url: \"http://admin:hunter2@127.0.0.1:9000\" }\nroutes: [ { name: a, match: { path: /a }, upstream: erp } ]\n",
    );
    let e = error_at(&errs, "upstreams.erp.url");
    assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
    assert!(e.message.contains("user:password@"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    // Nor when the password makes the URL unreadable (regression, the
    // secrets audit: quoted whole).
    for password in [
        "Pa#ss-hunter2",
        "Pa^ss-hunter2",
        "Pa/ss-hunter2",
        "Pa?ss-hunter2",
    ] {
        let errs = errors(&format!(
            "upstreams:\n  erp: {{ url: \"http://svc:{password}@erp.internal:9000\" }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: erp }} ]\n",
        ));
        let e = error_at(&errs, "upstreams.erp.url");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}

/// Regression: `http` reads a URL's port lazily, and one it cannot read
/// was the scheme's default: `http://127.0.0.1:90000` (a typo for 9000)
/// passed `check` and sent every request to port 80.
#[test]
fn upstream_urls_with_a_port_out_of_range_or_no_host_are_refused() {
    for url in [
        "http://127.0.0.1:90000",
        "http://127.0.0.1:notaport",
        "http://127.0.0.1:0",
        "http://:9000",
    ] {
        let errs = errors(&format!(
            "upstreams:\n  erp: {{ url: \"{url}\" }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: erp }} ]\n"
        ));
        let e = error_at(&errs, "upstreams.erp.url");
        assert!(e.message.contains("is not an upstream URL"), "{url}: {e}");
    }
    for url in [
        "http://[::1]:9000",
        "http://[::1]",
        "https://erp.internal:65535/base",
    ] {
        let yaml = format!(
            "upstreams:\n  erp: {{ url: \"{url}\" }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: erp }} ]\n"
        );
        Config::parse(&yaml).unwrap_or_else(|e| panic!("{url}: {e:?}"));
    }
}

/// Regression: `match.host` was taken as written: a scheme, a path, a
/// wildcard or a bad port made a route no request could match, and its
/// protected POSTs went to a later route, passed through unprotected (the
/// upstream ran a duplicate twice).
#[test]
fn a_match_host_no_request_could_name_is_refused() {
    let route = |host: &str| {
        format!(
            "{BASE}routes:\n  - name: pay\n    match: {{ path_prefix: /pay, host: \"{host}\" }}\n    upstream: erp\n"
        )
    };
    for host in [
        "https://pay.example.com",
        "*.example.com",
        "api.example.com/v1",
        "",
        "exa mple.com",
        "pay.example.com:99999",
        "user@pay.example.com",
    ] {
        let errs = errors(&route(host));
        let e = error_at(&errs, "routes[0].match.host");
        assert_eq!(e.position.map(|p| p.0), Some(5), "{host}: {e}");
        assert!(
            e.message.contains("is not a host a request could name"),
            "{host}: {e}"
        );
    }
    for (host, kept) in [
        ("Pay.Example.com", "pay.example.com"),
        ("pay.example.com.", "pay.example.com"),
        ("pay.example.com.:8443", "pay.example.com:8443"),
        ("10.0.0.5:8443", "10.0.0.5:8443"),
        ("[::1]:8080", "[::1]:8080"),
    ] {
        let config = Config::parse(&route(host)).unwrap_or_else(|e| panic!("{host}: {e:?}"));
        assert_eq!(config.routes[0].matcher.host.as_deref(), Some(kept));
    }
}

#[test]
fn error_messages_never_show_the_value_of_an_env_var() {
    // SAFETY: this test binary sets only variables of its own, unique names.
    unsafe { std::env::set_var("IDEMGATE_TEST_SECRET_5120", "planted secret 5120") };
    let v = "${IDEMGATE_TEST_SECRET_5120}";
    let yaml = format!(
        "listen: \"{v}\"\nadmin: {{ listen: \"{v}\" }}\nshutdown_grace: \"{v}\"\nstore: {{ op_timeout: \"{v}\", on_unavailable: \"{v}\" }}\nupstreams:\n  erp: {{ url: \"http://{v}\" }}\ndefaults:\n  idempotency: {{ header: \"{v} x\", store_statuses: [\"{v}\"], max_request_body: \"{v}\", methods: [\"{v} x\"] }}\nroutes:\n  - {{ name: \"{v} x\", match: {{ path: \"{v}\" }}, upstream: \"{v}\" }}\n"
    );
    let errs = errors(&yaml);
    for path in [
        "listen",
        "admin.listen",
        "shutdown_grace",
        "store.op_timeout",
        "store.on_unavailable",
        "upstreams.erp.url",
        "defaults.idempotency.header",
        "defaults.idempotency.store_statuses[0]",
        "defaults.idempotency.max_request_body",
        "defaults.idempotency.methods[0]",
        "routes[0].name",
        "routes[0].match.path",
        "routes[0].upstream",
    ] {
        error_at(&errs, path);
    }
    for e in &errs {
        assert!(!e.to_string().contains("planted"), "{e}");
    }
    assert!(
        errs.iter()
            .any(|e| e.message.contains("IDEMGATE_TEST_SECRET_5120")),
        "the raw field text is shown instead: {errs:#?}"
    );
}

#[test]
fn zero_consecutive_failures_and_zero_max_records_are_errors_not_raised_to_one() {
    let errs = errors(
        "store:\n  max_records: 0\nupstreams:\n  erp: { url: \"http://127.0.0.1:9000\", max_in_flight: 0, circuit_breaker: { consecutive_failures: 0 } }\ndefaults:\n  idempotency: { key_max_length: 0 }\nroutes: [ { name: a, match: { path: /a }, upstream: erp } ]\n",
    );
    for (path, line) in [
        ("store.max_records", 2),
        ("upstreams.erp.max_in_flight", 4),
        ("upstreams.erp.circuit_breaker.consecutive_failures", 4),
        ("defaults.idempotency.key_max_length", 6),
    ] {
        let e = error_at(&errs, path);
        assert_eq!(e.position.map(|p| p.0), Some(line), "{e}");
        assert!(e.message.contains("at least 1"), "{e}");
    }
}

/// Regression (an audit): errors of a block as a whole had no line.
#[test]
fn errors_of_a_whole_block_have_a_line() {
    let route =
        |m: &str| format!("{BASE}routes:\n  - name: a\n    match: {m}\n    upstream: erp\n");
    let neither = errors(&route("{}"));
    assert_eq!(
        error_at(&neither, "routes[0].match").position.map(|p| p.0),
        Some(4)
    );
    let both = errors(&route("{ path_prefix: /a,\n      path: /b }"));
    assert_eq!(
        error_at(&both, "routes[0].match").position.map(|p| p.0),
        Some(6)
    );
    let store = errors(&format!(
        "store:\n  backend: redis\n{BASE}routes: [ {{ name: a, match: {{ path: /a }}, upstream: erp }} ]\n"
    ));
    assert_eq!(error_at(&store, "store").position.map(|p| p.0), Some(2));
}

#[test]
fn the_built_in_defaults_of_a_minimal_config() {
    use idemgate::config::{Backend, OnUnavailable};
    use std::net::SocketAddr;

    let config = Config::parse(&with_route("", "")).expect("valid");
    assert_eq!(
        config.listen.address,
        SocketAddr::from(([0, 0, 0, 0], 8080))
    );
    assert!(config.listen.tls.is_none());
    assert!(config.admin.is_none());
    assert_eq!(config.shutdown_grace, Duration::from_secs(30));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);

    let store = &config.store;
    assert_eq!(store.backend, Backend::Memory);
    assert_eq!(store.key_prefix, "idemgate:");
    assert_eq!(store.op_timeout, Duration::from_millis(250));
    assert_eq!(store.on_unavailable, OnUnavailable::Reject);
    assert_eq!(store.max_records, 1_000_000);
    assert!(store.tls.is_none());

    let up = &config.upstreams[0];
    assert_eq!(up.connect_timeout, Duration::from_secs(1));
    assert_eq!(up.max_in_flight, 256);
    let breaker = up.circuit_breaker.as_ref().expect("on by default");
    assert_eq!(breaker.consecutive_failures, 5);
    assert_eq!(breaker.open_for, Duration::from_secs(30));
    assert!(up.tls.is_none());
    assert_eq!(up.base_path, "");

    let route = &config.routes[0];
    assert_eq!(route.timeouts.response, Duration::from_secs(10));
    assert_eq!(route.timeouts.total, Duration::from_secs(30));
    assert!(route.matcher.methods.is_none());
    assert!(route.matcher.host.is_none());
    let p = route.idempotency.as_ref().expect("on by default");
    assert_eq!(p.methods, vec![http::Method::POST, http::Method::PATCH]);
    assert_eq!(p.header.as_str(), "idempotency-key");
    assert!(p.require_key);
    assert_eq!(p.key_max_length, 255);
    assert_eq!(p.ttl, Duration::from_secs(24 * 3600));
    assert_eq!(p.lease, Duration::from_secs(60));
    assert_eq!(p.concurrent, Concurrent::Reject);
    assert_eq!(p.fingerprint_headers, vec![http::header::CONTENT_TYPE]);
    assert!(p.fingerprint_query);
    assert_eq!(p.scope_headers, vec![http::header::AUTHORIZATION]);
    assert_eq!(
        p.store_statuses,
        vec![StatusPattern::Class(2), StatusPattern::Class(4)]
    );
    assert_eq!(p.release_statuses, vec![408, 425, 429]);
    assert_eq!(p.on_unknown, OnUnknown::Lock);
    assert_eq!(p.max_request_body, 1024 * 1024);
    assert_eq!(p.max_response_body, 1024 * 1024);
}

/// `idemgate check` run in `dir` with no `--config`, `IDEMGATE_CONFIG` as given.
fn check_in(dir: &std::path::Path, env_config: Option<&std::path::Path>) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idemgate"));
    command
        .arg("check")
        .current_dir(dir)
        .env_remove("IDEMGATE_CONFIG");
    if let Some(path) = env_config {
        command.env("IDEMGATE_CONFIG", path);
    }
    command.output().expect("run idemgate")
}

#[test]
fn config_defaults_to_idemgate_yaml_and_idemgate_config_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("idemgate.yaml"),
        with_route("", "").replace("name: a,", "name: from-default-file,"),
    )
    .unwrap();
    let other = dir.path().join("other.yaml");
    std::fs::write(
        &other,
        with_route("", "").replace("name: a,", "name: from-env-file,"),
    )
    .unwrap();

    let default = check_in(dir.path(), None);
    let out = String::from_utf8_lossy(&default.stdout);
    assert_eq!(
        default.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&default.stderr)
    );
    assert!(out.starts_with("idemgate.yaml: valid"), "{out}");
    assert!(out.contains("route from-default-file:"), "{out}");

    let from_env = check_in(dir.path(), Some(&other));
    let out = String::from_utf8_lossy(&from_env.stdout);
    assert_eq!(
        from_env.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&from_env.stderr)
    );
    assert!(
        out.starts_with(&format!("{}: valid", other.display())),
        "{out}"
    );
    assert!(
        out.contains("route from-env-file:") && !out.contains("from-default-file"),
        "{out}"
    );

    // Neither the flag, the variable nor idemgate.yaml: the default path is named.
    let empty = tempfile::tempdir().unwrap();
    let none = check_in(empty.path(), None);
    assert_eq!(none.status.code(), Some(1));
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(err.starts_with("idemgate.yaml: "), "{err}");
}

#[test]
fn check_prints_warnings_on_stderr_and_the_routes_with_defaults_merged() {
    let dir = tempfile::tempdir().unwrap();
    let warned = dir.path().join("warned.yaml");
    std::fs::write(
        &warned,
        with_route(
            "",
            ", timeouts: { total: 2m }, idempotency: { lease: 30s, ttl: 1h }",
        ),
    )
    .unwrap();
    let out = idemgate(&["check", "--config", warned.to_str().unwrap()]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "a warning is not an error: {stderr}"
    );
    assert!(
        stderr.starts_with("warning: routes[0] (a): lease 30s is shorter than timeouts.total 120s"),
        "{stderr}"
    );
    assert!(
        !stdout.contains("warning"),
        "warnings go to stderr: {stdout}"
    );
    assert!(
        stdout.contains("timeouts: response 10s, total 2m") && stdout.contains("ttl 1h, lease 30s"),
        "{stdout}"
    );

    // A route that sets one field of a block keeps the others from the
    // defaults block, and those not there from the built-in defaults.
    let merged = dir.path().join("merged.yaml");
    std::fs::write(
        &merged,
        format!(
            "defaults:\n  timeouts: {{ total: 45s }}\n  idempotency: {{ ttl: 2h, concurrent: wait }}\n{BASE}routes:\n  - {{ name: a, match: {{ path: /a }}, upstream: erp, timeouts: {{ response: 1s }}, idempotency: {{ lease: 50s }} }}\n  - {{ name: b, match: {{ path: /b }}, upstream: erp, timeouts: {{ response: 2s }} }}\n"
        ),
    )
    .unwrap();
    let out = idemgate(&["check", "--config", merged.to_str().unwrap()]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.is_empty(),
        "no warning for a lease >= total: {stderr}"
    );
    let route = |name: &str| -> String {
        let start = stdout
            .find(&format!("route {name}:"))
            .unwrap_or_else(|| panic!("route {name} in: {stdout}"));
        let rest = &stdout[start..];
        let end = rest[1..].find("\nroute ").map_or(rest.len(), |i| i + 1);
        rest[..end].to_owned()
    };
    let a = route("a");
    assert!(a.contains("timeouts: response 1s, total 45s"), "{a}");
    assert!(
        a.contains("ttl 2h, lease 50s, concurrent wait, on_unknown lock"),
        "{a}"
    );
    assert!(a.contains("header idempotency-key"), "{a}");
    let b = route("b");
    assert!(b.contains("timeouts: response 2s, total 45s"), "{b}");
    assert!(b.contains("ttl 2h, lease 1m, concurrent wait"), "{b}");
}

#[test]
fn unknown_fields_inside_shorthand_mappings_are_errors_with_a_line() {
    let cases = [
        (
            with_route("", ",\n      idempotency: { concurent: wait } "),
            "concurent",
            5,
        ),
        (
            format!(
                "defaults:\n  idempotency: {{ concurent: wait }}\n{}",
                with_route("", "")
            ),
            "concurent",
            2,
        ),
        (
            "upstreams:\n  erp:\n    url: \"http://127.0.0.1:9000\"\n    circuit_breaker: { open: 1s }\nroutes: [ { name: a, match: { path: /a }, upstream: erp } ]\n".to_owned(),
            "open",
            4,
        ),
        (
            format!("listen: {{ adress: 127.0.0.1:8080 }}\n{}", with_route("", "")),
            "adress",
            1,
        ),
    ];
    for (yaml, field, line) in cases {
        let errs = errors(&yaml);
        let e = errs
            .iter()
            .find(|e| e.message.contains(&format!("unknown field `{field}`")))
            .unwrap_or_else(|| panic!("no unknown-field error for {field}: {errs:#?}\n{yaml}"));
        assert_eq!(e.position.map(|p| p.0), Some(line), "{e}\n{yaml}");
    }
}

/// Settings that are valid but cannot mean what they say are warned about.
/// Regression: a `response` timeout longer than `total` (never applies)
/// and an empty `admin.token` (a `${VAR}` that expanded to nothing: the
/// admin API turns read-only) passed without a word.
#[test]
fn settings_that_cannot_work_as_written_are_warned_about() {
    let yaml = "admin: { listen: 127.0.0.1:0, token: \"\" }\nupstreams:\n  erp: { url: \"http://127.0.0.1:9000\", connect_timeout: 5s }\nroutes:\n  - { name: a, match: { path: /a }, upstream: erp, timeouts: { response: 20s, total: 5s } }\n";
    let config = Config::parse(yaml).expect("valid");
    let warnings = config.warnings.join("\n");
    assert!(
        warnings.contains("timeouts.response 20s is longer than timeouts.total 5s"),
        "{warnings}"
    );
    assert!(warnings.contains("admin.token is empty"), "{warnings}");
    // A client's 504 can come while the connection is still being made.
    assert!(
        warnings.contains("upstreams.erp.connect_timeout 5s is not shorter than timeouts.total 5s"),
        "{warnings}"
    );
}

/// Regression: on Redis, a stored response too large to come back within
/// `op_timeout` made every duplicate's claim time out: the completed
/// request was refused until its ttl, or sent again under `forward`. Such
/// a `max_response_body` (and one past what Redis stores in a value) is
/// warned about; the default, and any size on the memory store, is not.
#[test]
fn a_max_response_body_redis_cannot_return_within_op_timeout_is_warned_about() {
    let config = |store: &str, size: &str| {
        let yaml = format!(
            "{store}\nupstreams:\n  erp: {{ url: \"http://127.0.0.1:9000\" }}\nroutes:\n  - {{ name: a, match: {{ path: /a }}, upstream: erp, idempotency: {{ max_response_body: {size} }} }}\n"
        );
        Config::parse(&yaml).expect("valid").warnings.join("\n")
    };
    let redis = "store: { backend: redis, url: \"redis://127.0.0.1:6379\", op_timeout: 250ms }";
    let warned = config(redis, "64MiB");
    assert!(
        warned.contains("routes[0] (a): max_response_body 64.0 MiB may not be read back from Redis within store.op_timeout 250ms")
            && warned.contains("raise store.op_timeout"),
        "{warned}"
    );
    assert!(config(redis, "1MiB").is_empty(), "the default size fits");
    assert!(config(&redis.replace("250ms", "2s"), "64MiB").is_empty());
    let huge = config(&redis.replace("250ms", "60s"), "600MiB");
    assert!(
        huge.contains("more than Redis stores in one value"),
        "{huge}"
    );
    assert!(config("store: { backend: memory }", "600MiB").is_empty());
}

/// Regression: a size past what 64 bits hold was read as 16 EiB, and
/// durations of whole days printed as humantime's months ("11months 30days
/// 3h 50m 24s" for 365d), in the maximum's message too.
#[test]
fn huge_sizes_are_errors_and_days_print_as_days() {
    let route = "routes: [ { name: a, match: { path: /a }, upstream: erp } ]\n";
    let errs = errors(&format!(
        "defaults: {{ idempotency: {{ max_request_body: 99999999999999999999KiB }} }}\n{BASE}{route}"
    ));
    assert!(errs[0].to_string().contains("is too large"), "{}", errs[0]);
    let errs = errors(&format!(
        "defaults: {{ idempotency: {{ ttl: 400d }} }}\n{BASE}{route}"
    ));
    assert!(
        errs[0].to_string().contains("maximum of 365d"),
        "{}",
        errs[0]
    );
    let config = Config::parse(&format!(
        "defaults: {{ idempotency: {{ ttl: 365d }} }}\n{BASE}{route}"
    ))
    .unwrap();
    assert!(
        config.describe().contains("ttl 365d,"),
        "{}",
        config.describe()
    );
}

/// `idempotency: on` turns the gate on with the defaults (the built-in ones
/// where the defaults are off). Regression: it was an error, quoted as
/// `"true" is not allowed` (YAML reads `on` as true).
#[test]
fn idempotency_on_turns_the_gate_on_with_the_defaults() {
    let yaml = format!(
        "defaults: {{ idempotency: off }}\n{BASE}routes:\n  - {{ name: a, match: {{ path: /a }}, upstream: erp, idempotency: on }}\n  - {{ name: b, match: {{ path: /b }}, upstream: erp }}\n"
    );
    let config = Config::parse(&yaml).expect("valid");
    let policy = config.routes[0].idempotency.as_ref().expect("on");
    assert_eq!(policy.ttl, std::time::Duration::from_secs(86_400));
    assert!(
        config.routes[1].idempotency.is_none(),
        "b follows the defaults: off"
    );
    let wrong = errors(&format!(
        "{BASE}routes:\n  - {{ name: a, match: {{ path: /a }}, upstream: erp, idempotency: maybe }}\n"
    ));
    assert!(
        wrong[0].to_string().contains("on to enable it"),
        "{}",
        wrong[0]
    );
}

/// Configurations `check` passed and `serve` could not run, or ran other
/// than written (found by an audit), each now an error with its field.
#[test]
fn settings_serve_would_misread_are_errors_at_their_field() {
    let cases: &[(&str, &str, &str)] = &[
        // The admin listener on the proxy's own port: serve failed to bind.
        (
            "listen: 0.0.0.0:8080\nadmin: { listen: 127.0.0.1:8080 }\n",
            "",
            "admin.listen",
        ),
        // Parsed by the redis crate, then refused at connect: every request 503.
        (
            "store: { backend: redis, url: \"rediss://127.0.0.1:6380#insecure\" }\n",
            "",
            "store.url",
        ),
        // 0 ms on Redis: every completion failed.
        (
            "",
            ", idempotency: { ttl: 500us }",
            "routes[0].idempotency.ttl",
        ),
        // A gate on that protects nothing.
        (
            "",
            ", idempotency: { methods: [] }",
            "routes[0].idempotency.methods",
        ),
        // Nothing kept: every retry ran again (an audit).
        (
            "",
            ", idempotency: { store_statuses: [] }",
            "routes[0].idempotency.store_statuses",
        ),
        // Nothing kept either: all it names is released (a verification audit).
        (
            "",
            ", idempotency: { store_statuses: [429] }",
            "routes[0].idempotency.store_statuses",
        ),
        // The key is logged; these headers' values never may be.
        (
            "",
            ", idempotency: { header: Authorization }",
            "routes[0].idempotency.header",
        ),
        (
            "",
            ", idempotency: { header: X-Tenant, scope: { headers: [x-tenant] } }",
            "routes[0].idempotency.header",
        ),
        // An empty variable name.
        ("admin: { listen: \"${}\" }\n", "", "admin.listen"),
    ];
    for (head, route, path) in cases {
        let errs = errors(&with_route(head, route));
        error_at(&errs, path);
    }
    // A list that keeps nothing is placed at its first entry (regression,
    // an audit: no line for `[429]`).
    let nothing_kept = errors(&with_route("", ", idempotency: { store_statuses: [429] }"));
    let e = error_at(&nothing_kept, "routes[0].idempotency.store_statuses");
    assert!(e.position.is_some(), "{e}");
    // Port 0 picks a free port for each: no clash.
    Config::parse(&with_route(
        "listen: 127.0.0.1:0\nadmin: { listen: 127.0.0.1:0 }\n",
        "",
    ))
    .expect("valid");
}

#[test]
fn tls_settings_that_cannot_apply_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let cert = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let ca = ca.display();
    let yaml = format!(
        "store: {{ backend: redis, url: \"redis://127.0.0.1:6379\", tls: {{ ca_file: {ca} }} }}\nupstreams:\n  erp: {{ url: \"http://127.0.0.1:9000\", tls: {{ ca_file: {ca} }} }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: erp }} ]\n"
    );
    let warnings = Config::parse(&yaml).expect("valid").warnings.join("\n");
    assert!(
        warnings.contains("store.tls is set but no store URL is rediss://"),
        "{warnings}"
    );
    assert!(
        warnings.contains("upstreams.erp.tls is set but its url is http://"),
        "{warnings}"
    );
}

#[test]
fn a_file_of_two_documents_is_told_to_keep_one() {
    let errs = errors(&format!("{}---\nlisten: 127.0.0.1:1\n", with_route("", "")));
    assert!(errs[0].hint.contains("keep one document"), "{errs:?}");
    assert!(!errs[0].message.contains("from_str_multiple"), "{errs:?}");
}

/// Regression: a bad default that no route inherited yet (every route
/// setting its own value, or turning the gate off) was accepted, and the
/// edit or reload that added such a route failed on lines nobody touched.
#[test]
fn a_bad_default_is_an_error_even_when_no_route_inherits_it() {
    let yaml = format!(
        "{BASE}defaults:\n  timeouts: {{ response: 3x }}\n  idempotency: {{ ttl: forever, concurrent: wiat }}\nroutes:\n  - {{ name: a, match: {{ path: /a }}, upstream: erp, idempotency: off, timeouts: {{ response: 1s }} }}\n"
    );
    let errs = errors(&yaml);
    for (path, line) in [
        ("defaults.timeouts.response", 4),
        ("defaults.idempotency.ttl", 5),
        ("defaults.idempotency.concurrent", 5),
    ] {
        let e = error_at(&errs, path);
        assert_eq!(e.position.map(|p| p.0), Some(line), "{e}");
    }
    assert_eq!(errs.len(), 3, "each once: {errs:#?}");
}

/// Regression: route names were compared as written, so `orders` and
/// `${NAME}` set to `orders` made two routes of one name (sharing store
/// keys, metrics and `/keys/{route}/...`).
#[test]
fn route_names_are_compared_after_env_expansion() {
    // SAFETY: this test binary sets only variables of its own, unique names.
    unsafe { std::env::set_var("IDEMGATE_TEST_ROUTE_4417", "orders") };
    let yaml = format!(
        "{BASE}routes:\n  - {{ name: orders, match: {{ path: /a }}, upstream: erp }}\n  - {{ name: \"${{IDEMGATE_TEST_ROUTE_4417}}\", match: {{ path: /b }}, upstream: erp }}\n"
    );
    let e = error_at(&errors(&yaml), "routes[1].name").to_string();
    assert!(e.contains("used twice"), "{e}");
}

/// Regression: the key's header named as a scope header was refused only
/// when `header` was written out; with the default `Idempotency-Key` it was
/// accepted, and the key (logged with every request) was a scope value.
#[test]
fn the_default_key_header_cannot_be_a_scope_header() {
    let errs = errors(&with_route(
        "",
        ", idempotency: { scope: { headers: [authorization, idempotency-key] } }",
    ));
    let e = error_at(&errs, "routes[0].idempotency.scope.headers[1]");
    assert!(e.to_string().contains("the key's header"), "{e}");
    assert_eq!(errs.len(), 1, "{errs:#?}");
}

/// Regression: a number where an address or a setting belongs said
/// "invalid type: integer, expected a scalar or a mapping", and
/// `circuit_breaker: on` quoted a value the file does not hold ("true").
#[test]
fn numbers_and_on_get_the_field_s_own_message() {
    let yaml = "listen: 8080\nupstreams:\n  erp: { url: \"http://127.0.0.1:9000\", circuit_breaker: on }\nroutes:\n  - { name: a, match: { path: /a }, upstream: erp, idempotency: 0 }\n";
    let errs = errors(yaml);
    assert!(
        error_at(&errs, "listen")
            .to_string()
            .contains("write ip:port")
    );
    let breaker = error_at(&errs, "upstreams.erp.circuit_breaker").to_string();
    assert!(
        breaker.contains("on by default") && !breaker.contains("\"true\""),
        "{breaker}"
    );
    let gate = error_at(&errs, "routes[0].idempotency").to_string();
    assert!(gate.contains("write off"), "{gate}");
}

/// Regression (a config audit): any upstream name was taken, a newline
/// too, and went raw into metrics labels, log lines and `check`'s summary.
#[test]
fn an_upstream_name_follows_the_route_name_rule() {
    for bad in ["\"erp\\nx\"", "\"a b\"", "\"\"", "\"erp{x}\""] {
        let yaml = format!(
            "upstreams:\n  {bad}: {{ url: \"http://127.0.0.1:9000\" }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: erp }} ]\n"
        );
        let errs = errors(&yaml);
        let e = errs
            .iter()
            .find(|e| e.message.contains("upstream name"))
            .unwrap_or_else(|| panic!("{bad}: {errs:#?}"));
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
        assert!(e.hint.contains("letters, digits"), "{e}");
    }
    // Block style: the name's own line (regression: its `url:`'s, below).
    let yaml = "upstreams:\n  \"bad name!\":\n    url: \"http://127.0.0.1:9000\"\nroutes: [ { name: a, match: { path: /a }, upstream: erp } ]\n";
    let errs = errors(yaml);
    let e = (errs.iter())
        .find(|e| e.message.contains("upstream name"))
        .unwrap_or_else(|| panic!("{errs:#?}"));
    assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
    for good in ["erp", "erp-2.eu_west"] {
        let yaml = format!(
            "upstreams:\n  {good}: {{ url: \"http://127.0.0.1:9000\" }}\nroutes: [ {{ name: a, match: {{ path: /a }}, upstream: {good} }} ]\n"
        );
        Config::parse(&yaml).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

/// Regressions (a config audit): a protected route that refuses every
/// body, and a key length no request head can hold, were accepted
/// without a word.
#[test]
fn a_zero_body_limit_and_an_unreachable_key_length_are_warnings() {
    let route = |policy: &str| {
        format!(
            "{BASE}routes: [ {{ name: a, match: {{ path: /a }}, upstream: erp, idempotency: {{ {policy} }} }} ]\n"
        )
    };
    let zero = Config::parse(&route("max_request_body: 0B")).expect("valid");
    assert_eq!(zero.warnings.len(), 1, "{:?}", zero.warnings);
    assert!(
        zero.warnings[0].contains("max_request_body is 0"),
        "{:?}",
        zero.warnings
    );
    let long = Config::parse(&route("key_max_length: 100000")).expect("valid");
    assert_eq!(long.warnings.len(), 1, "{:?}", long.warnings);
    assert!(
        long.warnings[0].contains("key_max_length 100000"),
        "{:?}",
        long.warnings
    );
    for fine in ["max_request_body: 1B", "key_max_length: 65536"] {
        let config = Config::parse(&route(fine)).expect("valid");
        assert!(config.warnings.is_empty(), "{fine}: {:?}", config.warnings);
    }
}

/// Regression (an audit): a field written with no value (`listen:` alone,
/// as a template leaves an unset value) was read as left out and took its
/// default: a proxy on 0.0.0.0:8080, a gate with the default methods.
#[test]
fn a_field_written_empty_is_an_error_not_its_default() {
    let cases = [
        ("listen:\n", "listen", 1),
        ("store:\n  backend:\n", "store.backend", 2),
        (
            "admin: { listen: 127.0.0.1:9091, token: ~ }\n",
            "admin.token",
            1,
        ),
        (
            "defaults:\n  idempotency: { methods: , ttl: null }\n",
            "defaults.idempotency.methods",
            2,
        ),
        (
            "defaults:\n  idempotency: { methods: , ttl: null }\n",
            "defaults.idempotency.ttl",
            2,
        ),
    ];
    for (head, path, line) in cases {
        let yaml = with_route(head, "");
        let errors = errors(&yaml);
        let e = error_at(&errors, path);
        assert_eq!(e.position.map(|(l, _)| l), Some(line), "{yaml}\n{e:?}");
        assert!(e.message.starts_with("no value"), "{e:?}");
        assert!(e.hint.contains("remove the line"), "{e:?}");
    }
    let routed = with_route("", ", timeouts: { response: }");
    let errors = errors(&routed);
    let e = error_at(&errors, "routes[0].timeouts.response");
    assert!(e.message.starts_with("no value"), "{e:?}");
    // Left out, each takes its default; a section written empty (its
    // lines commented out) holds none of its settings.
    assert!(Config::parse(&with_route("", "")).is_ok());
    let sections = "defaults:\n  timeouts:\n  idempotency:\nstore:\n";
    let config = Config::parse(&with_route(sections, ", idempotency: , timeouts: ")).unwrap();
    assert!(config.routes[0].idempotency.is_some());
}

/// Regression (an audit): `max_in_flight: "${N}"` was "not a whole
/// number", with no word that `${VAR}` is replaced in string values only.
#[test]
fn a_variable_in_a_number_or_flag_field_is_told_it_is_not_replaced_there() {
    let route = "routes:\n  - { name: a, match: { path: /a }, upstream: erp }\n";
    let cases = [
        (
            format!(
                "upstreams:\n  erp: {{ url: \"http://127.0.0.1:9000\", max_in_flight: \"${{N}}\" }}\n{route}"
            ),
            "upstreams.erp.max_in_flight",
        ),
        (
            format!("{BASE}defaults:\n  idempotency: {{ require_key: \"${{RK}}\" }}\n{route}"),
            "defaults.idempotency.require_key",
        ),
    ];
    for (yaml, path) in cases {
        let errors = errors(&yaml);
        let e = error_at(&errors, path);
        assert!(e.hint.contains("string values only"), "{yaml}\n{e:?}");
    }
    // Elsewhere a number keeps its usual hint.
    let errors = errors(&with_route("", ", timeouts: { response: 3s }").replace(
        "{ url: \"http://127.0.0.1:9000\" }",
        "{ url: \"http://127.0.0.1:9000\", max_in_flight: lots }",
    ));
    assert!(
        error_at(&errors, "upstreams.erp.max_in_flight")
            .hint
            .contains("such as 64")
    );
}
