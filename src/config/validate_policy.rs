//! Validation of `idempotency` blocks: a route's settings merged over the
//! defaults field by field, then over the built-in defaults.

use std::time::Duration;

use http::{HeaderName, Method};
use serde_saphyr::Spanned;

use super::check::{Check, MAX_TTL, MAX_WAIT, quote};
use super::file::{IdempotencyFile, ScalarOr, Text};
use super::validate::{header_name, method};
use super::{Concurrent, OnUnknown, Policy, StatusPattern};

type Block = Spanned<ScalarOr<IdempotencyFile>>;

/// `Some(None)` is a valid `idempotency: off`; `None` means errors were recorded.
pub(super) fn build_policy(
    c: &mut Check,
    at: &str,
    route: Option<&Block>,
    defaults: Option<&Block>,
) -> Option<Option<Policy>> {
    let route_map = match route {
        Some(block) => match map_or_off(c, &format!("{at}.idempotency"), block)? {
            None => return Some(None),
            Some(map) => Some(map),
        },
        None => None,
    };
    let defaults_map = match defaults {
        Some(block) => match map_or_off(c, "defaults.idempotency", block)? {
            // Defaults off and the route silent: the route is off too.
            None if route_map.is_none() => return Some(None),
            other => other,
        },
        None => None,
    };
    let m = Merge {
        route: route_map,
        route_at: format!("{at}.idempotency"),
        defaults: defaults_map,
    };
    build(c, &m).map(Some)
}

/// `on` (YAML reads it as `true`) with no settings of its own.
static ON: std::sync::LazyLock<IdempotencyFile> = std::sync::LazyLock::new(Default::default);

fn map_or_off<'f>(
    c: &mut Check,
    path: &str,
    block: &'f Block,
) -> Option<Option<&'f IdempotencyFile>> {
    match &block.value {
        ScalarOr::Map(map) => Some(Some(map)),
        ScalarOr::Scalar(word) if word == "off" || word == "false" => Some(None),
        // The gate on, with the defaults (the built-in ones where the
        // defaults are off): what an operator means by `idempotency: on`.
        ScalarOr::Scalar(word) if word == "on" || word == "true" => Some(Some(&ON)),
        ScalarOr::Scalar(word) => {
            c.fail(
                path,
                Some(&block.referenced),
                format!("{word:?} is not allowed"),
                "write off to disable the gate, on to enable it with the defaults, or a mapping of idempotency settings",
            );
            None
        }
    }
}

/// Where each field comes from: the route first, then the defaults.
struct Merge<'f> {
    route: Option<&'f IdempotencyFile>,
    route_at: String,
    defaults: Option<&'f IdempotencyFile>,
}

impl<'f> Merge<'f> {
    /// The first source that sets the field, with that field's path.
    fn get<T>(
        &self,
        name: &str,
        field: impl Fn(&'f IdempotencyFile) -> Option<&'f T>,
    ) -> Option<(&'f T, String)> {
        if let Some(v) = self.route.and_then(&field) {
            return Some((v, format!("{}.{name}", self.route_at)));
        }
        self.defaults
            .and_then(&field)
            .map(|v| (v, format!("defaults.idempotency.{name}")))
    }
}

/// Headers whose values never reach a log (SPEC 7).
fn secret_header(name: &HeaderName) -> bool {
    use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION};
    [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE].contains(name)
}

fn build(c: &mut Check, m: &Merge) -> Option<Policy> {
    let duration =
        |c: &mut Check, name, field: fn(&IdempotencyFile) -> Option<&Text>, default, max| {
            m.get(name, field)
                .map_or(Some(default), |(v, p)| c.duration(&p, v, max))
        };
    let size = |c: &mut Check, name, field: fn(&IdempotencyFile) -> Option<&Text>| {
        m.get(name, field)
            .map_or(Some(1024 * 1024), |(v, p)| c.size(&p, v))
    };
    let methods = match m.get("methods", |f| f.methods.as_ref()) {
        None => Some(vec![Method::POST, Method::PATCH]),
        Some((list, p)) if list.is_empty() => {
            c.fail(
                &p,
                None,
                "methods is empty: the gate would protect no request",
                "list the methods to protect, such as [POST, PATCH], or write idempotency: off",
            );
            None
        }
        Some((list, p)) => list_of(c, &p, list, method),
    };
    let header = match m.get("header", |f| f.header.as_ref()) {
        None => Some(HeaderName::from_static("idempotency-key")),
        Some((v, p)) => header_name(c, &p, v),
    };
    let key_max_length = match m.get("key_max_length", |f| f.key_max_length.as_ref()) {
        None => Some(255),
        Some((v, p)) => c.count(&p, Some(v), 255, ""),
    };
    let concurrent = m.get("concurrent", |f| f.concurrent.as_ref()).map_or(
        Some(Concurrent::Reject),
        |(v, p)| {
            c.choice(
                &p,
                v,
                &[("reject", Concurrent::Reject), ("wait", Concurrent::Wait)],
            )
        },
    );
    let on_unknown =
        m.get("on_unknown", |f| f.on_unknown.as_ref())
            .map_or(Some(OnUnknown::Lock), |(v, p)| {
                c.choice(
                    &p,
                    v,
                    &[("lock", OnUnknown::Lock), ("release", OnUnknown::Release)],
                )
            });
    let fingerprint_headers = match m.get("fingerprint.headers", |f| {
        f.fingerprint.as_ref()?.headers.as_ref()
    }) {
        None => Some(vec![http::header::CONTENT_TYPE]),
        Some((list, p)) => list_of(c, &p, list, header_name),
    };
    let fingerprint_query = *m
        .get("fingerprint.query", |f| {
            f.fingerprint.as_ref()?.query.as_ref()
        })
        .map_or(&true, |(v, _)| v);
    let scope_headers = match m.get("scope.headers", |f| f.scope.as_ref()?.headers.as_ref()) {
        None => Some(vec![http::header::AUTHORIZATION]),
        Some((list, p)) => list_of(c, &p, list, header_name),
    };
    // The key is logged with every request; these headers' values never are.
    if let (Some(name), Some(scope)) = (&header, &scope_headers)
        && (secret_header(name) || scope.contains(name))
    {
        match m.get("header", |f| f.header.as_ref()) {
            Some((v, p)) => c.fail(
                &p,
                Some(&v.referenced),
                format!(
                    "{name} carries a credential or a scope: its value would be logged as the key"
                ),
                if scope.contains(name) {
                    // Not "such as Idempotency-Key" when that is the one refused.
                    "take it out of scope.headers, or name another header for the key"
                } else {
                    "name a header of its own for the key, such as Idempotency-Key"
                },
            ),
            // The default key header named as a scope header (regression:
            // accepted unless `header` was written out).
            None => {
                let (list, p) = m
                    .get("scope.headers", |f| f.scope.as_ref()?.headers.as_ref())
                    .expect("only a written scope list holds the key header");
                let i = scope.iter().position(|h| h == name).unwrap_or(0);
                c.fail(
                    &format!("{p}[{i}]"),
                    list.get(i).map(|v| &v.referenced),
                    format!(
                        "{name} is the key's header: a scope header's value is never logged, the key is with every request"
                    ),
                    "scope on another header (such as Authorization), or name the key's header with idempotency.header",
                );
            }
        }
    }
    let store_statuses = match m.get("store_statuses", |f| f.store_statuses.as_ref()) {
        None => Some(vec![StatusPattern::Class(2), StatusPattern::Class(4)]),
        Some((list, p)) => list_of(c, &p, list, status_pattern),
    };
    let release_statuses = match m.get("release_statuses", |f| f.release_statuses.as_ref()) {
        None => Some(vec![408, 425, 429]),
        Some((list, p)) => {
            let mut ok = true;
            for (i, s) in list.iter().enumerate() {
                if !(100..=599).contains(&s.value) {
                    c.fail(
                        &format!("{p}[{i}]"),
                        Some(&s.referenced),
                        format!("{} is not an HTTP status", s.value),
                        "write a status between 100 and 599",
                    );
                    ok = false;
                }
            }
            ok.then(|| list.iter().map(|s| s.value).collect())
        }
    };
    // Any ttl goes with any lease: an in-flight record outlives its lease
    // by the ttl (`store`), so it cannot expire while its attempt runs.
    let ttl = duration(
        c,
        "ttl",
        |f| f.ttl.as_ref(),
        Duration::from_secs(24 * 3600),
        MAX_TTL,
    );
    let lease = duration(
        c,
        "lease",
        |f| f.lease.as_ref(),
        Duration::from_secs(60),
        MAX_WAIT,
    );
    // A store list that keeps nothing: empty, or inside `release_statuses`
    // (regressions, an audit and its verification: `[]` and `[429]` were
    // accepted, and every retry ran again).
    if let (Some(store), Some(release)) = (&store_statuses, &release_statuses)
        && !(100..=599).any(|s| store.iter().any(|p| p.matches(s)) && !release.contains(&s))
    {
        // Placed at the list's first entry (regression, an audit: no line
        // for `[429]`); an empty list has no place of its own.
        let (field, at) = (m.get("store_statuses", |f| f.store_statuses.as_ref()))
            .map(|(list, p)| (p, list.first().map(|v| &v.referenced)))
            .or_else(|| {
                m.get("release_statuses", |f| f.release_statuses.as_ref())
                    .map(|(list, p)| (p, list.first().map(|v| &v.referenced)))
            })
            .unwrap_or_default();
        c.fail(
            &field,
            at,
            "store_statuses keeps no status (it is empty, or all it names is in release_statuses): no answer would be kept, and every retry would run again",
            "list the statuses to keep, such as [\"2xx\", \"4xx\"], and not in release_statuses; or write idempotency: off",
        );
    }
    let max_request_body = size(c, "max_request_body", |f| f.max_request_body.as_ref());
    let max_response_body = size(c, "max_response_body", |f| f.max_response_body.as_ref());
    Some(Policy {
        methods: methods?,
        header: header?,
        require_key: *m
            .get("require_key", |f| f.require_key.as_ref())
            .map_or(&true, |(v, _)| v),
        key_max_length: key_max_length?,
        ttl: ttl?,
        lease: lease?,
        concurrent: concurrent?,
        fingerprint_headers: fingerprint_headers?,
        fingerprint_query,
        scope_headers: scope_headers?,
        store_statuses: store_statuses?,
        release_statuses: release_statuses?,
        on_unknown: on_unknown?,
        max_request_body: max_request_body?,
        max_response_body: max_response_body?,
    })
}

fn list_of<T>(
    c: &mut Check,
    path: &str,
    list: &[Text],
    parse: fn(&mut Check, &str, &Text) -> Option<T>,
) -> Option<Vec<T>> {
    let parsed: Vec<Option<T>> = list
        .iter()
        .enumerate()
        .map(|(i, v)| parse(c, &format!("{path}[{i}]"), v))
        .collect();
    parsed.into_iter().collect()
}

fn status_pattern(c: &mut Check, path: &str, value: &Text) -> Option<StatusPattern> {
    let text = c.text(path, value)?.to_ascii_lowercase();
    let pattern = match text.as_bytes() {
        [d @ b'1'..=b'5', b'x', b'x'] => Some(StatusPattern::Class(u16::from(d - b'0'))),
        _ => text
            .parse::<u16>()
            .ok()
            .filter(|s| (100..=599).contains(s))
            .map(StatusPattern::Exact),
    };
    if pattern.is_none() {
        c.fail(
            path,
            Some(&value.referenced),
            format!("{} is not a status or class", quote(value)),
            "write a class such as \"2xx\" or a status such as 201",
        );
    }
    pattern
}
