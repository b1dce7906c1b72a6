//! `idemgate keys get|purge|unknown`: inspect and resolve records in the configured store.

use anyhow::{Context, bail};
use serde_json::json;

use crate::cli::{ConfigArg, KeyArgs, KeysCommand};
use crate::config::{Backend, Config, OnUnknown};
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, State};
use crate::store::{Store, memory::now_ms};

pub async fn run(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Get(args) => {
            let (config, store) = open(&args.config)?;
            let found = find(&config, &store, &args).await?;
            if found.is_empty() {
                bail!("no record for key {:?} on route {:?}", args.key, args.route);
            }
            let list: Vec<_> = found.iter().map(|(k, r)| record_json(k, r)).collect();
            let out = if args.scope.is_some() {
                list[0].clone()
            } else {
                json!(list)
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        KeysCommand::Purge(args) => {
            let (config, store) = open(&args.config)?;
            let found = find(&config, &store, &args).await?;
            if found.is_empty() {
                bail!("no record for key {:?} on route {:?}", args.key, args.route);
            }
            for (key, _) in &found {
                store.purge(key).await?;
                println!(
                    "purged route={} scope={} key={}",
                    key.route, key.scope, key.key
                );
            }
        }
        KeysCommand::Unknown { config: arg, route } => {
            let (config, store) = open(&arg)?;
            let now = now_ms();
            let mut list = Vec::new();
            for (key, record) in store.records(route.as_deref()).await? {
                if is_unknown(&config, &key, &record, now) {
                    list.push(record_json(&key, &record));
                }
            }
            println!("{}", serde_json::to_string_pretty(&json!(list))?);
        }
    }
    Ok(())
}

fn open(arg: &ConfigArg) -> anyhow::Result<(Config, Store)> {
    let config =
        Config::load(&arg.config).map_err(|e| anyhow::anyhow!("{}: {e}", arg.config.display()))?;
    if config.store.backend == Backend::Memory {
        bail!(
            "store.backend is memory: the records live in the running idemgate process; \
             inspect them through its admin listener (admin.listen) instead"
        );
    }
    let store = Store::open(&config.store).context("opening the store")?;
    Ok((config, store))
}

async fn find(
    config: &Config,
    store: &Store,
    args: &KeyArgs,
) -> anyhow::Result<Vec<(StorageKey, Record)>> {
    if !config.routes.iter().any(|r| r.name == args.route) {
        bail!("route {:?} is not in the configuration", args.route);
    }
    if let Some(scope) = &args.scope {
        let key = StorageKey {
            route: args.route.clone(),
            scope: scope.clone(),
            key: args.key.clone(),
        };
        return Ok(store
            .get(&key)
            .await?
            .map(|r| (key, r))
            .into_iter()
            .collect());
    }
    let all = store.records(Some(&args.route)).await?;
    Ok(all.into_iter().filter(|(k, _)| k.key == args.key).collect())
}

/// `unknown`, or in flight past its lease on a route that locks such keys.
pub fn is_unknown(config: &Config, key: &StorageKey, record: &Record, now: u64) -> bool {
    match record.state {
        State::Unknown => true,
        State::InFlight => {
            let locks = config
                .routes
                .iter()
                .find(|r| r.name == key.route)
                .and_then(|r| r.idempotency.as_ref())
                .is_none_or(|p| p.on_unknown == OnUnknown::Lock);
            locks && record.lease_end_ms <= now
        }
        State::Completed => false,
    }
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
        "headers": response.map(|r| r.headers.iter()
            .map(|(n, v)| (n.as_str().to_owned(), json!(String::from_utf8_lossy(v.as_bytes()))))
            .collect::<serde_json::Map<_, _>>()),
        "body_size": response.map(|r| r.body_size),
        "body_stored": response.map(|r| r.body.is_some()),
        "created_at": record.created_ms,
        "lease_end_at": record.lease_end_ms,
        "expires_at": record.expires_ms,
    })
}
