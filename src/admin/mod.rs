//! The admin listener: health, readiness, metrics, key inspection and
//! resolution, reload (SPEC.md sections 7 and 9). Mutating calls need the
//! bearer token; without a configured token they are refused (403).

use std::sync::Arc;

mod keys;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::json;

use crate::body::{self, ProxyBody};
use crate::metrics::{StoreLabels, UpstreamLabels};
use crate::problem::{Code, Problem};
use crate::proxy::{Proxy, Reloaded};
use crate::upstream::breaker::State as CircuitState;

pub struct Admin {
    pub proxy: Arc<Proxy>,
    /// The file `POST /reload` re-reads (none when started without one).
    pub config_path: Option<std::path::PathBuf>,
}

/// Whether `Accept` prefers OpenMetrics to the classic text format. Each
/// format is weighed by the most specific range that names it (RFC 9110
/// 12.5.1: `application/openmetrics-text`, then `application/*`, then
/// `*/*`; `text/plain`, `text/*`, `*/*`), parameter names in any case; on
/// a tie, or with no `Accept`, the classic text (curl's `*/*`). Prometheus
/// weighs OpenMetrics highest. Regressions (two audits): `q=0` and a list
/// preferring `text/plain` got OpenMetrics, and wildcards were not read.
fn wants_openmetrics(headers: &http::HeaderMap) -> bool {
    // (specificity, weight) of the most specific range naming each format.
    type Best = Option<(u8, f32)>;
    let (mut open, mut classic): (Best, Best) = (None, None);
    let ranges = (headers.get_all(header::ACCEPT).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for range in ranges {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, q)| q.trim().parse::<f32>().unwrap_or(1.0))
            .clamp(0.0, 1.0);
        let (names_open, names_classic) = match media.as_str() {
            "application/openmetrics-text" => (Some(2), None),
            "application/*" => (Some(1), None),
            "text/plain" => (None, Some(2)),
            "text/*" => (None, Some(1)),
            "*/*" => (Some(0), Some(0)),
            _ => (None, None),
        };
        for (named, best) in [(names_open, &mut open), (names_classic, &mut classic)] {
            if let Some(specificity) = named
                && best.is_none_or(|(s, w)| specificity > s || (specificity == s && q > w))
            {
                *best = Some((specificity, q));
            }
        }
    }
    let weight = |best: Best| best.map_or(0.0, |(_, q)| q);
    weight(open) > weight(classic)
}

impl Admin {
    /// One admin call; a call that changes something (or is refused its
    /// token) is logged with who asked (target `idemgate::admin`).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: std::net::SocketAddr,
    ) -> Response<ProxyBody> {
        let (parts, incoming) = request.into_parts();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        // Mutating calls need the token; a method an endpoint does not take
        // is a 405 whoever asks.
        let authorized = || self.authorize(&parts.headers);
        let result = match (&parts.method, path.as_str()) {
            // HEAD too: load balancers probe with it (hyper drops the body).
            (&Method::GET | &Method::HEAD, "/healthz") => Ok(text(StatusCode::OK, "ok\n")),
            (&Method::GET | &Method::HEAD, "/readyz") => self.readyz().await,
            (&Method::GET | &Method::HEAD, "/metrics") => Ok(self.metrics(&parts.headers)),
            (&Method::POST, "/reload") => match authorized() {
                Ok(()) => self.reload().await,
                Err(denied) => Err(denied),
            },
            (&Method::GET | &Method::HEAD, "/keys") => self.list(&query).await,
            (_, "/healthz" | "/readyz" | "/metrics" | "/keys") => Ok(wrong_method("GET, HEAD")),
            (_, "/reload") => Ok(wrong_method("POST")),
            // The method, then the token, then the request's own parts
            // (regression, found by an audit: a bad `scope` was a 400 before
            // a wrong method's 405 or a missing token's 401).
            // HEAD as GET (RFC 9110 9.1; regression, an audit: 405).
            (&Method::GET | &Method::HEAD | &Method::PUT | &Method::DELETE, p)
                if p.starts_with("/keys/") =>
            {
                let allowed = match parts.method {
                    Method::GET | Method::HEAD => Ok(()),
                    _ => authorized(),
                };
                let takes: &[&str] = match parts.method {
                    Method::DELETE => &["scope", "force"],
                    _ => &["scope"],
                };
                let params = only_params(&query, takes);
                match (allowed, params, key_path(p), scope(&query), force(&query)) {
                    (Err(problem), ..) | (_, Err(problem), ..) => Err(problem),
                    (.., None, _, _) => {
                        Err(Problem::new(Code::NotFound, "use /keys/{route}/{key}"))
                    }
                    (.., Err(problem), _) | (.., Err(problem)) => Err(problem),
                    (Ok(()), Ok(()), Some((route, key)), Ok(scope), Ok(force)) => {
                        match parts.method {
                            Method::GET | Method::HEAD => self.get(&route, &key, scope).await,
                            Method::DELETE => self.purge(&route, &key, scope, force).await,
                            _ => self.put(&route, &key, scope, incoming).await,
                        }
                    }
                }
            }
            (_, p) if p.starts_with("/keys/") => Ok(wrong_method("GET, HEAD, PUT, DELETE")),
            _ => Err(Problem::new(Code::NotFound, "no such admin endpoint")),
        };
        let response = result.unwrap_or_else(Problem::into_response);
        // An audit trail (regression, found by an audit: no admin call was
        // logged, refused tokens included). The path names the record; the
        // token is never logged.
        let status = response.status();
        let reads = matches!(parts.method, Method::GET | Method::HEAD);
        if !reads || matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            tracing::info!(
                target: "idemgate::admin",
                peer = %peer.ip(),
                method = %parts.method,
                path,
                query,
                status = status.as_u16(),
                "admin call"
            );
        }
        response
    }

    /// Bearer token, compared in constant time.
    fn authorize(&self, headers: &http::HeaderMap) -> Result<(), Problem> {
        // The running configuration's: a reload rotates the token.
        let routing = self.proxy.routing();
        let Some(token) = routing.config.admin.as_ref().and_then(|a| a.token.as_ref()) else {
            return Err(Problem::new(
                Code::Forbidden,
                "no admin.token is configured, so the admin API is read-only",
            ));
        };
        // The scheme is case-insensitive (RFC 9110 11.1): "bearer x" counts.
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(Problem::new(
                Code::Unauthorized,
                "send Authorization: Bearer <admin.token>",
            ))
        }
    }

    async fn readyz(&self) -> Result<Response<ProxyBody>, Problem> {
        if self.proxy.draining.is_cancelled() {
            return Err(Problem::new(
                Code::ShuttingDown,
                "draining in-flight requests; send new ones elsewhere",
            ));
        }
        let ready = self.proxy.store.ping().await;
        self.proxy.metrics.ready.set(i64::from(ready.is_ok()));
        match ready {
            Ok(()) => Ok(json_response(StatusCode::OK, &json!({ "status": "ready" }))),
            Err(error) => {
                tracing::warn!(error = %error, "not ready: store unreachable");
                Err(Problem::new(
                    Code::StoreUnavailable,
                    "the idempotency store is unreachable",
                ))
            }
        }
    }

    fn metrics(&self, headers: &http::HeaderMap) -> Response<ProxyBody> {
        let openmetrics = wants_openmetrics(headers);
        let routing = self.proxy.routing();
        // Read off the upstreams of the running configuration at each
        // scrape: an upstream a reload removed leaves no series behind (an
        // open circuit of a gone upstream would alert for good).
        let exposition = self.proxy.metrics.encode_after(|metrics| {
            metrics.in_flight.clear();
            metrics.circuit_state.clear();
            for upstream in &routing.upstreams {
                let labels = UpstreamLabels {
                    upstream: upstream.config.name.as_str().into(),
                };
                metrics
                    .in_flight
                    .get_or_create(&labels)
                    .set(upstream.in_flight() as i64);
                let state = match upstream.breaker.state() {
                    CircuitState::Closed { .. } => 0,
                    // Past `open_for` the next request is the probe: half-open,
                    // though no request has come to make it so (regression: 1,
                    // "open", for as long as no request came, alerting for good).
                    CircuitState::Open { until } if until > std::time::Instant::now() => 1,
                    CircuitState::Open { .. } | CircuitState::HalfOpen { .. } => 2,
                };
                metrics.circuit_state.get_or_create(&labels).set(state);
            }
            if let Some((held, bound)) = self.proxy.store.fill() {
                let memory = StoreLabels { store: "memory" };
                let as_gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                metrics
                    .store_records
                    .get_or_create(&memory)
                    .set(as_gauge(held));
                metrics
                    .store_max_records
                    .get_or_create(&memory)
                    .set(as_gauge(bound));
            }
        });
        // OpenMetrics when asked for (Prometheus asks), else the classic text.
        let (exposition, format) = if openmetrics {
            (
                exposition,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        } else {
            (
                crate::metrics::classic_text(&exposition),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        };
        let mut response = text(StatusCode::OK, exposition);
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format));
        // The format depends on it: caches must not serve one for the other.
        headers.insert(header::VARY, HeaderValue::from_static("accept"));
        response
    }

    async fn reload(&self) -> Result<Response<ProxyBody>, Problem> {
        let Some(path) = &self.config_path else {
            return Err(Problem::new(
                Code::BadRequest,
                "this instance was not started from a configuration file",
            ));
        };
        match self.proxy.reload_file(path).await {
            Ok(Reloaded::Applied) => {
                Ok(json_response(StatusCode::OK, &json!({ "reloaded": true })))
            }
            Ok(Reloaded::Overtaken) => Ok(json_response(
                StatusCode::OK,
                &json!({
                    "reloaded": true,
                    "overtaken": "a reload that began later read the file and was applied first; this one's older read was not"
                }),
            )),
            Err(errors) => {
                let list = errors;
                // Not always the file's fault: a read given up, or
                // overtaken by a newer reload (regression, an audit).
                Err(Problem::new(
                    Code::BadRequest,
                    "the configuration was not reloaded (see errors); the running one stays",
                )
                .with("errors", json!(list)))
            }
        }
    }
}

/// `/keys/{route}/{key}` with the key percent-decoded (it may contain `/`).
fn key_path(path: &str) -> Option<(String, String)> {
    let (route, key) = path.strip_prefix("/keys/")?.split_once('/')?;
    // Both decoded (regression, found by an audit: only the key was, and
    // `keys get --route my-orders`, which sends `my%2Dorders`, got a 404).
    let decode = |s| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .filter(|s| !s.is_empty())
    };
    let key = crate::idempotency::key::stored_form(&decode(key)?);
    Some((decode(route)?.into_owned(), key))
}

/// A call on records takes `names` only, each once, written `name=value`;
/// anything else is a `400` (regression, an audit: `?Scope=…`, a bare
/// `?scope` and a second `scope=` were ignored, and a DELETE then purged
/// every caller's record of the key, whose retries ran again).
fn only_params(query: &str, names: &[&str]) -> Result<(), Problem> {
    let mut seen = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((name, _)) if names.contains(&name) && !seen.contains(&name) => seen.push(name),
            _ => {
                let name: String = pair
                    .split('=')
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(40)
                    .collect();
                return Err(Problem::new(
                    Code::BadRequest,
                    format!(
                        "{name:?} is not a parameter of this call, or is given twice or without a value: it takes {}, each at most once, as name=value",
                        names.join(" and ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `?scope=HEX`, when given: 64 hex digits (any case), or a `400`.
fn scope(query: &str) -> Result<Option<String>, Problem> {
    param(query, "scope")
        .map(|text| crate::idempotency::key::parse_scope(&text))
        .transpose()
        .map_err(|why| Problem::new(Code::BadRequest, why))
}

/// `?force=true|false` (absent: false); anything else is a `400`, not
/// taken for false (noted by an audit).
fn force(query: &str) -> Result<bool, Problem> {
    match param(query, "force").as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(Problem::new(Code::BadRequest, "force is true or false")),
    }
}

fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // The length is not secret; the bytes are compared without an early exit.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

pub(super) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `405` for an endpoint that exists, naming the methods it takes.
fn wrong_method(allow: &'static str) -> Response<ProxyBody> {
    let detail = format!("this endpoint takes {allow}");
    let mut response = Problem::new(Code::MethodNotAllowed, detail).into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_and_params() {
        assert_eq!(
            key_path("/keys/orders/k1"),
            Some(("orders".into(), "k1".into()))
        );
        assert_eq!(
            key_path("/keys/orders/a%2Fb%20c"),
            Some(("orders".into(), "a/b c".into()))
        );
        assert_eq!(
            key_path("/keys/my%2Dorders/k1"),
            Some(("my-orders".into(), "k1".into()))
        );
        assert_eq!(key_path("/keys/orders/"), None);
        assert_eq!(key_path("/keys/orders"), None);
        assert_eq!(
            param("state=unknown&route=a%20b", "route").as_deref(),
            Some("a b")
        );
        assert_eq!(param("state=unknown", "scope"), None);
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"tokex"));
        assert!(!constant_time_eq(b"token", b"token2"));
        assert!(!constant_time_eq(b"", b"token"));
    }
}
