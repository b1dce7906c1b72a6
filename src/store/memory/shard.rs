//! A shard of the memory store: its records, the heap of their expiries,
//! and the task that sweeps expired records away.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Weak;
use std::sync::atomic::Ordering;

use hashbrown::HashTable;

use super::{Inner, SHARDS, SWEEP_EVERY, now_ms};
use crate::idempotency::key::StorageKey;
use crate::idempotency::record::Record;

/// One shard: its records, and when they expire.
#[derive(Default)]
pub(super) struct Shard {
    pub(super) table: HashTable<Slot>,
    /// `(expires_ms, hash)` of every expiry written, soonest first. An entry
    /// whose record is gone, or now expires later, is dropped when it comes
    /// up (the later expiry has an entry of its own).
    pub(super) expiry: Expiries,
}

/// A record in a shard's table, boxed, with its key's hash beside it: a
/// table that grows moves 16 bytes per record and hashes nothing. (Held
/// inline and rehashed, a record of some 300 bytes made each doubling of a
/// shard stall the worker: about 1 ms at 8k records a shard, and all 64
/// shards double at about the same time.)
pub(super) struct Slot {
    pub(super) hash: u64,
    pub(super) entry: Box<(StorageKey, Record)>,
}

impl Slot {
    pub(super) fn record(&self) -> &Record {
        &self.entry.1
    }

    pub(super) fn record_mut(&mut self) -> &mut Record {
        &mut self.entry.1
    }
}

/// A shard's expiries: `(expires_ms, hash)`, soonest first.
#[derive(Default)]
pub(super) struct Expiries(BinaryHeap<Reverse<(u64, u64)>>);

impl Expiries {
    /// Notes that the record at `hash` now expires at `at`: every write of an
    /// expiry goes through here, so the sweep finds it.
    pub(super) fn note(&mut self, hash: u64, at: u64) {
        self.0.push(Reverse((at, hash)));
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

impl Shard {
    /// Removes the records expired at `now`, returning how many.
    pub(super) fn sweep(&mut self, now: u64) -> usize {
        let mut removed = 0;
        while let Some(&Reverse((at, hash))) = self.expiry.0.peek() {
            if at > now {
                break;
            }
            self.expiry.0.pop();
            let expired = |slot: &Slot| slot.hash == hash && slot.record().expires_ms <= now;
            while let Ok(found) = self.table.find_entry(hash, expired) {
                found.remove();
                removed += 1;
            }
        }
        // Released keys and moved expiries leave entries behind until their
        // time comes: past twice the records, rebuild from the records.
        if self.expiry.len() > 2 * self.table.len() + 1024 {
            self.expiry.0 = self
                .table
                .iter()
                .map(|slot| Reverse((slot.record().expires_ms, slot.hash)))
                .collect();
        }
        removed
    }
}

impl Inner {
    /// Sweeps shard `index` as at `now`, keeping the record count right.
    pub(super) fn sweep_shard(&self, index: usize, now: u64) -> usize {
        let removed = self.shards[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sweep(now);
        self.len.fetch_sub(removed as u64, Ordering::Relaxed);
        removed
    }
}

/// Drops expired records until the store is gone: one shard per tick, each
/// shard once per `SWEEP_EVERY`; a visit pops the shard's expiry heap up
/// to now, so it costs what expired, not what the shard holds.
pub(super) async fn sweep(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY / SHARDS as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for index in (0..SHARDS).cycle() {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.sweep_shard(index, now_ms());
    }
}
