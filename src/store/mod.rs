//! The idempotency store: the only code that talks to a store.
//!
//! Two backends behind one small interface: `memory` (embedded, the
//! default) and `redis`. Each transition (claim, complete, release, mark
//! unknown) is one atomic step fenced by the attempt's owner token.

pub mod memory;
mod redis;

use std::time::Duration;

use crate::config::{Backend, OnUnknown, StoreConfig};
use crate::idempotency::decision::Decision;
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, StoredResponse};

pub use memory::MemoryStore;
pub use redis::RedisStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store operation timed out")]
    Timeout,
    #[error("store error: {0}")]
    Backend(String),
    #[error("memory store is full ({0} records)")]
    Full(u64),
}

/// What one claim did.
#[derive(Debug, Clone)]
pub struct ClaimReply {
    pub decision: Decision,
    /// The record as it was before the claim (none for a new key).
    pub record: Option<Record>,
    /// The store's clock at the claim, in ms since the epoch.
    pub now_ms: u64,
}

/// The arguments of a claim.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    pub key: &'a StorageKey,
    pub fingerprint: &'a str,
    pub token: &'a str,
    pub lease: Duration,
    pub ttl: Duration,
    pub on_unknown: OnUnknown,
}

pub enum Store {
    Memory(MemoryStore),
    Redis(Box<RedisStore>),
}

impl Store {
    /// Opens the configured store. Redis connects lazily, so the proxy starts
    /// (and answers `store_unavailable` per policy) while Redis is down.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        match &config.backend {
            Backend::Memory => Ok(Store::Memory(MemoryStore::new(config))),
            Backend::Redis { url } => Ok(Store::Redis(Box::new(RedisStore::new(url, config)?))),
            Backend::Cluster { .. } => Err(StoreError::Backend(
                "Redis Cluster is not supported yet; use store.url".into(),
            )),
        }
    }

    pub async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimReply, StoreError> {
        match self {
            Store::Memory(s) => s.claim(req),
            Store::Redis(s) => s.claim(req).await,
        }
    }

    /// Records the response; false when the attempt no longer owns the key.
    pub async fn complete(
        &self,
        key: &StorageKey,
        token: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(s) => s.complete(key, token, response, ttl),
            Store::Redis(s) => s.complete(key, token, response, ttl).await,
        }
    }

    /// Deletes the record so that a retry makes a new attempt; fenced by the token.
    pub async fn release(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        match self {
            Store::Memory(s) => s.release(key, token),
            Store::Redis(s) => s.release(key, token).await,
        }
    }

    /// Turns the attempt's record `unknown`; fenced by the token.
    pub async fn mark_unknown(&self, key: &StorageKey, token: &str) -> Result<bool, StoreError> {
        match self {
            Store::Memory(s) => s.mark_unknown(key, token),
            Store::Redis(s) => s.mark_unknown(key, token).await,
        }
    }

    pub async fn get(&self, key: &StorageKey) -> Result<Option<Record>, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.get(key)),
            Store::Redis(s) => s.get(key).await,
        }
    }

    /// Deletes a record whatever its state (an operator's purge).
    pub async fn purge(&self, key: &StorageKey) -> Result<bool, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.purge(key)),
            Store::Redis(s) => s.purge(key).await,
        }
    }

    /// Waits until the record may have changed, at most `at_most`. The memory
    /// store wakes waiters on every transition; Redis is polled with backoff
    /// by the caller, so this only sleeps.
    pub async fn changed(&self, at_most: Duration) {
        match self {
            Store::Memory(s) => s.changed(at_most).await,
            Store::Redis(_) => tokio::time::sleep(at_most).await,
        }
    }

    /// Every live record, optionally of one route (operator listings; not for the hot path).
    pub async fn records(
        &self,
        route: Option<&str>,
    ) -> Result<Vec<(StorageKey, Record)>, StoreError> {
        let all = match self {
            Store::Memory(s) => s.records(),
            Store::Redis(s) => s.records(route).await?,
        };
        Ok(all
            .into_iter()
            .filter(|(k, _)| route.is_none_or(|r| k.route == r))
            .collect())
    }

    /// A cheap liveness probe (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(s) => s.ping().await,
        }
    }
}
