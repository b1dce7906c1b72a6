//! The embedded store: sharded maps in this process. Nothing survives a restart.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use super::{ClaimReply, ClaimRequest, StoreError};
use crate::config::StoreConfig;
use crate::idempotency::decision::{Decision, decide};
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, State, StoredResponse};

/// Enough shards that two cores never queue on one lock.
const SHARDS: usize = 64;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Vec<Mutex<HashMap<StorageKey, Record>>>,
    hasher: RandomState,
    /// Records held, for the `max_records` bound.
    len: AtomicU64,
    max_records: u64,
    /// Woken on every transition, for `concurrent: wait`.
    changed: Notify,
}

impl MemoryStore {
    pub fn new(config: &StoreConfig) -> MemoryStore {
        let inner = Arc::new(Inner {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            len: AtomicU64::new(0),
            max_records: config.max_records,
            changed: Notify::new(),
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(sweep(Arc::downgrade(&inner)));
        }
        MemoryStore { inner }
    }

    pub fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimReply, StoreError> {
        let now_ms = now_ms();
        let mut shard = self.inner.shard(req.key);
        let existing = shard
            .get(req.key)
            .filter(|r| r.expires_ms > now_ms)
            .cloned();
        let decision = decide(existing.as_ref(), req.fingerprint, now_ms, req.on_unknown);
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
                    created_ms: now_ms,
                    expires_ms: now_ms + millis(req.ttl),
                    response: None,
                };
                if shard.insert(req.key.clone(), record).is_none() {
                    self.inner.len.fetch_add(1, Ordering::Relaxed);
                }
            }
            Decision::BecomeUnknown => {
                if let Some(r) = shard.get_mut(req.key) {
                    r.state = State::Unknown;
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
        token: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let done = self.owned(key, token, |r| {
            r.state = State::Completed;
            r.response = Some(response.clone());
            r.expires_ms = now_ms() + millis(ttl);
        });
        Ok(done)
    }

    pub fn release(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        let mut shard = self.inner.shard(key);
        let owned = shard
            .get(key)
            .is_some_and(|r| r.state == State::InFlight && r.token == token);
        if owned {
            shard.remove(key);
            self.inner.len.fetch_sub(1, Ordering::Relaxed);
        }
        drop(shard);
        self.inner.changed.notify_waiters();
        Ok(owned)
    }

    pub fn mark_unknown(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        Ok(self.owned(key, token, |r| r.state = State::Unknown))
    }

    pub fn resolve(&self, key: &StorageKey, response: &StoredResponse, ttl: Duration) -> bool {
        let mut shard = self.inner.shard(key);
        let now = now_ms();
        let done = match shard.get_mut(key).filter(|r| r.expires_ms > now) {
            Some(r) => {
                r.state = State::Completed;
                r.response = Some(response.clone());
                r.expires_ms = now + millis(ttl);
                true
            }
            None => false,
        };
        drop(shard);
        self.inner.changed.notify_waiters();
        done
    }

    pub fn get(&self, key: &StorageKey) -> Option<Record> {
        let now = now_ms();
        self.inner
            .shard(key)
            .get(key)
            .filter(|r| r.expires_ms > now)
            .cloned()
    }

    pub fn purge(&self, key: &StorageKey) -> bool {
        let removed = self.inner.shard(key).remove(key).is_some();
        if removed {
            self.inner.len.fetch_sub(1, Ordering::Relaxed);
            self.inner.changed.notify_waiters();
        }
        removed
    }

    /// Every live record, for the operator's listings.
    pub fn records(&self) -> Vec<(StorageKey, Record)> {
        let now = now_ms();
        let mut out = Vec::new();
        for shard in &self.inner.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(
                shard
                    .iter()
                    .filter(|(_, r)| r.expires_ms > now)
                    .map(|(k, r)| (k.clone(), r.clone())),
            );
        }
        out
    }

    pub async fn changed(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.inner.changed.notified()).await;
    }

    /// Applies `change` when `token` still owns the in-flight attempt.
    fn owned(&self, key: &StorageKey, token: &str, change: impl FnOnce(&mut Record)) -> bool {
        let mut shard = self.inner.shard(key);
        let done = match shard.get_mut(key) {
            Some(r) if r.state == State::InFlight && r.token == token => {
                change(r);
                true
            }
            _ => false,
        };
        drop(shard);
        self.inner.changed.notify_waiters();
        done
    }
}

impl Inner {
    fn shard(&self, key: &StorageKey) -> MutexGuard<'_, HashMap<StorageKey, Record>> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        // A panic while holding a shard lock leaves plain data behind: keep using it.
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drops expired records until the store is gone: one shard per tick, so
/// that a pass over a large store never stalls the worker it runs on (each
/// shard is visited once per `SWEEP_EVERY`).
async fn sweep(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY / SHARDS as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for index in (0..SHARDS).cycle() {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = now_ms();
        let mut shard = inner.shards[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = shard.len();
        shard.retain(|_, r| r.expires_ms > now);
        inner
            .len
            .fetch_sub((before - shard.len()) as u64, Ordering::Relaxed);
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
