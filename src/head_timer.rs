//! The header-read timer of one HTTP/1 client connection: a single tokio
//! timer per connection whose deadline moves, not one per request.
//!
//! hyper starts a timer each time it waits for a request head (the 10 s
//! the spec gives a head, which also closes idle keep-alive connections)
//! and drops it once the head is in. With hyper-util's `TokioTimer` that is,
//! for every request, an allocation and a timer registered in and removed
//! from tokio's timer wheel (S1: 5% of the instructions per request). Here
//! every sleep hyper asks for moves the connection's one tokio `Sleep`:
//! moving a registered timer to a later deadline is an atomic store in
//! tokio (the wheel catches up when the old deadline comes), and a dropped
//! sleep leaves the timer as it is. At worst the connection's task is woken
//! once, for nothing, when an old deadline passes.
//!
//! A second timer of this kind serves an HTTP/1 connection's pass-through
//! requests as their response timer ([`crate::upstream::within_response`]):
//! one request at a time, so one tokio timer for all of them, not one
//! registered and removed per request (S1 1.3% of the instructions).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::drain::Stopping;

/// hyper's timer for one connection (give each connection its own).
#[derive(Clone)]
pub struct HeadTimer {
    shared: Arc<Timer>,
}

/// One connection's timer: the sleep, its first head's deadline, and the
/// shutdown that cuts a head still arriving short.
struct Timer {
    state: Mutex<Shared>,
    first: Option<FirstHead>,
    stopping: Option<Stopping>,
}

struct Shared {
    /// Not in the timer wheel until first polled.
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The waker `sleep` was last polled with, while tokio holds it: until
    /// `sleep` fires, polling again with the same task's waker is not needed.
    waker: Option<Waker>,
}

/// The connection's first head is due by `by` (counted from the
/// connection's start, TLS handshake and opening included), not 10 s after
/// hyper begins to read it; the first sleep takes it.
struct FirstHead {
    by: Instant,
    pending: AtomicBool,
}

impl Default for HeadTimer {
    /// Needs a tokio runtime, as any tokio timer.
    fn default() -> HeadTimer {
        HeadTimer::new(None, None)
    }
}

impl Shared {
    /// Not in the timer wheel until first polled.
    fn new() -> Shared {
        Shared {
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            waker: None,
        }
    }
}

impl HeadTimer {
    /// A connection's timer whose first head is due by `by` at the latest,
    /// and whose head still arriving when shutdown begins is cut short (a
    /// partial head held a shutdown up to 10 s, though no request was in
    /// flight to wait for).
    pub fn for_connection(by: tokio::time::Instant, stopping: Stopping) -> HeadTimer {
        let first = FirstHead {
            by: by.into_std(),
            pending: AtomicBool::new(true),
        };
        HeadTimer::new(Some(first), Some(stopping))
    }

    /// A sleep until `deadline` on this timer, unboxed, for one user at a
    /// time (its sleeps share the one tokio timer).
    pub fn sleep_at(&self, deadline: Instant) -> HeadSleep {
        HeadSleep {
            timer: self.clone(),
            deadline,
        }
    }

    fn new(first: Option<FirstHead>, stopping: Option<Stopping>) -> HeadTimer {
        HeadTimer {
            shared: Arc::new(Timer {
                state: Mutex::new(Shared::new()),
                first,
                stopping,
            }),
        }
    }
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        // Per request one atomic load, once the first head is in.
        let deadline = match &self.shared.first {
            Some(first)
                if first.pending.load(Ordering::Relaxed)
                    && first.pending.swap(false, Ordering::Relaxed) =>
            {
                first.by.min(deadline)
            }
            _ => deadline,
        };
        Box::pin(HeadSleep {
            timer: self.clone(),
            deadline,
        })
    }

    /// tokio's clock (which tests can pause), as hyper-util's `TokioTimer`.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(sleep) => sleep.get_mut().deadline = new_deadline,
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// One sleep hyper asked for: the connection's timer, set to this deadline
/// when polled.
pub struct HeadSleep {
    timer: HeadTimer,
    deadline: Instant,
}

impl HeadSleep {
    /// Moves this sleep's deadline (the timer follows when next polled).
    pub fn reset(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls the head's sleep again once told to finish: a head
        // still arriving then is over (no request of it is in flight).
        if self
            .timer
            .shared
            .stopping
            .as_ref()
            .is_some_and(Stopping::now)
        {
            return Poll::Ready(());
        }
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let mut shared = self.timer.shared.state.lock().expect("head timer lock");
        let Shared { sleep, waker } = &mut *shared;
        if sleep.is_elapsed() {
            // Firing took the waker (perhaps for an old deadline, with no
            // sleep waiting): the next poll must give tokio one again.
            *waker = None;
        }
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        if waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let poll = sleep.as_mut().poll(cx);
        *waker = poll.is_pending().then(|| cx.waker().clone());
        poll
    }
}

impl hyper::rt::Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    const MS: Duration = Duration::from_millis(1);

    /// Awaits `sleep`, failing unless it wakes its task within 5 s. Biased:
    /// when the bound's wake-up comes first, the bound wins, even though the
    /// sleep's deadline has passed by then too (a plain `timeout` would poll
    /// the sleep first and pass).
    async fn wakes(sleep: impl Future<Output = ()>, what: &str) {
        tokio::select! {
            biased;
            () = tokio::time::sleep(Duration::from_secs(5)) => panic!("{what}: never woke its task"),
            () = sleep => {}
        }
    }

    /// Regression: once the connection's tokio timer had fired for an old,
    /// dropped sleep (a request that took longer than the head timeout),
    /// the next sleep counted on tokio still holding the task's waker,
    /// which firing had taken: the sleep never woke its task, and an idle
    /// connection was never closed.
    #[tokio::test]
    async fn a_sleep_fires_after_an_old_deadline_fired_while_no_sleep_was_waiting() {
        let timer = HeadTimer::default();
        let mut old = timer.sleep(50 * MS);
        std::future::poll_fn(|cx| {
            assert!(old.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        drop(old);
        tokio::time::sleep(150 * MS).await;
        wakes(timer.sleep(100 * MS), "the new sleep").await;
    }

    /// The connection's one timer serves sleep after sleep: a sleep never
    /// fires before its own deadline (an earlier sleep's deadline, left on
    /// the timer, does not cut it short), and `reset` moves a live sleep.
    /// Lower bounds only: a slow machine can only make the sleeps longer.
    #[tokio::test]
    async fn each_sleep_fires_at_its_own_deadline_on_the_one_timer() {
        let timer = HeadTimer::default();
        // A head that arrived: its sleep polled once, then dropped.
        let mut first = timer.sleep(300 * MS);
        let noop = &mut Context::from_waker(std::task::Waker::noop());
        assert!(first.as_mut().poll(noop).is_pending());
        drop(first);
        tokio::time::sleep(150 * MS).await;
        // The next head is awaited later: its time counts from now.
        let second = std::time::Instant::now();
        timer.sleep(300 * MS).await;
        assert!(second.elapsed() >= 300 * MS, "{:?}", second.elapsed());
        // After a sleep fired, the next one waits its whole time again.
        let third = std::time::Instant::now();
        timer.sleep(200 * MS).await;
        assert!(third.elapsed() >= 200 * MS, "{:?}", third.elapsed());
        // reset moves a live sleep's deadline, later or earlier.
        let moved_at = std::time::Instant::now();
        let mut moved = timer.sleep(60_000 * MS);
        assert!(moved.as_mut().poll(noop).is_pending());
        timer.reset(&mut moved, timer.now() + 100 * MS);
        wakes(moved, "a sleep moved earlier").await;
        assert!(moved_at.elapsed() >= 100 * MS);
    }
}
