//! The Compose stack: its build targets are Dockerfile stages, its config
//! passes `idemgate check` with the service's environment, its ports, health
//! check and stop grace period agree with that config and the image, the
//! upstream is the `erp` service, and Redis is durable and password-protected.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use crate::docker::{image, stage_names};
use crate::{
    admin_port, assert_outlasts_grace, at, duration, flag_value, read, strs, text, validated, yaml,
};

/// Compose's interpolation for what the file uses (`$$`, `${NAME:-default}`),
/// with every variable unset: `docker compose up` must work without any.
fn compose_interpolate(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(after) = after.strip_prefix('{') {
            let end = after.find('}').expect("a closing brace");
            let (name, default) = after[..end].split_once(":-").unwrap_or_else(|| {
                panic!("${{{}}} in the compose file has no default", &after[..end])
            });
            assert!(!name.is_empty());
            out.push_str(default);
            rest = &after[end + 1..];
        } else {
            panic!("bare $ in {s:?}: write $$ or ${{NAME:-default}}");
        }
    }
    out.push_str(rest);
    out
}

fn container_port(mapping: &str) -> u16 {
    mapping
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/tcp")
        .parse()
        .unwrap_or_else(|_| panic!("port mapping {mapping:?}"))
}

#[test]
fn compose_stack_agrees_with_its_config_and_the_image() {
    let compose = yaml("deploy/compose/docker-compose.yaml");
    let services = at(&compose, "services");
    let idemgate = at(services, "idemgate");
    let image = image();
    let stage_names = stage_names();
    for service in ["idemgate", "erp"] {
        let target = text(services, &format!("{service}.build.target"));
        assert!(
            stage_names.contains(&target.to_owned()),
            "no stage {target}"
        );
        assert_eq!(text(services, &format!("{service}.build.context")), "../..");
    }

    let env: BTreeMap<String, String> = at(idemgate, "environment")
        .as_object()
        .expect("environment as a mapping")
        .iter()
        .map(|(k, v)| (k.clone(), compose_interpolate(v.as_str().unwrap())))
        .collect();
    let volume = strs(idemgate, "volumes")
        .into_iter()
        .find(|v| v.contains(&image.config_path))
        .unwrap_or_else(|| panic!("no volume mounted at {}", image.config_path));
    let parts: Vec<&str> = volume.split(':').collect();
    assert_eq!(parts[1], image.config_path);
    assert_eq!(parts.get(2), Some(&"ro"), "mount the config read-only");
    let config_rel = format!("deploy/compose/{}", parts[0].trim_start_matches("./"));
    let config = validated(&config_rel, &read(&config_rel), &env);

    let listen = config.listen.address.port();
    let admin = admin_port(&config_rel, &config);
    let published: BTreeSet<u16> = strs(idemgate, "ports")
        .into_iter()
        .map(container_port)
        .collect();
    assert_eq!(published, BTreeSet::from([listen, admin]));
    assert_eq!(image.exposed, BTreeSet::from([listen, admin]));
    assert!(
        config.listen.address.ip().is_unspecified(),
        "listen on 0.0.0.0 in a container"
    );
    assert_eq!(
        container_port(&image.healthcheck_addr),
        admin,
        "the image's health check must reach admin.listen"
    );
    let stop = duration(text(idemgate, "stop_grace_period"));
    assert_outlasts_grace("stop_grace_period", stop, &config);
    assert_eq!(at(idemgate, "read_only"), &json!(true));
    assert_eq!(
        text(idemgate, "depends_on.redis.condition"),
        "service_healthy"
    );

    // The upstream is the erp service, on the port it listens on.
    let upstream = &config.upstreams[0];
    let erp = at(services, upstream.authority.host());
    let erp_args = strs(erp, "command");
    let erp_listen = flag_value(&erp_args, "--listen").unwrap();
    assert_eq!(
        Some(container_port(erp_listen)),
        upstream.authority.port_u16()
    );

    // Redis: the service the URL names, with AOF everysec, noeviction and the URL's password.
    let url = &env["REDIS_URL"];
    let (credentials, location) = url
        .trim_start_matches("redis://")
        .split_once('@')
        .expect("a password in REDIS_URL");
    let host = location.split('/').next().unwrap();
    assert_eq!(host, "redis:6379");
    let redis_args: Vec<String> = strs(services, "redis.command")
        .into_iter()
        .map(compose_interpolate)
        .collect();
    let arg = |flag: &str| -> &str {
        flag_value(&redis_args, flag)
            .unwrap_or_else(|| panic!("redis {flag} is not set: {redis_args:?}"))
    };
    assert_eq!(arg("--appendonly"), "yes");
    assert_eq!(arg("--appendfsync"), "everysec");
    assert_eq!(arg("--maxmemory-policy"), "noeviction");
    assert_eq!(
        arg("--requirepass"),
        credentials.trim_start_matches(':'),
        "REDIS_URL carries Redis' password"
    );
    assert!(at(services, "redis.healthcheck.test").is_array());
}
