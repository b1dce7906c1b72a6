//! Prometheus metrics of one running instance (prometheus-client, no global
//! registry). Labels are route, upstream, method and store operation names
//! only, never paths or keys, so cardinality stays bounded.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Arc<str>,
    pub method: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub route: Arc<str>,
    /// `2xx` .. `5xx`.
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

fn latency() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub responses: Family<ResponseLabels, Counter>,
    pub upstream_latency: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    pub store_latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    pub store_errors: Family<OpLabels, Counter>,
    pub in_flight: Family<UpstreamLabels, Gauge>,
    pub circuit_state: Family<UpstreamLabels, Gauge>,
    pub unknown_outcomes: Family<RouteLabels, Counter>,
    pub fail_open_forwards: Family<RouteLabels, Counter>,
    pub late_completions: Family<RouteLabels, Counter>,
    pub ready: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("idemgate");
        let requests = Family::default();
        let responses = Family::default();
        let upstream_latency = Family::new_with_constructor(latency as fn() -> Histogram);
        let store_latency = Family::new_with_constructor(latency as fn() -> Histogram);
        let store_errors = Family::default();
        let in_flight = Family::default();
        let circuit_state = Family::default();
        let unknown_outcomes = Family::default();
        let fail_open_forwards = Family::default();
        let late_completions = Family::default();
        let ready = Gauge::default();
        registry.register(
            "requests",
            "Requests by route, method and outcome",
            requests.clone(),
        );
        registry.register(
            "responses",
            "Responses to clients by route and status class (2xx..5xx), replays included",
            responses.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            upstream_latency.clone(),
        );
        registry.register(
            "store_latency_seconds",
            "Store operation latency by operation",
            store_latency.clone(),
        );
        registry.register(
            "store_errors",
            "Store operations that failed or timed out",
            store_errors.clone(),
        );
        registry.register(
            "upstream_in_flight",
            "Requests in flight to each upstream",
            in_flight.clone(),
        );
        registry.register(
            "circuit_state",
            "Circuit breaker state per upstream: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        registry.register(
            "unknown_outcomes",
            "Records that turned unknown (an operator must resolve them)",
            unknown_outcomes.clone(),
        );
        registry.register(
            "fail_open_forwards",
            "Requests forwarded unprotected because the store was unavailable",
            fail_open_forwards.clone(),
        );
        registry.register(
            "late_completions",
            "Responses recorded after the client stopped waiting (timeout or disconnect)",
            late_completions.clone(),
        );
        registry.register(
            "ready",
            "1 when the store is reachable and a configuration is loaded",
            ready.clone(),
        );
        Metrics {
            registry,
            requests,
            responses,
            upstream_latency,
            store_latency,
            store_errors,
            in_flight,
            circuit_state,
            unknown_outcomes,
            fail_open_forwards,
            late_completions,
            ready,
        }
    }

    /// Counts a request (`route` is empty when no route matched).
    pub fn request(&self, route: &Arc<str>, method: &http::Method, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.clone(),
                method: method_label(method),
                outcome,
            })
            .inc();
    }

    pub fn response(&self, route: &Arc<str>, status: u16) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.responses
            .get_or_create(&ResponseLabels {
                route: route.clone(),
                class,
            })
            .inc();
    }

    pub fn route_counter(family: &Family<RouteLabels, Counter>, route: &str) {
        family
            .get_or_create(&RouteLabels {
                route: route.into(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// Known methods by name; anything else is "other" (bounded cardinality).
fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
