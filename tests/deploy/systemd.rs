//! The systemd unit: hardened, reloaded with SIGHUP, started with the image's
//! config path; its config passes `idemgate check` with the example
//! environment file, and its stop timeout outlasts `shutdown_grace`.
//! `systemd-analyze verify` and `security` check it when installed.

use std::collections::BTreeMap;
use std::process::Command;

use crate::docker::image;
use crate::{
    admin_port, assert_outlasts_grace, assert_success, content_lines, duration, flag_value, read,
    said, validated,
};

/// The unit file's `Key=value` lines, in order, per key.
fn unit_entries(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut entries: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in content_lines(unit).filter(|l| !l.starts_with('[')) {
        let (key, value) = line.split_once('=').expect("Key=value");
        entries
            .entry(key.to_owned())
            .or_default()
            .push(value.to_owned());
    }
    entries
}

#[test]
fn systemd_unit_is_hardened_and_agrees_with_its_config() {
    let unit = read("deploy/systemd/idemgate.service");
    assert!(unit.starts_with('#'));
    let entries = unit_entries(&unit);
    let one = |key: &str| -> &str {
        let values = entries
            .get(key)
            .unwrap_or_else(|| panic!("{key}= is not set"));
        assert_eq!(values.len(), 1, "{key}= set once");
        &values[0]
    };
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("CapabilityBoundingSet", ""),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(key), value, "{key}=");
    }
    assert!(
        entries["ExecReload"].contains(&"/bin/kill -HUP $MAINPID".to_owned()),
        "ExecReload sends SIGHUP"
    );
    let exec = one("ExecStart");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert!(words.contains(&"serve"), "ExecStart {exec}");
    let config_path = flag_value(&words, "--config").unwrap();
    assert_eq!(config_path, image().config_path);

    // The unit's config, with the environment file's variables.
    let env: BTreeMap<String, String> = content_lines(&read("deploy/systemd/idemgate.env.example"))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=value");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert!(
        one("EnvironmentFile")
            .trim_start_matches('-')
            .starts_with("/etc/idemgate/")
    );
    let config = validated(
        "deploy/systemd/idemgate.yaml",
        &read("deploy/systemd/idemgate.yaml"),
        &env,
    );
    let stop = duration(one("TimeoutStopSec"));
    assert_outlasts_grace("TimeoutStopSec", stop, &config);
    admin_port("deploy/systemd/idemgate.yaml", &config);

    // systemd-analyze, when installed: a copy pointing at the built binary.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("idemgate.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/idemgate", env!("CARGO_BIN_EXE_idemgate")),
    )
    .unwrap();
    let verify = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
    {
        Err(_) => {
            println!("note: systemd-analyze is not installed; `systemd-analyze verify` not run");
            return;
        }
        Ok(out) => out,
    };
    assert_success(&verify, "systemd-analyze verify");
    let printed = said(&verify);
    let about_unit: Vec<&str> = printed.lines().filter(|l| l.contains("idemgate")).collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify warns:\n{}",
        about_unit.join("\n")
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&copy)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    match report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for idemgate.service: "))
    {
        None => {
            println!("note: this systemd-analyze has no `security --offline`; exposure not checked")
        }
        Some((_, level)) => {
            let score: f64 = level.split_whitespace().next().unwrap().parse().unwrap();
            assert!(
                score <= 2.0,
                "exposure level {level}: the unit lost hardening"
            );
        }
    }
}
