//! The Dockerfile and its image: the dependency layer is cached and the build
//! is locked and release, `.dockerignore` lets in all that COPY needs, the
//! final image runs non-root with a health check; and the health check script
//! probes the admin listener. `image()` is what the other deployments check
//! themselves against.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::{TestProxy, TestUpstream};
use crate::{admin_config, content_lines, read, root};

/// The Dockerfile as (INSTRUCTION, arguments), continuations joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        let (body, continued) = match trimmed.strip_suffix('\\') {
            Some(body) => (body, true),
            None => (trimmed, false),
        };
        current.push_str(body);
        current.push(' ');
        if !continued {
            let joined = current.trim().to_owned();
            current.clear();
            if joined.is_empty() {
                continue;
            }
            let (instruction, args) = joined.split_once(' ').unwrap_or((&joined, ""));
            out.push((instruction.to_ascii_uppercase(), args.trim().to_owned()));
        }
    }
    out
}

/// The stages by name, each with its instructions (FROM included).
fn stages() -> Vec<(String, Vec<(String, String)>)> {
    let mut stages: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (instruction, args) in dockerfile() {
        if instruction == "FROM" {
            let name = args
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .find(|w| w[0].eq_ignore_ascii_case("as"))
                .map(|w| w[1].to_owned())
                .unwrap_or_default();
            stages.push((name, Vec::new()));
        }
        if let Some(stage) = stages.last_mut() {
            stage.1.push((instruction, args));
        }
    }
    stages
}

/// The names of the Dockerfile's stages, in order.
pub(crate) fn stage_names() -> Vec<String> {
    stages().into_iter().map(|(n, _)| n).collect()
}

fn stage_env(stage: &[(String, String)]) -> BTreeMap<String, String> {
    stage
        .iter()
        .filter(|(i, _)| i == "ENV")
        .flat_map(|(_, args)| args.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The final image: its config path, uid, exposed ports and health check address.
pub(crate) struct Image {
    pub(crate) config_path: String,
    pub(crate) uid: u64,
    pub(crate) exposed: BTreeSet<u16>,
    pub(crate) healthcheck_addr: String,
}

pub(crate) fn image() -> Image {
    let stages = stages();
    let (name, last) = stages.last().expect("a FROM");
    assert_eq!(name, "idemgate", "the default (last) stage is the proxy");
    let one = |instruction: &str| -> &str {
        let found: Vec<_> = last.iter().filter(|(i, _)| i == instruction).collect();
        assert_eq!(found.len(), 1, "one {instruction} in the final stage");
        &found[0].1
    };
    let user = one("USER");
    let uid: u64 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("USER {user} is not numeric (runAsNonRoot needs a uid)"));
    assert_ne!(uid, 0, "the image runs as root");
    assert_eq!(one("STOPSIGNAL"), "SIGTERM");
    let health = one("HEALTHCHECK");
    assert!(
        health.contains("/usr/local/bin/idemgate-healthcheck") && health.contains("/healthz"),
        "HEALTHCHECK {health}"
    );
    assert!(
        last.iter().any(|(i, a)| i == "COPY"
            && a.contains("deploy/docker/healthcheck.sh /usr/local/bin/idemgate-healthcheck")),
        "the health check script is copied into the image"
    );
    assert_eq!(one("ENTRYPOINT"), r#"["/usr/local/bin/idemgate"]"#);
    assert_eq!(one("CMD"), r#"["serve"]"#);
    let env = stage_env(last);
    Image {
        config_path: env
            .get("IDEMGATE_CONFIG")
            .expect("ENV IDEMGATE_CONFIG")
            .clone(),
        uid,
        exposed: one("EXPOSE")
            .split_whitespace()
            .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
            .collect(),
        healthcheck_addr: env
            .get("IDEMGATE_HEALTHCHECK_ADDR")
            .expect("ENV IDEMGATE_HEALTHCHECK_ADDR")
            .clone(),
    }
}

#[test]
fn dockerfile_caches_dependencies_and_builds_locked_release() {
    let steps = dockerfile();
    let position = |what: &dyn Fn(&(String, String)) -> bool, name: &str| {
        steps
            .iter()
            .position(what)
            .unwrap_or_else(|| panic!("no {name} in the Dockerfile"))
    };
    let manifests = position(
        &|(i, a)| i == "COPY" && a.contains("Cargo.toml") && a.contains("Cargo.lock"),
        "COPY of Cargo.toml and Cargo.lock",
    );
    let deps_build = position(
        &|(i, a)| i == "RUN" && a.contains("cargo build --release --locked"),
        "locked release build",
    );
    let sources = position(
        &|(i, a)| i == "COPY" && a.starts_with("src "),
        "COPY of src",
    );
    assert!(
        manifests < deps_build && deps_build < sources,
        "the dependencies must be built from the manifests before the sources are copied"
    );
    assert!(
        steps[deps_build].1.contains("src/main.rs") && steps[deps_build].1.contains("src/lib.rs"),
        "the dependency layer builds against dummy sources: {}",
        steps[deps_build].1
    );
    assert!(
        steps[sources..]
            .iter()
            .any(|(i, a)| i == "RUN" && a.contains("cargo build --release --locked")),
        "the real build after COPY src is --locked and --release"
    );
    let names = stage_names();
    for stage in ["deps", "build", "runtime", "erp", "idemgate"] {
        assert!(
            names.contains(&stage.to_owned()),
            "stage {stage} in {names:?}"
        );
    }
    let image = image();
    assert_eq!(image.config_path, "/etc/idemgate/idemgate.yaml");

    // .dockerignore is an allowlist that lets in everything COPY needs.
    let ignore = read(".dockerignore");
    let patterns: Vec<&str> = content_lines(&ignore).collect();
    assert_eq!(patterns.first(), Some(&"*"), ".dockerignore starts with *");
    for (instruction, args) in &steps {
        if instruction != "COPY" || args.contains("--from=") {
            continue;
        }
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for source in &words[..words.len() - 1] {
            let source = source.trim_end_matches('/');
            assert!(
                root().join(source).exists(),
                "COPY {source}: no such path in the repository"
            );
            assert!(
                patterns.iter().any(|p| p
                    .strip_prefix('!')
                    .is_some_and(|p| source == p || source.starts_with(&format!("{p}/")))),
                "COPY {source} is excluded by .dockerignore"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_script_probes_the_admin_listener() {
    let upstream = TestUpstream::start().await;
    let yaml = admin_config(
        "store: { backend: memory }",
        upstream.addr,
        "  - { name: orders, match: { path_prefix: /api }, upstream: up }",
    );
    let proxy = TestProxy::start(&yaml).await;
    let admin = proxy.admin.unwrap().to_string();
    let script = root().join("deploy/docker/healthcheck.sh");
    let probe = |addr: String, path: &'static str| {
        let script = script.clone();
        async move {
            tokio::process::Command::new("bash")
                .arg(&script)
                .arg(path)
                .env("IDEMGATE_HEALTHCHECK_ADDR", addr)
                .output()
                .await
                .expect("run bash")
        }
    };
    for path in ["/healthz", "/readyz"] {
        let out = probe(admin.clone(), path).await;
        assert!(
            out.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let missing = probe(admin.clone(), "/nope").await;
    assert!(!missing.status.success(), "a 404 is not healthy");
    let closed = crate::common::ClosedPort::new();
    assert!(
        !probe(closed.addr().to_string(), "/healthz")
            .await
            .status
            .success(),
        "nothing listening is not healthy"
    );
    proxy.stop().await;
}
