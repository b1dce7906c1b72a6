//! The route table: first match wins, in file order.

use std::sync::Arc;

use http::Method;

use crate::config::{PathMatch, Route, RouteMatch};

/// Routes in file order.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(routes: &[Route]) -> RouteTable {
        RouteTable {
            routes: routes.iter().cloned().map(Arc::new).collect(),
        }
    }

    /// The first route matching the request. `host` is the request's Host
    /// (or `:authority`) as sent, port included.
    pub fn find(&self, method: &Method, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.find_index(method, host, path).map(|i| &self.routes[i])
    }

    /// [`find`](Self::find) as the route's index in file order.
    pub fn find_index(&self, method: &Method, host: Option<&str>, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|route| matches(&route.matcher, method, host, path))
    }

    /// The route at `index` in file order.
    pub fn get(&self, index: usize) -> &Arc<Route> {
        &self.routes[index]
    }
}

fn matches(m: &RouteMatch, method: &Method, host: Option<&str>, path: &str) -> bool {
    let path_ok = match &m.path {
        PathMatch::Exact(exact) => path == exact,
        // A prefix matches on a segment boundary: /api/orders matches
        // /api/orders and /api/orders/7, never /api/ordersX.
        PathMatch::Prefix(prefix) => path_under(prefix, path),
    };
    path_ok
        && m.methods.as_ref().is_none_or(|ms| has_method(ms, method))
        && m.host.as_ref().is_none_or(|want| host_matches(want, host))
}

/// Whether every request `later` matches is matched by `earlier` too: a
/// route after it could then never be taken (first match wins).
pub fn covers(earlier: &RouteMatch, later: &RouteMatch) -> bool {
    let path = match (&earlier.path, &later.path) {
        (PathMatch::Exact(e), PathMatch::Exact(l)) => e == l,
        (PathMatch::Exact(_), PathMatch::Prefix(_)) => false,
        (PathMatch::Prefix(e), PathMatch::Exact(l) | PathMatch::Prefix(l)) => path_under(e, l),
    };
    let methods = match (&earlier.methods, &later.methods) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(e), Some(l)) => l.iter().all(|m| has_method(e, m)),
    };
    let host = match (&earlier.host, &later.host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(e), Some(l)) if has_port(e) => e == l,
        (Some(e), Some(l)) => strip_port(l) == e,
    };
    path && methods && host
}

/// Whether `path` is matched by the prefix `prefix` (on a segment boundary).
fn path_under(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

/// Whether `method` is one of `methods`, in any case: methods are
/// case-sensitive (RFC 9110 9.1), but many upstreams upper-case them before
/// routing (Django, Flask), and `fetch()` sends `patch` as written, so a
/// `patch` must not side-step a route or gate that names `PATCH`.
pub fn has_method(methods: &[Method], method: &Method) -> bool {
    methods.contains(method)
        // Lists are upper case (the configuration's are upper-cased when
        // read): only a method with a lower-case letter can differ from one
        // in case alone, so the walk is skipped for the rest (S1 -0.6%
        // instructions: it ran twice on every request).
        || (method.as_str().bytes().any(|b| b.is_ascii_lowercase())
            && methods
                .iter()
                .any(|m| m.as_str().eq_ignore_ascii_case(method.as_str())))
}

/// Case-insensitive; the request's port is ignored unless the route names
/// one; `example.com.` (a fully qualified name, RFC 1034 3.1) is
/// `example.com`.
fn host_matches(want: &str, host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let mut host = host.to_ascii_lowercase();
    strip_root_dot(&mut host);
    if has_port(want) {
        return host == want;
    }
    strip_port(&host) == want
}

/// `example.com.` (with its port, if any) made `example.com`.
pub fn strip_root_dot(host: &mut String) {
    let name_end = if has_port(host) {
        host.rfind(':').unwrap_or(host.len())
    } else {
        host.len()
    };
    if name_end > 1 && host.as_bytes()[name_end - 1] == b'.' {
        host.remove(name_end - 1);
    }
}

fn has_port(host: &str) -> bool {
    match host.rfind(':') {
        // An IPv6 literal without a port ends with ']'.
        Some(i) => !host[i..].contains(']') && (!host.starts_with('[') || host[..i].ends_with(']')),
        None => false,
    }
}

fn strip_port(host: &str) -> &str {
    if has_port(host) {
        &host[..host.rfind(':').unwrap_or(host.len())]
    } else {
        host
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const CONFIG: &str = r#"
upstreams:
  erp: { url: "http://127.0.0.1:9000" }
routes:
  - { name: exact, match: { path: /exact }, upstream: erp }
  - { name: hosted, match: { path_prefix: /h, host: Example.COM }, upstream: erp }
  - { name: hosted-port, match: { path_prefix: /p, host: "example.com:8443" }, upstream: erp }
  - { name: post-only, match: { path_prefix: /api/orders, methods: [post] }, upstream: erp }
  - { name: orders, match: { path_prefix: /api/orders/ }, upstream: erp }
  - { name: root, match: { path_prefix: / }, upstream: erp }
"#;

    #[test]
    fn first_match_wins_table() {
        let config = Config::parse(CONFIG).expect("valid");
        let table = RouteTable::new(&config.routes);
        let cases: &[(&str, Option<&str>, &str, &str)] = &[
            ("GET", None, "/exact", "exact"),
            ("GET", None, "/exact/more", "root"),
            ("GET", None, "/exactly", "root"),
            ("GET", Some("example.com"), "/h/x", "hosted"),
            ("GET", Some("EXAMPLE.com:8080"), "/h", "hosted"),
            ("GET", Some("example.com."), "/h/x", "hosted"),
            ("GET", Some("Example.com.:8443"), "/p", "hosted-port"),
            ("GET", Some("other.com"), "/h", "root"),
            ("GET", None, "/h", "root"),
            ("GET", Some("example.com:8443"), "/p", "hosted-port"),
            ("GET", Some("example.com"), "/p", "root"),
            ("POST", None, "/api/orders", "post-only"),
            ("POST", None, "/api/orders/7", "post-only"),
            ("POST", None, "/api/ordersX", "root"),
            ("GET", None, "/api/orders", "orders"),
            ("GET", None, "/api/orders/7/lines", "orders"),
            ("GET", None, "/api/ordersX", "root"),
            ("GET", None, "/", "root"),
        ];
        for (method, host, path, want) in cases {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let got = table.find(&method, *host, path).map(|r| &*r.name);
            assert_eq!(got, Some(*want), "{method} {host:?} {path}");
        }
    }

    #[test]
    fn no_match_is_none() {
        let config = Config::parse(
            "upstreams: { erp: { url: \"http://127.0.0.1:1\" } }\nroutes:\n  - { name: a, match: { path_prefix: /a }, upstream: erp }\n",
        )
        .expect("valid");
        let table = RouteTable::new(&config.routes);
        assert!(table.find(&Method::GET, None, "/b").is_none());
        assert!(table.find(&Method::GET, None, "/ab").is_none());
    }
}
