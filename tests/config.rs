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

#[test]
fn the_example_config_is_valid() {
    let config = Config::load(std::path::Path::new("config.example.yaml"))
        .expect("config.example.yaml is valid");
    assert!(!config.routes.is_empty());
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

    let dir = tempfile::tempdir().unwrap();
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
