//! The circuit breaker of one upstream (SPEC.md sections 5 and 9): closed →
//! open after `consecutive_failures` → half-open with exactly one probe →
//! closed on its success, open again on its failure.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Breaker as BreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; everyone else is turned away until it answers.
    HalfOpen {
        probe_out: bool,
    },
}

/// What the breaker said to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Pass,
    Probe,
    /// Turned away; retry after this long.
    Reject(Duration),
}

pub struct Breaker {
    config: Option<BreakerConfig>,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(config: Option<BreakerConfig>) -> Breaker {
        Breaker {
            config,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    pub fn state(&self) -> State {
        *self.lock()
    }

    /// Whether a request may go to the upstream. The clock is read only
    /// while the breaker is open: a closed breaker costs no clock read.
    pub fn admit(&self, now: impl FnOnce() -> Instant) -> Admit {
        if self.config.is_none() {
            return Admit::Pass;
        }
        let mut state = self.lock();
        if let State::Open { until } = *state {
            let now = now();
            if now < until {
                return Admit::Reject(until - now);
            }
        }
        match *state {
            State::Closed { .. } => Admit::Pass,
            State::HalfOpen { probe_out: true } => Admit::Reject(Duration::from_secs(1)),
            State::Open { .. } | State::HalfOpen { probe_out: false } => {
                *state = State::HalfOpen { probe_out: true };
                Admit::Probe
            }
        }
    }

    /// The answer of an admitted request: success closes, failure counts.
    /// The clock is read only when a failure opens the breaker.
    pub fn record(&self, admit: Admit, success: bool, now: impl FnOnce() -> Instant) {
        let Some(config) = &self.config else { return };
        let mut state = self.lock();
        *state = match (*state, success) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < config.consecutive_failures => {
                State::Closed {
                    failures: failures + 1,
                }
            }
            (State::HalfOpen { .. }, false) if admit != Admit::Probe => *state,
            (_, false) => State::Open {
                until: now() + config.open_for,
            },
        };
    }

    /// An admitted request that never reached the upstream: a probe's turn goes to the next request.
    pub fn cancel(&self, admit: Admit) {
        if admit == Admit::Probe {
            let mut state = self.lock();
            if *state == (State::HalfOpen { probe_out: true }) {
                *state = State::HalfOpen { probe_out: false };
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_n_failures_probes_once_and_closes_on_success() {
        let b = Breaker::new(Some(BreakerConfig {
            consecutive_failures: 3,
            open_for: Duration::from_secs(10),
        }));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.admit(|| t0), Admit::Pass);
            b.record(Admit::Pass, false, || t0);
        }
        // A success resets the count.
        b.record(Admit::Pass, true, || t0);
        for _ in 0..3 {
            b.record(Admit::Pass, false, || t0);
        }
        assert!(matches!(b.admit(|| t0), Admit::Reject(d) if d == Duration::from_secs(10)));
        let later = t0 + Duration::from_secs(11);
        assert_eq!(b.admit(|| later), Admit::Probe);
        assert!(
            matches!(b.admit(|| later), Admit::Reject(_)),
            "exactly one probe"
        );
        b.record(Admit::Probe, false, || later);
        assert!(
            matches!(b.admit(|| later), Admit::Reject(_)),
            "a failed probe opens it again"
        );
        let much_later = later + Duration::from_secs(11);
        assert_eq!(b.admit(|| much_later), Admit::Probe);
        b.cancel(Admit::Probe);
        assert_eq!(
            b.admit(|| much_later),
            Admit::Probe,
            "a cancelled probe lets the next one through"
        );
        b.record(Admit::Probe, true, || much_later);
        assert_eq!(b.state(), State::Closed { failures: 0 });
        assert_eq!(b.admit(|| much_later), Admit::Pass);
    }

    #[test]
    fn off_never_rejects() {
        let b = Breaker::new(None);
        for _ in 0..100 {
            b.record(Admit::Pass, false, Instant::now);
        }
        assert_eq!(b.admit(Instant::now), Admit::Pass);
    }
}
