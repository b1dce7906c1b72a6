//! Concurrent claims of one key on this instance share one read of a
//! settled record: the first goes to Redis (it leads), those that come
//! while it is out follow and are answered from the completed or unknown
//! record it found, or make their own claim when it found none (it
//! claimed the key) or one still in flight.
//!
//! Why: a claim's `SET .. NX GET` brings the whole record back, body and
//! all, over the one connection every call shares. A retry storm of a
//! completed key with a large answer (an audit: 300 duplicates of 512 KiB
//! answers at once) read it once per duplicate, so claims ran past
//! `op_timeout` against a healthy Redis: `503 store_unavailable`, or under
//! `on_unavailable: forward` the completed request was executed again.
//!
//! A follower's answer is a record read at most one claim's round trip
//! before it would have read it itself. A completed or unknown record
//! changes only when it expires or an operator purges or resolves it, so
//! at worst a follower replays an answer that was purged a moment before
//! it arrived: never a second execution.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, State};

/// Slots of claims out at once: a claim takes its key's slot while it is
/// out, unless a claim of another key holds it (then it goes uncollapsed).
const SLOTS: usize = 64;

/// The claims out to Redis, a slot per key hash. Per claim: a hash of its
/// key and two uncontended locks, no allocation (a flight is made only
/// when a second claim of the key comes; regression, the instruction
/// counts: a map keyed by a copy of each key, and a flight per claim, cost
/// 2.7k instructions and 4 allocations per request on Redis).
pub(super) struct Collapse {
    slots: Box<[Mutex<Option<Out>>]>,
}

/// The claim out in a slot, and its followers' flight once one follows.
struct Out {
    key: Arc<StorageKey>,
    flight: Option<Arc<Flight>>,
}

/// One claim out to Redis, as its followers wait for it.
#[derive(Default)]
pub(super) struct Flight {
    /// What the leader found, set when it is done: a settled record, or
    /// none (the followers claim for themselves).
    found: OnceLock<Option<Record>>,
    done: Notify,
}

/// A claim of a key: it leads (its end is told to followers when this is
/// dropped), follows another, or goes alone (its slot is taken by a claim
/// of another key).
pub(super) enum Joined<'a> {
    Lead(Lead<'a>),
    Follow(Arc<Flight>),
    Alone,
}

/// The leading claim's part: [`Lead::found`] shares what it read; dropped
/// without it (an error, a claim cut short) its followers claim anew.
pub(super) struct Lead<'a> {
    slot: &'a Mutex<Option<Out>>,
    key: &'a Arc<StorageKey>,
    ended: bool,
}

impl Default for Collapse {
    fn default() -> Collapse {
        Collapse {
            slots: (0..SLOTS).map(|_| Mutex::new(None)).collect(),
        }
    }
}

impl Collapse {
    /// Leads a claim of `key`, follows the one already out, or goes alone.
    pub(super) fn join<'a>(&'a self, key: &'a Arc<StorageKey>) -> Joined<'a> {
        let slot = &self.slots[self.slot_of(key)];
        let mut out = lock(slot);
        match &mut *out {
            None => {
                *out = Some(Out {
                    key: key.clone(),
                    flight: None,
                });
                Joined::Lead(Lead {
                    slot,
                    key,
                    ended: false,
                })
            }
            Some(leader) if *leader.key == **key => {
                Joined::Follow(leader.flight.get_or_insert_with(Default::default).clone())
            }
            Some(_) => Joined::Alone,
        }
    }

    /// FNV-1a of the client's key: a slot is only where a claim looks for
    /// another of its key (the key itself is compared), so keys made to
    /// share one only go uncollapsed, and SipHash cost some 480
    /// instructions per claim.
    fn slot_of(&self, key: &StorageKey) -> usize {
        let hash = (key.key.as_bytes().iter()).fold(0xcbf2_9ce4_8422_2325_u64, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        (hash % SLOTS as u64) as usize
    }
}

fn lock(slot: &Mutex<Option<Out>>) -> MutexGuard<'_, Option<Out>> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lead<'_> {
    /// The leader found `record`: shared with its followers if settled
    /// (completed or unknown), copied only when someone follows.
    pub(super) fn found(mut self, record: &Record) {
        self.end(Some(record));
    }

    fn end(&mut self, record: Option<&Record>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        // Out of the slot first: no follower joins after this.
        let flight = {
            let mut out = lock(self.slot);
            match out.take() {
                Some(mine) if Arc::ptr_eq(&mine.key, self.key) => mine.flight,
                other => {
                    *out = other;
                    None
                }
            }
        };
        if let Some(flight) = flight {
            let settled = record.filter(|record| record.state != State::InFlight);
            let _ = flight.found.set(settled.cloned());
            flight.done.notify_waiters();
        }
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        self.end(None);
    }
}

impl Flight {
    /// The settled record the leader found, once it is done (by
    /// `deadline`); none when it found nothing to share, failed, or is
    /// still out at `deadline`.
    pub(super) async fn settled(&self, deadline: Instant) -> Option<Record> {
        let notified = self.done.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before `found` is read: an end in between is not missed.
        notified.as_mut().enable();
        if self.found.get().is_none() {
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
        self.found.get().cloned().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follow(joined: Joined<'_>) -> Arc<Flight> {
        match joined {
            Joined::Follow(flight) => flight,
            _ => panic!("did not follow where a claim of its key was out"),
        }
    }

    fn lead(joined: Joined<'_>) -> Lead<'_> {
        match joined {
            Joined::Lead(lead) => lead,
            _ => panic!("did not lead where its slot was free"),
        }
    }

    /// A key of another slot than `of`'s (`other`: true), or of the same.
    fn key_by_slot(collapse: &Collapse, of: &StorageKey, other: bool) -> Arc<StorageKey> {
        (0..)
            .map(|i| StorageKey::named(&format!("k-{i}")))
            .find(|k| (collapse.slot_of(k) != collapse.slot_of(of)) == other && k != of)
            .map(Arc::new)
            .expect("a key")
    }

    /// Followers get the completed or unknown record their leader read; an
    /// in-flight record, none, or a leader dropped unfinished sends them
    /// to claim for themselves. Another key is never followed: in another
    /// slot it leads, in the same slot it goes alone. Every slot is free
    /// once the claims are done.
    #[tokio::test]
    async fn followers_share_a_settled_record_and_nothing_else() {
        let collapse = Collapse::default();
        let soon = || Instant::now() + std::time::Duration::from_secs(5);
        let a = Arc::new(StorageKey::named("a"));
        let elsewhere = key_by_slot(&collapse, &a, true);
        let beside = key_by_slot(&collapse, &a, false);
        for (state, shared) in [
            (Some(State::Completed), true),
            (Some(State::Unknown), true),
            (Some(State::InFlight), false),
            (None, false),
        ] {
            let leader = lead(collapse.join(&a));
            let other = lead(collapse.join(&elsewhere));
            assert!(matches!(collapse.join(&beside), Joined::Alone));
            let same_key = Arc::new(StorageKey::named("a"));
            let followers = [follow(collapse.join(&same_key)), follow(collapse.join(&a))];
            let found = state.map(Record::bare);
            match &found {
                Some(found) => leader.found(found),
                None => drop(leader),
            }
            for flight in followers {
                let got = flight.settled(soon()).await;
                assert_eq!(got.is_some(), shared, "{state:?}");
                assert_eq!(got.map(|r| r.state), state.filter(|_| shared));
            }
            drop(other);
            assert!(collapse.slots.iter().all(|slot| lock(slot).is_none()));
        }
    }

    /// A follower waits for its leader, at most until its deadline.
    #[tokio::test]
    async fn a_follower_waits_for_its_leader_until_its_deadline() {
        let collapse = Collapse::default();
        let k = Arc::new(StorageKey::named("k"));
        let _leader = lead(collapse.join(&k));
        let flight = follow(collapse.join(&k));
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        assert!(flight.settled(deadline).await.is_none());
        assert!(Instant::now() >= deadline);
    }
}
