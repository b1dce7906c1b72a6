//! The Redis store: one Lua script per transition, times from Redis `TIME`,
//! records expiring by Redis TTL, every operation bounded by `op_timeout`
//! (one deadline for all of an operation's round trips).
//! Standalone Redis or Redis Cluster (`link.rs`): a record is one hash
//! whose key carries a hash tag, so every script touches one slot.

mod claim_mix;
mod events;
mod link;
mod scripts;
mod wire;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;

use redis::{AsyncCommands, Cmd, ErrorKind, FromRedisValue, Script, ServerErrorKind, Value};

use super::memory::millis;
use super::waiters::Waiters;
use super::{ClaimReply, ClaimRequest, StoreError};
use crate::config::{Backend, OnUnknown, StoreConfig};
use crate::idempotency::decision::decide;
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, State, StoredResponse, encode_headers};
use claim_mix::ClaimMix;
use scripts::{
    COMPLETE, HEAD_FIELDS, MARK_UNKNOWN, RECORD_FIELDS, RELEASE, RESOLVE, SETTLED_FIELDS,
};
use wire::{EncodedKey, glob_escape, parse_record};

/// Records read per round trip in a listing (standalone Redis): a listing
/// of a million records takes two thousand round trips, not a million.
const READ_BATCH: usize = 500;

pub struct RedisStore {
    link: link::Link,
    prefix: String,
    op_timeout: Duration,
    claim: Script,
    complete: Script,
    release: Script,
    mark_unknown: Script,
    resolve: Script,
    /// Whether claims read the record before running the claim script.
    mix: ClaimMix,
    /// Where the fenced scripts tell other instances' waiters (`events.rs`).
    events: String,
    /// A standalone server's client, for [`Self::listen`]'s subscription.
    client: Option<redis::Client>,
    /// The task hearing other instances' transitions, once started.
    listener: OnceLock<AbortHandle>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.get() {
            listener.abort();
        }
    }
}

impl RedisStore {
    pub fn new(config: &StoreConfig) -> Result<RedisStore, StoreError> {
        crate::tls::install_provider();
        let certs = tls_certificates(config)?;
        let mut standalone = None;
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
                standalone = Some(client.clone());
                link::Link::single(client, config.op_timeout)?
            }
            Backend::Cluster { urls } => link::Link::cluster(urls, certs, config.op_timeout)?,
            Backend::Memory => return Err(StoreError::Backend("not a Redis backend".into())),
        };
        Ok(RedisStore {
            link,
            prefix: config.key_prefix.clone(),
            op_timeout: config.op_timeout,
            claim: Script::new(&scripts::claim()),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
            mark_unknown: Script::new(MARK_UNKNOWN),
            resolve: Script::new(RESOLVE),
            mix: ClaimMix::default(),
            events: events::channel(&config.key_prefix),
            client: standalone,
            listener: OnceLock::new(),
        })
    }

    /// Starts hearing other instances' transitions for `waiters` (once; a
    /// standalone server only, inside a Tokio runtime): see `events.rs`.
    pub(super) fn listen(&self, waiters: &Arc<Waiters>) {
        let Some(client) = &self.client else { return };
        self.listener.get_or_init(|| {
            events::listen(
                client.clone(),
                self.prefix.clone(),
                self.op_timeout.max(Duration::from_secs(1)),
                waiters.clone(),
            )
        });
    }

    /// When an operation starting now must have ended.
    fn deadline(&self) -> Instant {
        Instant::now() + self.op_timeout
    }

    /// The connection for one call; making it (a cluster's first call)
    /// counts against the operation's deadline like the call itself.
    async fn conn(&self, deadline: Instant) -> Result<link::Handle, StoreError> {
        match self.link.ready_handle() {
            Some(handle) => Ok(handle),
            None => self.bounded(deadline, self.link.handle()).await,
        }
    }

    /// Claims a key, or reports the record that holds it. While most claims
    /// find a settled record (see `claim_mix::ClaimMix`), a plain `HMGET` goes first
    /// and answers them without the script. Read and script together are
    /// one operation: they share one `op_timeout`.
    pub async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimReply, StoreError> {
        let deadline = self.deadline();
        let read_first = self.mix.read_first();
        if read_first {
            let record = self.read_settled(req.key, deadline).await?;
            let settled = settled(record.as_ref(), req.fingerprint);
            self.mix.saw(settled);
            if settled {
                // No write follows from a settled record, so the time does not matter.
                let decision = decide(
                    record.as_ref(),
                    req.fingerprint,
                    req.token,
                    0,
                    req.on_unknown,
                );
                return Ok(ClaimReply { decision, record });
            }
        }
        let reply = self.claim_script(req, deadline).await?;
        if !read_first {
            self.mix
                .saw(settled(reply.record.as_ref(), req.fingerprint));
        }
        Ok(reply)
    }

    async fn claim_script(
        &self,
        req: &ClaimRequest<'_>,
        deadline: Instant,
    ) -> Result<ClaimReply, StoreError> {
        let mut call = self.script_call(
            &self.claim,
            req.key,
            6,
            req.fingerprint.len() + req.token.len() + 2 * 20 + 2,
        );
        call.arg(req.fingerprint)
            .arg(req.token)
            .arg(millis(req.lease))
            .arg(millis(req.lease + req.ttl))
            .arg(if req.on_unknown == OnUnknown::Release {
                "1"
            } else {
                "0"
            })
            .arg(if req.waits { "1" } else { "0" });
        let (now_ms, values) = match self.run(&self.claim, &call, deadline).await? {
            // A key that held nothing, claimed: the script's short way.
            Value::Int(now_ms) => (u64::try_from(now_ms).unwrap_or(0), Vec::new()),
            reply => {
                let (now_ms, _claimed, values): (u64, u8, Vec<Option<Vec<u8>>>) =
                    FromRedisValue::from_redis_value(reply)
                        .map_err(|e| StoreError::Backend(e.to_string()))?;
                (now_ms, values)
            }
        };
        let record = parse_record(values)?;
        let decision = decide(
            record.as_ref(),
            req.fingerprint,
            req.token,
            now_ms,
            req.on_unknown,
        );
        Ok(ClaimReply { decision, record })
    }

    pub async fn complete(
        &self,
        key: &StorageKey,
        token: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let headers = encode_headers(&response.headers);
        let body = response.body.as_deref().unwrap_or_default();
        let mut call = self.script_call(
            &self.complete,
            key,
            8,
            token.len() + 3 + headers.len() + body.len() + 1 + 2 * 20 + self.events.len(),
        );
        call.arg(token)
            .arg(response.status)
            .arg(headers)
            .arg(body)
            .arg(if response.body.is_some() { "1" } else { "0" })
            .arg(response.body_size)
            .arg(millis(ttl))
            .arg(&self.events);
        let done: u8 = self.run(&self.complete, &call, self.deadline()).await?;
        Ok(done == 1)
    }

    pub async fn release(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        self.fenced(&self.release, key, token, None).await
    }

    pub async fn mark_unknown(
        &self,
        key: &StorageKey,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.fenced(&self.mark_unknown, key, token, Some(millis(ttl)))
            .await
    }

    pub async fn resolve(
        &self,
        key: &StorageKey,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let headers = encode_headers(&response.headers);
        let body = response.body.as_deref().unwrap_or_default();
        let mut call = self.script_call(
            &self.resolve,
            key,
            5,
            3 + headers.len() + body.len() + 2 * 20,
        );
        call.arg(response.status)
            .arg(headers)
            .arg(body)
            .arg(response.body_size)
            .arg(millis(ttl));
        let done: u8 = self.run(&self.resolve, &call, self.deadline()).await?;
        Ok(done == 1)
    }

    pub async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        let now = self.now_ms().await?;
        let conn = self.conn(self.deadline()).await?;
        let mut read = self
            .read_listed(conn, now, std::slice::from_ref(key))
            .await?;
        Ok(read.pop().map(|(_, record)| record))
    }

    /// The records at `keys` that exist, with their expiry (`now`, the
    /// store's clock, plus the key's TTL), read in one pipeline: `HMGET` and
    /// `PTTL` per key. All keys of one call on one node (one key for a cluster).
    async fn read_listed(
        &self,
        mut conn: link::Handle,
        now: u64,
        keys: &[StorageKey],
    ) -> Result<Vec<(StorageKey, Record)>, StoreError> {
        let mut pipe = redis::pipe();
        for key in keys {
            let name = EncodedKey(key.encoded_parts(&self.prefix));
            pipe.cmd("HMGET").arg(&name).arg(&RECORD_FIELDS[..]);
            pipe.cmd("PTTL").arg(&name);
        }
        let rows: Vec<Value> = self
            .bounded(self.deadline(), pipe.query_async(&mut conn))
            .await?;
        let mut out = Vec::new();
        let mut rows = rows.into_iter();
        for key in keys {
            let (Some(fields), Some(ttl)) = (rows.next(), rows.next()) else {
                break;
            };
            let values: Vec<Option<Vec<u8>>> = FromRedisValue::from_redis_value(fields)
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            let Some(mut record) = parse_record(values)? else {
                continue;
            };
            // -1: no expiry (not written by idemgate); -2: gone since the HMGET.
            record.expires_ms = match ttl {
                Value::Int(ms) if ms >= 0 => now.saturating_add(ms.unsigned_abs()),
                Value::Int(-2) => continue,
                _ => u64::MAX,
            };
            out.push((key.clone(), record));
        }
        Ok(out)
    }

    /// A claim's plain read: the fields that answer a settled record.
    async fn read_settled(
        &self,
        key: &StorageKey,
        deadline: Instant,
    ) -> Result<Option<Record>, StoreError> {
        let mut conn = self.conn(deadline).await?;
        let values: Vec<Option<Vec<u8>>> = self
            .bounded(
                deadline,
                redis::cmd("HMGET")
                    .arg(key.encode(&self.prefix))
                    .arg(&RECORD_FIELDS[..SETTLED_FIELDS])
                    .query_async(&mut conn),
            )
            .await?;
        parse_record(values)
    }

    pub async fn purge(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let deadline = self.deadline();
        let mut conn = self.conn(deadline).await?;
        let removed: u64 = self
            .bounded(deadline, conn.del(key.encode(&self.prefix)))
            .await?;
        Ok(removed > 0)
    }

    /// SCANs the record keys (of one route, of one client key) on every
    /// master and reads those `keep` accepts: from a standalone server in
    /// pipelines of `READ_BATCH`, from a cluster one by one; each SCAN step
    /// and each read gets `op_timeout` of its own. The pattern may match a
    /// little more than asked (a `*` spans `:` in a key): `keep` checks the
    /// route and key too. With `heads_first` each batch is read twice:
    /// first without the responses (`HEAD_FIELDS`) for `keep` to judge,
    /// then whole for the records it kept, judged again (a record may move
    /// on in between). So listing the few unknown outcomes among a million
    /// completed records neither transfers nor holds their bodies.
    pub async fn records(
        &self,
        route: Option<&str>,
        key: Option<&str>,
        keep: &super::Keep<'_>,
        heads_first: bool,
    ) -> Result<Vec<(StorageKey, Record)>, StoreError> {
        let mut conn = self.conn(self.deadline()).await?;
        let pattern = format!(
            "{}{{{}:{}",
            glob_escape(&self.prefix),
            route.map_or("*".to_owned(), glob_escape),
            key.map_or("*".to_owned(), |k| format!("*:{}}}", glob_escape(k)))
        );
        let mut names = Vec::new();
        for node in self.bounded(self.deadline(), conn.scan_targets()).await? {
            let mut cursor = 0u64;
            loop {
                let (next, batch) = self
                    .bounded(self.deadline(), conn.scan(&node, cursor, &pattern))
                    .await?;
                names.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        let keys: Vec<StorageKey> = names
            .iter()
            .filter_map(|name| StorageKey::decode(&self.prefix, name))
            .collect();
        let now = self.now_ms().await?;
        // The keys of one node's SCAN span many slots: a cluster's are read one by one.
        let batch = match conn {
            link::Handle::Single(_) => READ_BATCH,
            link::Handle::Cluster(_) => 1,
        };
        let mut out = Vec::new();
        for keys in keys.chunks(batch) {
            let kept: Vec<StorageKey>;
            let keys = if heads_first {
                let heads = self.read_heads(conn.clone(), keys).await?;
                kept = keys
                    .iter()
                    .zip(heads)
                    .filter(|(key, head)| head.as_ref().is_some_and(|head| keep(key, head)))
                    .map(|(key, _)| key.clone())
                    .collect();
                &kept[..]
            } else {
                keys
            };
            if keys.is_empty() {
                continue;
            }
            let read = self.read_listed(conn.clone(), now, keys).await?;
            out.extend(read.into_iter().filter(|(key, record)| keep(key, record)));
        }
        Ok(out)
    }

    /// The records at `keys` without their responses (and without expiry),
    /// one pipeline of `HMGET`s; `None` where a key holds no record.
    async fn read_heads(
        &self,
        mut conn: link::Handle,
        keys: &[StorageKey],
    ) -> Result<Vec<Option<Record>>, StoreError> {
        let mut pipe = redis::pipe();
        for key in keys {
            let name = EncodedKey(key.encoded_parts(&self.prefix));
            pipe.cmd("HMGET").arg(&name).arg(&HEAD_FIELDS[..]);
        }
        let rows: Vec<Vec<Option<Vec<u8>>>> = self
            .bounded(self.deadline(), pipe.query_async(&mut conn))
            .await?;
        // Where each head field sits among the record's fields.
        let at = HEAD_FIELDS.map(|name| {
            let at = RECORD_FIELDS.iter().position(|f| *f == name);
            at.expect("head fields are record fields")
        });
        rows.into_iter()
            .map(|head| {
                let mut values = vec![None; RECORD_FIELDS.len()];
                for (&at, value) in at.iter().zip(head) {
                    values[at] = value;
                }
                parse_record(values)
            })
            .collect()
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let deadline = self.deadline();
        let mut conn = self.conn(deadline).await?;
        let _: String = self
            .bounded(deadline, redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
    }

    /// Redis's clock (`TIME`) in milliseconds since the epoch: the clock
    /// leases are taken from and judged by.
    pub async fn now_ms(&self) -> Result<u64, StoreError> {
        let deadline = self.deadline();
        let mut conn = self.conn(deadline).await?;
        let (secs, micros): (u64, u64) = self
            .bounded(deadline, redis::cmd("TIME").query_async(&mut conn))
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// A fenced script's call: the owner's token, the script's own argument
    /// if any, and the waiters' channel last.
    async fn fenced(
        &self,
        script: &Script,
        key: &StorageKey,
        token: &str,
        arg: Option<u64>,
    ) -> Result<bool, StoreError> {
        let mut call = self.script_call(script, key, 3, token.len() + 20 + self.events.len());
        call.arg(token);
        if let Some(arg) = arg {
            call.arg(arg);
        }
        call.arg(&self.events);
        let done: u8 = self.run(script, &call, self.deadline()).await?;
        Ok(done == 1)
    }

    /// `EVALSHA <script> 1 <key>`, for the caller to add `args` arguments of
    /// about `bytes` bytes to: one buffer for the whole command, sized once
    /// (`Script::key(..).arg(..)` keeps a vector per argument, and a growing
    /// `Cmd` reallocates its buffers a dozen times per request).
    fn script_call(&self, script: &Script, key: &StorageKey, args: usize, bytes: usize) -> Cmd {
        let key = EncodedKey(key.encoded_parts(&self.prefix));
        let hash = script.get_hash();
        let mut call = Cmd::with_capacity(4 + args, 7 + hash.len() + 1 + key.len() + bytes);
        call.arg("EVALSHA").arg(hash).arg(1).arg(key);
        call
    }

    /// Runs a [`script_call`](Self::script_call), loading the script first
    /// when Redis does not know it yet (a new or restarted server).
    async fn run<T: FromRedisValue>(
        &self,
        script: &Script,
        call: &Cmd,
        deadline: Instant,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn(deadline).await?;
        self.bounded(deadline, async {
            match call.query_async(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    script.load_async(&mut conn).await?;
                    call.query_async(&mut conn).await
                }
                result => result,
            }
        })
        .await
    }

    /// One round trip of an operation, cut short at the operation's deadline.
    async fn bounded<T>(
        &self,
        deadline: Instant,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout_at(deadline, op).await {
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

/// Whether a claim can be answered from this record alone, whatever the
/// time: it is completed or unknown, or it belongs to another request.
/// (An in-flight record's lease is judged by the script, on Redis time.)
fn settled(record: Option<&Record>, fingerprint: &str) -> bool {
    record.is_some_and(|r| r.state != State::InFlight || r.fingerprint != fingerprint)
}
