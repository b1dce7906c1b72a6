//! The metrics of a running instance: two in-process instances driven until
//! every `idemgate_*` family shows samples; every metric, label and outcome the
//! dashboard and the alert rules use must be among them, and
//! docs/operations.md must describe every family.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::common::{self, Reply, TestClient, TestProxy, TestUpstream};
use crate::promql::{grouping_labels, references, split_matchers, template_labels};
use crate::{admin_config, deploy_files_under, ext, json_file, read, yaml_docs};

/// The outcomes of `idemgate_requests_total` (SPEC.md section 7).
const OUTCOMES: [&str; 8] = [
    "forwarded",
    "replayed",
    "conflict",
    "mismatch",
    "rejected",
    "unknown",
    "passthrough",
    "error",
];
/// The classes of `idemgate_responses_total`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// What a running instance exposes: sample names with their label names,
/// family types, and label values seen.
#[derive(Default)]
struct Exposition {
    samples: BTreeMap<String, BTreeSet<String>>,
    types: BTreeMap<String, String>,
    values: BTreeMap<String, BTreeSet<String>>,
}

impl Exposition {
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                self.types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap();
            let labels = self.samples.entry(line[..end].to_owned()).or_default();
            if line[end..].starts_with('{') {
                let close = line.rfind('}').unwrap();
                for pair in split_matchers(&line[end + 1..close]) {
                    let (name, value) = pair.split_once('=').unwrap();
                    labels.insert(name.to_owned());
                    self.values
                        .entry(name.to_owned())
                        .or_default()
                        .insert(value.trim_matches('"').to_owned());
                }
            }
        }
    }

    /// Adds what `url` (an admin `/metrics`) answers now.
    async fn scrape(&mut self, client: &TestClient, url: &str) {
        let text = get(client, url).await;
        self.add(std::str::from_utf8(&text.body).unwrap());
    }

    fn all_labels(&self) -> BTreeSet<String> {
        self.samples.values().flatten().cloned().collect()
    }
}

async fn get(client: &TestClient, url: &str) -> Reply {
    client.send("GET", url, &[], Bytes::new()).await
}

/// Two in-process instances that between them make every metric family
/// show samples: one on the memory store (forwarded, replayed, mismatch,
/// rejected, passthrough, unknown, late completion), one on a Redis that is
/// not there with `on_unavailable: forward` (store errors, fail-open).
async fn exposition_of_every_family() -> Exposition {
    let upstream = TestUpstream::start().await;
    let client = TestClient::new();
    // Only `slow` has a short response timeout: on a loaded machine a
    // request that should be answered must not race it.
    let routes = "  - { name: orders, match: { path_prefix: /api }, upstream: up }\n  - { name: slow, match: { path_prefix: /slow }, upstream: up, timeouts: { response: 150ms } }\n  - { name: plain, match: { path_prefix: /plain }, upstream: up, idempotency: off }";
    let memory = TestProxy::start(&admin_config(
        "store: { backend: memory }",
        upstream.addr,
        routes,
    ))
    .await;
    let api = memory.url("/api/o");
    assert_eq!(client.post_key(&api, "k-1", "{}").await.status, 201);
    assert!(
        client
            .post_key(&api, "k-1", "{}")
            .await
            .header("idempotent-replayed")
            .is_some()
    );
    assert_eq!(
        client.post_key(&api, "k-1", "{\"x\":1}").await.code(),
        "idempotency_key_reused"
    );
    assert_eq!(
        client.send("POST", &api, &[], "{}").await.code(),
        "idempotency_key_missing"
    );
    assert_eq!(get(&client, &memory.url("/plain")).await.status, 201);
    let reset = [("idempotency-key", "k-2"), ("x-test-reset", "1")];
    assert_eq!(
        client.send("POST", &api, &reset, "{}").await.code(),
        "upstream_failed"
    );
    let slow = [("idempotency-key", "k-3"), ("x-test-delay-ms", "400")];
    assert_eq!(
        client
            .send("POST", &memory.url("/slow/o"), &slow, "{}")
            .await
            .code(),
        "upstream_timeout"
    );
    assert_eq!(get(&client, &memory.admin_url("/readyz")).await.status, 200);
    let metrics_url = memory.admin_url("/metrics");
    common::eventually(Duration::from_secs(10), "a late completion", || {
        let (client, url) = (client.clone(), metrics_url.clone());
        async move {
            let text = get(&client, &url).await;
            String::from_utf8_lossy(&text.body).contains("idemgate_late_completions_total{")
        }
    })
    .await;
    let mut exposition = Exposition::default();
    exposition.scrape(&client, &metrics_url).await;
    memory.stop().await;

    let closed = crate::common::ClosedPort::new();
    let store = format!(
        "store: {{ backend: redis, url: \"redis://{}/0\", op_timeout: 200ms, on_unavailable: forward }}",
        closed.addr()
    );
    let fail_open = TestProxy::start(&admin_config(&store, upstream.addr, routes)).await;
    let forwarded = client.post_key(&fail_open.url("/api/o"), "k-4", "{}").await;
    assert_eq!(
        forwarded.status, 201,
        "forwarded unprotected: {forwarded:?}"
    );
    exposition
        .scrape(&client, &fail_open.admin_url("/metrics"))
        .await;
    fail_open.stop().await;
    exposition
}

/// Every string in a document, with the key it sits under.
fn strings<'a>(v: &'a Value, key: &str, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::String(s) => out.push((key.to_owned(), s)),
        Value::Array(items) => items.iter().for_each(|i| strings(i, key, out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| strings(v, k, out)),
        _ => {}
    }
}

/// Every JSON and YAML document under `deploy/observability/`, with its file.
fn observability_documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for (rel, path) in deploy_files_under("deploy/observability/") {
        match ext(&path) {
            "json" => docs.push((rel.clone(), json_file(&rel))),
            "yaml" | "yml" => docs.extend(yaml_docs(&rel).into_iter().map(|d| (rel.clone(), d))),
            _ => {}
        }
    }
    docs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_what_a_running_instance_exposes() {
    let exposed = exposition_of_every_family().await;
    let labels = exposed.all_labels();
    assert!(
        exposed.values["outcome"]
            .iter()
            .all(|o| OUTCOMES.contains(&o.as_str())),
        "an outcome this test does not know: {:?}",
        exposed.values["outcome"]
    );
    let documents = observability_documents();
    assert!(documents.len() >= 2, "a dashboard and alert rules");
    let mut used = BTreeSet::new();
    for (file, doc) in &documents {
        let mut all = Vec::new();
        strings(doc, "", &mut all);
        for (key, s) in all {
            for reference in references(s) {
                let Some(known) = exposed.samples.get(&reference.name) else {
                    let family = ["_bucket", "_sum", "_count", "_total"]
                        .iter()
                        .find_map(|suffix| reference.name.strip_suffix(suffix))
                        .unwrap_or(&reference.name);
                    panic!(
                        "{file}: {} is not exposed by a running instance ({}); exposed: {:?}",
                        reference.name,
                        match exposed.types.get(family) {
                            Some(kind) => format!("the family {family} is a {kind}"),
                            None => "no such family".to_owned(),
                        },
                        exposed.samples.keys().collect::<Vec<_>>()
                    )
                };
                used.insert(reference.name.clone());
                for matcher in &reference.matchers {
                    let op = matcher
                        .find(['=', '!'])
                        .unwrap_or_else(|| panic!("{file}: matcher {matcher}"));
                    let name = matcher[..op].trim();
                    assert!(
                        known.contains(name),
                        "{file}: {} has no label {name:?} (it has {known:?})",
                        reference.name
                    );
                    let value = matcher[op..]
                        .trim_start_matches(['=', '!', '~'])
                        .trim()
                        .trim_matches('"');
                    let allowed: &[&str] = match name {
                        "outcome" => &OUTCOMES,
                        "class" => &CLASSES,
                        _ => &[],
                    };
                    if !allowed.is_empty() && !value.contains('$') {
                        for alternative in value.split('|') {
                            assert!(
                                allowed.contains(&alternative),
                                "{file}: {name}={alternative:?} is not one of {allowed:?}"
                            );
                        }
                    }
                }
            }
            if matches!(key.as_str(), "expr" | "query" | "definition") {
                for label in grouping_labels(s) {
                    assert!(
                        labels.contains(&label) || label == "le",
                        "{file}: groups by {label:?}, which no idemgate metric has: {s}"
                    );
                }
            }
            for label in template_labels(s) {
                assert!(
                    labels.contains(&label),
                    "{file}: template uses label {label:?}, which no idemgate metric has: {s}"
                );
            }
        }
    }
    for family in [
        "idemgate_requests_total",
        "idemgate_responses_total",
        "idemgate_upstream_latency_seconds_bucket",
        "idemgate_store_latency_seconds_bucket",
        "idemgate_store_errors_total",
        "idemgate_circuit_state",
        "idemgate_unknown_outcomes_total",
        "idemgate_fail_open_forwards_total",
        "idemgate_late_completions_total",
        "idemgate_superseded_attempts_total",
        "idemgate_store_records",
        "idemgate_upstream_in_flight",
    ] {
        assert!(
            used.contains(family),
            "the dashboard or the alerts should use {family}"
        );
    }

    // docs/operations.md describes every family a running instance exposes.
    let docs = read("docs/operations.md");
    for (family, kind) in &exposed.types {
        // Classic text (what a scrape without `Accept` gets) names a
        // counter's family by its `_total` samples already.
        let written = if kind == "counter" && !family.ends_with("_total") {
            format!("`{family}_total")
        } else {
            format!("`{family}")
        };
        assert!(
            docs.contains(&written),
            "docs/operations.md does not describe {family} ({kind})"
        );
    }
}
