//! Request paths made normal before routing, so that a route cannot be
//! side-stepped by writing its path another way.
//!
//! `/api/reports/../orders`, `/api/%6Frders` and `//api/orders` all reach an
//! upstream that normalises paths as `/api/orders`; matched as sent, they
//! would miss the `/api/orders` route (and its idempotency gate). The proxy
//! matches and forwards the normal form (RFC 3986 6.2.2): escapes of
//! unreserved characters decoded, `.` and `..` segments removed, runs of `/`
//! merged (as nginx does by default). Other escapes (`%2F`, `%20`, …) stay
//! as they are.

use http::Uri;
use http::uri::PathAndQuery;

/// The URI with its path made normal, or `None` when it already is (almost
/// every request: a scan, no allocation) or when no valid URI results.
pub fn normalized(uri: &Uri) -> Option<Uri> {
    let path = uri.path();
    if !path.starts_with('/') || !needs_work(path) {
        return None;
    }
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

/// `%XX` of A–Z, a–z, 0–9, `-`, `.`, `_`, `~` decoded; every other byte kept.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok())
            .filter(|b| b.is_ascii_alphanumeric() || b"-._~".contains(b));
        match escaped {
            Some(b) => {
                out.push(b);
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
    fn an_absolute_uri_keeps_its_authority() {
        let uri: Uri = "http://example.com:8080/a/../b?q".parse().unwrap();
        let got = normalized(&uri).unwrap();
        assert_eq!(got.to_string(), "http://example.com:8080/b?q");
    }
}
