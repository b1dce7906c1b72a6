//! Validation of a route's `match` block.

use super::check::{Check, authority_ok, quote};
use super::file::{MatchFile, Text};
use super::validate::method;
use super::{PathMatch, RouteMatch};

/// `name`: the route's, whose line an error of the block as a whole gives.
pub(super) fn build_match(
    c: &mut Check,
    at: &str,
    m: &MatchFile,
    name: &Text,
) -> Option<RouteMatch> {
    let path = match (&m.path_prefix, &m.path) {
        (Some(prefix), None) => {
            let field = format!("{at}.match.path_prefix");
            // "/api/orders/" and "/api/orders" match the same segments.
            let text = route_path(c, &field, prefix)?;
            PathMatch::Prefix(text.trim_end_matches('/').to_owned())
        }
        (None, Some(exact)) => {
            let field = format!("{at}.match.path");
            PathMatch::Exact(route_path(c, &field, exact)?)
        }
        _ => {
            // Where the two are, or the route (regression, an audit: no line).
            let line = m.path.as_ref().map_or(&name.referenced, |p| &p.referenced);
            c.fail(
                &format!("{at}.match"),
                Some(line),
                "a match needs exactly one of path_prefix and path",
                "write match: { path_prefix: /api/orders } or match: { path: /exact }",
            );
            return None;
        }
    };
    let methods = match &m.methods {
        None => None,
        Some(list) if list.is_empty() => {
            c.fail(
                &format!("{at}.match.methods"),
                None,
                "methods is empty: no request would match the route",
                "list the methods, such as [POST, PUT], or leave methods out for every method",
            );
            return None;
        }
        Some(list) => {
            let parsed: Vec<_> = list
                .iter()
                .enumerate()
                .map(|(i, v)| method(c, &format!("{at}.match.methods[{i}]"), v))
                .collect();
            Some(parsed.into_iter().collect::<Option<Vec<_>>>()?)
        }
    };
    let host = match &m.host {
        None => None,
        Some(h) => Some(route_host(c, &format!("{at}.match.host"), h)?),
    };
    Some(RouteMatch {
        path,
        methods,
        host,
    })
}

/// A configured host as requests' hosts are compared with it: a name or an
/// address, with a port where the route is for that port only, lower case,
/// without a fully qualified name's final dot. Anything else (a scheme, a
/// path, a wildcard, a port out of range) could never match a request, and
/// a protected route's traffic would go to a later route, unprotected.
fn route_host(c: &mut Check, field: &str, value: &Text) -> Option<String> {
    let mut text = c.text(field, value)?.to_ascii_lowercase();
    let valid = text
        .parse::<http::uri::Authority>()
        .is_ok_and(|a| authority_ok(&a) && !a.as_str().contains(['@', '*']));
    if !valid {
        c.fail(
            field,
            Some(&value.referenced),
            format!("{} is not a host a request could name", quote(value)),
            "write a host name or address, with a port only if the route is for that port, such as api.example.com or 10.0.0.5:8443 (no scheme, path or wildcard)",
        );
        return None;
    }
    crate::route::strip_root_dot(&mut text);
    Some(text)
}

/// A configured path as requests are matched against it: absolute, a
/// valid path without a query, and in the normal form requests are put in
/// (`path::normalized`, `path::for_routing`). Any other could never match a request, and a
/// protected route's traffic would go to a later route, unprotected.
fn route_path(c: &mut Check, field: &str, value: &Text) -> Option<String> {
    let text = c.text(field, value)?;
    let fail = |c: &mut Check, message: String, hint: String| {
        c.fail(field, Some(&value.referenced), message, hint);
        None
    };
    if !text.starts_with('/') {
        let message = format!("{} does not start with /", quote(value));
        return fail(
            c,
            message,
            "write an absolute path such as /api/orders".into(),
        );
    }
    let Ok(uri) = text.parse::<http::Uri>() else {
        let message = format!("{} is not a valid URL path", quote(value));
        let hint = "percent-encode spaces and other characters a URL path cannot hold";
        return fail(c, message, hint.into());
    };
    if uri.query().is_some() || text.contains('#') {
        let message = format!("{} holds a query or fragment", quote(value));
        let hint = "match on the path alone: requests are matched without their query";
        return fail(c, message, hint.into());
    }
    if let Some(normal) = crate::path::normalized(&uri) {
        let message = format!(
            "{} is not in the normal form requests are matched in (escapes of unreserved characters decoded, other escapes in upper case, . and .. removed, // merged), so no request would match it",
            quote(value)
        );
        // Written as it will be routed: an encoded slash as `/` too.
        let write = crate::path::for_routing(normal.path()).into_owned();
        return fail(c, message, format!("write {write}"));
    }
    let routed = crate::path::for_routing(&text);
    if routed != text {
        // Said as what it holds (regression, a verification audit: a path
        // parameter was called an encoded slash).
        let what = if text.contains(';') {
            "path parameters (;...), which requests are routed without"
        } else {
            "an encoded slash (%2F or %5C), which requests are routed as /"
        };
        let message = format!(
            "{} holds {what}, so no request would match it",
            quote(value)
        );
        return fail(c, message, format!("write {routed}"));
    }
    Some(text)
}
