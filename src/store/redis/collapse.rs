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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::idempotency::key::StorageKey;
use crate::idempotency::record::{Record, State};

/// The claims out to Redis, by key, with how many follow each.
#[derive(Default)]
pub(super) struct Collapse {
    flights: Mutex<HashMap<StorageKey, (Arc<Flight>, usize)>>,
}

/// One claim out to Redis.
#[derive(Default)]
pub(super) struct Flight {
    /// What the leader found, set when it is done, if anyone follows: a
    /// settled record, or none (the followers claim for themselves).
    found: OnceLock<Option<Record>>,
    done: Notify,
}

/// A claim of a key: it leads (its end is told to followers when this is
/// dropped), or follows another.
pub(super) enum Joined<'a> {
    Lead(Lead<'a>),
    Follow(Arc<Flight>),
}

/// The leading claim's part: [`Lead::found`] shares what it read; dropped
/// without it (an error, a claim cut short) its followers claim anew.
pub(super) struct Lead<'a> {
    collapse: &'a Collapse,
    key: &'a StorageKey,
    flight: Option<Arc<Flight>>,
}

impl Collapse {
    /// Leads a claim of `key`, or follows the one already out.
    pub(super) fn join<'a>(&'a self, key: &'a StorageKey) -> Joined<'a> {
        let mut flights = self.lock();
        if let Some((flight, followers)) = flights.get_mut(key) {
            *followers += 1;
            return Joined::Follow(flight.clone());
        }
        let flight = Arc::new(Flight::default());
        flights.insert(key.clone(), (flight.clone(), 0));
        Joined::Lead(Lead {
            collapse: self,
            key,
            flight: Some(flight),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StorageKey, (Arc<Flight>, usize)>> {
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Lead<'_> {
    /// The leader found `record`: shared with its followers if settled
    /// (completed or unknown), copied only when someone follows.
    pub(super) fn found(mut self, record: &Record) {
        self.end(Some(record));
    }

    fn end(&mut self, record: Option<&Record>) {
        let Some(flight) = self.flight.take() else {
            return;
        };
        // Out of the map first: no follower joins after the count is read.
        let followers = match self.collapse.lock().remove(self.key) {
            Some((_, followers)) => followers,
            None => 0,
        };
        if followers > 0 {
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
            Joined::Lead(_) => panic!("led where a claim was out"),
        }
    }

    fn lead(joined: Joined<'_>) -> Lead<'_> {
        match joined {
            Joined::Lead(lead) => lead,
            Joined::Follow(_) => panic!("followed where no claim was out"),
        }
    }

    /// Followers get the completed or unknown record their leader read; an
    /// in-flight record, none, or a leader dropped unfinished sends them
    /// to claim for themselves. Another key is never followed.
    #[tokio::test]
    async fn followers_share_a_settled_record_and_nothing_else() {
        let collapse = Collapse::default();
        let soon = || Instant::now() + std::time::Duration::from_secs(5);
        for (state, shared) in [
            (Some(State::Completed), true),
            (Some(State::Unknown), true),
            (Some(State::InFlight), false),
            (None, false),
        ] {
            let (a, b) = (StorageKey::named("a"), StorageKey::named("b"));
            let leader = lead(collapse.join(&a));
            let other = lead(collapse.join(&b));
            let followers = [follow(collapse.join(&a)), follow(collapse.join(&a))];
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
            assert!(collapse.lock().is_empty(), "every flight left the map");
        }
    }

    /// A follower waits for its leader, at most until its deadline.
    #[tokio::test]
    async fn a_follower_waits_for_its_leader_until_its_deadline() {
        let collapse = Collapse::default();
        let k = StorageKey::named("k");
        let _leader = lead(collapse.join(&k));
        let flight = follow(collapse.join(&k));
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        assert!(flight.settled(deadline).await.is_none());
        assert!(Instant::now() >= deadline);
    }
}
