//! The circuit breaker of one upstream, as a pure state machine over an explicit clock, so
//! it is tested without waiting: after `failures` consecutive failures it opens and requests
//! go local at once (no cloud attempt, no added latency); after `cooldown` one request may
//! probe the upstream; the probe's success closes it, its failure opens it again.

use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Requests go to the upstream; this many failed in a row.
    Closed {
        /// Consecutive failures so far.
        failures: u32,
    },
    /// Requests skip the upstream until `until`.
    Open {
        /// When a probe may try again.
        until: Instant,
    },
    /// One probe is trying the upstream; everyone else skips it meanwhile.
    HalfOpen,
}

impl State {
    /// The name shown in readiness and logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen => "half_open",
        }
    }

    /// The Prometheus gauge value: 0 closed, 1 half-open, 2 open.
    pub(crate) fn gauge(self) -> f64 {
        match self {
            State::Closed { .. } => 0.0,
            State::HalfOpen => 1.0,
            State::Open { .. } => 2.0,
        }
    }
}

/// What a request may do with the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Try it.
    Try,
    /// Try it as the probe that decides whether the breaker closes.
    Probe,
    /// Skip it: the breaker is open (or another request is probing).
    Skip,
}

/// One upstream's breaker.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    state: State,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            state: State::Closed { failures: 0 },
        }
    }

    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// Whether a request arriving at `now` may use the upstream.
    pub(crate) fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed { .. } => Admit::Try,
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen;
                Admit::Probe
            }
            State::Open { .. } | State::HalfOpen => Admit::Skip,
        }
    }

    /// The upstream answered (a probe's success closes the breaker). Returns whether the
    /// state changed.
    pub(crate) fn success(&mut self) -> bool {
        let changed = !matches!(self.state, State::Closed { failures: 0 });
        let was_closed = matches!(self.state, State::Closed { .. });
        self.state = State::Closed { failures: 0 };
        changed && !was_closed
    }

    /// The upstream failed at `now`. Returns whether the breaker opened.
    pub(crate) fn failure(&mut self, now: Instant) -> bool {
        let open = State::Open {
            until: now + self.config.cooldown,
        };
        match self.state {
            State::Closed { failures } if failures + 1 >= self.config.failures => {
                self.state = open;
                true
            }
            State::Closed { failures } => {
                self.state = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::HalfOpen | State::Open { .. } => {
                self.state = open;
                true
            }
        }
    }

    /// A probe ended without a verdict (the client went away before the upstream answered):
    /// let the next request probe instead of leaving the breaker half-open for ever.
    pub(crate) fn abandon_probe(&mut self, now: Instant) {
        if self.state == State::HalfOpen {
            self.state = State::Open { until: now };
        }
    }

    /// Time left until a probe may run, while open.
    pub(crate) fn open_for(&self, now: Instant) -> Option<Duration> {
        match self.state {
            State::Open { until } => Some(until.saturating_duration_since(now)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            failures: 3,
            cooldown: Duration::from_secs(30),
        })
    }

    #[test]
    fn it_opens_after_the_configured_consecutive_failures_only() {
        let mut b = breaker();
        let t = Instant::now();
        assert!(!b.failure(t));
        assert!(!b.failure(t));
        b.success();
        assert!(!b.failure(t), "a success resets the count");
        assert!(!b.failure(t));
        assert!(b.failure(t));
        assert_eq!(b.state().name(), "open");
        assert_eq!(b.admit(t + Duration::from_secs(29)), Admit::Skip);
    }

    #[test]
    fn after_the_cooldown_one_probe_runs_and_others_skip() {
        let mut b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.failure(t);
        }
        let later = t + Duration::from_secs(30);
        assert_eq!(b.admit(later), Admit::Probe);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.admit(later), Admit::Skip, "only one probe at a time");
        assert!(b.success(), "the probe's success closes it");
        assert_eq!(b.admit(later), Admit::Try);
    }

    #[test]
    fn a_failed_probe_opens_it_for_another_cooldown() {
        let mut b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.failure(t);
        }
        let later = t + Duration::from_secs(31);
        assert_eq!(b.admit(later), Admit::Probe);
        assert!(b.failure(later));
        assert_eq!(b.open_for(later), Some(Duration::from_secs(30)));
        assert_eq!(b.admit(later + Duration::from_secs(29)), Admit::Skip);
        assert_eq!(b.admit(later + Duration::from_secs(30)), Admit::Probe);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let mut b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.failure(t);
        }
        let later = t + Duration::from_secs(30);
        assert_eq!(b.admit(later), Admit::Probe);
        b.abandon_probe(later);
        assert_eq!(b.admit(later), Admit::Probe);
    }
}
