//! Prometheus metrics of one running instance (prometheus-client, no global
//! registry). Labels are route, upstream, method and store operation names
//! only, never paths or keys, so cardinality stays bounded.

use std::sync::{Arc, OnceLock};

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
pub struct StoreLabels {
    pub store: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
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
    pub superseded: Family<RouteLabels, Counter>,
    pub send_timeouts: Counter,
    pub refused_heads: Family<ReasonLabels, Counter>,
    /// The memory store's records and bound (no series on Redis).
    pub store_records: Family<StoreLabels, Gauge>,
    pub store_max_records: Family<StoreLabels, Gauge>,
    pub ready: Gauge,
    /// 1 while a Redis node may evict records (read on the store's pings).
    pub store_evicting: Gauge,
    /// One scrape at a time: a scrape rebuilds the upstream gauges before
    /// encoding ([`encode_after`](Self::encode_after)).
    scrape: std::sync::Mutex<()>,
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
        let superseded = Family::default();
        let send_timeouts = Counter::default();
        let refused_heads = Family::default();
        let store_records = Family::default();
        let store_max_records = Family::default();
        let ready = Gauge::default();
        let store_evicting = Gauge::default();
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
            "superseded_attempts",
            "Outcomes delivered but not recorded: the key had been claimed again (lease ended under on_unknown: release, or the record lost or purged), so the request may have run twice; or the store did not take the record in 20 background tries, so a retry may run it again",
            superseded.clone(),
        );
        registry.register(
            "send_timeouts",
            "Client connections cut off because they took nothing of an answer for send_timeout",
            send_timeouts.clone(),
        );
        registry.register(
            "refused_heads",
            "HTTP/1 request heads refused before routing, by reason: malformed (a bare 400) or too_large (431: over 64 KiB or 100 fields); no access line is written for them",
            refused_heads.clone(),
        );
        registry.register(
            "store_records",
            "Records the memory store holds (store=\"memory\"; none on Redis)",
            store_records.clone(),
        );
        registry.register(
            "store_max_records",
            "The memory store's bound, store.max_records: beyond it new keys are a store failure",
            store_max_records.clone(),
        );
        registry.register(
            "ready",
            "1 when the store is reachable and a configuration is loaded",
            ready.clone(),
        );
        registry.register(
            "store_evicting",
            "1 while a Redis node may evict records (maxmemory with a policy other than noeviction): a retry of an evicted key runs again",
            store_evicting.clone(),
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
            superseded,
            send_timeouts,
            refused_heads,
            store_records,
            store_max_records,
            ready,
            store_evicting,
            scrape: std::sync::Mutex::new(()),
        }
    }

    /// Counts a request that matched no route (route label empty); routed
    /// requests are counted through their [`RouteMetrics`].
    pub fn unrouted(&self, method: &http::Method, outcome: &'static str, status: u16) {
        static NO_ROUTE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "".into());
        self.request(&NO_ROUTE, method_label(method), outcome);
        self.responses
            .get_or_create(&ResponseLabels {
                route: NO_ROUTE.clone(),
                class: CLASSES[class_index(status)],
            })
            .inc();
    }

    fn request(&self, route: &Arc<str>, method: &'static str, outcome: &'static str) {
        self.request_counter(route, method, outcome).inc();
    }

    fn request_counter(
        &self,
        route: &Arc<str>,
        method: &'static str,
        outcome: &'static str,
    ) -> Counter {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.clone(),
                method,
                outcome,
            })
            .clone()
    }

    /// A protected route's alerting counters, at 0 from the start: a series
    /// that first appears at 1 is a step `increase()` cannot see, so the
    /// dashboard's panels showed 0 for a route's first unknown outcome.
    pub fn open_protected_route(&self, route: &str) {
        let labels = RouteLabels {
            route: route.into(),
        };
        for family in [
            &self.unknown_outcomes,
            &self.fail_open_forwards,
            &self.superseded,
        ] {
            let _ = family.get_or_create(&labels);
        }
    }

    pub fn route_counter(family: &Family<RouteLabels, Counter>, route: &str) {
        family
            .get_or_create(&RouteLabels {
                route: route.into(),
            })
            .inc();
    }

    /// The exposition after `refresh` (which sets the gauges read off at
    /// scrape time), both under one lock: concurrent scrapes (an HA pair of
    /// Prometheus servers) each saw the other's cleared families, and
    /// series went missing (regression).
    pub fn encode_after(&self, refresh: impl FnOnce(&Metrics)) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        refresh(self);
        self.encode()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// The exposition in the classic Prometheus text format (0.0.4), from the
/// OpenMetrics one `encode` writes: for scrapers that ask for it, or for
/// no format (regression, an audit: a classic-text reader took every
/// counter for untyped, its `# TYPE idemgate_requests counter` naming no
/// sample). A counter's HELP and TYPE name its `_total` samples; `# UNIT`
/// and `# EOF` lines are OpenMetrics' own. Samples are written alike.
pub fn classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 1024);
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let counter = line.strip_prefix("# HELP ").and_then(|rest| {
            let name = rest.split(' ').next()?;
            let typed = lines.peek()?.strip_prefix("# TYPE ")?;
            (typed == format!("{name} counter")).then_some(name)
        });
        match counter {
            Some(name) => {
                let help = &line["# HELP ".len() + name.len()..];
                out.push_str(&format!(
                    "# HELP {name}_total{help}\n# TYPE {name}_total counter\n"
                ));
                lines.next();
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The request outcomes of SPEC.md section 7, in the order of
/// [`RouteMetrics`]' handles.
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
/// Method labels, in [`method_index`] order; anything else is "other".
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One route's series, each looked up in its family once (on first use,
/// so that no zero series appear) and then counted directly: a family
/// lookup hashes the labels under a lock, three times per request.
pub struct RouteMetrics {
    route: Arc<str>,
    upstream: Arc<str>,
    metrics: Arc<Metrics>,
    requests: [[OnceLock<Counter>; OUTCOMES.len()]; METHODS.len()],
    responses: [OnceLock<Counter>; CLASSES.len()],
    upstream_latency: OnceLock<Histogram>,
}

impl RouteMetrics {
    pub fn new(metrics: &Arc<Metrics>, route: Arc<str>, upstream: Arc<str>) -> RouteMetrics {
        RouteMetrics {
            route,
            upstream,
            metrics: metrics.clone(),
            requests: Default::default(),
            responses: Default::default(),
            upstream_latency: OnceLock::new(),
        }
    }

    /// Counts a request, its response's status class and, when it went
    /// upstream, the upstream's latency.
    pub fn count(
        &self,
        method: &http::Method,
        outcome: &'static str,
        status: u16,
        upstream_time: Option<std::time::Duration>,
    ) {
        let m = method_index(method);
        let counter = match OUTCOMES.iter().position(|o| *o == outcome) {
            Some(o) => self.requests[m][o].get_or_init(|| {
                self.metrics
                    .request_counter(&self.route, METHODS[m], outcome)
            }),
            None => &self
                .metrics
                .request_counter(&self.route, METHODS[m], outcome),
        };
        counter.inc();
        let class = class_index(status);
        self.responses[class]
            .get_or_init(|| {
                self.metrics
                    .responses
                    .get_or_create(&ResponseLabels {
                        route: self.route.clone(),
                        class: CLASSES[class],
                    })
                    .clone()
            })
            .inc();
        if let Some(time) = upstream_time {
            self.observe_upstream(time);
        }
    }

    /// The upstream's latency for one exchange of this route: counted with
    /// the request, or by the exchange when its client no longer waits
    /// for it (a 504 or a disconnect; `Exchange::run`).
    pub fn observe_upstream(&self, time: std::time::Duration) {
        self.upstream_latency
            .get_or_init(|| {
                self.metrics
                    .upstream_latency
                    .get_or_create(&UpstreamLabels {
                        upstream: self.upstream.clone(),
                    })
                    .clone()
            })
            .observe(time.as_secs_f64());
    }
}

/// `1xx` .. `5xx` as an index into [`CLASSES`].
fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Known methods by name; anything else is "other" (bounded cardinality).
fn method_label(method: &http::Method) -> &'static str {
    METHODS[method_index(method)]
}

/// The method's index into [`METHODS`].
fn method_index(method: &http::Method) -> usize {
    use http::Method;
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::PATCH => 3,
        Method::DELETE => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        // A `patch` is gated as a `PATCH` (`route::has_method`): counted so too.
        _ => METHODS[..7]
            .iter()
            .position(|m| m.eq_ignore_ascii_case(method.as_str()))
            .unwrap_or(7),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_by_their_samples_and_drops_openmetrics_lines() {
        let metrics = Metrics::new();
        metrics.send_timeouts.inc();
        metrics.ready.set(1);
        let upstream = UpstreamLabels {
            upstream: "erp".into(),
        };
        metrics
            .upstream_latency
            .get_or_create(&upstream)
            .observe(0.01);
        let openmetrics = metrics.encode();
        assert!(openmetrics.contains("# TYPE idemgate_send_timeouts counter"));
        assert!(openmetrics.ends_with("# EOF\n"));
        let classic = classic_text(&openmetrics);
        assert!(
            classic.contains("# HELP idemgate_send_timeouts_total Client connections"),
            "{classic}"
        );
        assert!(
            classic.contains(
                "# TYPE idemgate_send_timeouts_total counter\nidemgate_send_timeouts_total 1\n"
            ),
            "{classic}"
        );
        assert!(
            classic.contains("# TYPE idemgate_ready gauge\nidemgate_ready 1\n"),
            "{classic}"
        );
        assert!(
            classic.contains("# TYPE idemgate_upstream_latency_seconds histogram"),
            "{classic}"
        );
        assert!(
            !classic.contains("# EOF") && !classic.contains("# UNIT"),
            "{classic}"
        );
        // Every sample line is kept as it was.
        let samples = |text: &str| {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(samples(&classic), samples(&openmetrics));
    }
}
