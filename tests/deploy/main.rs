//! The deployment files agree with the code: every YAML and JSON file under
//! `deploy/` parses; the deploy configurations pass `idemgate check`; ports,
//! probe paths, the config path, users and grace periods agree across the
//! Dockerfile, Compose, Kubernetes and systemd; every `idemgate_*` metric,
//! label and outcome used by the dashboard and the alert rules is exposed by
//! a running instance; docs/operations.md covers every problem code, metric
//! and alert. `systemd-analyze`, `promtool` and `kubectl` add checks when
//! installed (each says so when it is not).
//!
//! This file holds the helpers the modules share: reading the repository's
//! files, walking parsed YAML and JSON, and validating a deploy configuration
//! with the real binary.

#[path = "../common/mod.rs"]
mod common;

mod compose;
mod docker;
mod docs;
mod files;
mod kubernetes;
mod metrics;
mod observability;
mod promql;
mod systemd;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

// ------------------------------------------------------------------ files

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Every file under `deploy/`, sorted, as (path relative to the root, path).
fn deploy_files() -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    walk(&root().join("deploy"), &mut files);
    files
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(root()).unwrap().display().to_string();
            (rel, path)
        })
        .collect()
}

/// The files of `deploy_files` whose relative path starts with `prefix`.
fn deploy_files_under(prefix: &str) -> Vec<(String, PathBuf)> {
    deploy_files()
        .into_iter()
        .filter(|(rel, _)| rel.starts_with(prefix))
        .collect()
}

fn ext(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or("")
}

/// The lines of a `#`-commented line-based file, trimmed, blank and comment lines left out.
fn content_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

// ---------------------------------------------------------- YAML and JSON

/// Every document of a YAML file (multi-document files included).
fn yaml_docs_of(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()))
}

fn yaml_docs(rel: &str) -> Vec<Value> {
    yaml_docs_of(&root().join(rel))
}

fn yaml(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: expected one YAML document");
    docs.remove(0)
}

fn json_file(rel: &str) -> Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: invalid JSON: {e}"))
}

/// `v` at a dotted path (`spec.template.spec.containers.0`), or a panic naming the path.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for part in path.split('.') {
        let next = match part.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(part),
        };
        cur = next.unwrap_or_else(|| panic!("missing {path} (at {part:?}) in {v:#}"));
    }
    cur
}

fn text<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string: {}", at(v, path)))
}

fn int(v: &Value, path: &str) -> u64 {
    at(v, path)
        .as_u64()
        .unwrap_or_else(|| panic!("{path} is not a number: {}", at(v, path)))
}

fn list<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    at(v, path)
        .as_array()
        .unwrap_or_else(|| panic!("{path} is not a list: {}", at(v, path)))
}

/// The list at `path`, every item a string.
fn strs<'a>(v: &'a Value, path: &str) -> Vec<&'a str> {
    list(v, path)
        .iter()
        .map(|item| {
            item.as_str()
                .unwrap_or_else(|| panic!("{path}: {item} is not a string"))
        })
        .collect()
}

/// The argument after `flag` in a command line, if `flag` is there.
fn flag_value<'a, S: AsRef<str>>(args: &'a [S], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a.as_ref() == flag)?;
    Some(args[i + 1].as_ref())
}

fn duration(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("{s:?} is not a duration: {e}"))
}

// -------------------------------------------------------- commands, ports

/// What a command printed: its stdout, then its stderr.
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that a command succeeded, showing `what` and what it printed if not.
fn assert_success(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}:\n{}", said(out));
}

/// An in-process test config with an admin listener on port 0, one upstream `up`
/// at `upstream`, the given store block and routes.
fn admin_config(store: &str, upstream: SocketAddr, routes: &str) -> String {
    format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n{}",
        common::config(store, upstream, "", routes)
    )
}

// --------------------------------------------------- deploy configurations

/// The `${VAR}` names a configuration reads, comments left out.
fn referenced_vars(yaml: &str) -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    for line in yaml.lines() {
        let code = match line.find(" #") {
            _ if line.trim_start().starts_with('#') => "",
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = code;
        while let Some(start) = rest.find("${") {
            let end = rest[start..].find('}').expect("a closing brace") + start;
            vars.insert(rest[start + 2..end].to_owned());
            rest = &rest[end + 1..];
        }
    }
    vars
}

/// A deploy configuration with the environment its deployment gives it:
/// accepted by the real binary (`idemgate check`), refused without that
/// environment (the secrets are not in the file), and parsed into a `Config`.
fn validated(name: &str, yaml: &str, env: &BTreeMap<String, String>) -> idemgate::Config {
    let vars = referenced_vars(yaml);
    for var in &vars {
        assert!(
            env.contains_key(var),
            "{name}: reads ${{{var}}}, which its deployment does not set (it sets {:?})",
            env.keys().collect::<Vec<_>>()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("idemgate.yaml");
    std::fs::write(&file, yaml).unwrap();
    let check = |env: &BTreeMap<String, String>| {
        Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .args(["check", "--config"])
            .arg(&file)
            .env_clear()
            .envs(env)
            .output()
            .expect("run idemgate check")
    };
    let out = check(env);
    assert_success(&out, &format!("{name}: idemgate check failed"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("warning"),
        "{name}: idemgate check warns:\n{stderr}"
    );
    if !vars.is_empty() {
        assert!(
            !check(&BTreeMap::new()).status.success(),
            "{name}: passes without its environment"
        );
    }
    let mut expanded = yaml.to_owned();
    for (k, v) in env {
        expanded = expanded.replace(&format!("${{{k}}}"), v);
    }
    idemgate::Config::parse(&expanded).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn admin_port(name: &str, config: &idemgate::Config) -> u16 {
    config
        .admin
        .as_ref()
        .unwrap_or_else(|| panic!("{name}: no admin block, so no probes and no metrics"))
        .listen
        .port()
}

/// Asserts that `what` (a stop timeout of `stop`) outlasts the config's `shutdown_grace`.
fn assert_outlasts_grace(what: &str, stop: Duration, config: &idemgate::Config) {
    assert!(
        stop > config.shutdown_grace,
        "{what} {stop:?} must exceed shutdown_grace {:?}",
        config.shutdown_grace
    );
}
