//! File structs → validated `Config`: `${VAR}`, units, references, defaults
//! merged field by field, and every error of the file collected at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use serde_saphyr::Spanned;

use super::check::{Check, ConfigError, ConfigErrors, MAX_WAIT, quote};
use super::file::*;
use super::*;

const DEFAULT_RESPONSE: Duration = Duration::from_secs(10);
const DEFAULT_TOTAL: Duration = Duration::from_secs(30);

pub fn validate(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    // The parser's errors give the place; the path of the field being read
    // when it stopped comes from `serde_path_to_error`.
    let path = std::cell::RefCell::new(String::new());
    let file: FileConfig = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            *path.borrow_mut() = e.path().to_string();
            e.into_inner()
        })
    })
    .map_err(|e| parse_error(e, &path.into_inner(), text))?;
    let mut c = Check::new(env);
    for (path, at) in super::empty::empty_values(text) {
        c.fail(
            &path,
            Some(&at),
            "no value: a field written empty is not taken as its default",
            "write the value, or remove the line to take the default (config.example.yaml shows each)",
        );
    }
    let config = build(&mut c, &file, &super::file::upstream_name_places(text));
    let mut errors = c.errors;
    // Defaults are merged into every route, so one bad default would be
    // reported once per route: keep the first of each.
    let mut seen = Vec::new();
    errors.retain(|e| {
        let key = (e.path.clone(), e.message.clone());
        let new = !seen.contains(&key);
        seen.push(key);
        new
    });
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ => Err(ConfigErrors(errors)),
    }
}

/// A YAML syntax or shape error (unknown field, wrong type): the parser
/// stops at the first. `path` is the field it was reading (`.` for none).
fn parse_error(error: serde_saphyr::Error, path: &str, text: &str) -> ConfigErrors {
    let location = error.location();
    // `${VAR}` is expanded in string values only (an audit: "not a whole
    // number" for a `max_in_flight: "${N}"`, with no word of why).
    let reference = location.as_ref().is_some_and(|at| {
        let line = text.lines().nth((at.line() as usize).saturating_sub(1));
        line.is_some_and(|l| l.contains("${"))
    });
    let said = error.to_string();
    let first = said.lines().next().unwrap_or("invalid YAML").trim();
    // The parser's own prefix repeats the position we report separately.
    let message = match first.strip_prefix("error: ") {
        Some(rest) if rest.starts_with("line ") => rest.split_once(": ").map_or(rest, |(_, m)| m),
        Some(rest) => rest,
        None => first,
    }
    .to_owned();
    // Advice meant for Rust programmers, not for the file's author.
    let message = [
        "; use Option<",
        ", set DuplicateKeyPolicy",
        "; use from_str_multiple",
    ]
    .iter()
    .fold(message, |m, cut| {
        m.split(cut).next().unwrap_or_default().to_owned()
    });
    // A Rust type name is not the file author's word for a number.
    let message = match message.as_str() {
        "invalid u8" | "invalid u16" | "invalid u32" | "invalid u64" | "invalid usize" => {
            "not a whole number of 0 or more".to_owned()
        }
        _ => message,
    };
    // `Spanned` fields read as `{ value, span }`: not the file's own path.
    // `?` is a key the parser had not read yet.
    let path: Vec<&str> = path
        .split('.')
        .filter(|s| !matches!(*s, "" | "value" | "?"))
        .collect();
    let path = path.join(".");
    // The fix in the file's words, for the shape that was expected
    // (regression, an audit: "fix the YAML at this place" for a `maybe`
    // where true or false goes, a status list hinted "such as 64").
    let status = message.starts_with("not a whole number") && path.contains("_statuses[");
    let message = match status {
        // 70000 is a whole number, too large for a status.
        true => "not an HTTP status".to_owned(),
        false => message,
    };
    let number_or_flag =
        message.starts_with("not a whole number") || message.starts_with("invalid boolean");
    let hint = if reference && number_or_flag {
        "${VAR} is replaced in string values only (durations, sizes, addresses, URLs, names): write the number or true/false itself here"
    } else if status {
        "write an HTTP status, a whole number between 100 and 599, such as 408"
    } else if message.starts_with("not a whole number") {
        "write a whole number such as 64 (no sign, no unit)"
    } else if message.starts_with("invalid boolean") {
        "write true or false"
    } else if message.starts_with("expected sequence") {
        "write a list here: [A, B] on the field's line, or one \"- item\" line per entry below it"
    } else if message.starts_with("expected mapping") {
        "write a mapping here: { key: value, ... } on the field's line, or \"key: value\" lines indented below it"
    } else if message.contains("unknown field") {
        "remove the field or fix its spelling (the \"Every field\" table of README.md lists them)"
    } else if message.starts_with("duplicate mapping key") {
        "write each key once in a mapping"
    } else if message.starts_with("multiple YAML documents") {
        "keep one document: the configuration is one mapping, without a second ---"
    } else {
        "fix the YAML at this place (see config.example.yaml)"
    };
    ConfigErrors::one(ConfigError::new(&path, location.as_ref(), message, hint))
}

fn build(
    c: &mut Check,
    file: &FileConfig,
    names_at: &std::collections::BTreeMap<String, serde_saphyr::Location>,
) -> Option<Config> {
    let listen = match &file.listen {
        None => Some(Listen {
            address: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tls: None,
        }),
        Some(listen) => build_listen(c, listen),
    };
    let admin = file.admin.as_ref().and_then(|admin| {
        let address = address(c, "admin.listen", &admin.listen)?;
        if let Some(listen) = &listen
            && overlap(listen.address, address)
        {
            c.fail(
                "admin.listen",
                Some(&admin.listen.referenced),
                format!("{} is the proxy's own listen address", quote(&admin.listen)),
                "give the admin listener another port, such as 127.0.0.1:9090",
            );
            return None;
        }
        let token = match &admin.token {
            Some(t) => Some(c.text("admin.token", t)?).filter(|t| !t.is_empty()),
            None => None,
        };
        // Never quoted: it is a secret (regression, found by an audit: a
        // Kubernetes secret's trailing newline was taken in, and no bearer
        // header could carry it: every mutating call got 401).
        if let (Some(t), Some(written)) = (&token, &admin.token)
            && !t.bytes().all(|b| b.is_ascii_graphic())
        {
            c.fail(
                "admin.token",
                Some(&written.referenced),
                "holds whitespace, a control character or a non-ASCII one (a secret file's trailing newline?), which no bearer header can carry",
                "remove it: e.g. create the secret with --from-literal, or strip the file's final newline",
            );
            return None;
        }
        Some(Admin {
            listen: address,
            token,
        })
    });
    let store = build_store(c, file.store.as_ref());
    let shutdown_grace = match &file.shutdown_grace {
        Some(d) => c.duration("shutdown_grace", d, MAX_WAIT),
        None => Some(Duration::from_secs(30)),
    };
    let send_timeout = match &file.send_timeout {
        Some(d) => c.duration("send_timeout", d, MAX_WAIT),
        None => Some(crate::send_timer::SEND_STALL),
    };
    let upstreams: Vec<_> = (file.upstreams.iter())
        .filter_map(|(name, u)| {
            super::validate_upstream::build_upstream(c, name, names_at.get(name), u)
        })
        .collect();
    if file.routes.is_empty() {
        c.fail(
            "routes",
            None,
            "no routes are configured",
            "add at least one route with a name, a match and an upstream",
        );
    }
    let defaults = file.defaults.as_ref();
    // Each default checked on its own too: one that no route inherits yet
    // (regression: accepted) would fail the edit or reload that adds one,
    // on a line nobody touched. Errors merged into routes are kept once.
    if let Some(d) = defaults {
        let _ = timeouts(c, "defaults", None, d.timeouts.as_ref());
        let _ = super::validate_policy::build_policy(c, "defaults", None, d.idempotency.as_ref());
    }
    let mut routes = Vec::new();
    let mut warnings = Vec::new();
    // Compared as expanded (regression: `orders` and `${NAME}` set to
    // `orders` were two routes of one name, sharing store keys and metrics).
    let names: Vec<Option<String>> = (file.routes.iter().enumerate())
        .map(|(i, r)| c.text(&format!("routes[{i}].name"), &r.name))
        .collect();
    for (i, route) in file.routes.iter().enumerate() {
        if let Some(name) = &names[i]
            && names[..i].iter().flatten().any(|n| n == name)
        {
            c.fail(
                &format!("routes[{i}].name"),
                Some(&route.name.referenced),
                format!("route name {:?} is used twice", route.name.value),
                "give every route its own name",
            );
        }
        if let Some(built) = build_route(c, i, route, defaults, &file.upstreams) {
            // First match wins: a route behind one that takes all of its
            // requests is never taken (a protected route behind a
            // pass-through prefix: its requests go unprotected).
            if let Some(first) = routes
                .iter()
                .find(|r: &&Route| crate::route::covers(&r.matcher, &built.matcher))
            {
                // At the match's path (the verification audit: the name's line).
                let paths = route
                    .matcher
                    .path_prefix
                    .as_ref()
                    .or(route.matcher.path.as_ref());
                c.fail(
                    &format!("routes[{i}].match"),
                    Some(paths.map_or(&route.name.referenced, |p| &p.referenced)),
                    format!(
                        "route {:?} can never be taken: route {:?}, before it, matches every request it would (the first match wins)",
                        built.name, first.name
                    ),
                    "move the narrower route above the broader one, or remove it",
                );
            }
            let route = built;
            if let Some(policy) = &route.idempotency
                && policy.lease < route.timeouts.total
            {
                warnings.push(format!(
                    "routes[{i}] ({}): lease {:?} is shorter than timeouts.total {:?}; \
                     a slow attempt may be declared unknown while the client still waits",
                    route.name, policy.lease, route.timeouts.total
                ));
            }
            if let Some(policy) = &route.idempotency {
                warnings.extend(
                    policy_warnings(policy).map(|w| format!("routes[{i}] ({}): {w}", route.name)),
                );
            }
            if let Some(methods) = &route.matcher.methods {
                warnings.extend(
                    unregistered_methods("match.methods", methods)
                        .map(|w| format!("routes[{i}] ({}): {w}", route.name)),
                );
            }
            if route.timeouts.response > route.timeouts.total {
                warnings.push(format!(
                    "routes[{i}] ({}): timeouts.response {:?} is longer than timeouts.total {:?}; \
                     the total ends first, so the response timeout never applies",
                    route.name, route.timeouts.response, route.timeouts.total
                ));
            }
            if let Some(u) = upstreams.iter().find(|u| *u.name == *route.upstream)
                && u.connect_timeout >= route.timeouts.total
            {
                warnings.push(format!(
                    "routes[{i}] ({}): upstreams.{}.connect_timeout {:?} is not shorter than timeouts.total {:?}; \
                     a client can get its 504 while the connection is still being made (its request then goes out, or its key is released, only after)",
                    route.name, u.name, u.connect_timeout, route.timeouts.total
                ));
            }
            routes.push(route);
        }
    }
    let store = store?;
    if store.backend != Backend::Memory
        && file.store.as_ref().is_some_and(|s| s.max_records.is_some())
    {
        warnings.push(
            "store.max_records bounds the memory store only: Redis is bounded by its own maxmemory (leave max_records out)"
                .to_owned(),
        );
    }
    if matches!(store.backend, Backend::Cluster { .. })
        && let Some(tag) = hash_tag(&store.key_prefix)
    {
        warnings.push(format!(
            "store.key_prefix holds the hash tag {{{tag}}}: on a Redis Cluster every record would be in one slot, on one master (remove the braces)"
        ));
    }
    if store.backend != Backend::Memory {
        warnings.extend(routes.iter().enumerate().filter_map(|(i, r)| {
            let policy = r.idempotency.as_ref()?;
            large_for_redis(policy.max_response_body, store.op_timeout)
                .map(|why| format!("routes[{i}] ({}): {why}", r.name))
        }));
    }
    let token_written = file.admin.as_ref().is_some_and(|a| a.token.is_some());
    let token_read = admin.as_ref().is_some_and(|a| a.token.is_some());
    if token_written && !token_read && admin.is_some() {
        warnings.push(
            "admin.token is empty (a ${VAR} that expanded to nothing?): the admin API is read-only, mutating calls get 403"
                .to_owned(),
        );
    }
    let tls_store = match &store.backend {
        Backend::Memory => false,
        Backend::Redis { url } => url.starts_with("rediss://"),
        Backend::Cluster { urls } => urls.iter().any(|u| u.starts_with("rediss://")),
    };
    if store.tls.is_some() && !tls_store {
        warnings.push(
            "store.tls is set but no store URL is rediss://: it is ignored (it applies to rediss:// URLs)"
                .to_owned(),
        );
    }
    // Certificates this process shows: the listener's, upstreams' and the
    // store's client ones (the store's missed: regression, an audit).
    let now = std::time::SystemTime::now();
    let reloaded = (listen.as_ref().and_then(|l| l.tls.as_ref()))
        .map(|t| t.cert_file.as_path())
        .into_iter()
        .chain(
            (upstreams.iter())
                // An `http://` upstream's TLS files are not used.
                .filter(|u| u.scheme == http::uri::Scheme::HTTPS)
                .filter_map(|u| u.tls.as_ref()?.client_cert_file.as_deref()),
        );
    // The store's are read once, at startup.
    let restarted = (store.tls.as_ref())
        .filter(|_| tls_store)
        .and_then(|t| t.client_cert_file.as_deref());
    let shown = (reloaded.map(|path| (path, "reload")))
        .chain(restarted.map(|path| (path, "restart idemgate")));
    warnings.extend(shown.filter_map(|(path, apply)| crate::tls::expiry_warning(path, now, apply)));
    for u in upstreams.iter().filter(|u| u.tls.is_some()) {
        if u.scheme == http::uri::Scheme::HTTP {
            warnings.push(format!(
                "upstreams.{}.tls is set but its url is http://: it is ignored (write https:// to use TLS)",
                u.name
            ));
        }
    }
    Some(Config {
        listen: listen?,
        admin,
        store,
        upstreams,
        routes,
        shutdown_grace: shutdown_grace?,
        send_timeout: send_timeout?,
        warnings,
    })
}

/// Whether two listeners would want the same port (port 0 picks a free
/// one: never a clash).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn address(c: &mut Check, path: &str, value: &Text) -> Option<SocketAddr> {
    let text = c.text(path, value)?;
    match text.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            c.fail(
                path,
                Some(&value.referenced),
                format!("{} is not an address", quote(value)),
                "write ip:port, such as 0.0.0.0:8080 or 127.0.0.1:9090",
            );
            None
        }
    }
}

fn build_listen(c: &mut Check, listen: &Spanned<ScalarOr<ListenFile>>) -> Option<Listen> {
    match &listen.value {
        ScalarOr::Scalar(text) => {
            let spanned = Spanned::new(text.clone(), listen.referenced, listen.defined);
            Some(Listen {
                address: address(c, "listen", &spanned)?,
                tls: None,
            })
        }
        ScalarOr::Map(map) => {
            let address = address(c, "listen.address", &map.address);
            let tls = match &map.tls {
                None => None,
                Some(tls) => {
                    let files = TlsFiles {
                        cert_file: PathBuf::from(c.text("listen.tls.cert_file", &tls.cert_file)?),
                        key_file: PathBuf::from(c.text("listen.tls.key_file", &tls.key_file)?),
                    };
                    // Each file read on its own first, so that both are
                    // reported when both are bad (regression, an audit: the
                    // key's trouble showed only once the certificate was
                    // fixed), as an upstream's are; then built together.
                    let unreadable: Vec<_> = [
                        crate::tls::load_certs(&files.cert_file).err(),
                        crate::tls::load_key(&files.key_file).err(),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    let built = (unreadable.is_empty())
                        .then(|| crate::tls::server_config(&files).err())
                        .flatten();
                    for error in unreadable.into_iter().chain(built) {
                        let fields = [
                            (
                                "cert_file",
                                Some(&tls.cert_file),
                                Some(files.cert_file.as_path()),
                            ),
                            (
                                "key_file",
                                Some(&tls.key_file),
                                Some(files.key_file.as_path()),
                            ),
                        ];
                        super::validate_upstream::tls_failure(c, "listen.tls", &error, &fields);
                    }
                    Some(files)
                }
            };
            Some(Listen {
                address: address?,
                tls,
            })
        }
    }
}

fn build_store(c: &mut Check, store: Option<&StoreFile>) -> Option<StoreConfig> {
    let Some(store) = store else {
        return Some(StoreConfig {
            backend: Backend::Memory,
            key_prefix: "idemgate:".into(),
            op_timeout: Duration::from_millis(250),
            on_unavailable: OnUnavailable::Reject,
            max_records: 1_000_000,
            tls: None,
        });
    };
    let kind = match &store.backend {
        Some(b) => c.choice("store.backend", b, &[("memory", false), ("redis", true)])?,
        None => false,
    };
    let backend = if !kind {
        // A Redis address with the memory store is a forgotten `backend:`
        // line: running without the shared store would let duplicates that
        // reach different instances through.
        let url = store
            .url
            .as_ref()
            .map(|u| ("store.url", Some(&u.referenced)));
        let cluster = store
            .cluster
            .as_ref()
            .map(|urls| ("store.cluster", urls.first().map(|u| &u.referenced)));
        if let Some((field, at)) = url.or(cluster) {
            let (message, hint) = match &store.backend {
                None => (
                    format!(
                        "{field} is set but store.backend is not, so the memory store would run"
                    ),
                    "add backend: redis to the store block (or remove the Redis address for the memory store)",
                ),
                Some(_) => (
                    format!("backend memory does not use {field}"),
                    "write backend: redis to use Redis, or remove the Redis address",
                ),
            };
            c.fail(field, at, message, hint);
            None
        } else {
            Some(Backend::Memory)
        }
    } else {
        match (&store.url, &store.cluster) {
            (Some(url), None) => redis_url(c, "store.url", url).map(|url| Backend::Redis { url }),
            (None, Some(urls)) if !urls.is_empty() => {
                let urls: Vec<_> = urls
                    .iter()
                    .enumerate()
                    .map(|(i, url)| cluster_url(c, &format!("store.cluster[{i}]"), url))
                    .collect();
                let urls: Option<Vec<String>> = urls.into_iter().collect();
                urls.and_then(|urls| cluster_urls(c, store, urls))
                    .map(|urls| Backend::Cluster { urls })
            }
            _ => {
                // At the backend's line (regression, an audit: no line).
                let line = store.backend.as_ref().map(|b| &b.referenced);
                c.fail(
                    "store",
                    line,
                    "backend redis needs exactly one of url and cluster",
                    "set store.url: redis://host:6379/0, or store.cluster: [redis://node:7000, ...]",
                );
                None
            }
        }
    };
    let key_prefix = match &store.key_prefix {
        Some(p) => c.text("store.key_prefix", p),
        None => Some("idemgate:".into()),
    };
    let op_timeout = match &store.op_timeout {
        Some(d) => c.duration("store.op_timeout", d, MAX_WAIT),
        None => Some(Duration::from_millis(250)),
    };
    let on_unavailable = match &store.on_unavailable {
        Some(v) => c.choice(
            "store.on_unavailable",
            v,
            &[
                ("reject", OnUnavailable::Reject),
                ("forward", OnUnavailable::Forward),
            ],
        ),
        None => Some(OnUnavailable::Reject),
    };
    let max_records = c.count(
        "store.max_records",
        store.max_records.as_ref(),
        1_000_000,
        "",
    );
    Some(StoreConfig {
        backend: backend?,
        key_prefix: key_prefix?,
        op_timeout: op_timeout?,
        on_unavailable: on_unavailable?,
        max_records: max_records?,
        tls: store
            .tls
            .as_ref()
            .map(|t| super::validate_upstream::tls_paths(c, "store", t)),
    })
}

/// A Redis URL as the store will parse it when it starts (`redis::Client::open`),
/// so that `check` fails on every URL that `serve` would refuse.
fn redis_url(c: &mut Check, path: &str, value: &Text) -> Option<String> {
    let url = c.text(path, value)?;
    let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
    // The redis crate parses `#insecure` and then refuses to connect: this
    // build does not skip certificate checks (and should not).
    if url.ends_with("#insecure") {
        c.fail(
            path,
            Some(&value.referenced),
            "#insecure (no certificate check) is not supported",
            "remove #insecure; for a private CA give its certificate in store.tls.ca_file",
        );
        return None;
    }
    if scheme_ok && redis::Client::open(url.as_str()).is_ok() {
        return Some(url);
    }
    // Never echo the value, nor the parser's words about it: either may
    // hold the password.
    c.fail(
        path,
        Some(&value.referenced),
        if scheme_ok {
            "not a valid Redis URL"
        } else {
            "not a Redis URL (the scheme must be redis:// or rediss://)"
        },
        "write redis://[user:password@]host:port/db with a numeric port and db, \
         or rediss:// for TLS; percent-encode special characters in the password",
    );
    None
}

/// The hash tag a key starting with `prefix` has, whatever follows: the
/// text between its first `{` and the first `}` after it, when not empty
/// (Redis Cluster's rule). Records are keyed `<prefix>{<route>:<scope>:<key>}`
/// so that each has its own slot; a tag in the prefix put them all in one
/// (regression, an audit: accepted silently).
fn hash_tag(prefix: &str) -> Option<&str> {
    let open = prefix.find('{')?;
    let close = prefix[open + 1..].find('}')?;
    Some(&prefix[open + 1..open + 1 + close]).filter(|tag| !tag.is_empty())
}

/// One seed of a cluster: a Redis URL, of database 0 (every seed's error
/// is reported, a bad port beside a database: an audit).
fn cluster_url(c: &mut Check, path: &str, url: &Spanned<String>) -> Option<String> {
    // A cluster has database 0 only: `SELECT` is refused, and every call
    // failed (regression, an audit: `check` said valid).
    use redis::IntoConnectionInfo;
    let parsed = redis_url(c, path, url)?;
    let db = (parsed.as_str().into_connection_info()).map_or(0, |i| i.redis_settings().db());
    if db != 0 {
        c.fail(
            path,
            Some(&url.referenced),
            "a Redis Cluster has database 0 only (it refuses SELECT)",
            "leave the database out of cluster URLs (redis://node:7000), or write /0",
        );
        return None;
    }
    Some(parsed)
}

/// The cluster's URLs as a whole, as the cluster client checks them when it
/// is built (without connecting).
fn cluster_urls(c: &mut Check, store: &StoreFile, urls: Vec<String>) -> Option<Vec<String>> {
    use redis::IntoConnectionInfo;
    // The cluster client takes the first seed's credentials for every
    // node and accepts a later seed's different ones only when the first
    // has some: a first seed without a password beside one with it was
    // valid to `check`, and every call then failed with NOAUTH
    // (regression, the Redis deployments audit).
    let credentials = |url: &String| {
        url.as_str().into_connection_info().ok().map(|i| {
            let settings = i.redis_settings();
            let user = settings.username().map(str::to_owned);
            (user, settings.password().map(str::to_owned))
        })
    };
    let same_credentials = urls
        .windows(2)
        .all(|w| credentials(&w[0]) == credentials(&w[1]));
    if same_credentials && redis::cluster::ClusterClient::new(urls.clone()).is_ok() {
        return Some(urls);
    }
    let at = store
        .cluster
        .as_ref()
        .and_then(|u| u.first())
        .map(|u| &u.referenced);
    c.fail(
        "store.cluster",
        at,
        "these URLs do not make one Redis Cluster",
        "give every node the same scheme (all redis:// or all rediss://) and the same credentials",
    );
    None
}

/// Settings that are allowed but seldom what was meant (regressions, the
/// config audit: both were accepted without a word).
fn policy_warnings(policy: &Policy) -> impl Iterator<Item = String> {
    let empty_only = (policy.max_request_body == 0).then(|| {
        "max_request_body is 0: every protected request with a body gets 413 request_too_large"
            .to_owned()
    });
    let head = crate::server::MAX_HEADER_BYTES;
    let long_key = (policy.key_max_length > head).then(|| {
        format!(
            "key_max_length {} is more than a request head may hold ({} KiB): longer keys are refused as the head is, with 431",
            policy.key_max_length,
            head / 1024
        )
    });
    let unknown = unregistered_methods("idempotency.methods", &policy.methods);
    empty_only.into_iter().chain(long_key).chain(unknown)
}

/// The methods of IANA's HTTP method registry (RFC 9110, RFC 5789, WebDAV
/// and its extensions, and QUERY).
const REGISTERED_METHODS: &[&str] = &[
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "QUERY",
    "ACL",
    "BASELINE-CONTROL",
    "BIND",
    "CHECKIN",
    "CHECKOUT",
    "COPY",
    "LABEL",
    "LINK",
    "LOCK",
    "MERGE",
    "MKACTIVITY",
    "MKCALENDAR",
    "MKCOL",
    "MKREDIRECTREF",
    "MKWORKSPACE",
    "MOVE",
    "ORDERPATCH",
    "PRI",
    "PROPFIND",
    "PROPPATCH",
    "REBIND",
    "REPORT",
    "SEARCH",
    "UNBIND",
    "UNCHECKOUT",
    "UNLINK",
    "UNLOCK",
    "UPDATE",
    "UPDATEREDIRECTREF",
    "VERSION-CONTROL",
];

/// A method no registry knows is taken (an API may have its own), but
/// said: `[POTS, PATCH]` left POST unprotected without a word (an audit).
fn unregistered_methods(field: &str, methods: &[http::Method]) -> Option<String> {
    let unknown: Vec<&str> = (methods.iter())
        .map(http::Method::as_str)
        .filter(|m| !REGISTERED_METHODS.contains(m))
        .collect();
    (!unknown.is_empty()).then(|| {
        format!(
            "{field} names {}, no registered HTTP method (a misspelling?): requests are matched by the methods as written",
            unknown.join(", ")
        )
    })
}

/// A route's or an upstream's name: it goes into metrics labels, log lines,
/// store keys and `check`'s summary as it is.
pub(super) fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
}

fn build_route(
    c: &mut Check,
    i: usize,
    route: &RouteFile,
    defaults: Option<&RouteSettings>,
    upstreams: &std::collections::BTreeMap<String, UpstreamFile>,
) -> Option<Route> {
    let at = format!("routes[{i}]");
    let name = c.text(&format!("{at}.name"), &route.name);
    if let Some(name) = &name
        && !name_ok(name)
    {
        c.fail(
            &format!("{at}.name"),
            Some(&route.name.referenced),
            format!("route name {} is not allowed", quote(&route.name)),
            "use letters, digits, '-', '_' and '.' (the name appears in metrics and store keys)",
        );
    }
    let matcher = super::validate_match::build_match(c, &at, &route.matcher, &route.name);
    let upstream = c.text(&format!("{at}.upstream"), &route.upstream);
    if let Some(u) = &upstream
        && !upstreams.contains_key(u)
    {
        let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
        c.fail(
            &format!("{at}.upstream"),
            Some(&route.upstream.referenced),
            format!("upstream {} is not defined", quote(&route.upstream)),
            format!(
                "define it under upstreams, or use one of: {}",
                if known.is_empty() {
                    "(none defined)".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        );
    }
    let timeouts = timeouts(
        c,
        &at,
        route.timeouts.as_ref(),
        defaults.and_then(|d| d.timeouts.as_ref()),
    );
    let idempotency = super::validate_policy::build_policy(
        c,
        &at,
        route.idempotency.as_ref(),
        defaults.and_then(|d| d.idempotency.as_ref()),
    );
    Some(Route {
        name: name?.into(),
        matcher: matcher?,
        upstream: upstream?.into(),
        timeouts: timeouts?,
        idempotency: idempotency?.map(Arc::new),
    })
}

fn timeouts(
    c: &mut Check,
    at: &str,
    route: Option<&TimeoutsFile>,
    defaults: Option<&TimeoutsFile>,
) -> Option<Timeouts> {
    let mut field = |name: &str, get: fn(&TimeoutsFile) -> Option<&Text>, fallback| {
        if let Some(v) = route.and_then(get) {
            c.duration(&format!("{at}.timeouts.{name}"), v, MAX_WAIT)
        } else if let Some(v) = defaults.and_then(get) {
            c.duration(&format!("defaults.timeouts.{name}"), v, MAX_WAIT)
        } else {
            Some(fallback)
        }
    };
    let response = field("response", |t| t.response.as_ref(), DEFAULT_RESPONSE);
    let total = field("total", |t| t.total.as_ref(), DEFAULT_TOTAL);
    Some(Timeouts {
        response: response?,
        total: total?,
    })
}

pub(super) fn header_name(c: &mut Check, path: &str, value: &Text) -> Option<HeaderName> {
    let text = c.text(path, value)?;
    match HeaderName::from_bytes(text.trim().as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            c.fail(
                path,
                Some(&value.referenced),
                format!("{} is not a header name", quote(value)),
                "write a header name such as Idempotency-Key",
            );
            None
        }
    }
}

pub(super) fn method(c: &mut Check, path: &str, value: &Text) -> Option<Method> {
    let text = c.text(path, value)?.to_ascii_uppercase();
    match Method::from_bytes(text.as_bytes()) {
        Ok(m) => Some(m),
        Err(_) => {
            c.fail(
                path,
                Some(&value.referenced),
                format!("{} is not an HTTP method", quote(value)),
                "write a method such as POST or PATCH",
            );
            None
        }
    }
}

/// How fast, in bytes per second, a stored response can be counted on to
/// come back from Redis: a claim returns the record whole within one
/// `op_timeout` (loopback managed about 200 MB/s, a LAN less).
const REDIS_READ_RATE: f64 = 50e6;

/// Why a route's `max_response_body` is too large for Redis, if it is: a
/// stored response must come back within `op_timeout` on every replay
/// (regression: a 60 MB record made every duplicate's claim time out, so a
/// completed request was refused 503 until its ttl, or sent to the
/// upstream again under `on_unavailable: forward`; found by an audit).
fn large_for_redis(max_response_body: u64, op_timeout: Duration) -> Option<String> {
    let size = |bytes: u64| bytesize::ByteSize(bytes).display().iec().to_string();
    if max_response_body > 512 << 20 {
        return Some(format!(
            "max_response_body {} is more than Redis stores in one value (proto-max-bulk-len, 512 MiB by default): such a response cannot be recorded; lower it",
            size(max_response_body)
        ));
    }
    let readable = (op_timeout.as_secs_f64() * REDIS_READ_RATE) as u64;
    (max_response_body > readable).then(|| {
        format!(
            "max_response_body {} may not be read back from Redis within store.op_timeout {op_timeout:?} (about {} at 50 MB/s): a duplicate whose claim times out is answered per store.on_unavailable (forward: sent to the upstream again) and the record may not be written either; lower max_response_body or raise store.op_timeout",
            size(max_response_body),
            size(readable)
        )
    })
}
