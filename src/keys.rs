//! `idemgate keys get|purge|unknown`: inspect and resolve records in the configured store.

use anyhow::{Context, bail};
use serde_json::json;

use crate::cli::{KeyArgs, KeysCommand, PurgeArgs};
use crate::config::{Backend, Config, OnUnknown};
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, SIZE_UNKNOWN, State};
use crate::store::{Listing, Resolved, Store};

/// What the command prints.
pub async fn run(command: KeysCommand) -> anyhow::Result<String> {
    let config_arg = match &command {
        KeysCommand::Get(args) | KeysCommand::Purge(PurgeArgs { key: args, .. }) => &args.config,
        KeysCommand::Unknown { config, .. } => config,
    };
    let config = Config::load(&config_arg.config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config_arg.config.display()))?;
    let value = if config.store.backend == Backend::Memory {
        via_admin(&config, &command).await?
    } else {
        direct(&config, &command).await?
    };
    Ok(match command {
        KeysCommand::Unknown { json: false, .. } => table(&value),
        KeysCommand::Purge(_) => format!("purged {} record(s)\n", value["purged"]),
        KeysCommand::Get(args) => {
            let record = one_record(value, &args.key)?;
            format!("{}\n", serde_json::to_string_pretty(&record)?)
        }
        KeysCommand::Unknown { .. } => format!("{}\n", serde_json::to_string_pretty(&value)?),
    })
}

/// The one record `keys get` prints (SPEC 1): a key held under several
/// scopes needs `--scope` (regression, an audit: a list was printed without
/// it, so `| jq .state` broke on every key).
fn one_record(value: serde_json::Value, key: &str) -> anyhow::Result<serde_json::Value> {
    let serde_json::Value::Array(mut list) = value else {
        return Ok(value);
    };
    match list.len() {
        1 => Ok(list.remove(0)),
        0 => bail!("no record of key {key:?}"),
        n => {
            let scopes: Vec<&str> = list.iter().filter_map(|r| r["scope"].as_str()).collect();
            bail!(
                "key {key:?} is held under {n} scopes (one per caller): name one with --scope ({})",
                scopes.join(", ")
            )
        }
    }
}

/// Redis: the store itself.
async fn direct(config: &Config, command: &KeysCommand) -> anyhow::Result<serde_json::Value> {
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let store = Store::open(&config.store, metrics).context("opening the store")?;
    // Says why Redis cannot be reached (refused, authentication, TLS)
    // rather than that the first operation timed out. A cluster's
    // connection may take a few `op_timeout`s to make (a seed that never
    // answers): asked again for up to 5 s.
    let cluster = matches!(config.store.backend, Backend::Cluster { .. });
    let start = std::time::Instant::now();
    loop {
        match store.ping().await {
            Err(crate::store::StoreError::Timeout | crate::store::StoreError::NoConnection)
                if cluster && start.elapsed() < std::time::Duration::from_secs(5) =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            result => break result.context("the store")?,
        }
    }
    Ok(match command {
        KeysCommand::Get(args) => json!(listing_json(&find(config, &store, args).await?, true)),
        KeysCommand::Purge(PurgeArgs { key: args, force }) => {
            let found = find(config, &store, args).await?;
            let purged = purge(&store, found.keys(), *force, false).await?;
            if let Some(refused) = purged.refused() {
                bail!("{refused}; or purge with --force");
            }
            json!({ "purged": purged.done })
        }
        KeysCommand::Unknown { route, .. } => {
            let now = store.now_ms().await?;
            let unknown = store
                .records(route.as_deref(), None, |k, r| is_unknown(config, k, r, now))
                .await?;
            // A misspelt route must not read as "no unknown outcomes".
            if let Some(route) = route.as_deref().filter(|_| unknown.is_empty())
                && let Some(why) = unlisted_route(config, &store, route).await?
            {
                bail!("{why}");
            }
            json!(listing_json(&unknown, true))
        }
    })
}

/// One line per unknown outcome, for a human.
fn table(list: &serde_json::Value) -> String {
    use std::fmt::Write;
    let rows = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        return "no unknown outcomes\n".into();
    }
    let mut out = format!(
        "{:<16} {:<40} {:<10} {:<24} scope\n",
        "route", "key", "state", "created_at"
    );
    for r in rows {
        let created = r["created_at"].as_u64().map(rfc3339).unwrap_or_default();
        let text = |f: &str| r[f].as_str().unwrap_or("").to_owned();
        let _ = writeln!(
            out,
            "{:<16} {:<40} {:<10} {:<24} {}",
            text("route"),
            text("key"),
            text("state"),
            created,
            text("scope")
        );
    }
    out
}

/// How long a `keys` command waits for the admin listener's whole answer.
const ADMIN_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// With `backend: memory` the records live in the serving process: ask its admin listener.
async fn via_admin(config: &Config, command: &KeysCommand) -> anyhow::Result<serde_json::Value> {
    let Some(admin) = &config.admin else {
        bail!(
            "store.backend is memory: the records live in the running idemgate; configure admin.listen to reach them"
        );
    };
    let encode = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let scope_query = |scope: &Option<String>| {
        scope
            .as_ref()
            .map_or(String::new(), |s| format!("?scope={}", encode(s)))
    };
    let record_path = |a: &KeyArgs| {
        format!(
            "/keys/{}/{}{}",
            encode(&a.route),
            encode(&a.key),
            scope_query(&a.scope)
        )
    };
    let (method, path) = match command {
        KeysCommand::Get(a) => ("GET", record_path(a)),
        KeysCommand::Purge(PurgeArgs { key: a, force }) => {
            let path = record_path(a);
            let force = match (force, path.contains('?')) {
                (false, _) => "",
                (true, true) => "&force=true",
                (true, false) => "?force=true",
            };
            ("DELETE", format!("{path}{force}"))
        }
        // Every unknown outcome: the memory store holds at most a million records.
        KeysCommand::Unknown { route, .. } => (
            "GET",
            format!(
                "/keys?state=unknown&limit=1000000{}",
                route
                    .as_ref()
                    .map_or(String::new(), |r| format!("&route={}", encode(r)))
            ),
        ),
    };
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", admin.listen));
    if let Some(token) = &admin.token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    // Bounded (regression: a stopped or hung process held the command forever).
    let call = async {
        let response = client
            .request(request)
            .await
            .with_context(|| format!("cannot reach the admin listener at {}", admin.listen))?;
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body()).await?;
        anyhow::Ok((status, body.to_bytes()))
    };
    let Ok(answer) = tokio::time::timeout(ADMIN_CALL_TIMEOUT, call).await else {
        // A purge already sent may still be done when the process resumes.
        let outcome = if method == "DELETE" {
            "; the purge may still be applied when it resumes: check with keys get"
        } else {
            ""
        };
        bail!(
            "the admin listener at {} did not answer within {} s (is the process stopped or overloaded?){outcome}",
            admin.listen,
            ADMIN_CALL_TIMEOUT.as_secs()
        );
    };
    let (status, body) = answer?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or(json!(String::from_utf8_lossy(&body)));
    if !status.is_success() {
        bail!(
            "admin answered {status}: {}",
            value["detail"].as_str().unwrap_or(&value.to_string())
        );
    }
    Ok(value)
}

/// Why a lookup by `route` found nothing, when the route is not configured
/// either: a misspelt name must not read as "nothing there". Records of a
/// route that a reload removed or renamed are still found, listed, purged
/// and resolved by its old name (regression: refused, an unknown outcome
/// of such a route could not be resolved at all).
pub fn no_such_route(config: &Config, route: &str) -> Option<String> {
    (!config.routes.iter().any(|r| *r.name == *route)).then(|| {
        format!("route {route:?} is not in the configuration, and the store holds no record under that name")
    })
}

/// Why a listing filtered by `route` that found nothing is a mistake: the
/// route is neither configured nor holds any record in the store (one a
/// reload removed, whose records the filter left out, lists as empty:
/// regression, a verification audit).
pub async fn unlisted_route(
    config: &Config,
    store: &Store,
    route: &str,
) -> Result<Option<String>, crate::store::StoreError> {
    let Some(why) = no_such_route(config, route) else {
        return Ok(None);
    };
    let held = store
        .records_up_to(Some(route), None, |_, _| true, 1)
        .await?;
    Ok(held.is_empty().then_some(why))
}

/// What purging the records of a key did.
pub struct Purged {
    pub done: usize,
    /// Records left alone: their attempt is still running.
    pub running: usize,
    /// The longest lease left of those, in ms.
    pub lease_left_ms: u64,
}

impl Purged {
    /// Why some records were left alone, when some were.
    pub fn refused(&self) -> Option<String> {
        (self.running > 0).then(|| {
            format!(
                "{} record(s) of this key belong to an attempt still running (its lease ends in {} s): a purge would let a retry run the request again beside it; {} other record(s) purged. Wait for the lease to end (the outcome is then unknown, and purging it is safe)",
                self.running,
                self.lease_left_ms.div_ceil(1000),
                self.done
            )
        })
    }
}

/// Purges the records at `keys`, those of attempts still running only
/// when `force`; each purged one is logged when `log` (the server's log:
/// the command's own output is its stdout).
pub async fn purge<'k>(
    store: &Store,
    keys: impl Iterator<Item = &'k StorageKey>,
    force: bool,
    log: bool,
) -> Result<Purged, crate::store::StoreError> {
    let mut purged = Purged {
        done: 0,
        running: 0,
        lease_left_ms: 0,
    };
    for k in keys {
        match store.purge(k, force).await? {
            Resolved::Done => {
                purged.done += 1;
                if log {
                    tracing::info!(route = %k.route, scope = %k.scope, key = %k.key, force, "record purged by an operator");
                }
            }
            Resolved::InFlight { lease_left_ms } => {
                purged.running += 1;
                purged.lease_left_ms = purged.lease_left_ms.max(lease_left_ms);
            }
            Resolved::Missing => {}
        }
    }
    Ok(purged)
}

async fn find(config: &Config, store: &Store, args: &KeyArgs) -> anyhow::Result<Listing> {
    let found = store
        .find(&args.route, &args.key, args.scope.as_deref())
        .await?;
    if found.is_empty() {
        if let Some(why) = no_such_route(config, &args.route) {
            bail!("{why}");
        }
        bail!("no record for key {:?} on route {:?}", args.key, args.route);
    }
    Ok(found)
}

/// Milliseconds since the epoch in RFC 3339, or as the number past the
/// year 9999, which RFC 3339 cannot write (regression, the panics audit:
/// a record crafted with such a `created_at` panicked `keys unknown`).
fn rfc3339(ms: u64) -> String {
    const YEAR_10000_MS: u64 = 253_402_300_800_000;
    if ms >= YEAR_10000_MS {
        return format!("{ms} ms");
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

/// `unknown`, or in flight past its lease on a route that locks such keys.
pub fn is_unknown(config: &Config, key: &StorageKey, record: &Record, now: u64) -> bool {
    match record.state {
        State::Unknown => true,
        State::InFlight => {
            let locks = config
                .routes
                .iter()
                .find(|r| *r.name == *key.route)
                .and_then(|r| r.idempotency.as_ref())
                .is_none_or(|p| p.on_unknown == OnUnknown::Lock);
            locks && record.lease_end_ms <= now
        }
        State::Completed => false,
    }
}

/// Response headers as a JSON object: a header sent once is a string, one
/// sent several times (`Set-Cookie`) an array of its values in order.
pub fn headers_json(headers: &http::HeaderMap) -> serde_json::Value {
    let text = |v: &http::HeaderValue| json!(String::from_utf8_lossy(v.as_bytes()));
    let object: serde_json::Map<_, _> = headers
        .keys()
        .map(|name| {
            let values: Vec<_> = headers.get_all(name).iter().map(text).collect();
            let value = match <[_; 1]>::try_from(values) {
                Ok([one]) => one,
                Err(many) => json!(many),
            };
            (name.as_str().to_owned(), value)
        })
        .collect();
    serde_json::Value::Object(object)
}

/// A record as the admin API and the CLI show it (SPEC.md section 9).
pub fn record_json(key: &StorageKey, record: &Record) -> serde_json::Value {
    let response = record.response.as_ref();
    json!({
        "route": key.route,
        "scope": key.scope,
        "key": key.key,
        "state": record.state.as_str(),
        "fingerprint": record.fingerprint,
        "status": response.map(|r| r.status),
        "headers": response.map(|r| headers_json(&r.headers)),
        // Unknown (null) for a body too large to store that had no Content-Length.
        "body_size": response.and_then(|r| (r.body_size != SIZE_UNKNOWN).then_some(r.body_size)),
        "body_stored": response.map(|r| r.body.is_some()),
        "created_at": record.created_ms,
        "lease_end_at": record.lease_end_ms,
        "expires_at": record.expires_ms,
    })
}

/// A damaged record as the admin API and the CLI show it: its key, the
/// state `damaged` and why; `DELETE /keys/...` (`keys purge`) removes it.
pub fn damaged_json(key: &StorageKey, why: &str) -> serde_json::Value {
    json!({
        "route": key.route,
        "scope": key.scope,
        "key": key.key,
        "state": "damaged",
        "detail": why,
    })
}

/// A listing's records, then (with `damaged`) its damaged records.
pub fn listing_json(listing: &Listing, damaged: bool) -> Vec<serde_json::Value> {
    let records = listing.found.iter().map(|(k, r)| record_json(k, r));
    let damaged = listing.damaged.iter().filter(|_| damaged);
    records
        .chain(damaged.map(|(k, why)| damaged_json(k, why)))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_past_the_year_9999_are_shown_as_numbers() {
        assert_eq!(super::rfc3339(1_000), "1970-01-01T00:00:01.000Z");
        assert_eq!(
            super::rfc3339(253_402_300_799_999),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(super::rfc3339(253_402_300_800_000), "253402300800000 ms");
        assert_eq!(super::rfc3339(u64::MAX), format!("{} ms", u64::MAX));
    }
}
