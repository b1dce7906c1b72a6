//! Which settings a reload cannot apply: the ones the running process read
//! once at startup (listeners, the store, the shutdown grace, the send timeout). The admin
//! token is not one of them: it is read from the running configuration.

use super::{Backend, Config};

impl Config {
    /// The fields that differ between the running configuration (`self`)
    /// and a reloaded one `new` and take effect only after a restart. Names
    /// only, never values: `admin.token` and `store.url` hold secrets.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let (old_store, new_store) = (&self.store, &new.store);
        let changed = [
            ("listen.address", self.listen.address != new.listen.address),
            (
                "listen.tls (on or off)",
                self.listen.tls.is_some() != new.listen.tls.is_some(),
            ),
            (
                "admin (on or off)",
                self.admin.is_some() != new.admin.is_some(),
            ),
            (
                "admin.listen",
                matches!((&self.admin, &new.admin), (Some(a), Some(b)) if a.listen != b.listen),
            ),
            (
                "store.backend",
                std::mem::discriminant(&old_store.backend)
                    != std::mem::discriminant(&new_store.backend),
            ),
            (
                "store.url",
                matches!((&old_store.backend, &new_store.backend),
                    (Backend::Redis { url: a }, Backend::Redis { url: b }) if a != b),
            ),
            (
                "store.cluster",
                matches!((&old_store.backend, &new_store.backend),
                    (Backend::Cluster { urls: a }, Backend::Cluster { urls: b }) if a != b),
            ),
            (
                "store.key_prefix",
                old_store.key_prefix != new_store.key_prefix,
            ),
            (
                "store.op_timeout",
                old_store.op_timeout != new_store.op_timeout,
            ),
            (
                "store.on_unavailable",
                old_store.on_unavailable != new_store.on_unavailable,
            ),
            (
                "store.max_records",
                old_store.max_records != new_store.max_records,
            ),
            // Its files too: the store read them at startup (regression,
            // the TLS audit: a client certificate renewed in place, as its
            // expiry warning asked, was reloaded without a word, unused).
            (
                "store.tls (its settings or files)",
                old_store.tls != new_store.tls,
            ),
            ("shutdown_grace", self.shutdown_grace != new.shutdown_grace),
            ("send_timeout", self.send_timeout != new.send_timeout),
        ];
        changed
            .into_iter()
            .filter_map(|(name, differs)| differs.then_some(name))
            .collect()
    }

    /// What a reload to `new` does to records made before it: a protected
    /// route (by name) whose scope or fingerprint changes no longer finds,
    /// or no longer matches, them (regression: said nowhere, though a
    /// new scope header let a completed request run again).
    pub fn record_changes(&self, new: &Config) -> Vec<String> {
        let mut said = Vec::new();
        // A route's name is part of its records' keys (regression, a
        // verification audit: a rename let completed requests run again,
        // unsaid).
        for gone in (self.routes.iter())
            .filter(|r| r.idempotency.is_some())
            .filter(|r| !new.routes.iter().any(|n| n.name == r.name))
        {
            said.push(format!(
                "route {}: removed or renamed: its records (kept under its name) are no longer found, so a retry of a request it handled is forwarded afresh (a completed request may run again) under whatever route now takes it; `keys` still reaches them by the old name",
                gone.name
            ));
        }
        for route in &new.routes {
            let old = self.routes.iter().find(|r| r.name == route.name);
            let Some(was) = old.and_then(|r| r.idempotency.as_ref()) else {
                continue;
            };
            // Protection taken off a method: its retries pass through
            // (regression, an audit: said for a rename, not for this).
            let kept = |m: &http::Method| {
                route
                    .idempotency
                    .as_ref()
                    .is_some_and(|is| is.methods.contains(m))
            };
            let dropped: Vec<&str> = (was.methods.iter())
                .filter(|m| !kept(m))
                .map(http::Method::as_str)
                .collect();
            if !dropped.is_empty() {
                said.push(format!(
                    "route {}: no longer protects {}: retries of requests made before this reload pass through to the upstream unchecked (a completed request may run again); their records stay until their ttl passes",
                    route.name,
                    dropped.join(", ")
                ));
            }
            let Some(is) = route.idempotency.as_ref() else {
                continue;
            };
            if was.scope_headers != is.scope_headers {
                said.push(format!(
                    "route {}: scope.headers changed: retries of requests made before this reload look for their records under a new scope and are forwarded afresh (a completed request may run again) until those records' ttl passes",
                    route.name
                ));
            }
            if was.fingerprint_headers != is.fingerprint_headers
                || was.fingerprint_query != is.fingerprint_query
            {
                said.push(format!(
                    "route {}: fingerprint changed: retries of requests made before this reload no longer match their records (422 idempotency_key_reused) until those records' ttl passes",
                    route.name
                ));
            }
        }
        said
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "upstreams: { erp: { url: \"http://127.0.0.1:9000\" } }\nroutes: [ { name: a, match: { path: /a }, upstream: erp } ]\n";

    fn config(extra: &str) -> Config {
        let env = |name: &str| (name == "RESTART_TEST_TOKEN").then(|| "s3cret".to_owned());
        super::super::validate::validate(&format!("{extra}{BASE}"), &env).expect("valid")
    }

    #[test]
    fn a_new_scope_or_fingerprint_is_said_to_change_what_records_match() {
        let old = config("");
        let scoped = config(
            "defaults: { idempotency: { scope: { headers: [authorization, x-tenant] } } }\n",
        );
        let printed = config("defaults: { idempotency: { fingerprint: { query: false } } }\n");
        assert!(old.record_changes(&old).is_empty());
        let mut new = config("");
        new.routes[0].name = "b".into();
        let renamed = old.record_changes(&new);
        assert!(
            renamed.len() == 1 && renamed[0].starts_with("route a: removed or renamed"),
            "{renamed:?}"
        );
        let said = old.record_changes(&scoped);
        assert!(
            said.len() == 1 && said[0].starts_with("route a: scope.headers changed"),
            "{said:?}"
        );
        let said = old.record_changes(&printed);
        assert!(
            said.len() == 1 && said[0].starts_with("route a: fingerprint changed"),
            "{said:?}"
        );
    }

    /// Regression (an audit): taking protection off a route, or a method
    /// off its `methods`, let retries of completed requests run again,
    /// unsaid (a rename was said).
    #[test]
    fn protection_taken_off_a_route_or_a_method_is_said() {
        let old = config("defaults: { idempotency: { methods: [POST, PATCH] } }\n");
        let patch_only = config("defaults: { idempotency: { methods: [PATCH] } }\n");
        let said = old.record_changes(&patch_only);
        assert!(
            said.len() == 1 && said[0].starts_with("route a: no longer protects POST:"),
            "{said:?}"
        );
        let off = config("defaults: { idempotency: off }\n");
        let said = old.record_changes(&off);
        assert!(
            said.len() == 1 && said[0].starts_with("route a: no longer protects POST, PATCH:"),
            "{said:?}"
        );
        let more = config("defaults: { idempotency: { methods: [POST, PATCH, PUT] } }\n");
        assert!(old.record_changes(&more).is_empty());
        assert!(off.record_changes(&old).is_empty());
    }

    /// Regression: a new `store.url` alone was reported as `store.backend`.
    #[test]
    fn a_new_store_url_is_named_as_such() {
        let old = config("store: { backend: redis, url: \"redis://127.0.0.1:6379/0\" }\n");
        let new = config("store: { backend: redis, url: \"redis://127.0.0.1:6380/0\" }\n");
        assert_eq!(old.restart_needed(&new), vec!["store.url"]);
    }

    #[test]
    fn routes_and_upstreams_reload_without_a_restart() {
        let old = config("");
        let new = config("defaults: { timeouts: { response: 1s } }\n");
        assert_eq!(old.restart_needed(&new), Vec::<&str>::new());
    }

    #[test]
    fn every_setting_read_at_startup_is_named_and_no_value_is() {
        let old = config(
            "listen: 127.0.0.1:8080\nadmin: { listen: 127.0.0.1:9090 }\nstore: { backend: memory }\n",
        );
        let new = config(
            "listen: 127.0.0.1:8081\nadmin: { listen: 127.0.0.1:9091, token: \"${RESTART_TEST_TOKEN}\" }\nshutdown_grace: 5s\nsend_timeout: 5s\nstore: { backend: redis, url: \"redis://:pw@127.0.0.1:6379/0\", key_prefix: \"x:\", op_timeout: 1s, on_unavailable: forward, max_records: 10 }\n",
        );
        let names = old.restart_needed(&new);
        assert_eq!(
            names,
            vec![
                "listen.address",
                "admin.listen",
                "store.backend",
                "store.key_prefix",
                "store.op_timeout",
                "store.on_unavailable",
                "store.max_records",
                "shutdown_grace",
                "send_timeout",
            ]
        );
        let turned_off = config("");
        assert_eq!(
            new.restart_needed(&turned_off)[..2],
            ["listen.address", "admin (on or off)"]
        );
        assert!(
            !names
                .iter()
                .any(|n| n.contains("s3cret") || n.contains("pw"))
        );
    }
}
