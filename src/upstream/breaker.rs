//! The circuit breaker of one upstream (SPEC.md sections 5 and 9): closed →
//! open after `consecutive_failures` → half-open with exactly one probe →
//! closed on its success, open again on its failure.
//!
//! Only the answers of requests admitted in the current state count. Each
//! change of state starts a new epoch, and every admission carries the
//! epoch it was admitted in: a late answer from before the breaker opened
//! neither closes it (only the probe does) nor keeps it open past
//! `open_for`.

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
    /// `open_for` has passed: one probe goes, everyone else is turned away until it answers.
    HalfOpen {
        probe: Probe,
    },
}

/// The half-open breaker's probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// None is out: the next request is the probe.
    Free,
    /// Out, its answer awaited.
    Out,
    /// Its client went away while the upstream may still be at work on it:
    /// the turn comes back `until` then, when it would have timed out.
    Abandoned { until: Instant },
}

/// What the breaker said to one request, with the epoch it said it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Admitted while closed (or with the breaker off).
    Pass { epoch: u64 },
    /// The one request let through while half-open.
    Probe { epoch: u64 },
    /// Turned away; retry after this long.
    Reject(Duration),
}

pub struct Breaker {
    config: Option<BreakerConfig>,
    inner: Mutex<Inner>,
}

struct Inner {
    state: State,
    /// Counts the changes of state; see the module comment.
    epoch: u64,
}

impl Inner {
    fn enter(&mut self, state: State) {
        self.state = state;
        self.epoch += 1;
    }
}

impl Breaker {
    pub fn new(config: Option<BreakerConfig>) -> Breaker {
        Breaker {
            config,
            inner: Mutex::new(Inner {
                state: State::Closed { failures: 0 },
                epoch: 0,
            }),
        }
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    /// Whether a request may go to the upstream. The clock is read only
    /// while the breaker is open: a closed breaker costs no clock read.
    pub fn admit(&self, now: impl FnOnce() -> Instant) -> Admit {
        if self.config.is_none() {
            return Admit::Pass { epoch: 0 };
        }
        let mut inner = self.lock();
        if let State::Open { until }
        | State::HalfOpen {
            probe: Probe::Abandoned { until },
        } = inner.state
        {
            let now = now();
            if now < until {
                return Admit::Reject(until - now);
            }
        }
        match inner.state {
            State::Closed { .. } => Admit::Pass { epoch: inner.epoch },
            State::HalfOpen { probe: Probe::Out } => Admit::Reject(Duration::from_secs(1)),
            State::HalfOpen { .. } => {
                // A cancelled or abandoned probe's turn: the epoch stays,
                // nothing was answered in it.
                inner.state = State::HalfOpen { probe: Probe::Out };
                Admit::Probe { epoch: inner.epoch }
            }
            State::Open { .. } => {
                inner.enter(State::HalfOpen { probe: Probe::Out });
                Admit::Probe { epoch: inner.epoch }
            }
        }
    }

    /// Whether answers count at all (`circuit_breaker: off` makes them not).
    pub fn counts(&self) -> bool {
        self.config.is_some()
    }

    /// The answer of an admitted request. While closed, success resets the
    /// count and failure adds to it; while half-open, the probe's answer
    /// closes or reopens the breaker. Answers of requests admitted in an
    /// earlier state count for nothing. The clock is read only when a
    /// failure opens the breaker.
    pub fn record(&self, admit: Admit, success: bool, now: impl FnOnce() -> Instant) {
        let Some(config) = &self.config else { return };
        let (Admit::Pass { epoch } | Admit::Probe { epoch }) = admit else {
            return;
        };
        let mut inner = self.lock();
        if epoch != inner.epoch {
            return;
        }
        match (inner.state, admit, success) {
            (State::Closed { failures }, Admit::Pass { .. }, _) => {
                let failures = if success { 0 } else { failures + 1 };
                if failures < config.consecutive_failures {
                    inner.state = State::Closed { failures };
                } else {
                    inner.enter(State::Open {
                        until: now() + config.open_for,
                    });
                }
            }
            (State::HalfOpen { .. }, Admit::Probe { .. }, true) => {
                inner.enter(State::Closed { failures: 0 })
            }
            (State::HalfOpen { .. }, Admit::Probe { .. }, false) => inner.enter(State::Open {
                until: now() + config.open_for,
            }),
            // An epoch holds one state, and admits only its own kind.
            _ => {}
        }
    }

    /// An admitted request that never reached the upstream: a probe's turn goes to the next request.
    pub fn cancel(&self, admit: Admit) {
        self.probe_gone(admit, || Probe::Free);
    }

    /// An admitted request given up unanswered (its client went away)
    /// while the upstream may still be at work on it: a probe's turn comes
    /// back at `until`, when it would have timed out. Until then the rest
    /// are turned away, as while it was out (regression, an audit: each
    /// pass-through probe whose client gave up let the next request
    /// through, five at once on a half-open upstream). The clock is read
    /// only for a probe.
    pub fn abandon(&self, admit: Admit, until: impl FnOnce() -> Instant) {
        self.probe_gone(admit, || Probe::Abandoned { until: until() });
    }

    fn probe_gone(&self, admit: Admit, then: impl FnOnce() -> Probe) {
        if let Admit::Probe { epoch } = admit {
            let mut inner = self.lock();
            if inner.epoch == epoch && inner.state == (State::HalfOpen { probe: Probe::Out }) {
                inner.state = State::HalfOpen { probe: then() };
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// One step of a scenario. Requests are named by a letter, so that a
    /// late answer refers to the admission it belongs to; times are seconds
    /// from the start.
    #[derive(Clone, Copy)]
    enum Step {
        /// Request `name` asks at `t`; `want` is "pass", "probe" or "reject".
        Ask(char, u64, &'static str),
        /// Request `name` answers at `t`: true for success.
        Answer(char, u64, bool),
        /// Request `name` never reached the upstream.
        Cancel(char),
        /// Request `name`'s client went away; it would time out at `until`.
        Abandon(char, u64),
        /// The state now: "closed N", "open" or "half-open".
        Is(&'static str),
    }
    use Step::*;

    /// `consecutive_failures: 2`, `open_for: 10s`; `a` and `b` fail at 0
    /// and open the breaker until 10, while `l` (late) is still out.
    const OPEN_WITH_LATE: [Step; 6] = [
        Ask('a', 0, "pass"),
        Ask('b', 0, "pass"),
        Ask('l', 0, "pass"),
        Answer('a', 0, false),
        Answer('b', 0, false),
        Is("open"),
    ];

    fn run(name: &str, steps: &[Step]) {
        let b = Breaker::new(Some(BreakerConfig {
            consecutive_failures: 2,
            open_for: Duration::from_secs(10),
        }));
        let t0 = Instant::now();
        let at = |t: u64| t0 + Duration::from_secs(t);
        let mut admitted = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            let context = format!("{name}: step {i}");
            match *step {
                Ask(r, t, want) => {
                    let admit = b.admit(|| at(t));
                    let got = match admit {
                        Admit::Pass { .. } => "pass",
                        Admit::Probe { .. } => "probe",
                        Admit::Reject(_) => "reject",
                    };
                    assert_eq!(got, want, "{context}");
                    admitted.insert(r, admit);
                }
                Answer(r, t, success) => b.record(admitted[&r], success, || at(t)),
                Cancel(r) => b.cancel(admitted[&r]),
                Abandon(r, until) => b.abandon(admitted[&r], || at(until)),
                Is(want) => {
                    let got = match b.state() {
                        State::Closed { failures } => format!("closed {failures}"),
                        State::Open { .. } => "open".to_owned(),
                        State::HalfOpen { .. } => "half-open".to_owned(),
                    };
                    assert_eq!(got, want, "{context}");
                }
            }
        }
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        run(
            "a success resets the count",
            &[
                Ask('a', 0, "pass"),
                Answer('a', 0, false),
                Is("closed 1"),
                Ask('b', 0, "pass"),
                Answer('b', 0, true),
                Is("closed 0"),
                Ask('c', 0, "pass"),
                Answer('c', 0, false),
                Is("closed 1"),
            ],
        );
        let mut opened = OPENED.to_vec();
        opened.extend_from_slice(&[Is("open"), Ask('x', 9, "reject")]);
        run("two failures in a row open it until open_for ends", &opened);
    }

    /// `a` and `b` fail at 0 and open the breaker until 10 (`run`'s config).
    const OPENED: [Step; 4] = [
        Ask('a', 0, "pass"),
        Answer('a', 0, false),
        Ask('b', 0, "pass"),
        Answer('b', 0, false),
    ];

    #[test]
    fn an_open_breaker_lets_exactly_one_probe_through() {
        let cases: &[(&str, &[Step])] = &[
            (
                "open until open_for ends, then exactly one probe; its success closes",
                &[
                    Is("open"),
                    Ask('x', 9, "reject"),
                    Ask('p', 10, "probe"),
                    Ask('y', 10, "reject"),
                    Is("half-open"),
                    Answer('p', 11, true),
                    Is("closed 0"),
                    Ask('z', 11, "pass"),
                ],
            ),
            (
                "a failed probe opens it again for open_for",
                &[
                    Ask('p', 10, "probe"),
                    Answer('p', 12, false),
                    Is("open"),
                    Ask('x', 21, "reject"),
                    Ask('q', 22, "probe"),
                ],
            ),
            (
                "a cancelled probe lets the next one through",
                &[
                    Ask('p', 10, "probe"),
                    Cancel('p'),
                    Ask('q', 10, "probe"),
                    Ask('x', 10, "reject"),
                    Answer('q', 10, true),
                    Is("closed 0"),
                ],
            ),
            (
                "an abandoned probe holds the turn until it would have timed out",
                &[
                    Ask('p', 10, "probe"),
                    Abandon('p', 13),
                    Ask('x', 11, "reject"),
                    Ask('y', 12, "reject"),
                    Is("half-open"),
                    Ask('q', 13, "probe"),
                    Ask('z', 13, "reject"),
                    Answer('q', 14, true),
                    Is("closed 0"),
                ],
            ),
        ];
        for (name, steps) in cases {
            let mut all = OPENED.to_vec();
            all.extend_from_slice(steps);
            run(name, &all);
        }
    }

    /// Regression: answers of requests admitted before the breaker opened
    /// changed its state: a late success closed it without a probe, and a
    /// late failure restarted `open_for`.
    #[test]
    fn late_answers_from_before_the_breaker_opened_count_for_nothing() {
        let cases: &[(&str, &[Step])] = &[
            (
                "a late success while open does not close it",
                &[Answer('l', 1, true), Is("open"), Ask('x', 1, "reject")],
            ),
            (
                "a late failure while open does not restart open_for",
                &[Answer('l', 5, false), Is("open"), Ask('p', 10, "probe")],
            ),
            (
                "a late success while half-open does not close it; the probe decides",
                &[
                    Ask('p', 10, "probe"),
                    Answer('l', 10, true),
                    Is("half-open"),
                    Ask('x', 10, "reject"),
                    Answer('p', 11, false),
                    Is("open"),
                ],
            ),
            (
                "a late failure while half-open does not reopen it",
                &[
                    Ask('p', 10, "probe"),
                    Answer('l', 10, false),
                    Is("half-open"),
                    Answer('p', 11, true),
                    Is("closed 0"),
                ],
            ),
            (
                "a late failure after closing again is not counted",
                &[
                    Ask('p', 10, "probe"),
                    Answer('p', 10, true),
                    Answer('l', 11, false),
                    Is("closed 0"),
                ],
            ),
        ];
        for (name, steps) in cases {
            let mut all = OPEN_WITH_LATE.to_vec();
            all.extend_from_slice(steps);
            run(name, &all);
        }
    }

    #[test]
    fn off_never_rejects() {
        let b = Breaker::new(None);
        for _ in 0..100 {
            b.record(Admit::Pass { epoch: 0 }, false, Instant::now);
        }
        assert!(matches!(b.admit(Instant::now), Admit::Pass { .. }));
    }
}
