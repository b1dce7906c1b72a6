//! Validation of a route's `match` block.

use super::check::{Check, quote};
use super::file::MatchFile;
use super::validate::method;
use super::{PathMatch, RouteMatch};

pub(super) fn build_match(c: &mut Check, at: &str, m: &MatchFile) -> Option<RouteMatch> {
    let path = match (&m.path_prefix, &m.path) {
        (Some(prefix), None) => {
            let field = format!("{at}.match.path_prefix");
            let text = c.text(&field, prefix)?;
            if !text.starts_with('/') {
                c.fail(
                    &field,
                    Some(&prefix.referenced),
                    format!("{} does not start with /", quote(prefix)),
                    "write an absolute path such as /api/orders",
                );
                return None;
            }
            // "/api/orders/" and "/api/orders" match the same segments.
            let trimmed = text.trim_end_matches('/');
            PathMatch::Prefix(trimmed.to_owned())
        }
        (None, Some(exact)) => {
            let field = format!("{at}.match.path");
            let text = c.text(&field, exact)?;
            if !text.starts_with('/') {
                c.fail(
                    &field,
                    Some(&exact.referenced),
                    format!("{} does not start with /", quote(exact)),
                    "write an absolute path such as /api/orders",
                );
                return None;
            }
            PathMatch::Exact(text)
        }
        _ => {
            c.fail(
                &format!("{at}.match"),
                None,
                "a match needs exactly one of path_prefix and path",
                "write match: { path_prefix: /api/orders } or match: { path: /exact }",
            );
            return None;
        }
    };
    let methods = match &m.methods {
        None => None,
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
        Some(h) => Some(c.text(&format!("{at}.match.host"), h)?.to_ascii_lowercase()),
    };
    Some(RouteMatch {
        path,
        methods,
        host,
    })
}
