//! Request paths made normal before routing, so that a route cannot be
//! side-stepped by writing its path another way.
//!
//! `/api/reports/../orders`, `/api/%6Frders` and `//api/orders` all reach an
//! upstream that normalises paths as `/api/orders`; matched as sent, they
//! would miss the `/api/orders` route (and its idempotency gate). The proxy
//! matches and forwards the normal form (RFC 3986 6.2.2): escapes of
//! unreserved characters decoded, other escapes (`%2F`, `%20`, …) kept with
//! their hex digits in upper case, `.` and `..` segments removed, runs of
//! `/` merged (as nginx does by default). A path that upstreams may read
//! as another one whatever idemgate routes it as is refused ([`ambiguous`]).

use std::borrow::Cow;

use http::Uri;
use http::uri::PathAndQuery;

/// The URI with its path made normal, or `None` when it already is (almost
/// every request: a scan, no allocation) or when no valid URI results.
pub fn normalized(uri: &Uri) -> Option<Uri> {
    let path = uri.path();
    if !path.starts_with('/') || !needs_work(path) {
        return None;
    }
    let mut normal = normal_path(path);
    if let Some(query) = uri.query() {
        normal.push('?');
        normal.push_str(query);
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() == normal) {
        return None;
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(normal).ok()?);
    Uri::from_parts(parts).ok()
}

/// The path that routes are matched against: the normal path (already made
/// so by [`normalized`]), with encoded slashes and backslashes (`%2F`,
/// `%5C`) taken as `/`, as upstreams that decode the path before routing
/// on it see it (WSGI's `PATH_INFO`: Django, Flask): `/api/orders%2F7` and
/// `/api%2Forders/7` take the `/api/orders` route. Forwarded unchanged.
///
/// Path parameters (`;` to the end of a segment) are left out too, as
/// servlet containers (Tomcat, Jetty) and Spring read a path:
/// `/api/orders;jsessionid=1` and `/api;x/orders` take the `/api/orders`
/// route (regression, found by an audit: they took a pass-through route,
/// and a servlet upstream acted on them as `/api/orders`, unprotected).
pub fn for_routing(path: &str) -> Cow<'_, str> {
    let encoded_slash = |w: &[u8]| w[0] == b'%' && matches!(&w[1..], b"2F" | b"2f" | b"5C" | b"5c");
    let slashes = path.contains('%') && path.as_bytes().windows(3).any(encoded_slash);
    let params = path.contains(';');
    if !slashes && !params {
        return Cow::Borrowed(path);
    }
    let path = if slashes {
        Cow::Owned(normal_path(&for_routing_raw(path)))
    } else {
        Cow::Borrowed(path)
    };
    if !params {
        return path;
    }
    let mut bare = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            bare.push('/');
        }
        bare.push_str(segment.split(';').next().unwrap_or(""));
    }
    // A segment that was all parameters leaves an empty one: merged.
    Cow::Owned(normal_path(&bare))
}

/// Why a path in normal form would be read by some upstreams as another
/// path than the one it is routed as, if it would; such a path is refused
/// (400), since routing it either way could side-step a route's gate
/// (regressions, found by an audit: `/api/reports/..\orders` was routed as
/// a pass-through `reports` path and taken by a Node upstream for
/// `/api/orders`; `/api/orders%2F..%2Freports` was routed as `/api/reports`
/// and taken by a WSGI upstream for an `/api/orders/...` path). No client
/// of an API writes these.
pub fn ambiguous(path: &str) -> Option<&'static str> {
    let bytes = path.as_bytes();
    if bytes.contains(&b'\\') {
        return Some("a raw backslash, which some servers take for a slash (send it as %5C)");
    }
    let dot = |segment: &str| matches!(segment, "." | "..");
    if bytes.contains(&b';')
        && path
            .split('/')
            .any(|s| s.contains(';') && dot(s.split(';').next().unwrap_or("")))
    {
        return Some(
            "a dot segment with parameters (`..;`), which servlet containers resolve as `..`",
        );
    }
    if bytes.contains(&b'%') {
        let slashed = for_routing_raw(path);
        if slashed.split('/').any(dot) {
            return Some(
                "a `.` or `..` segment beside an encoded slash (%2F, %5C), which servers that decode the slash resolve differently",
            );
        }
    }
    None
}

/// Why a path as sent would be read by some upstreams as another path than
/// its normal form, if it would: a `%` that starts no escape. Normal form
/// decodes once, so `%%36%66rders` became `%6frders`, which was routed as
/// such and read as `orders` by upstreams that decode the path (regression,
/// an audit: a protected route's POSTs passed through a catch-all route
/// unprotected, three runs of one key). Asked of the path as sent.
pub fn malformed(path: &str) -> Option<&'static str> {
    let bytes = path.as_bytes();
    let stray = |i: usize| bytes[i] == b'%' && escape_at(bytes, i).is_none();
    (bytes.contains(&b'%') && (0..bytes.len()).any(stray))
        .then_some("a `%` that starts no escape (send a literal % as %25)")
}

/// The two hex digits of the escape `%XX` at `i`, if one starts there.
fn escape_at(bytes: &[u8], i: usize) -> Option<&[u8]> {
    (bytes[i] == b'%')
        .then(|| bytes.get(i + 1..i + 3))
        .flatten()
        .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
}

/// `%2F` and `%5C` (either case) as `/`, nothing else changed.
fn for_routing_raw(path: &str) -> String {
    path.replace("%2F", "/")
        .replace("%2f", "/")
        .replace("%5C", "/")
        .replace("%5c", "/")
}

/// An absolute path in normal form: unreserved escapes decoded, `.` and
/// `..` segments resolved, empty segments dropped.
fn normal_path(path: &str) -> String {
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    // "/a/b/", "/a/b/." and "/a/b/c/.." name a directory: keep its slash.
    let last = decoded.rsplit('/').next().unwrap_or("");
    if normal.is_empty() || matches!(last, "" | "." | "..") {
        normal.push('/');
    }
    normal
}

/// Whether the path may have an escape, a `.`/`..` segment or an empty
/// segment: a `%`, or a `/` followed by `/` or `.` (`/.well-known` too, which
/// then turns out normal). One pass over the bytes.
fn needs_work(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'%' || (b == b'/' && matches!(bytes.get(i + 1), Some(b'/' | b'.'))))
}

/// `%XX` of A–Z, a–z, 0–9, `-`, `.`, `_`, `~` decoded, the hex digits of
/// every other escape in upper case (RFC 3986 6.2.2.1: `%c3%a9` and `%C3%A9`
/// are one path, and a route written one way was side-stepped by a request
/// written the other); every other byte kept. A query's escapes mean what
/// they mean in a path: the fingerprint reads the query this way.
pub fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match escape_at(bytes, i) {
            Some(hex) => {
                let byte = u8::from_str_radix(std::str::from_utf8(hex).expect("hex"), 16)
                    .expect("two hex digits");
                if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                    out.push(byte);
                } else {
                    out.push(b'%');
                    out.extend(hex.iter().map(u8::to_ascii_uppercase));
                }
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("ASCII replaced by ASCII in a UTF-8 path")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_made_normal_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("/api/orders", None),
            ("/api/orders/7?x=1", None),
            ("/", None),
            ("*", None),
            ("/api/reports/../orders", Some("/api/orders")),
            ("/api/./orders", Some("/api/orders")),
            ("/api/%6Frders?x=%2e", Some("/api/orders?x=%2e")),
            ("/api/%2e%2E/api/orders", Some("/api/orders")),
            ("//api//orders", Some("/api/orders")),
            ("/../../api/orders", Some("/api/orders")),
            ("/api/orders/", None),
            ("/.well-known/x", None),
            ("/a.b/c.", None),
            ("/api/orders/.", Some("/api/orders/")),
            ("/api/orders/x/..", Some("/api/orders/")),
            ("/..", Some("/")),
            ("/a%2Fb/%20c", None),
            ("/caf%c3%a9/x", Some("/caf%C3%A9/x")),
            ("/a%2fb?q=%2f", Some("/a%2Fb?q=%2f")),
            ("/a%2", None),
            ("/a%zz", None),
        ];
        for (sent, want) in cases {
            let uri: Uri = sent.parse().unwrap();
            let got = normalized(&uri);
            assert_eq!(
                got.as_ref().map(|u| u.path_and_query().unwrap().as_str()),
                *want,
                "{sent}"
            );
        }
    }

    #[test]
    fn encoded_slashes_route_as_slashes_table() {
        let cases: &[(&str, &str)] = &[
            ("/api/orders", "/api/orders"),
            ("/a%20b", "/a%20b"),
            ("/api/orders%2F7", "/api/orders/7"),
            ("/api%2forders/7", "/api/orders/7"),
            ("/api%5Corders", "/api/orders"),
            ("/x/..%2F..%2Fapi/orders", "/api/orders"),
            ("/api/orders%2F", "/api/orders/"),
            ("/a%2", "/a%2"),
            ("/api/orders;jsessionid=1", "/api/orders"),
            ("/api;x/orders", "/api/orders"),
            ("/api;x=1;y/orders/7;v", "/api/orders/7"),
            ("/api%2Forders;x", "/api/orders"),
            ("/a/b;/", "/a/b/"),
            ("/;x/api/orders", "/api/orders"),
        ];
        for (sent, want) in cases {
            assert_eq!(for_routing(sent), *want, "{sent}");
        }
    }

    #[test]
    fn paths_with_a_stray_percent_table() {
        let cases: &[(&str, bool)] = &[
            ("/api/orders", false),
            ("/api/%6Frders", false),
            ("/caf%c3%a9", false),
            ("/api/%%36%66rders", true),
            ("/api/reports/%%32%65%%32%65/orders", true),
            ("/a%2", true),
            ("/a%", true),
            ("/a%zz", true),
            ("/100%25", false),
        ];
        for (path, refused) in cases {
            assert_eq!(malformed(path).is_some(), *refused, "{path}");
        }
    }

    #[test]
    fn paths_read_differently_by_some_servers_table() {
        let cases: &[(&str, bool)] = &[
            ("/api/orders", false),
            ("/api/orders%2F7", false),
            ("/a;b/c", false),
            ("/a/b;v=1", false),
            ("/.well-known/x", false),
            ("/a/...;x", false),
            ("/api/reports/..\\orders", true),
            ("/api\\orders", true),
            ("/api/reports/..;/orders", true),
            ("/api/.;x/orders", true),
            ("/api/orders%2F..%2Freports", true),
            ("/api/orders%2F.%2Freports", true),
            ("/api/orders/..%5Creports", true),
            ("/api/orders%2F..x", false),
        ];
        for (path, refused) in cases {
            assert_eq!(ambiguous(path).is_some(), *refused, "{path}");
        }
    }

    #[test]
    fn an_absolute_uri_keeps_its_authority() {
        let uri: Uri = "http://example.com:8080/a/../b?q".parse().unwrap();
        let got = normalized(&uri).unwrap();
        assert_eq!(got.to_string(), "http://example.com:8080/b?q");
    }
}
