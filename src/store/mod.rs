//! The idempotency store: the only code that talks to a store.
//!
//! Two backends behind one small interface: `memory` (embedded, the
//! default) and `redis`. Each transition (claim, complete, release, mark
//! unknown) is one atomic step fenced by the attempt's owner token. Every
//! call is timed and its failures counted here. Redis calls are boxed: their
//! futures are large, and every future that awaits a store call would carry
//! (and copy) their size even on the memory store.

pub mod memory;
mod redis;
mod waiters;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;

use crate::config::{Backend, OnUnknown, StoreConfig};
use crate::idempotency::decision::Decision;
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, StoredResponse};
use crate::metrics::{Metrics, OpLabels};

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// A listing's filter (`Store::records`), judging a record by its key,
/// state and lease, not by its response.
pub type Keep<'a> = dyn Fn(&StorageKey, &Record) -> bool + Sync + 'a;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store operation timed out")]
    Timeout,
    #[error("store error: {0}")]
    Backend(String),
    /// No connection could be made (refused, authentication failed): the
    /// operation was never sent, so nothing of it needs undoing.
    #[error("store unreachable: {0}")]
    Unreachable(String),
    /// No connection was ready within `op_timeout` (a server that accepts
    /// but never finishes its handshake, a cluster still being found): the
    /// operation was never sent either.
    #[error("store unreachable: no connection made within op_timeout")]
    NoConnection,
    #[error("memory store is full ({0} records)")]
    Full(u64),
    /// The store answered, with a record no version of idemgate writes: not
    /// an outage (`on_unavailable` does not apply), a record to purge.
    #[error("damaged record in the store: {0}")]
    Damaged(String),
}

impl StoreError {
    /// Whether the operation never reached the store (so nothing of it
    /// can have landed, and nothing needs undoing).
    pub fn never_sent(&self) -> bool {
        matches!(self, StoreError::Unreachable(_) | StoreError::NoConnection)
    }
}

/// What a listing found: the records, and the keys holding a value that
/// idemgate cannot read (with why). A damaged record answers every claim
/// of its key with `500` until it is deleted, so listings show it rather
/// than failing on it.
#[derive(Debug, Default)]
pub struct Listing {
    pub found: Vec<(StorageKey, Record)>,
    pub damaged: Vec<(StorageKey, String)>,
}

impl Listing {
    pub fn is_empty(&self) -> bool {
        self.found.is_empty() && self.damaged.is_empty()
    }

    /// The keys listed, records first, then damaged ones.
    pub fn keys(&self) -> impl Iterator<Item = &StorageKey> {
        let found = self.found.iter().map(|(k, _)| k);
        found.chain(self.damaged.iter().map(|(k, _)| k))
    }
}

/// An attempt that holds its key, as its claim wrote it: what a
/// completion needs to write the record whole where it finds none (Redis
/// lost it: a restart, a flush, a failover), rather than lose the outcome.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub token: &'a str,
    pub fingerprint: &'a str,
    pub lease: Duration,
    pub created_ms: u64,
}

/// What an operator's [`Store::resolve`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The response is recorded (or the record purged).
    Done,
    /// There is no record.
    Missing,
    /// The record's attempt is still running; its lease ends in this many ms.
    InFlight { lease_left_ms: u64 },
}

/// What one claim did.
#[derive(Debug, Clone)]
pub struct ClaimReply {
    pub decision: Decision,
    /// The record as it was before the claim (none for a new key).
    pub record: Option<Record>,
}

/// The arguments of a claim.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    /// Shared, so that a Redis claim can name its key to concurrent ones
    /// without copying it (`redis/collapse.rs`).
    pub key: &'a Arc<StorageKey>,
    pub fingerprint: &'a str,
    pub token: &'a str,
    pub lease: Duration,
    pub ttl: Duration,
    /// When the claim was made (the proxy's wall clock): the record's
    /// creation time, shown in listings.
    pub created_ms: u64,
    pub on_unknown: OnUnknown,
    /// Whether the caller waits when the key is in flight (`concurrent:
    /// wait`): on Redis the record is then marked, so that the attempt that
    /// ends it tells the other instances (`redis/events.rs`).
    pub waits: bool,
}

enum Kind {
    Memory(MemoryStore),
    Redis(Box<RedisStore>),
}

pub struct Store {
    kind: Kind,
    metrics: Arc<Metrics>,
    /// Each operation's latency series, looked up in its family on first
    /// use (a lookup hashes the labels under a lock: twice per new key).
    latency: [OnceLock<Histogram>; Op::ALL.len()],
    waiters: Arc<waiters::Waiters>,
}

/// A store operation, as the metrics name it (`op` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Claim,
    Complete,
    Release,
    MarkUnknown,
    Resolve,
    Get,
    Purge,
    List,
    Ping,
}

impl Op {
    const ALL: [Op; 9] = [
        Op::Claim,
        Op::Complete,
        Op::Release,
        Op::MarkUnknown,
        Op::Resolve,
        Op::Get,
        Op::Purge,
        Op::List,
        Op::Ping,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Claim => "claim",
            Op::Complete => "complete",
            Op::Release => "release",
            Op::MarkUnknown => "mark_unknown",
            Op::Resolve => "resolve",
            Op::Get => "get",
            Op::Purge => "purge",
            Op::List => "list",
            Op::Ping => "ping",
        }
    }
}

impl Store {
    /// Opens the configured store. Redis connects lazily, so the proxy starts
    /// (and answers per `on_unavailable`) while Redis is down.
    pub fn open(config: &StoreConfig, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        let kind = match &config.backend {
            Backend::Memory => Kind::Memory(MemoryStore::new(config)),
            Backend::Redis { .. } | Backend::Cluster { .. } => {
                Kind::Redis(Box::new(RedisStore::new(config)?))
            }
        };
        Ok(Store {
            kind,
            metrics,
            latency: Default::default(),
            waiters: Arc::new(waiters::Waiters::new()),
        })
    }

    /// For a serving instance (not the `keys` command): on a standalone
    /// Redis, hear other instances end attempts that this one's waiters wait
    /// on, from a task of the current Tokio runtime. Idempotent.
    /// Whether records outlive this process (Redis) or end with it (memory).
    pub fn outlives_the_process(&self) -> bool {
        matches!(self.kind, Kind::Redis(_))
    }

    pub fn hear_other_instances(&self) {
        if let Kind::Redis(s) = &self.kind {
            s.listen(&self.waiters);
        }
    }

    /// Times one operation and counts its failure.
    async fn timed<T>(
        &self,
        op: Op,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let result = call.await;
        let labels = || OpLabels { op: op.name() };
        self.latency[op as usize]
            .get_or_init(|| self.metrics.store_latency.get_or_create(&labels()).clone())
            .observe(start.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.store_errors.get_or_create(&labels()).inc();
        }
        result
    }

    /// Times a transition of `key` and wakes the waiters of its slot.
    async fn transition<T>(
        &self,
        op: Op,
        key: &StorageKey,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let done = self.timed(op, call).await;
        self.waiters.wake(key);
        done
    }

    pub async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimReply, StoreError> {
        self.timed(Op::Claim, async {
            match &self.kind {
                Kind::Memory(s) => s.claim(req),
                Kind::Redis(s) => Box::pin(s.claim(req)).await,
            }
        })
        .await
    }

    /// Records the response; false when the attempt no longer owns the key.
    /// Its header values may be slices of hyper's read buffers: the memory
    /// store keeps a copy that owns its bytes ([`StoredResponse::detached`]),
    /// Redis encodes them as they are.
    ///
    /// Fenced by the attempt's token; a record that is gone (lost by Redis,
    /// or purged by an operator while the attempt ran) is written whole,
    /// so that the outcome is kept and a retry replays it instead of
    /// reaching the upstream again.
    pub async fn complete(
        &self,
        key: &StorageKey,
        attempt: &Attempt<'_>,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.transition(Op::Complete, key, async {
            match &self.kind {
                Kind::Memory(s) => s.complete(key, attempt, response.detached(), ttl),
                Kind::Redis(s) => Box::pin(s.complete(key, attempt, response, ttl)).await,
            }
        })
        .await
    }

    /// Deletes the record so that a retry makes a new attempt; fenced by the token.
    pub async fn release(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        self.transition(Op::Release, key, async {
            match &self.kind {
                Kind::Memory(s) => s.release(key, token),
                Kind::Redis(s) => Box::pin(s.release(key, token)).await,
            }
        })
        .await
    }

    /// Turns the attempt's record `unknown` for `ttl` from now; fenced by
    /// the token. A record that is gone is written whole, as a completion is.
    pub async fn mark_unknown(
        &self,
        key: &StorageKey,
        attempt: &Attempt<'_>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.transition(Op::MarkUnknown, key, async {
            match &self.kind {
                Kind::Memory(s) => s.mark_unknown(key, attempt, ttl),
                Kind::Redis(s) => Box::pin(s.mark_unknown(key, attempt, ttl)).await,
            }
        })
        .await
    }

    /// An operator records a response by hand for an existing record, e.g.
    /// to resolve an unknown outcome; never over an attempt still running
    /// (within its lease), whose own answer would be thrown away.
    pub async fn resolve(
        &self,
        key: &StorageKey,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<Resolved, StoreError> {
        self.transition(Op::Resolve, key, async {
            match &self.kind {
                Kind::Memory(s) => Ok(s.resolve(key, response, ttl)),
                Kind::Redis(s) => Box::pin(s.resolve(key, response, ttl)).await,
            }
        })
        .await
    }

    pub async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        self.timed(Op::Get, async {
            match &self.kind {
                Kind::Memory(s) => Ok(s.get(key)),
                Kind::Redis(s) => Box::pin(s.get(key)).await,
            }
        })
        .await
    }

    /// Deletes a record (an operator's purge), in one step: not one whose
    /// attempt is still running within its lease, unless `force` (a retry
    /// would run the request again beside it: regression, an operator's
    /// purge of the wrong key made the upstream act twice).
    pub async fn purge(&self, key: &StorageKey, force: bool) -> Result<Resolved, StoreError> {
        self.transition(Op::Purge, key, async {
            match &self.kind {
                Kind::Memory(s) => Ok(s.purge(key, force)),
                Kind::Redis(s) => Box::pin(s.purge(key, force)).await,
            }
        })
        .await
    }

    /// Live records for operator listings (not for the hot path): of one
    /// route and one client key when given, and those `keep` accepts. The
    /// memory store tests a record before copying it; Redis SCANs for the
    /// route and key only and reads a record's response only once `keep`
    /// has accepted it without (`keep` must judge by state, lease and key,
    /// not by the response). So listing the few unknown outcomes copies
    /// neither the whole store nor every record's body. Listed records come
    /// without their bodies' bytes ([`Record::listed`]).
    pub async fn records(
        &self,
        route: Option<&str>,
        key: Option<&str>,
        keep: impl Fn(&StorageKey, &Record) -> bool + Sync,
    ) -> Result<Listing, StoreError> {
        self.list(route, key, Some(&keep), usize::MAX).await
    }

    /// [`Self::records`], at most `limit` of them (the admin API's listing:
    /// a store of a million records listed whole held them all, and their
    /// JSON, at once).
    pub async fn records_up_to(
        &self,
        route: Option<&str>,
        key: Option<&str>,
        keep: impl Fn(&StorageKey, &Record) -> bool + Sync,
        limit: usize,
    ) -> Result<Listing, StoreError> {
        self.list(route, key, Some(&keep), limit).await
    }

    /// [`Self::records`]; `None` keeps every record (read whole at once).
    async fn list(
        &self,
        route: Option<&str>,
        key: Option<&str>,
        keep: Option<&Keep<'_>>,
        limit: usize,
    ) -> Result<Listing, StoreError> {
        let asked =
            |k: &StorageKey| route.is_none_or(|x| k.route == x) && key.is_none_or(|x| k.key == x);
        let wanted = |k: &StorageKey, r: &Record| asked(k) && keep.is_none_or(|keep| keep(k, r));
        let mut listing = self
            .timed(Op::List, async {
                match &self.kind {
                    Kind::Memory(s) => Ok(Listing {
                        found: s.records(wanted, limit),
                        damaged: Vec::new(),
                    }),
                    Kind::Redis(s) => {
                        Box::pin(s.records(route, key, &wanted, keep.is_some(), limit)).await
                    }
                }
            })
            .await?;
        // A SCAN pattern may match a little more than asked.
        listing.damaged.retain(|(k, _)| asked(k));
        Ok(listing)
    }

    /// The records of one client key: in one scope, or in every scope of the route.
    pub async fn find(
        &self,
        route: &str,
        key: &str,
        scope: Option<&str>,
    ) -> Result<Listing, StoreError> {
        let Some(scope) = scope else {
            return self.list(Some(route), Some(key), None, usize::MAX).await;
        };
        let k = StorageKey {
            route: route.to_owned(),
            scope: scope.to_owned(),
            key: key.to_owned(),
        };
        let mut listing = Listing::default();
        match self.get(&k).await {
            Ok(found) => listing.found.extend(found.map(|r| (k, r))),
            Err(StoreError::Damaged(why)) => listing.damaged.push((k, why)),
            Err(e) => return Err(e),
        }
        Ok(listing)
    }

    /// Waits until `key`'s record may have changed, at most `at_most`:
    /// woken by this process's transitions on keys of its slot (1 in 64)
    /// and, on a standalone Redis, by other instances' ending of an attempt
    /// that a waiting claim marked; otherwise the caller's next claim, after
    /// `at_most`, sees them.
    pub async fn changed(&self, key: &StorageKey, at_most: Duration) {
        self.waiters.changed(key, at_most).await;
    }

    /// Wakes the waiters of `key`'s slot, as a transition does.
    pub fn wake(&self, key: &StorageKey) {
        self.waiters.wake(key);
    }

    /// The store's clock in milliseconds since the epoch (Redis `TIME`):
    /// what lease ends are compared with, whichever instance asks.
    pub async fn now_ms(&self) -> Result<u64, StoreError> {
        match &self.kind {
            Kind::Memory(_) => Ok(memory::now_ms()),
            Kind::Redis(s) => s.now_ms().await,
        }
    }

    /// The memory store's records held and its `max_records` bound (`None`
    /// on Redis, whose memory is its own to watch).
    pub fn fill(&self) -> Option<(u64, u64)> {
        match &self.kind {
            Kind::Memory(s) => Some(s.fill()),
            Kind::Redis(_) => None,
        }
    }

    /// A cheap liveness probe (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.kind {
            Kind::Memory(_) => Ok(()),
            Kind::Redis(s) => {
                let pinged = self.timed(Op::Ping, s.ping()).await;
                (self.metrics.store_evicting).set(i64::from(s.evicting()));
                pinged
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Op;

    #[test]
    fn each_operation_has_its_own_series_slot_and_label() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "{op:?} indexes the latency series");
        }
        let mut names: Vec<_> = Op::ALL.iter().map(|op| op.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Op::ALL.len(), "labels are distinct");
    }
}
