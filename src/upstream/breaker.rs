//! Circuit breakers, one per upstream target: a target that keeps failing
//! gets no traffic for a while, then a few probes decide whether it is back.
//!
//! - **Closed**: requests flow; outcomes are counted in a rolling window
//!   (ten buckets of `window / 10`). Once the window holds at least
//!   `min_requests` and errors (5xx, connect failures, timeouts) are at
//!   least `error_percent` of them, the target opens. `CONNECT_FAILURES`
//!   connect failures in a row open it at once (passive health), whatever
//!   the counts.
//! - **Open**: no traffic for `open_for`; the balancer skips the target the
//!   way it skips an unhealthy one.
//! - **Half-open**: up to `half_open_probes` requests go through. Any
//!   failure opens the target again; once that many succeeded it closes.
//!   Probes that never report (their client went away) are given up after
//!   `open_for`, so the target cannot stay half-open forever.
//!
//! State is one small mutex per target, held for a few instructions and
//! never across an await. Breakers are pooled by upstream and address, so
//! a reload keeps the state of targets that still exist.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Connect failures in a row that open a target at once.
pub const CONNECT_FAILURES: u32 = 3;

const BUCKETS: usize = 10;

/// An upstream's `circuit_breaker` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerSettings {
    pub window: Duration,
    pub min_requests: u32,
    pub error_percent: u32,
    pub open_for: Duration,
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    /// The seed's breaker: 50 % errors once 20 requests were seen, 5 s.
    fn default() -> Self {
        BreakerSettings {
            window: Duration::from_secs(10),
            min_requests: 20,
            error_percent: 50,
            open_for: Duration::from_secs(5),
            half_open_probes: 3,
        }
    }
}

/// Where a breaker stands, as the admin listener shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        admitted: u32,
        succeeded: u32,
        since: Instant,
    },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open { .. } => "open",
            Phase::HalfOpen { .. } => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which `window / 10` slice of time this bucket counts.
    slice: u64,
    requests: u32,
    errors: u32,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    buckets: [Bucket; BUCKETS],
    connect_failures: u32,
}

/// One target's breaker.
#[derive(Debug)]
pub struct Breaker {
    pub settings: BreakerSettings,
    /// The origin of the bucket slices.
    epoch: Instant,
    slice: Duration,
    state: Mutex<State>,
}

/// How an attempt on the target ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx, a timeout, a broken response.
    Error,
    /// The connection could not be made.
    ConnectFailure,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        let slice = (settings.window / BUCKETS as u32).max(Duration::from_millis(1));
        Breaker {
            settings,
            epoch: Instant::now(),
            slice,
            state: Mutex::new(State {
                phase: Phase::Closed,
                buckets: [Bucket::default(); BUCKETS],
                connect_failures: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn phase(&self, now: Instant) -> Phase {
        let state = self.lock();
        match state.phase {
            Phase::Open { until } if now >= until => Phase::HalfOpen {
                admitted: 0,
                succeeded: 0,
                since: until,
            },
            phase => phase,
        }
    }

    /// Whether a request may be sent now; in half-open this takes one of
    /// the probes.
    pub fn try_admit(&self, now: Instant) -> bool {
        let mut state = self.lock();
        match state.phase {
            Phase::Closed => true,
            Phase::Open { until } if now < until => false,
            Phase::Open { .. } => {
                state.phase = Phase::HalfOpen {
                    admitted: 1,
                    succeeded: 0,
                    since: now,
                };
                true
            }
            Phase::HalfOpen {
                admitted,
                succeeded,
                since,
            } => {
                let stale = now.duration_since(since) >= self.settings.open_for;
                if admitted < self.settings.half_open_probes || stale {
                    state.phase = Phase::HalfOpen {
                        admitted: if stale { 1 } else { admitted + 1 },
                        succeeded: if stale { 0 } else { succeeded },
                        since: if stale { now } else { since },
                    };
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Whether the breaker would admit a request now, without taking a
    /// probe.
    pub fn is_blocking(&self, now: Instant) -> bool {
        let state = self.lock();
        match state.phase {
            Phase::Closed => false,
            Phase::Open { until } => now < until,
            Phase::HalfOpen {
                admitted, since, ..
            } => {
                admitted >= self.settings.half_open_probes
                    && now.duration_since(since) < self.settings.open_for
            }
        }
    }

    /// Counts how an attempt ended.
    pub fn record(&self, outcome: Outcome, now: Instant) {
        let mut state = self.lock();
        let failed = outcome != Outcome::Success;
        match state.phase {
            Phase::Open { .. } => {}
            Phase::HalfOpen {
                succeeded,
                admitted,
                since,
            } => {
                if failed {
                    self.open(&mut state, now);
                } else if succeeded + 1 >= self.settings.half_open_probes {
                    state.phase = Phase::Closed;
                    state.buckets = [Bucket::default(); BUCKETS];
                    state.connect_failures = 0;
                } else {
                    state.phase = Phase::HalfOpen {
                        admitted,
                        succeeded: succeeded + 1,
                        since,
                    };
                }
            }
            Phase::Closed => {
                state.connect_failures = match outcome {
                    Outcome::ConnectFailure => state.connect_failures + 1,
                    _ => 0,
                };
                let slice = (now.duration_since(self.epoch).as_nanos()
                    / self.slice.as_nanos().max(1)) as u64;
                let bucket = &mut state.buckets[(slice % BUCKETS as u64) as usize];
                if bucket.slice != slice {
                    *bucket = Bucket {
                        slice,
                        requests: 0,
                        errors: 0,
                    };
                }
                bucket.requests += 1;
                bucket.errors += u32::from(failed);
                if !failed {
                    return;
                }
                let (requests, errors) = state
                    .buckets
                    .iter()
                    .filter(|b| b.slice + (BUCKETS as u64) > slice)
                    .fold((0u64, 0u64), |(r, e), b| {
                        (r + u64::from(b.requests), e + u64::from(b.errors))
                    });
                let tripped = requests >= u64::from(self.settings.min_requests)
                    && errors * 100 >= u64::from(self.settings.error_percent) * requests;
                if tripped || state.connect_failures >= CONNECT_FAILURES {
                    self.open(&mut state, now);
                }
            }
        }
    }

    fn open(&self, state: &mut State, now: Instant) {
        state.phase = Phase::Open {
            until: now + self.settings.open_for,
        };
        state.buckets = [Bucket::default(); BUCKETS];
        state.connect_failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> (Breaker, Instant) {
        let b = Breaker::new(BreakerSettings {
            window: Duration::from_secs(10),
            min_requests: 20,
            error_percent: 50,
            open_for: Duration::from_secs(5),
            half_open_probes: 3,
        });
        let t = b.epoch;
        (b, t)
    }

    #[test]
    fn opens_at_the_error_share_once_enough_requests_were_seen() {
        let (b, t) = breaker();
        // 19 errors: under min_requests, still closed.
        for _ in 0..19 {
            b.record(Outcome::Error, t);
        }
        assert_eq!(b.phase(t), Phase::Closed);
        b.record(Outcome::Error, t);
        assert!(matches!(b.phase(t), Phase::Open { .. }));
        assert!(!b.try_admit(t + Duration::from_secs(4)));
    }

    #[test]
    fn stays_closed_under_the_error_share() {
        let (b, t) = breaker();
        for i in 0..99 {
            // One error in three: a third, under the half that opens it.
            let outcome = if i % 3 == 2 {
                Outcome::Error
            } else {
                Outcome::Success
            };
            b.record(outcome, t);
        }
        assert_eq!(b.phase(t), Phase::Closed);
    }

    #[test]
    fn old_outcomes_leave_the_window() {
        let (b, t) = breaker();
        for _ in 0..15 {
            b.record(Outcome::Error, t);
        }
        // Eleven seconds later those fifteen are out of the window.
        let later = t + Duration::from_secs(11);
        for _ in 0..10 {
            b.record(Outcome::Error, later);
        }
        assert_eq!(b.phase(later), Phase::Closed);
    }

    #[test]
    fn half_open_probes_close_it_or_a_failure_reopens_it() {
        let (b, t) = breaker();
        for _ in 0..20 {
            b.record(Outcome::Error, t);
        }
        let after = t + Duration::from_secs(5);
        // Three probes, no fourth.
        assert!(b.try_admit(after) && b.try_admit(after) && b.try_admit(after));
        assert!(!b.try_admit(after));
        assert!(b.is_blocking(after));
        b.record(Outcome::Success, after);
        b.record(Outcome::Error, after);
        assert!(
            matches!(b.phase(after), Phase::Open { .. }),
            "a failed probe reopens"
        );
        let again = after + Duration::from_secs(5);
        for _ in 0..3 {
            assert!(b.try_admit(again));
        }
        for _ in 0..3 {
            b.record(Outcome::Success, again);
        }
        assert_eq!(b.phase(again), Phase::Closed);
        assert!(b.try_admit(again));
    }

    #[test]
    fn connect_failures_in_a_row_open_at_once() {
        let (b, t) = breaker();
        b.record(Outcome::ConnectFailure, t);
        b.record(Outcome::ConnectFailure, t);
        b.record(Outcome::Success, t);
        b.record(Outcome::ConnectFailure, t);
        b.record(Outcome::ConnectFailure, t);
        assert_eq!(b.phase(t), Phase::Closed, "the run was broken by a success");
        b.record(Outcome::ConnectFailure, t);
        assert!(matches!(b.phase(t), Phase::Open { .. }));
    }

    #[test]
    fn probes_that_never_report_are_given_up() {
        let (b, t) = breaker();
        for _ in 0..20 {
            b.record(Outcome::Error, t);
        }
        let after = t + Duration::from_secs(5);
        for _ in 0..3 {
            assert!(b.try_admit(after));
        }
        assert!(!b.try_admit(after + Duration::from_secs(1)));
        assert!(b.try_admit(after + Duration::from_secs(5)));
    }
}
