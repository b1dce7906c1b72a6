//! The protected attempts running in this process, by key: named in the
//! shutdown log, and asked by waiting duplicates before the store (see
//! [`crate::gate`]), with the outcome of one that has ended but whose
//! record the store has not taken yet.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::idempotency::key::StorageKey;
use crate::idempotency::record::Record;

/// A slot per running attempt, reused once it ends: per request a lock, a
/// reference count and no formatting (names are made only for shutdown's
/// log; a formatted name and a hash map entry cost about 1.6k instructions
/// per protected request).
#[derive(Default)]
pub struct Running {
    slots: Mutex<Slots>,
    /// How many slots hold an ended attempt's record: while none do, a
    /// request's claim asks nothing of them (one atomic load).
    ended: AtomicUsize,
}

#[derive(Default)]
struct Slots {
    held: Vec<Option<Slot>>,
    free: Vec<usize>,
}

struct Slot {
    key: Arc<StorageKey>,
    /// Set when the attempt has ended and its record is being written in
    /// the background: what the store will hold once it takes it.
    ended: Option<Arc<Record>>,
}

/// What this process knows of a key's attempt.
pub enum Held {
    /// It runs here: ask the store only once it has ended.
    Running,
    /// It ended here, and its record is still on its way to the store:
    /// this is that record.
    Ended(Arc<Record>),
}

/// A running attempt's slot, freed when dropped: when the attempt ends,
/// or, if its record went to the background, when that ends.
pub struct Hold {
    running: Arc<Running>,
    slot: usize,
}

impl Running {
    pub fn hold(self: &Arc<Self>, key: &Arc<StorageKey>) -> Hold {
        let mut slots = self.lock();
        let held = Some(Slot {
            key: key.clone(),
            ended: None,
        });
        let slot = match slots.free.pop() {
            Some(slot) => {
                slots.held[slot] = held;
                slot
            }
            None => {
                slots.held.push(held);
                slots.held.len() - 1
            }
        };
        Hold {
            running: self.clone(),
            slot,
        }
    }

    /// What this process knows of `key`'s attempt (a scan: for waiting
    /// duplicates only, never on a request's own path).
    pub fn held(&self, key: &StorageKey) -> Option<Held> {
        let slots = self.lock();
        let slot = slots.held.iter().flatten().find(|s| *s.key == *key)?;
        Some(match &slot.ended {
            None => Held::Running,
            Some(record) => Held::Ended(record.clone()),
        })
    }

    /// The record of `key`'s attempt that ended here and is still on its
    /// way to the store, if there is one: asked before every claim, so
    /// only an atomic load while no attempt is in that state.
    pub fn ended(&self, key: &StorageKey) -> Option<Arc<Record>> {
        if self.ended.load(Ordering::Acquire) == 0 {
            return None;
        }
        match self.held(key)? {
            Held::Ended(record) => Some(record),
            Held::Running => None,
        }
    }

    /// Names the attempts held, for shutdown's log: with `None` those still
    /// running, with their record those that ended and whose record is
    /// still on its way to the store (regression, an audit: these were
    /// named as exchanges still running, though the upstream had answered).
    pub fn named(&self) -> Vec<(String, Option<Arc<Record>>)> {
        (self.lock().held.iter().flatten())
            .map(|s| {
                let name = format!("route={} key={}", s.key.route, s.key.key);
                (name, s.ended.clone())
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Hold {
    /// The attempt has ended with `record`, which the store has yet to take.
    pub fn end(&self, record: Record) {
        if let Some(slot) = &mut self.running.lock().held[self.slot]
            && slot.ended.replace(Arc::new(record)).is_none()
        {
            self.running.ended.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut slots = self.running.lock();
        if slots.held[self.slot]
            .take()
            .is_some_and(|s| s.ended.is_some())
        {
            self.running.ended.fetch_sub(1, Ordering::AcqRel);
        }
        slots.free.push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::record::State;

    fn key(name: &str) -> Arc<StorageKey> {
        Arc::new(StorageKey::named(name))
    }

    #[test]
    fn running_exchanges_are_named_until_they_end_and_their_slots_reused() {
        let running = Arc::new(Running::default());
        let a = running.hold(&key("a"));
        let b = running.hold(&key("b"));
        let a_slot = a.slot;
        drop(a);
        let names = |running: &Running| {
            let mut named = running.named();
            named.sort_by(|x, y| x.0.cmp(&y.0));
            (named.into_iter())
                .map(|(name, ended)| (name, ended.is_some()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&running), [("route=r key=b".into(), false)]);
        let c = running.hold(&key("c"));
        assert_eq!(c.slot, a_slot, "an ended exchange's slot is reused");
        c.end(Record::bare(State::Completed));
        assert_eq!(
            names(&running),
            [
                ("route=r key=b".into(), false),
                ("route=r key=c".into(), true)
            ],
            "an ended attempt is named with its record"
        );
        drop((b, c));
        assert!(running.named().is_empty());
    }

    #[test]
    fn an_ended_attempt_is_held_with_its_record_until_its_hold_goes() {
        let running = Arc::new(Running::default());
        let hold = running.hold(&key("a"));
        assert!(matches!(running.held(&key("a")), Some(Held::Running)));
        assert!(running.held(&key("b")).is_none());
        let record = Record::bare(State::Unknown);
        assert!(running.ended(&key("a")).is_none(), "it runs");
        hold.end(record.clone());
        match running.held(&key("a")) {
            Some(Held::Ended(held)) => assert_eq!(*held, record),
            _ => panic!("the ended attempt's record is held"),
        }
        assert_eq!(running.ended(&key("a")).as_deref(), Some(&record));
        assert!(running.ended(&key("b")).is_none());
        drop(hold);
        assert!(running.held(&key("a")).is_none());
        assert!(running.ended(&key("a")).is_none());
        assert_eq!(running.ended.load(Ordering::Acquire), 0);
    }
}
