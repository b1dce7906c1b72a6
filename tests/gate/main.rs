//! The idempotency gate end to end (SPEC.md section 4), against the memory
//! store and a real redis-server alike: one module per concern, each suite
//! run on both backends by `both_stores!`.

#[path = "../common/mod.rs"]
mod common;
mod concurrency;
mod keys;
mod outcomes;
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
        let upstream = TestUpstream::start().await;
        let routes = format!(
            "  - {{ name: orders, match: {{ path_prefix: /api }}, upstream: up, timeouts: {{ {timeouts} }}, idempotency: {{ {idempotency} }} }}"
        );
        let yaml = config(
            &backend.store_yaml(),
            upstream.addr,
            "  timeouts: { response: 5s, total: 10s }\n  idempotency: { lease: 5s, ttl: 1h }",
            &routes,
        );
        let proxy = TestProxy::start(&yaml).await;
        Setup {
            upstream,
            proxy,
            client: TestClient::new(),
            _backend: backend,
        }
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
