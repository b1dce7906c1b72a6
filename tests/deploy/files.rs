//! The inventory of `deploy/`: every expected file is there, every YAML and
//! JSON file parses, YAML files open with a comment and scripts with a
//! shebang and a comment.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::{deploy_files, ext, yaml_docs_of};

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut seen = BTreeSet::new();
    for (rel, path) in deploy_files() {
        let content = std::fs::read_to_string(&path).unwrap();
        match ext(&path) {
            "yaml" | "yml" => {
                let docs = yaml_docs_of(&path);
                assert!(!docs.is_empty(), "{rel}: no YAML document");
                assert!(
                    content.starts_with('#'),
                    "{rel}: start with a comment saying what it is"
                );
            }
            "json" => {
                serde_json::from_str::<Value>(&content)
                    .unwrap_or_else(|e| panic!("{rel}: invalid JSON: {e}"));
            }
            "sh" => assert!(
                content.starts_with("#!")
                    && content.lines().nth(1).is_some_and(|l| l.starts_with('#'))
            ),
            _ => {}
        }
        seen.insert(rel);
    }
    for expected in [
        "deploy/compose/docker-compose.yaml",
        "deploy/compose/idemgate.yaml",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/service.yaml",
        "deploy/kubernetes/configmap.yaml",
        "deploy/kubernetes/secret.yaml",
        "deploy/kubernetes/pdb.yaml",
        "deploy/kubernetes/kustomization.yaml",
        "deploy/systemd/idemgate.service",
        "deploy/systemd/idemgate.yaml",
        "deploy/observability/grafana-dashboard.json",
        "deploy/observability/prometheus-alerts.yaml",
        "deploy/docker/healthcheck.sh",
    ] {
        assert!(seen.contains(expected), "{expected} is missing");
    }
}
