//! Wake-ups for `concurrent: wait`: a waiting duplicate sleeps until this
//! process makes a transition on a key of its slot, another instance's
//! transition is heard (`redis/events.rs`, standalone Redis), or its
//! backoff step ends. One mechanism for both stores.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::idempotency::key::StorageKey;

/// A transition wakes the waiters of its key's slot only, not every waiter.
const SLOTS: usize = 64;

pub(super) struct Waiters {
    slots: Vec<Notify>,
    hasher: RandomState,
    /// Waiters now: with none, a transition costs one atomic load.
    waiting: AtomicUsize,
}

impl Waiters {
    pub(super) fn new() -> Waiters {
        Waiters {
            slots: (0..SLOTS).map(|_| Notify::new()).collect(),
            hasher: RandomState::new(),
            waiting: AtomicUsize::new(0),
        }
    }

    fn slot(&self, key: &StorageKey) -> &Notify {
        // Bits 32.. of the hash: a `RandomState` hash is good in all of them.
        &self.slots[((self.hasher.hash_one(key) >> 32) as usize) % SLOTS]
    }

    /// Wakes whoever waits on a key of `key`'s slot.
    pub(super) fn wake(&self, key: &StorageKey) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.slot(key).notify_waiters();
        }
    }

    /// Waits for a transition in `key`'s slot, at most `at_most`. One that
    /// came just before the wait began is caught by the caller's next claim.
    pub(super) async fn changed(&self, key: &StorageKey, at_most: Duration) {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = Leave(&self.waiting);
        let _ = tokio::time::timeout(at_most, self.slot(key).notified()).await;
    }
}

/// Counts a waiter out, also when its wait is cancelled.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use super::*;

    fn key(name: &str) -> StorageKey {
        StorageKey::named(name)
    }

    /// A waiter wakes on its own key's transition and not on one of a key
    /// in another slot; it is counted only while it waits.
    #[tokio::test]
    async fn a_transition_wakes_the_waiters_of_its_slot() {
        let waiters = Waiters::new();
        let mine = key("mine");
        let other = (0..)
            .map(|i| key(&format!("other-{i}")))
            .find(|k| !std::ptr::eq(waiters.slot(k), waiters.slot(&mine)))
            .expect("a key in another slot");
        let mut wait = pin!(waiters.changed(&mine, Duration::from_secs(3600)));
        // Polled once: registered and counted.
        assert!(poll_once(wait.as_mut()).await.is_none());
        assert_eq!(waiters.waiting.load(Ordering::Acquire), 1);
        waiters.wake(&other);
        assert!(
            poll_once(wait.as_mut()).await.is_none(),
            "woken by another slot"
        );
        waiters.wake(&mine);
        assert!(
            poll_once(wait.as_mut()).await.is_some(),
            "not woken by its key"
        );
        assert_eq!(waiters.waiting.load(Ordering::Acquire), 0);
    }

    /// Polls `future` once: its output if it is ready.
    async fn poll_once<F: Future + Unpin>(mut future: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(out) => Some(out),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
