//! The Redis store: a plain `SET .. NX GET` claims a new key or reads a
//! settled one, one Lua script per other transition, leases judged on
//! Redis's clock (the record's TTL), records expiring by Redis TTL, every
//! operation bounded by `op_timeout` (one deadline for all of an
//! operation's round trips). Standalone Redis or Redis Cluster (`link.rs`):
//! a record is one string (`compact.rs`) whose key carries a hash tag, so
//! every command touches one slot.

mod collapse;
mod compact;
mod events;
mod eviction;
mod link;
mod scripts;
mod watch;
mod wire;

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;

use redis::{Cmd, ErrorKind, FromRedisValue, Script, ServerErrorKind, Value};

use super::memory::millis;
use super::waiters::Waiters;
use super::{Attempt, ClaimReply, ClaimRequest, Listing, Resolved, StoreError};
use crate::config::{Backend, OnUnknown, StoreConfig};
use crate::idempotency::decision::{Decision, decide};
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, State, StoredResponse, encode_headers};
use collapse::{Collapse, Joined};
use compact::{Lease, ResponsePart};
use scripts::{COMPLETE, HEAD_FIELDS, MARK_UNKNOWN, PURGE, READ, RECORD_FIELDS, RELEASE, RESOLVE};
use wire::{EncodedKey, glob_escape, parse_record};

/// Records read per round trip in a listing (standalone Redis): a listing
/// of a million records takes two thousand round trips, not a million.
const READ_BATCH: usize = 500;
/// The bytes of whole records (responses of up to `max_response_body` each)
/// read in one pipeline of a listing, by the lengths its first pass read:
/// a pipeline must come back within `op_timeout`, and live requests'
/// commands wait behind it (regression: 500 records of 1 MiB in one
/// pipeline failed every listing and held claims up for 250 ms each).
const READ_WHOLE_BYTES: u64 = 4 << 20;

/// How many times a listing SCANs a cluster whose slots keep moving.
const SCAN_TRIES: usize = 3;

pub struct RedisStore {
    link: link::Link,
    prefix: String,
    op_timeout: Duration,
    claim: Script,
    complete: Script,
    release: Script,
    mark_unknown: Script,
    resolve: Script,
    purge: Script,
    /// Lookups' and listings' read of either format.
    read: Script,
    /// Where the fenced scripts tell other instances' waiters (`events.rs`).
    events: String,
    /// A standalone server's client, for [`Self::listen`]'s subscription.
    client: Option<redis::Client>,
    /// Set once Redis's version was found new enough ([`Self::ping`]).
    version_checked: OnceLock<()>,
    /// Whether Redis may evict records, read again every few seconds.
    eviction: eviction::Eviction,
    /// The task hearing other instances' transitions, once started.
    listener: OnceLock<AbortHandle>,
    /// Claims of one key out at once share a settled record's read.
    collapse: Collapse,
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
                let client = link::client(url, certs.as_ref()).map_err(invalid)?;
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
            purge: Script::new(PURGE),
            read: Script::new(READ),
            events: events::channel(&config.key_prefix),
            client: standalone,
            version_checked: OnceLock::new(),
            eviction: eviction::Eviction::default(),
            listener: OnceLock::new(),
            collapse: Collapse::default(),
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
        if let Some(handle) = self.link.ready_handle() {
            return Ok(handle.until(deadline));
        }
        // No connection: no command was sent, whether making it failed or
        // was still under way at the deadline (regressions, audits: every
        // claim refused by a cluster down or a user without `+cluster`, or
        // cut off by a Redis that never finished its TLS handshake, was
        // undone in the background, 20 tries, holding a shutdown 10-15 s).
        match tokio::time::timeout_at(deadline, self.link.handle()).await {
            Ok(Ok(handle)) => Ok(handle.until(deadline)),
            Ok(Err(e)) => Err(StoreError::Unreachable(e.to_string())),
            Err(_) => Err(StoreError::NoConnection),
        }
    }

    /// Claims a key, or reports the record that holds it: a plain `SET ..
    /// NX PX .. GET` writes the claim where the key holds nothing and
    /// otherwise returns the record, unchanged. A settled record (completed,
    /// unknown, another request's) or this attempt's own (the claim sent
    /// twice) answers at once; one in flight for the same request, whose
    /// lease only Redis's clock can judge, or an earlier version's record
    /// hash goes to the claim script. Both are one operation: they share one
    /// `op_timeout`.
    ///
    /// Claims of a key already out to Redis from this instance wait for it
    /// and share the settled record it finds (`collapse.rs`); a follower
    /// whose leader found none claims for itself, within the same deadline.
    pub async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimReply, StoreError> {
        let deadline = self.deadline();
        let lead = match self.collapse.join(req.key) {
            Joined::Lead(lead) => Some(lead),
            Joined::Follow(flight) => match flight.settled(deadline).await {
                Some(record) => return answer(req, record),
                None => None,
            },
            Joined::Alone => None,
        };
        let value = compact::claim_value(
            req.fingerprint,
            req.token,
            millis(req.lease),
            millis(req.ttl),
            req.created_ms,
        );
        let key = EncodedKey(req.key.encoded_parts(&self.prefix));
        let mut set = Cmd::with_capacity(7, 3 + key.len() + value.len() + 2 + 2 + 20 + 3);
        set.arg("SET")
            .arg(&key)
            .arg(&value)
            .arg("NX")
            .arg("PX")
            .arg(millis(req.lease + req.ttl))
            .arg("GET");
        let mut conn = self.conn(deadline).await?;
        let found: Option<Vec<u8>> = match self
            .bounded_raw(deadline, set.query_async(&mut conn))
            .await?
        {
            Ok(found) => found,
            // An earlier version's record (a hash), or a full Redis, which
            // refuses a `SET` even where it would write nothing: the claim
            // script reads either format and fails only where it must write
            // (a new key), so settled and in-flight records are still
            // answered.
            Err(e) if matches!(e.code(), Some("WRONGTYPE" | "OOM")) => {
                return self.claim_script(req, value, deadline).await;
            }
            Err(e) if e.code() == Some("ERR") && e.to_string().contains("syntax") => {
                return Err(StoreError::Backend(
                    "Redis refused SET .. NX GET: idemgate needs Redis 7.0 or later".into(),
                ));
            }
            Err(e) => return Err(self.backend_error(&e)),
        };
        let Some(found) = found else {
            return Ok(ClaimReply {
                decision: Decision::Claim,
                record: None,
            });
        };
        let record = compact::parse(found, None)?;
        if let Some(lead) = lead {
            lead.found(&record);
        }
        if settled(&record, req.fingerprint) || record.token == req.token {
            return answer(req, record);
        }
        self.claim_script(req, value, deadline).await
    }

    async fn claim_script(
        &self,
        req: &ClaimRequest<'_>,
        value: Vec<u8>,
        deadline: Instant,
    ) -> Result<ClaimReply, StoreError> {
        let mut call = self.script_call(
            &self.claim,
            req.key,
            7,
            req.fingerprint.len() + req.token.len() + 2 * 20 + 2 + value.len(),
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
            .arg(if req.waits { "1" } else { "0" })
            .arg(value);
        let reply = self.run(&self.claim, &call, deadline).await?;
        let (now_ms, record, unmarked) = match reply {
            // Claimed, with no record to report.
            Value::Int(now_ms) => (u64::try_from(now_ms).unwrap_or(0), None, false),
            Value::Array(reply) => {
                let mut reply = reply.into_iter();
                let mut next = || reply.next().unwrap_or(Value::Nil);
                let now_ms: u64 = from_value(next())?;
                // 1: claimed afresh; 2: a lease that ended could not be
                // marked `unknown` (a full Redis refuses the write).
                let unmarked = matches!(next(), Value::Int(2));
                let kind: String = from_value(next())?;
                let record = read_record(&kind, next(), next(), now_ms)?;
                (now_ms, record, unmarked)
            }
            other => return Err(StoreError::Backend(format!("claim script: {other:?}"))),
        };
        if let Some(record) = &record {
            compact::check_complete(record)?;
        }
        let decision = match decide(
            record.as_ref(),
            req.fingerprint,
            req.token,
            now_ms,
            req.on_unknown,
        ) {
            // Unknown all the same, but not made so yet: counted once it is.
            Decision::BecomeUnknown if unmarked => Decision::Unknown,
            decision => decision,
        };
        Ok(ClaimReply { decision, record })
    }

    /// Sends the whole completed record, head and response: the script
    /// writes it where the attempt still holds the key, or where the key
    /// is gone (see `Store::complete`).
    pub async fn complete(
        &self,
        key: &StorageKey,
        attempt: &Attempt<'_>,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let headers = encode_headers(&response.headers);
        let head = compact::head(
            b'C',
            attempt.fingerprint,
            attempt.token,
            millis(attempt.lease),
            millis(ttl),
            attempt.created_ms,
        );
        let mut part = ResponsePart::new(response, &headers);
        part.head = &head;
        let token = attempt.token;
        let mut call = self.script_call(
            &self.complete,
            key,
            4,
            token.len() + part.len() + 20 + self.events.len(),
        );
        call.arg(token)
            .arg(&part)
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
        attempt: &Attempt<'_>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let head = compact::head(
            b'U',
            attempt.fingerprint,
            attempt.token,
            millis(attempt.lease),
            millis(ttl),
            attempt.created_ms,
        );
        let token = attempt.token;
        let bytes = token.len() + head.len() + 20 + self.events.len();
        let mut call = self.script_call(&self.mark_unknown, key, 4, bytes);
        call.arg(token)
            .arg(millis(ttl))
            .arg(&head)
            .arg(&self.events);
        let done: u8 = self.run(&self.mark_unknown, &call, self.deadline()).await?;
        Ok(done == 1)
    }

    pub async fn resolve(
        &self,
        key: &StorageKey,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<Resolved, StoreError> {
        let headers = encode_headers(&response.headers);
        let part = ResponsePart::new(response, &headers);
        let mut call = self.script_call(&self.resolve, key, 2, part.len() + 20);
        call.arg(&part).arg(millis(ttl));
        let (done, left): (u8, u64) = self.run(&self.resolve, &call, self.deadline()).await?;
        Ok(resolved(done, left))
    }

    pub async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        let conn = self.conn(self.deadline()).await?;
        let mut read = self.read_listed(conn, std::slice::from_ref(key)).await?;
        read.pop()
            .map(|(_, record)| record.map_err(StoreError::Damaged))
            .transpose()
    }

    /// The records at `keys` that exist, with their expiry (Redis's time at
    /// the read plus the key's TTL), read in one pipeline of the read
    /// script; a value idemgate cannot read is `Err` with why. All keys of
    /// one call on one node (one key for a cluster).
    async fn read_listed(
        &self,
        conn: link::Handle,
        keys: &[StorageKey],
    ) -> Result<Vec<(StorageKey, Result<Record, String>)>, StoreError> {
        let rows = self.read(conn, keys, false).await?;
        let mut out = Vec::new();
        for (key, (row, _)) in keys.iter().zip(rows) {
            let record = match row {
                Ok(None) => continue,
                Ok(Some(record)) => compact::check_complete(&record)
                    .map(|()| record)
                    .map_err(damage),
                Err(why) => Err(why),
            };
            out.push((key.clone(), record));
        }
        Ok(out)
    }

    /// The records at `keys` in either format, `None` where a key holds no
    /// record, `Err` with why where it holds a value idemgate cannot read:
    /// one pipeline of the read script. With `heads` a value comes without
    /// its response (and a hash without its response fields), with the
    /// whole value's length (else 0).
    async fn read(
        &self,
        mut conn: link::Handle,
        keys: &[StorageKey],
        heads: bool,
    ) -> Result<Vec<(Result<Option<Record>, String>, u64)>, StoreError> {
        // The fields read of a record hash; `-` (no such field) for those left out.
        let fields = RECORD_FIELDS.map(|f| {
            if !heads || HEAD_FIELDS.contains(&f) {
                f
            } else {
                "-"
            }
        });
        let mut pipe = redis::pipe();
        for key in keys {
            let name = EncodedKey(key.encoded_parts(&self.prefix));
            pipe.cmd("EVALSHA")
                .arg(self.read.get_hash())
                .arg(1)
                .arg(&name)
                .arg(if heads { "1" } else { "0" })
                .arg(&fields[..]);
        }
        let rows: Vec<Vec<Value>> = self
            .bounded(self.deadline(), async {
                match pipe.query_async(&mut conn).await {
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        self.read.load_async(&mut conn).await?;
                        pipe.query_async(&mut conn).await
                    }
                    result => result,
                }
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let size = row.get(4).and_then(|v| from_value::<u64>(v.clone()).ok());
                (parse_row(row).map_err(damage), size.unwrap_or(0))
            })
            .collect())
    }

    pub async fn purge(&self, key: &StorageKey, force: bool) -> Result<Resolved, StoreError> {
        let mut call = self.script_call(&self.purge, key, 1, 1);
        call.arg(u8::from(force));
        let (done, left): (u8, u64) = self.run(&self.purge, &call, self.deadline()).await?;
        Ok(resolved(done, left))
    }

    /// SCANs the record keys (of one route, of one client key) on every
    /// master and reads those `keep` accepts: from a standalone server in
    /// pipelines of `READ_BATCH`, from a cluster one by one; each SCAN step
    /// and each read gets `op_timeout` of its own. The pattern may match a
    /// little more than asked (a `*` spans `:` in a key): `keep` checks the
    /// route and key too. With `heads_first` each batch is read twice:
    /// first without the responses (`HEAD_FIELDS`; a value's first bytes)
    /// for `keep` to judge, then whole for the records it kept, in
    /// pipelines of at most [`READ_WHOLE_BYTES`] by the lengths the first
    /// pass read, judged again (a record may move on in between). So listing the few unknown outcomes among a million
    /// completed records neither transfers nor holds their bodies.
    /// The names of the records `pattern` matches, each once: SCANned from
    /// every node that holds slots, again (up to [`SCAN_TRIES`] times in all)
    /// when a cluster's slots moved meanwhile (regression, the cluster
    /// operations audit: listings during a reshard left records out or
    /// named them twice, as a key moved between the masters' SCANs). A slot
    /// whose keys are being moved when the listing starts and ends may
    /// still hide some: Redis has no cluster-wide SCAN.
    async fn scan_names(
        &self,
        conn: &mut link::Handle,
        pattern: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut targets = self.bounded(self.deadline(), conn.scan_targets()).await?;
        for _ in 0..SCAN_TRIES {
            let mut names = Vec::new();
            for node in targets.nodes() {
                let mut cursor = 0u64;
                loop {
                    let (next, batch) = self
                        .bounded(self.deadline(), conn.scan(&node, cursor, pattern))
                        .await?;
                    names.extend(batch);
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            // The slots as they are after the SCAN: unchanged, the names
            // stand; else they are the next SCAN's targets.
            let after = self.bounded(self.deadline(), conn.scan_targets()).await?;
            if after == targets {
                let mut seen = HashSet::new();
                names.retain(|name| seen.insert(name.clone()));
                return Ok(names);
            }
            targets = after;
        }
        Err(StoreError::Backend(format!(
            "the Redis Cluster's slots moved during each of {SCAN_TRIES} listings (a reshard or a failover): list again once it is done"
        )))
    }

    pub async fn records(
        &self,
        route: Option<&str>,
        key: Option<&str>,
        keep: &super::Keep<'_>,
        heads_first: bool,
        limit: usize,
    ) -> Result<Listing, StoreError> {
        let mut conn = self.conn(self.deadline()).await?;
        let pattern = format!(
            "{}{{{}:{}",
            glob_escape(&self.prefix),
            route.map_or("*".to_owned(), glob_escape),
            key.map_or("*".to_owned(), |k| format!("*:{}}}", glob_escape(k)))
        );
        let names = self.scan_names(&mut conn, &pattern).await?;
        let keys: Vec<StorageKey> = names
            .iter()
            .filter_map(|name| StorageKey::decode(&self.prefix, name))
            .collect();
        // The keys of one node's SCAN span many slots: a cluster's are read one by one.
        let batch = match conn {
            link::Handle::Single(_) => READ_BATCH,
            link::Handle::Cluster(_) => 1,
        };
        let mut listing = Listing::default();
        for keys in keys.chunks(batch) {
            if listing.found.len() >= limit {
                break;
            }
            // The keys to read whole, each with its value's length (0: not known).
            let wanted: Vec<(StorageKey, u64)> = if heads_first {
                let heads = self.read(conn.clone(), keys, true).await?;
                let mut wanted = Vec::new();
                for (key, (head, size)) in keys.iter().zip(heads) {
                    match head {
                        Ok(Some(head)) if keep(key, &head) => wanted.push((key.clone(), size)),
                        Ok(_) => {}
                        Err(why) => listing.damaged.push((key.clone(), why)),
                    }
                }
                wanted
            } else {
                keys.iter().map(|k| (k.clone(), 0)).collect()
            };
            let mut rest = &wanted[..];
            while !rest.is_empty() && listing.found.len() < limit {
                // As many as fit in READ_WHOLE_BYTES, at least one.
                let mut bytes: u64 = 0;
                let n = 1
                    + (rest.iter().skip(1))
                        .take_while(|(_, size)| {
                            bytes = bytes.saturating_add(*size);
                            bytes.saturating_add(rest[0].1) <= READ_WHOLE_BYTES
                        })
                        .count();
                let (pipeline, after) = rest.split_at(n);
                rest = after;
                let keys: Vec<StorageKey> = pipeline.iter().map(|(k, _)| k.clone()).collect();
                for (key, record) in self.read_listed(conn.clone(), &keys).await? {
                    match record {
                        Ok(record) if keep(&key, &record) => {
                            listing.found.push((key, record.listed()));
                        }
                        Ok(_) => {}
                        Err(why) => listing.damaged.push((key, why)),
                    }
                }
            }
        }
        listing.found.truncate(limit);
        Ok(listing)
    }

    /// Whether Redis answers; the first answer also checks its version
    /// (`SET .. NX GET` needs Redis 7.0), so that an older server shows as
    /// not ready, with the reason, rather than failing every claim.
    /// A ping that timed out is told apart: the connection (which retries
    /// by itself until the deadline, so its own error never shows) is made
    /// once more directly, and its error named: refused, authentication
    /// failed, certificate not trusted. Never the URL or its password.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self.ping_once().await {
            Err(StoreError::Timeout | StoreError::NoConnection) => {
                Err(self.why_unreachable().await)
            }
            result => result,
        }
    }

    async fn why_unreachable(&self) -> StoreError {
        let Some(client) = &self.client else {
            return StoreError::Timeout;
        };
        let attempt = client.get_multiplexed_async_connection();
        match tokio::time::timeout(self.op_timeout, attempt).await {
            Ok(Err(e)) => StoreError::Backend(format!("cannot connect to Redis: {e}")),
            // Connects (or as slowly): Redis itself is slow to answer.
            _ => StoreError::Timeout,
        }
    }

    async fn ping_once(&self) -> Result<(), StoreError> {
        let deadline = self.deadline();
        let mut conn = self.conn(deadline).await?;
        if self.version_checked.get().is_some() {
            if self.eviction.due() {
                self.read_eviction(deadline, &mut conn).await?;
            }
            return self.bounded(deadline, conn.ping()).await;
        }
        // A standalone server answers one text; a cluster, a map of every
        // node's (regression: read as one string, it failed on every
        // ping: a cluster store was never ready, and `keys` always failed).
        // The default sections: `server` for the version, `memory` for
        // the eviction policy.
        let info: redis::RedisResult<Value> = self
            .bounded_raw(deadline, redis::cmd("INFO").query_async(&mut conn))
            .await?;
        let texts = match info {
            Ok(info) => eviction::info_texts(info),
            // A Redis user not allowed `INFO` (ACL): the version stays unknown.
            Err(e) if e.code().is_some() => {
                self.eviction.refused(&e.to_string());
                Vec::new()
            }
            Err(e) => return Err(StoreError::Backend(e.to_string())),
        };
        // The oldest node's version decides.
        let oldest = (texts.iter())
            .filter_map(|info| {
                let version = (info.text)
                    .lines()
                    .find_map(|line| line.strip_prefix("redis_version:"))?
                    .trim();
                let major = version.split('.').next()?.parse::<u32>().ok()?;
                Some((major, version))
            })
            .min();
        match oldest {
            Some((major, version)) if major < 7 => Err(StoreError::Backend(format!(
                "Redis {version} is too old: idemgate needs Redis 7.0 or later"
            ))),
            // Unknown (not allowed, or a Redis-compatible server): claims will tell.
            _ => {
                match texts.is_empty() {
                    true => self.eviction.unread(),
                    false => self.eviction.note(&texts),
                }
                self.may_run_scripts(deadline).await?;
                let _ = self.version_checked.set(());
                self.bounded(deadline, conn.ping()).await
            }
        }
    }

    /// Reads the eviction policy again (`INFO memory`); a user not allowed
    /// `INFO` leaves the last reading standing.
    async fn read_eviction(
        &self,
        deadline: Instant,
        conn: &mut link::Handle,
    ) -> Result<(), StoreError> {
        let info: redis::RedisResult<Value> = self
            .bounded_raw(deadline, redis::cmd("INFO").arg("memory").query_async(conn))
            .await?;
        match info {
            Ok(info) => self.eviction.note(&eviction::info_texts(info)),
            Err(e) if e.code().is_some() => self.eviction.refused(&e.to_string()),
            Err(e) => return Err(StoreError::Backend(e.to_string())),
        }
        Ok(())
    }

    /// Whether the last reading found a Redis node that may evict records.
    pub fn evicting(&self) -> bool {
        self.eviction.evicting()
    }

    /// Whether the Redis user may run idemgate's scripts: one that may not
    /// (ACL) claims new keys with a plain `SET` and then fails every
    /// completion and every other claim (regression, the Redis deployments
    /// audit: ready, and nothing recorded). The read script on a key of
    /// its own, loaded if need be, as a listing runs it.
    async fn may_run_scripts(&self, deadline: Instant) -> Result<(), StoreError> {
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.read.get_hash())
            .arg(1)
            .arg(format!("{}readiness-probe", self.prefix))
            .arg("1");
        self.run::<Value>(&self.read, &call, deadline)
            .await
            .map(drop)
    }

    /// Redis's clock (`TIME`) in milliseconds since the epoch: the clock
    /// leases are taken from and judged by.
    pub async fn now_ms(&self) -> Result<u64, StoreError> {
        let deadline = self.deadline();
        let mut conn = self.conn(deadline).await?;
        let (secs, micros): (u64, u64) = self
            .bounded(deadline, redis::cmd("TIME").query_async(&mut conn))
            .await?;
        // Saturating: a server's reply is not ours to overflow on (the panics audit).
        Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
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
    /// when Redis does not know it yet (a new or restarted server). A
    /// script's `DAMAGED` error (a value no version of idemgate writes) is
    /// [`StoreError::Damaged`]; a user not allowed it (ACL) is told what to
    /// grant.
    async fn run<T: FromRedisValue>(
        &self,
        script: &Script,
        call: &Cmd,
        deadline: Instant,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn(deadline).await?;
        let reply = self
            .bounded_raw(deadline, async {
                match call.query_async(&mut conn).await {
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        script.load_async(&mut conn).await?;
                        call.query_async(&mut conn).await
                    }
                    result => result,
                }
            })
            .await?;
        reply.map_err(|e| match e.code() {
            Some("DAMAGED") => StoreError::Damaged(e.to_string()),
            Some("NOPERM") => StoreError::Backend(format!(
                "the Redis user may not run idemgate's scripts ({e}): grant it +@scripting, +@read, +@write and +@keyspace on the store's keys (README, Redis)"
            )),
            _ => self.backend_error(&e),
        })
    }

    /// A Redis error as the store's: [`StoreError::Unreachable`] when no
    /// connection could be made, so the command was never sent (regression:
    /// every claim refused during an outage was undone in the background, 20
    /// tries of a reconnect each, holding a shutdown some 10 s).
    fn backend_error(&self, e: &redis::RedisError) -> StoreError {
        if self.link.never_sent(e) {
            StoreError::Unreachable(e.to_string())
        } else {
            StoreError::Backend(e.to_string())
        }
    }

    /// One round trip of an operation, cut short at the operation's
    /// deadline, with Redis's own error left to the caller.
    async fn bounded_raw<T>(
        &self,
        deadline: Instant,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<redis::RedisResult<T>, StoreError> {
        tokio::time::timeout_at(deadline, op)
            .await
            .map_err(|_| StoreError::Timeout)
    }

    /// One round trip of an operation, cut short at the operation's deadline.
    async fn bounded<T>(
        &self,
        deadline: Instant,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout_at(deadline, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.backend_error(&e)),
            Err(_) => Err(StoreError::Timeout),
        }
    }
}

/// `store.tls` as the redis crate wants it (PEM bytes), if set.
fn tls_certificates(config: &StoreConfig) -> Result<Option<redis::TlsCertificates>, StoreError> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    // The files as rustls will take them, checked here so that a bad one
    // is named at startup, not blamed on the URL or met at each connect.
    crate::tls::client_config(Some(tls))
        .map_err(|e| StoreError::Backend(format!("store.tls: {e}")))?;
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

/// The reply of the `RESOLVE` and `PURGE` scripts: {1, 0} done, {2, ms}
/// an attempt still running (its lease ends in ms), {0, 0} no record.
fn resolved(done: u8, left: u64) -> Resolved {
    match done {
        1 => Resolved::Done,
        2 => Resolved::InFlight {
            lease_left_ms: left,
        },
        _ => Resolved::Missing,
    }
}

/// Whether a claim can be answered from this record alone, whatever the
/// time: it is completed or unknown, or it belongs to another request.
/// (An in-flight record's lease is judged by the claim script, on Redis time.)
fn settled(record: &Record, fingerprint: &str) -> bool {
    record.state != State::InFlight || record.fingerprint != fingerprint
}

/// The answer to a claim from a record it found and need not judge on
/// Redis's clock: settled, or this attempt's own. No write follows.
fn answer(req: &ClaimRequest<'_>, record: Record) -> Result<ClaimReply, StoreError> {
    compact::check_complete(&record)?;
    let decision = decide(Some(&record), req.fingerprint, req.token, 0, req.on_unknown);
    Ok(ClaimReply {
        decision,
        record: Some(record),
    })
}

/// One row of the read script's reply: the record at its key, if any.
fn parse_row(row: Vec<Value>) -> Result<Option<Record>, StoreError> {
    let mut row = row.into_iter();
    let mut next = || row.next().unwrap_or(Value::Nil);
    let kind: String = from_value(next())?;
    let (record, pttl) = (next(), next());
    let now = from_value::<Option<u64>>(next())?.unwrap_or(0);
    let mut record = read_record(&kind, record, pttl.clone(), now)?;
    if let Some(record) = &mut record {
        // -1: no expiry (not written by idemgate).
        record.expires_ms = match pttl {
            Value::Int(ms) if ms >= 0 => now.saturating_add(ms.unsigned_abs()),
            _ => u64::MAX,
        };
    }
    Ok(record)
}

/// Why a row of a listing cannot be read, for the operator.
fn damage(error: StoreError) -> String {
    match error {
        StoreError::Damaged(why) => why,
        other => other.to_string(),
    }
}

/// One value of a reply, as `T`.
fn from_value<T: FromRedisValue>(value: Value) -> Result<T, StoreError> {
    FromRedisValue::from_redis_value(value).map_err(|e| StoreError::Backend(e.to_string()))
}

/// A record as a script reports it: `kind` `s` with the value and its key's
/// TTL (read at `now_ms`), `h` with an earlier version's hash fields,
/// `none` for no key; any other (a list, a set...) is a damaged record.
fn read_record(
    kind: &str,
    record: Value,
    pttl: Value,
    now_ms: u64,
) -> Result<Option<Record>, StoreError> {
    match kind {
        "s" => {
            let value: Vec<u8> = from_value(record)?;
            let pttl_ms = match pttl {
                Value::Int(ms) => ms,
                _ => -1,
            };
            let lease = (pttl_ms >= 0).then_some(Lease { now_ms, pttl_ms });
            compact::parse(value, lease).map(Some)
        }
        // A head read has the status too: a completed hash without one is
        // damaged in filtered listings as well (regression: only lookups,
        // claims and the unfiltered listing said so).
        "h" => {
            let record = parse_record(from_value(record)?)?;
            record.as_ref().map(compact::check_complete).transpose()?;
            Ok(record)
        }
        "none" => Ok(None),
        other => Err(StoreError::Damaged(format!(
            "a Redis {other} at the key, not a record"
        ))),
    }
}
