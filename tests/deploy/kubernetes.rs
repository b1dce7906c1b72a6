//! The Kubernetes manifests: the kustomization lists them all, the ConfigMap's
//! config passes `idemgate check` with the Deployment's environment (Secrets
//! included), and ports, probes, the config mount, grace period, security
//! context and the selectors of the Services, PodDisruptionBudget and
//! NetworkPolicy agree with that config and the image. `kubectl kustomize`
//! builds them when kubectl is installed.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::docker::image;
use crate::{
    admin_port, at, deploy_files_under, ext, flag_value, int, list, root, strs, text, validated,
    yaml_docs_of,
};

/// Every document of every YAML file under `deploy/kubernetes/`, with its file.
fn k8s_objects() -> Vec<(String, Value)> {
    let mut objects = Vec::new();
    for (rel, path) in deploy_files_under("deploy/kubernetes/") {
        if ext(&path) == "yaml" {
            for doc in yaml_docs_of(&path) {
                objects.push((rel.clone(), doc));
            }
        }
    }
    objects
}

/// The objects other than the kustomization, with their files.
fn manifests(objects: &[(String, Value)]) -> impl Iterator<Item = &(String, Value)> {
    objects.iter().filter(|(_, o)| o["kind"] != "Kustomization")
}

/// The one object that `matches`, described by `what` if there is not exactly one.
fn only<'a>(
    objects: &'a [(String, Value)],
    what: &str,
    matches: impl Fn(&Value) -> bool,
) -> &'a Value {
    let found: Vec<_> = objects.iter().filter(|(_, o)| matches(o)).collect();
    assert_eq!(found.len(), 1, "one {what}");
    &found[0].1
}

fn object<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    only(objects, &format!("{kind} {name}"), |o| {
        o["kind"] == kind && o["metadata"]["name"] == name
    })
}

fn object_by_kind<'a>(objects: &'a [(String, Value)], kind: &str) -> &'a Value {
    only(objects, kind, |o| o["kind"] == kind)
}

/// Whether every label of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("a label mapping");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn kubernetes_manifests_agree_with_their_config_and_the_image() {
    let objects = k8s_objects();
    let image = image();

    // The kustomization lists every manifest.
    let kustomization = object_by_kind(&objects, "Kustomization");
    let listed: BTreeSet<String> = strs(kustomization, "resources")
        .into_iter()
        .map(|r| format!("deploy/kubernetes/{r}"))
        .collect();
    let manifest_files: BTreeSet<String> = manifests(&objects).map(|(f, _)| f.clone()).collect();
    assert_eq!(listed, manifest_files, "kustomization.yaml resources");

    let deployment = object(&objects, "Deployment", "idemgate");
    let replicas = int(deployment, "spec.replicas");
    assert!(replicas >= 2, "at least 2 replicas");
    let pod = at(deployment, "spec.template");
    let pod_labels = at(pod, "metadata.labels");
    assert!(selects(
        at(deployment, "spec.selector.matchLabels"),
        pod_labels
    ));
    let spec = at(pod, "spec");
    let containers = list(spec, "containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // The environment: plain values and Secret keys, which must exist.
    let mut env = BTreeMap::new();
    for var in list(container, "env") {
        let name = text(var, "name").to_owned();
        let value = match var.get("value") {
            Some(v) => v.as_str().unwrap().to_owned(),
            None => {
                let secret = object(&objects, "Secret", text(var, "valueFrom.secretKeyRef.name"));
                let key = text(var, "valueFrom.secretKeyRef.key");
                text(secret, &format!("stringData.{key}")).to_owned()
            }
        };
        env.insert(name, value);
    }

    // The config file: ConfigMap → volume → mount → --config, as the image expects.
    let args = strs(container, "args");
    assert_eq!(args[0], "serve");
    let config_path = flag_value(&args, "--config").unwrap();
    assert_eq!(config_path, image.config_path);
    let mount = list(container, "volumeMounts")
        .iter()
        .find(|m| config_path.starts_with(&format!("{}/", text(m, "mountPath"))))
        .expect("a volume mounted where --config points");
    assert_eq!(at(mount, "readOnly"), &json!(true));
    let volume = list(spec, "volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let item = &list(volume, "configMap.items")[0];
    assert_eq!(
        format!("{}/{}", text(mount, "mountPath"), text(item, "path")),
        config_path
    );
    let configmap = object(&objects, "ConfigMap", text(volume, "configMap.name"));
    let config_text = at(configmap, "data")
        .get(text(item, "key"))
        .and_then(Value::as_str)
        .expect("the ConfigMap holds the mounted key");
    let config = validated("deploy/kubernetes/configmap.yaml", config_text, &env);

    // Ports: the container's named ports are the config's.
    let listen = config.listen.address.port();
    let admin = admin_port("configmap", &config);
    let ports: BTreeMap<String, u64> = list(container, "ports")
        .iter()
        .map(|p| (text(p, "name").to_owned(), int(p, "containerPort")))
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([
            ("http".into(), u64::from(listen)),
            ("admin".into(), u64::from(admin))
        ])
    );
    assert_eq!(image.exposed, BTreeSet::from([listen, admin]));
    let resolve = |port: &Value| -> u64 {
        match port {
            Value::String(name) => *ports
                .get(name)
                .unwrap_or_else(|| panic!("no container port named {name}")),
            other => {
                let n = other.as_u64().unwrap();
                assert!(ports.values().any(|p| *p == n), "no container port {n}");
                n
            }
        }
    };

    // Probes: readiness /readyz and liveness /healthz on the admin port.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(text(container, &format!("{probe}.httpGet.path")), path);
        assert_eq!(
            resolve(at(container, &format!("{probe}.httpGet.port"))),
            u64::from(admin),
            "{probe} on the admin port"
        );
    }
    let scrape_port = at(pod, "metadata.annotations")
        .get("prometheus.io/port")
        .and_then(Value::as_str);
    assert_eq!(scrape_port, Some(admin.to_string().as_str()));

    // Graceful stop: the grace period covers the preStop sleep and shutdown_grace.
    let pre_stop: u64 = match at(container, "lifecycle.preStop") {
        hook if hook.get("sleep").is_some() => int(hook, "sleep.seconds"),
        hook => {
            let command = list(hook, "exec.command");
            assert_eq!(command[0], "sleep");
            command[1].as_str().unwrap().parse().unwrap()
        }
    };
    let grace = int(spec, "terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > Duration::from_secs(pre_stop) + config.shutdown_grace,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop}s + shutdown_grace {:?}",
        config.shutdown_grace
    );

    // Non-root, read-only, no privileges, bounded resources.
    assert_eq!(at(spec, "securityContext.runAsNonRoot"), &json!(true));
    assert_eq!(int(spec, "securityContext.runAsUser"), image.uid);
    let security = at(container, "securityContext");
    assert_eq!(at(security, "readOnlyRootFilesystem"), &json!(true));
    assert_eq!(at(security, "allowPrivilegeEscalation"), &json!(false));
    assert_eq!(at(security, "capabilities.drop"), &json!(["ALL"]));
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            at(container, &format!("resources.{kind}.{resource}"));
        }
    }

    // Services, the PodDisruptionBudget and the NetworkPolicy select these pods.
    let target_ports = |service: &Value| -> Vec<u64> {
        list(service, "spec.ports")
            .iter()
            .map(|p| resolve(at(p, "targetPort")))
            .collect()
    };
    let mut targeted = BTreeSet::new();
    for (_, service) in objects.iter().filter(|(_, o)| o["kind"] == "Service") {
        assert!(selects(at(service, "spec.selector"), pod_labels));
        targeted.extend(target_ports(service));
    }
    let clients = object(&objects, "Service", "idemgate");
    assert_eq!(
        target_ports(clients),
        vec![u64::from(listen)],
        "the client Service: the proxy only"
    );
    assert!(
        targeted.contains(&u64::from(admin)),
        "a Service for scraping"
    );
    let pdb = object(&objects, "PodDisruptionBudget", "idemgate");
    assert!(selects(at(pdb, "spec.selector.matchLabels"), pod_labels));
    assert!(
        int(pdb, "spec.minAvailable") < replicas,
        "a drain can proceed"
    );
    let policy = object(&objects, "NetworkPolicy", "idemgate");
    assert!(selects(
        at(policy, "spec.podSelector.matchLabels"),
        pod_labels
    ));
    for rule in list(policy, "spec.ingress") {
        for port in list(rule, "ports") {
            resolve(at(port, "port"));
        }
    }

    // kubectl builds the kustomization offline, when it is installed.
    match Command::new("kubectl")
        .args(["kustomize"])
        .arg(root().join("deploy/kubernetes"))
        .output()
    {
        Err(_) => println!("note: kubectl is not installed; `kubectl kustomize` not run"),
        Ok(out) => {
            assert!(
                out.status.success(),
                "kubectl kustomize: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let built: Vec<Value> =
                serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
            let mut kinds: Vec<String> = built.iter().map(|o| text(o, "kind").to_owned()).collect();
            let mut expected: Vec<String> = manifests(&objects)
                .map(|(_, o)| text(o, "kind").to_owned())
                .collect();
            kinds.sort();
            expected.sort();
            assert_eq!(kinds, expected);
        }
    }
}
