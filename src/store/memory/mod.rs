//! The embedded store: sharded maps in this process. Nothing survives a restart.
//!
//! Each operation hashes its key once (SipHash, randomly keyed): the hash
//! picks the shard and finds the record in the shard's table
//! (`hashbrown::HashTable`, which takes the hash instead of rehashing; each
//! record is boxed with its hash beside it, so a table grows without a stall).
//! Each shard also keeps its expiries in a heap, so the sweep visits what
//! has expired, not every record (`shard.rs`).

mod shard;

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::hash_table::Entry;

use super::{Attempt, ClaimReply, ClaimRequest, Resolved, StoreError};
use crate::config::StoreConfig;
use crate::idempotency::decision::{Decision, decide};
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, State, StoredResponse};
use shard::{Shard, Slot, sweep};

/// Enough shards that two cores never queue on one lock.
const SHARDS: usize = 64;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    /// Records held, for the `max_records` bound.
    len: AtomicU64,
    max_records: u64,
}

impl MemoryStore {
    pub fn new(config: &StoreConfig) -> MemoryStore {
        let inner = Arc::new(Inner {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            len: AtomicU64::new(0),
            max_records: config.max_records,
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(sweep(Arc::downgrade(&inner)));
        }
        MemoryStore { inner }
    }

    /// Records held now, and the `max_records` bound.
    pub fn fill(&self) -> (u64, u64) {
        (
            self.inner.len.load(Ordering::Relaxed),
            self.inner.max_records,
        )
    }

    pub fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimReply, StoreError> {
        let now_ms = now_ms();
        let (hash, mut guard) = self.inner.shard(req.key);
        let shard = &mut *guard;
        let entry = shard.table.entry(hash, is(hash, req.key), |slot| slot.hash);
        let existing = match &entry {
            Entry::Occupied(found) => Some(found.get().record()),
            Entry::Vacant(_) => None,
        }
        .filter(|r| r.expires_ms > now_ms)
        .cloned();
        let decision = decide(
            existing.as_ref(),
            req.fingerprint,
            req.token,
            now_ms,
            req.on_unknown,
        );
        match decision {
            Decision::Claim => {
                if existing.is_none()
                    && self.inner.len.load(Ordering::Relaxed) >= self.inner.max_records
                {
                    return Err(StoreError::Full(self.inner.max_records));
                }
                let record = Record {
                    state: State::InFlight,
                    fingerprint: req.fingerprint.to_owned(),
                    token: req.token.to_owned(),
                    lease_end_ms: now_ms + millis(req.lease),
                    created_ms: req.created_ms,
                    // Outlives its lease, to turn unknown (and last the ttl) when it ends.
                    expires_ms: now_ms + millis(req.lease + req.ttl),
                    response: None,
                };
                shard.expiry.note(hash, record.expires_ms);
                match entry {
                    Entry::Occupied(mut found) => *found.get_mut().record_mut() = record,
                    Entry::Vacant(vacant) => {
                        vacant.insert(Slot {
                            hash,
                            entry: Box::new((StorageKey::clone(req.key), record)),
                        });
                        self.inner.len.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Decision::BecomeUnknown => {
                if let Entry::Occupied(mut found) = entry {
                    let record = found.get_mut().record_mut();
                    record.state = State::Unknown;
                    record.expires_ms = now_ms + millis(req.ttl);
                    shard.expiry.note(hash, record.expires_ms);
                }
            }
            _ => {}
        }
        Ok(ClaimReply {
            decision,
            record: existing,
        })
    }

    pub fn complete(
        &self,
        key: &StorageKey,
        attempt: &Attempt<'_>,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.settle(key, attempt, ttl, State::Completed, Some(response)))
    }

    /// Ends `attempt`'s record in `state` (with `response`), kept `ttl`
    /// from now; a record that is gone (purged while the attempt ran) is
    /// written whole, as on Redis. False when another attempt holds the key.
    fn settle(
        &self,
        key: &StorageKey,
        attempt: &Attempt<'_>,
        ttl: Duration,
        state: State,
        response: Option<StoredResponse>,
    ) -> bool {
        let now = now_ms();
        let expires = now + millis(ttl);
        // Only where the record is gone: the common case keeps its own.
        let whole = |response| Record {
            state,
            fingerprint: attempt.fingerprint.to_owned(),
            token: attempt.token.to_owned(),
            lease_end_ms: attempt.created_ms + millis(attempt.lease),
            created_ms: attempt.created_ms,
            expires_ms: expires,
            response,
        };
        let (hash, mut guard) = self.inner.shard(key);
        let shard = &mut *guard;
        let done = match shard.table.entry(hash, is(hash, key), |slot| slot.hash) {
            // Purged while the attempt ran: written whole, as on Redis.
            Entry::Vacant(vacant) => {
                vacant.insert(Slot {
                    hash,
                    entry: Box::new((key.clone(), whole(response))),
                });
                self.inner.len.fetch_add(1, Ordering::Relaxed);
                true
            }
            Entry::Occupied(mut found) => {
                let r = found.get_mut().record_mut();
                if r.expires_ms <= now {
                    // Gone, as on Redis (not swept yet).
                    *r = whole(response);
                    true
                } else if owns(r, attempt.token, now) {
                    r.state = state;
                    r.response = response;
                    r.expires_ms = expires;
                    true
                } else {
                    r.token == attempt.token && r.state == state && r.expires_ms > now
                }
            }
        };
        if done {
            shard.expiry.note(hash, expires);
        }
        done
    }

    pub fn release(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        let now = now_ms();
        let (hash, mut shard) = self.inner.shard(key);
        let owned = match shard.table.find_entry(hash, is(hash, key)) {
            Ok(found) if owns(found.get().record(), token, now) => {
                found.remove();
                self.inner.len.fetch_sub(1, Ordering::Relaxed);
                true
            }
            _ => false,
        };
        Ok(owned)
    }

    pub fn mark_unknown(
        &self,
        key: &StorageKey,
        attempt: &Attempt<'_>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.settle(key, attempt, ttl, State::Unknown, None))
    }

    pub fn resolve(&self, key: &StorageKey, response: &StoredResponse, ttl: Duration) -> Resolved {
        let (hash, mut guard) = self.inner.shard(key);
        let shard = &mut *guard;
        let now = now_ms();
        let found = shard
            .table
            .find_mut(hash, is(hash, key))
            .map(Slot::record_mut);
        match found.filter(|r| r.expires_ms > now) {
            Some(r) if let Some(lease_left_ms) = running(r, now) => {
                Resolved::InFlight { lease_left_ms }
            }
            Some(r) => {
                r.state = State::Completed;
                r.response = Some(response.clone());
                r.expires_ms = now + millis(ttl);
                shard.expiry.note(hash, r.expires_ms);
                Resolved::Done
            }
            None => Resolved::Missing,
        }
    }

    pub fn get(&self, key: &StorageKey) -> Option<Record> {
        let now = now_ms();
        let (hash, shard) = self.inner.shard(key);
        shard
            .table
            .find(hash, is(hash, key))
            .map(Slot::record)
            .filter(|r| r.expires_ms > now)
            .cloned()
    }

    pub fn purge(&self, key: &StorageKey, force: bool) -> Resolved {
        let (hash, mut shard) = self.inner.shard(key);
        let now = now_ms();
        let Ok(found) = shard.table.find_entry(hash, is(hash, key)) else {
            return Resolved::Missing;
        };
        let record = Slot::record(found.get());
        if record.expires_ms <= now {
            return Resolved::Missing;
        }
        if !force && let Some(lease_left_ms) = running(record, now) {
            return Resolved::InFlight { lease_left_ms };
        }
        found.remove();
        self.inner.len.fetch_sub(1, Ordering::Relaxed);
        Resolved::Done
    }

    /// The live records `wanted` accepts, at most `limit` of them, for the
    /// operator's listings; a record is tested before it is copied, without
    /// its body's bytes ([`Record::listed`], as Redis lists them).
    pub fn records(
        &self,
        wanted: impl Fn(&StorageKey, &Record) -> bool,
        limit: usize,
    ) -> Vec<(StorageKey, Record)> {
        let now = now_ms();
        let mut out = Vec::new();
        for shard in &self.inner.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(
                shard
                    .table
                    .iter()
                    .filter(|slot| {
                        let (key, record) = &*slot.entry;
                        record.expires_ms > now && wanted(key, record)
                    })
                    .take(limit - out.len())
                    .map(|slot| (slot.entry.0.clone(), slot.entry.1.listed())),
            );
            if out.len() >= limit {
                break;
            }
        }
        out
    }
}

/// Whether `token`'s attempt still holds `record`, in flight, at `now`: an
/// expired record is gone, as it is from Redis, even before the sweep.
fn owns(record: &Record, token: &str, now: u64) -> bool {
    record.state == State::InFlight && record.token == token && record.expires_ms > now
}

impl Inner {
    /// The key's hash and its shard, locked.
    fn shard(&self, key: &StorageKey) -> (u64, MutexGuard<'_, Shard>) {
        let hash = self.hasher.hash_one(key);
        let index = shard_index(hash);
        // A panic while holding a shard lock leaves plain data behind: keep using it.
        (
            hash,
            self.shards[index].lock().unwrap_or_else(|e| e.into_inner()),
        )
    }
}

/// The shard of the key hashed to `hash`: bits 32..38, which the table
/// itself uses neither for its bucket index (low bits) nor for its tags
/// (top 7 bits).
fn shard_index(hash: u64) -> usize {
    ((hash >> 32) as usize) % SHARDS
}

/// Finds `key` (whose hash is `hash`) in a shard.
fn is(hash: u64, key: &StorageKey) -> impl Fn(&Slot) -> bool + '_ {
    move |slot| slot.hash == hash && slot.entry.0 == *key
}

/// Milliseconds since the Unix epoch by a clock that only moves on: the
/// wall clock read once, at first use, plus the monotonic time since.
/// Leases and expiries are judged on it, as the attempt's own lease timer
/// (a tokio `Instant`) runs (regression, a review: judged on the wall
/// clock, a step forward longer than a lease (NTP, a VM resumed) ended
/// running attempts' leases, and a duplicate ran the request again or was
/// told its outcome was unknown while it ran). Times shown in listings
/// are off by any step the wall clock took since the process started.
pub fn now_ms() -> u64 {
    static START: OnceLock<(Instant, u64)> = OnceLock::new();
    let (at, wall_ms) = START.get_or_init(|| {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH);
        (Instant::now(), wall.map_or(0, millis))
    });
    wall_ms.saturating_add(millis(at.elapsed()))
}

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The lease left (ms) of a record whose attempt is still running, which
/// an operator's resolve or purge leaves alone.
fn running(record: &Record, now: u64) -> Option<u64> {
    (record.state == State::InFlight && record.lease_end_ms > now)
        .then(|| record.lease_end_ms - now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, OnUnavailable, OnUnknown};

    fn store(max_records: u64) -> MemoryStore {
        MemoryStore::new(&StoreConfig {
            backend: Backend::Memory,
            key_prefix: String::new(),
            op_timeout: Duration::from_secs(1),
            on_unavailable: OnUnavailable::Reject,
            max_records,
            tls: None,
        })
    }

    fn key(i: usize) -> StorageKey {
        StorageKey {
            route: "r".into(),
            scope: "s".into(),
            key: format!("k{i}"),
        }
    }

    fn claim(store: &MemoryStore, key: &StorageKey) -> Decision {
        claim_for(store, key, Duration::from_secs(60))
    }

    fn claim_for(store: &MemoryStore, key: &StorageKey, ttl: Duration) -> Decision {
        let key = Arc::new(key.clone());
        let req = ClaimRequest {
            key: &key,
            fingerprint: "fp",
            token: "t",
            lease: Duration::from_secs(10),
            ttl,
            created_ms: now_ms(),
            on_unknown: OnUnknown::Lock,
            waits: false,
        };
        store.claim(&req).unwrap().decision
    }

    /// The attempt `claim_for` made.
    const ATTEMPT: Attempt<'static> = Attempt {
        token: "t",
        fingerprint: "fp",
        lease: Duration::from_secs(10),
        created_ms: 0,
    };

    /// Sweeps every shard as at `now`, as the sweep task does one per tick.
    fn sweep_all(store: &MemoryStore, now: u64) -> usize {
        (0..SHARDS).map(|i| store.inner.sweep_shard(i, now)).sum()
    }

    fn heap_entries(store: &MemoryStore) -> usize {
        let shards = &store.inner.shards;
        shards.iter().map(|s| s.lock().unwrap().expiry.len()).sum()
    }

    /// Records of a short ttl expire while records of a long ttl, written
    /// before them into the same shards, stay; a completion's later expiry
    /// keeps its record past the claim's.
    #[test]
    fn the_sweep_removes_what_expired_whatever_the_order_of_ttls() {
        let store = store(1_000_000);
        let (short, long) = (Duration::from_secs(5), Duration::from_secs(3600));
        for i in 0..500 {
            assert_eq!(claim_for(&store, &key(i), long), Decision::Claim);
        }
        for i in 500..1000 {
            assert_eq!(claim_for(&store, &key(i), short), Decision::Claim);
        }
        let response = StoredResponse {
            status: 201,
            headers: Default::default(),
            body: None,
            body_size: 0,
        };
        // Completed with the long ttl: its claim's short expiry no longer holds.
        assert!(store.complete(&key(999), &ATTEMPT, response, long).unwrap());
        let in_a_minute = now_ms() + 60_000;
        assert_eq!(sweep_all(&store, in_a_minute), 499);
        assert_eq!(store.inner.len.load(Ordering::Relaxed), 501);
        assert!(store.get(&key(0)).is_some());
        assert!(store.get(&key(999)).is_some());
        let left: usize = (500..999)
            .filter(|&i| {
                let (hash, shard) = store.inner.shard(&key(i));
                shard.table.find(hash, is(hash, &key(i))).is_some()
            })
            .count();
        assert_eq!(left, 0, "short-ttl records left in the tables");
        assert_eq!(sweep_all(&store, now_ms() + 7_200_000), 501);
        assert_eq!(store.inner.len.load(Ordering::Relaxed), 0);
    }

    /// Regression: records were held inline in the shard tables (about 300
    /// bytes each) and rehashed whenever a table grew, so each doubling
    /// stalled the worker for up to milliseconds (p99 of paced S2 runs). A
    /// slot is the hash and a pointer; a growing table never calls a hasher.
    #[test]
    fn growing_a_shard_moves_slots_of_a_hash_and_a_pointer() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
        let store = store(1_000_000);
        for i in 0..20_000 {
            assert_eq!(claim(&store, &key(i)), Decision::Claim);
        }
        // Every record is found again by its stored hash after the growth.
        for i in (0..20_000).step_by(97) {
            assert!(store.get(&key(i)).is_some(), "key {i}");
        }
    }

    /// Keys claimed and released leave heap entries behind; the sweep
    /// keeps them within twice the records (plus a little per shard).
    #[test]
    fn released_keys_do_not_grow_the_expiry_heaps_without_bound() {
        let store = store(1_000_000);
        for i in 0..50_000 {
            assert_eq!(claim(&store, &key(i)), Decision::Claim);
            assert!(store.release(&key(i), "t").unwrap());
        }
        assert_eq!(heap_entries(&store), 50_000);
        assert_eq!(sweep_all(&store, now_ms()), 0);
        assert!(
            heap_entries(&store) <= 1024 * SHARDS,
            "{} entries for no records",
            heap_entries(&store)
        );
    }

    /// The hash picks the shard and finds the entry in the shard's table:
    /// both must agree through the tables' growth, removals and counts.
    #[test]
    fn thousands_of_keys_stay_findable_as_the_tables_grow() {
        let store = store(1_000_000);
        let n = 20_000;
        let response = StoredResponse {
            status: 201,
            headers: Default::default(),
            body: Some("ok".into()),
            body_size: 2,
        };
        for i in 0..n {
            assert_eq!(claim(&store, &key(i)), Decision::Claim);
        }
        for i in 0..n {
            let ttl = Duration::from_secs(60);
            if i % 2 == 0 {
                assert!(store.release(&key(i), "t").unwrap());
            } else {
                assert!(
                    store
                        .complete(&key(i), &ATTEMPT, response.clone(), ttl)
                        .unwrap()
                );
            }
        }
        assert_eq!(store.inner.len.load(Ordering::Relaxed), n as u64 / 2);
        assert_eq!(store.records(|_, _| true, usize::MAX).len(), n / 2);
        assert_eq!(store.records(|_, _| true, 3).len(), 3, "a limit");
        for i in 0..n {
            let want = if i % 2 == 0 {
                Decision::Claim
            } else {
                Decision::Replay
            };
            assert_eq!(claim(&store, &key(i)), want, "key {i}");
        }
        assert!(matches!(store.purge(&key(1), false), Resolved::Done));
        assert!(store.get(&key(1)).is_none());
        assert_eq!(store.inner.len.load(Ordering::Relaxed), n as u64 - 1);
    }
}
