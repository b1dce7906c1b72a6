//! The idempotency gate end to end (SPEC.md section 4), against the memory
//! store and a real redis-server alike: one module per concern, each suite
//! run on both backends by `both_stores!`.

mod budget;
#[path = "../common/mod.rs"]
mod common;
mod concurrency;
mod disconnects;
mod headers;
mod keys;
mod odd_requests;
mod outcomes;
mod protection;
mod recording;

use common::{Backend, TestClient, TestProxy, TestUpstream, config};

/// A proxy with one protected route `/api` (settings in `idempotency`,
/// YAML flow mapping entries) in front of a fresh upstream.
struct Setup {
    upstream: TestUpstream,
    proxy: TestProxy,
    client: TestClient,
    _backend: Backend,
}

impl Setup {
    async fn new(backend: Backend, idempotency: &str, timeouts: &str) -> Setup {
        let store = backend.store_yaml();
        Setup::with_store(backend, &store, "", idempotency, timeouts).await
    }

    /// `new` with its own top-level `store:` block (and any other top-level
    /// lines, e.g. `admin:`), and more settings of the upstream (flow
    /// mapping entries, e.g. `max_in_flight: 1`).
    async fn with_store(
        backend: Backend,
        store: &str,
        upstream_settings: &str,
        idempotency: &str,
        timeouts: &str,
    ) -> Setup {
        let upstream = TestUpstream::start().await;
        let mut yaml = yaml(store, &upstream, idempotency, timeouts);
        if !upstream_settings.is_empty() {
            yaml = yaml.replace(
                "connect_timeout: 500ms }",
                &format!("connect_timeout: 500ms, {upstream_settings} }}"),
            );
        }
        let proxy = TestProxy::start(&yaml).await;
        Setup {
            upstream,
            proxy,
            client: TestClient::new(),
            _backend: backend,
        }
    }

    /// The proxy's metrics (the store block must add an `admin:` listener).
    async fn metrics(&self) -> String {
        self.proxy.metrics().await
    }

    fn url(&self) -> String {
        self.proxy.url("/api/orders?x=1")
    }

    async fn post(&self, key: &str, body: &str, extra: &[(&str, &str)]) -> crate::common::Reply {
        let mut headers = vec![
            ("idempotency-key", key),
            ("content-type", "application/json"),
        ];
        headers.extend_from_slice(extra);
        self.client
            .send("POST", &self.url(), &headers, body.to_owned())
            .await
    }
}

/// The configuration `Setup` runs: one protected route `/api` to `upstream`.
fn yaml(store: &str, upstream: &TestUpstream, idempotency: &str, timeouts: &str) -> String {
    let routes = format!(
        "  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up, timeouts: {{ {timeouts} }}, idempotency: {{ {idempotency} }} }}"
    );
    config(
        store,
        upstream.addr,
        "  timeouts: { response: 5s, total: 10s }\n  idempotency: { lease: 5s, ttl: 1h }",
        &routes,
    )
}
