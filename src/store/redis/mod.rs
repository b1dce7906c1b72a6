//! The Redis store: one Lua script per transition, times from Redis `TIME`,
//! records expiring by Redis TTL, every call bounded by `op_timeout`.
//! Standalone Redis or Redis Cluster (`link.rs`): a record is one hash
//! whose key carries a hash tag, so every script touches one slot.

mod link;

use std::time::Duration;

use bytes::Bytes;
use redis::{AsyncCommands, Script};

use super::memory::millis;
use super::{ClaimReply, ClaimRequest, StoreError};
use crate::config::{Backend, OnUnknown, StoreConfig};
use crate::idempotency::decision::decide;
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, State, StoredResponse, decode_headers, encode_headers};

/// Claims a key, or reports the record that holds it. Mirrors the writing
/// rows of `idempotency::decision::decide`: a missing key is claimed; an
/// in-flight attempt with the same fingerprint whose lease ended is claimed
/// afresh (ARGV[5] == '1', `on_unknown: release`) or turned `unknown`.
/// Returns {now_ms, claimed, previous record as HGETALL pairs}.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rec = redis.call('HGETALL', KEYS[1])
local claimed = 0
local function claim()
  if #rec > 0 then redis.call('DEL', KEYS[1]) end
  redis.call('HSET', KEYS[1], 'state', 'in_flight', 'fp', ARGV[1], 'token', ARGV[2],
    'lease_end', now + tonumber(ARGV[3]), 'created', now, 'expires', now + tonumber(ARGV[4]))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  claimed = 1
end
if #rec == 0 then
  claim()
else
  local f = {}
  for i = 1, #rec, 2 do f[rec[i]] = rec[i + 1] end
  if f.fp == ARGV[1] and f.state == 'in_flight' and tonumber(f.lease_end) <= now then
    if ARGV[5] == '1' then claim() else redis.call('HSET', KEYS[1], 'state', 'unknown') end
  end
end
return {now, claimed, rec}
";

/// The start of every fenced script: return 0 unless the attempt owned by
/// ARGV[1] still holds the key, in flight.
macro_rules! owner_guard {
    () => {
        r"
local owner = redis.call('HMGET', KEYS[1], 'token', 'state')
if owner[1] ~= ARGV[1] or owner[2] ~= 'in_flight' then
  return 0
end
"
    };
}

/// Completes the attempt owned by ARGV[1]; 0 when it no longer owns the key.
const COMPLETE: &str = concat!(
    owner_guard!(),
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', 'completed', 'status', ARGV[2], 'headers', ARGV[3],
  'body', ARGV[4], 'stored', ARGV[5], 'body_size', ARGV[6], 'expires', now + tonumber(ARGV[7]))
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1
"
);

/// Deletes the attempt owned by ARGV[1].
const RELEASE: &str = concat!(
    owner_guard!(),
    r"
redis.call('DEL', KEYS[1])
return 1
"
);

/// Turns the attempt owned by ARGV[1] `unknown`.
const MARK_UNKNOWN: &str = concat!(
    owner_guard!(),
    r"
redis.call('HSET', KEYS[1], 'state', 'unknown')
return 1
"
);

/// An operator's answer for an existing record, whatever its state.
const RESOLVE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', 'completed', 'status', ARGV[1], 'headers', ARGV[2],
  'body', ARGV[3], 'stored', '1', 'body_size', ARGV[4], 'expires', now + tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";

pub struct RedisStore {
    link: link::Link,
    prefix: String,
    op_timeout: Duration,
    claim: Script,
    complete: Script,
    release: Script,
    mark_unknown: Script,
    resolve: Script,
}

impl RedisStore {
    pub fn new(config: &StoreConfig) -> Result<RedisStore, StoreError> {
        crate::tls::install_provider();
        let certs = tls_certificates(config)?;
        let link = match &config.backend {
            Backend::Redis { url } => {
                // The error text of a bad URL may echo it, password included: keep it generic.
                let invalid = |_| StoreError::Backend("store.url is not a valid Redis URL".into());
                let client = match certs {
                    None => redis::Client::open(url.as_str()).map_err(invalid)?,
                    Some(certs) => {
                        redis::Client::build_with_tls(url.as_str(), certs).map_err(invalid)?
                    }
                };
                link::Link::single(client, config.op_timeout)?
            }
            Backend::Cluster { urls } => link::Link::cluster(urls, certs, config.op_timeout)?,
            Backend::Memory => return Err(StoreError::Backend("not a Redis backend".into())),
        };
        Ok(RedisStore {
            link,
            prefix: config.key_prefix.clone(),
            op_timeout: config.op_timeout,
            claim: Script::new(CLAIM),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
            mark_unknown: Script::new(MARK_UNKNOWN),
            resolve: Script::new(RESOLVE),
        })
    }

    /// The connection for one call; making it (a cluster's first call) is
    /// bounded by `op_timeout` like the call itself.
    async fn conn(&self) -> Result<link::Handle, StoreError> {
        match self.link.ready_handle() {
            Some(handle) => Ok(handle),
            None => self.bounded(self.link.handle()).await,
        }
    }

    pub async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimReply, StoreError> {
        let mut conn = self.conn().await?;
        let mut call = self.claim.key(req.key.encode(&self.prefix));
        call.arg(req.fingerprint)
            .arg(req.token)
            .arg(millis(req.lease))
            .arg(millis(req.ttl))
            .arg(if req.on_unknown == OnUnknown::Release {
                "1"
            } else {
                "0"
            });
        let (now_ms, _claimed, fields): (u64, u8, Vec<Vec<u8>>) =
            self.bounded(call.invoke_async(&mut conn)).await?;
        let record = parse_record(&fields)?;
        let decision = decide(record.as_ref(), req.fingerprint, now_ms, req.on_unknown);
        Ok(ClaimReply {
            decision,
            record,
            now_ms,
        })
    }

    pub async fn complete(
        &self,
        key: &StorageKey,
        token: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let mut call = self.complete.key(key.encode(&self.prefix));
        call.arg(token)
            .arg(response.status)
            .arg(encode_headers(&response.headers))
            .arg(response.body.as_deref().unwrap_or_default())
            .arg(if response.body.is_some() { "1" } else { "0" })
            .arg(response.body_size)
            .arg(millis(ttl));
        let done: u8 = self.bounded(call.invoke_async(&mut conn)).await?;
        Ok(done == 1)
    }

    pub async fn release(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        self.fenced(&self.release, key, token).await
    }

    pub async fn mark_unknown(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        self.fenced(&self.mark_unknown, key, token).await
    }

    pub async fn resolve(
        &self,
        key: &StorageKey,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let mut call = self.resolve.key(key.encode(&self.prefix));
        call.arg(response.status)
            .arg(encode_headers(&response.headers))
            .arg(response.body.as_deref().unwrap_or_default())
            .arg(response.body_size)
            .arg(millis(ttl));
        let done: u8 = self.bounded(call.invoke_async(&mut conn)).await?;
        Ok(done == 1)
    }

    pub async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        let mut conn = self.conn().await?;
        let fields: Vec<Vec<u8>> = self.bounded(conn.hgetall(key.encode(&self.prefix))).await?;
        parse_record(&fields)
    }

    pub async fn purge(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let removed: u64 = self.bounded(conn.del(key.encode(&self.prefix))).await?;
        Ok(removed > 0)
    }

    /// SCANs the record keys (of one route) on every master and reads each one.
    pub async fn records(
        &self,
        route: Option<&str>,
    ) -> Result<Vec<(StorageKey, Record)>, StoreError> {
        let mut conn = self.conn().await?;
        let pattern = format!(
            "{}{{{}:*",
            glob_escape(&self.prefix),
            route.map_or("*".to_owned(), glob_escape)
        );
        let mut names = Vec::new();
        for node in self.bounded(conn.scan_targets()).await? {
            let mut cursor = 0u64;
            loop {
                let (next, batch) = self.bounded(conn.scan(&node, cursor, &pattern)).await?;
                names.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        let mut out = Vec::new();
        for name in names {
            let Some(key) = StorageKey::decode(&self.prefix, &name) else {
                continue;
            };
            if let Some(record) = self.get(&key).await? {
                out.push((key, record));
            }
        }
        Ok(out)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: String = self
            .bounded(redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
    }

    async fn fenced(
        &self,
        script: &Script,
        key: &StorageKey,
        token: &str,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let mut call = script.key(key.encode(&self.prefix));
        call.arg(token);
        let done: u8 = self.bounded(call.invoke_async(&mut conn)).await?;
        Ok(done == 1)
    }

    async fn bounded<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.op_timeout, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError::Backend(e.to_string())),
            Err(_) => Err(StoreError::Timeout),
        }
    }
}

/// `store.tls` as the redis crate wants it (PEM bytes), if set.
fn tls_certificates(config: &StoreConfig) -> Result<Option<redis::TlsCertificates>, StoreError> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let read = |path: &Option<std::path::PathBuf>| -> Result<Option<Vec<u8>>, StoreError> {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| StoreError::Backend(format!("{}: {e}", p.display())))
            })
            .transpose()
    };
    let client_tls = match (read(&tls.client_cert_file)?, read(&tls.client_key_file)?) {
        (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
            client_cert,
            client_key,
        }),
        _ => None,
    };
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert: read(&tls.ca_file)?,
    }))
}

fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// HGETALL pairs → record; an empty list is no record.
fn parse_record(fields: &[Vec<u8>]) -> Result<Option<Record>, StoreError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let get = |name: &str| -> Option<&[u8]> {
        fields
            .chunks(2)
            .find(|pair| pair[0] == name.as_bytes())
            .and_then(|pair| pair.get(1))
            .map(Vec::as_slice)
    };
    let text = |name: &str| get(name).and_then(|v| std::str::from_utf8(v).ok());
    let number = |name: &str| text(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let state = text("state")
        .and_then(State::parse)
        .ok_or_else(|| StoreError::Backend("record without a valid state".into()))?;
    let response = text("status")
        .and_then(|s| s.parse::<u16>().ok())
        .map(|status| StoredResponse {
            status,
            headers: decode_headers(get("headers").unwrap_or_default()),
            body: (text("stored") == Some("1"))
                .then(|| Bytes::copy_from_slice(get("body").unwrap_or_default())),
            body_size: number("body_size"),
        });
    Ok(Some(Record {
        state,
        fingerprint: text("fp").unwrap_or_default().to_owned(),
        token: text("token").unwrap_or_default().to_owned(),
        lease_end_ms: number("lease_end"),
        created_ms: number("created"),
        expires_ms: number("expires"),
        response,
    }))
}
