//! Circuit breakers, one per upstream target: a target that keeps failing
//! gets no traffic for a while, then a few probes decide whether it is back.
//!
//! - **Closed**: requests flow; outcomes are counted in a rolling window
//!   (ten buckets of `window / 10`). Errors are what the gateway itself
//!   saw go wrong: connect failures, resets, timeouts, and the statuses in
//!   `failure_statuses` (502, 503, 504 by default). An upstream's own 500
//!   is its answer to one request, which any client can provoke on purpose;
//!   it is an error only when listed. Once the window holds at least
//!   `min_requests` and errors are at least `error_percent` of them, the
//!   breaker asks to open (`Verdict::Trip`). `CONNECT_FAILURES` connect
//!   failures in a row ask at once (passive health), whatever the counts.
//!   The upstream's [`super::Cluster`] decides: it opens the target only
//!   while the upstream's open targets stay within `max_open_share`, and
//!   otherwise *spares* it, so no client can cut every target off by
//!   making its own requests fail.
//! - **Open**: no traffic for `open_for`; the balancer skips the target the
//!   way it skips an unhealthy one.
//! - **Spared**: a target that tripped but was not allowed to open stays
//!   closed and does not ask again for `open_for`.
//! - **Half-open**: up to `half_open_probes` requests go through. Any
//!   failure asks to open the target again (the same share decides); once
//!   that many succeeded it closes.
//!   Probes that never report (their client went away) are given up after
//!   `open_for`, so the target cannot stay half-open forever.
//!
//! State is one small mutex per target, held for a few instructions and
//! never across an await. Breakers are pooled by upstream and address, so
//! a reload keeps the state of targets that still exist.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Connect failures in a row that trip a target at once.
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
    /// Upstream statuses that count as errors.
    pub failure_statuses: StatusSet,
    /// The largest share of the upstream's targets, in percent, that may
    /// be open (or half-open) at once.
    pub max_open_share: u32,
}

impl Default for BreakerSettings {
    /// The seed's breaker: 50 % errors once 20 requests were seen, 5 s;
    /// gateway failures only, at most half of the targets open (Envoy's
    /// outlier detection counts "gateway failures" the same way, and its
    /// panic threshold is 50 %).
    fn default() -> Self {
        BreakerSettings {
            window: Duration::from_secs(10),
            min_requests: 20,
            error_percent: 50,
            open_for: Duration::from_secs(5),
            half_open_probes: 3,
            failure_statuses: StatusSet::GATEWAY_FAILURES,
            max_open_share: 50,
        }
    }
}

impl BreakerSettings {
    /// How an answer with `status` counts.
    pub fn outcome_of(&self, status: u16) -> Outcome {
        if self.failure_statuses.contains(status) {
            Outcome::Error
        } else {
            Outcome::Success
        }
    }

    /// How many of `targets` may be open at once.
    pub fn max_open(&self, targets: usize) -> usize {
        targets.saturating_mul(self.max_open_share as usize) / 100
    }
}

/// A set of HTTP status codes (100 to 599), one bit each: a response's
/// status is looked up without a search.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    pub const EMPTY: StatusSet = StatusSet([0; 10]);

    /// 502, 503 and 504: what a gateway answers when it could not get a
    /// response, from tollgate's own upstreams as from a proxy in front of
    /// them.
    pub const GATEWAY_FAILURES: StatusSet = StatusSet::EMPTY.with(502).with(503).with(504);

    /// The set with `status` added; statuses outside 100..=599 are left
    /// out (the config refuses them before this).
    pub const fn with(mut self, status: u16) -> StatusSet {
        if status >= 100 && status <= 599 {
            self.0[(status / 64) as usize] |= 1 << (status % 64);
        }
        self
    }

    pub fn contains(&self, status: u16) -> bool {
        self.0
            .get(usize::from(status / 64))
            .is_some_and(|word| word & (1 << (status % 64)) != 0)
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (100..=599).filter(|s| self.contains(*s))
    }
}

impl std::fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
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
    /// Until when a target that was refused opening does not ask again.
    spared_until: Option<Instant>,
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
    /// An answer whose status is not in `failure_statuses`.
    Success,
    /// A status in `failure_statuses`, a timeout, a reset or broken
    /// response.
    Error,
    /// The connection could not be made.
    ConnectFailure,
}

/// What the breaker asks of its upstream after an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to decide.
    Stay,
    /// The target should open: the upstream calls [`Breaker::trip`] or,
    /// when too many of its targets are open already, [`Breaker::spare`].
    Trip,
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
                spared_until: None,
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

    /// Counts how an attempt ended, and says whether the target should
    /// open. It opens only by [`Breaker::trip`], which the upstream calls
    /// when its share of open targets allows.
    pub fn record(&self, outcome: Outcome, now: Instant) -> Verdict {
        let mut state = self.lock();
        let failed = outcome != Outcome::Success;
        match state.phase {
            Phase::Open { .. } => Verdict::Stay,
            Phase::HalfOpen {
                succeeded,
                admitted,
                since,
            } => {
                if failed {
                    Verdict::Trip
                } else {
                    if succeeded + 1 >= self.settings.half_open_probes {
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
                    Verdict::Stay
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
                if !failed || state.spared_until.is_some_and(|until| now < until) {
                    return Verdict::Stay;
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
                    Verdict::Trip
                } else {
                    Verdict::Stay
                }
            }
        }
    }

    /// Opens the target (after a [`Verdict::Trip`]), unless it is open
    /// already: a second failure reported meanwhile does not extend it.
    pub fn trip(&self, now: Instant) {
        let mut state = self.lock();
        if !matches!(state.phase, Phase::Open { .. }) {
            state.phase = Phase::Open {
                until: now + self.settings.open_for,
            };
            state.buckets = [Bucket::default(); BUCKETS];
            state.connect_failures = 0;
            state.spared_until = None;
        }
    }

    /// Keeps the target closed although it tripped, because too many of
    /// the upstream's targets are open: it takes traffic as before and
    /// does not ask to open again for `open_for`. A half-open target
    /// closes. Its window is kept, so once the time is up and a sibling
    /// has closed, one more failure is enough to ask again.
    pub fn spare(&self, now: Instant) {
        let mut state = self.lock();
        match state.phase {
            Phase::Open { .. } => {}
            Phase::HalfOpen { .. } => {
                state.phase = Phase::Closed;
                state.buckets = [Bucket::default(); BUCKETS];
                state.connect_failures = 0;
                state.spared_until = Some(now + self.settings.open_for);
            }
            Phase::Closed => state.spared_until = Some(now + self.settings.open_for),
        }
    }

    /// Whether the target counts against the upstream's `max_open_share`:
    /// open, or half-open (still on trial).
    pub fn is_open(&self) -> bool {
        !matches!(self.lock().phase, Phase::Closed)
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
            ..BreakerSettings::default()
        });
        let t = b.epoch;
        (b, t)
    }

    /// Records as an upstream with room for another open target does.
    fn feed(b: &Breaker, outcome: Outcome, now: Instant) {
        if b.record(outcome, now) == Verdict::Trip {
            b.trip(now);
        }
    }

    #[test]
    fn opens_at_the_error_share_once_enough_requests_were_seen() {
        let (b, t) = breaker();
        // 19 errors: under min_requests, still closed.
        for _ in 0..19 {
            feed(&b, Outcome::Error, t);
        }
        assert_eq!(b.phase(t), Phase::Closed);
        feed(&b, Outcome::Error, t);
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
            feed(&b, outcome, t);
        }
        assert_eq!(b.phase(t), Phase::Closed);
    }

    #[test]
    fn old_outcomes_leave_the_window() {
        let (b, t) = breaker();
        for _ in 0..15 {
            feed(&b, Outcome::Error, t);
        }
        // Eleven seconds later those fifteen are out of the window.
        let later = t + Duration::from_secs(11);
        for _ in 0..10 {
            feed(&b, Outcome::Error, later);
        }
        assert_eq!(b.phase(later), Phase::Closed);
    }

    #[test]
    fn half_open_probes_close_it_or_a_failure_reopens_it() {
        let (b, t) = breaker();
        for _ in 0..20 {
            feed(&b, Outcome::Error, t);
        }
        let after = t + Duration::from_secs(5);
        // Three probes, no fourth.
        assert!(b.try_admit(after) && b.try_admit(after) && b.try_admit(after));
        assert!(!b.try_admit(after));
        assert!(b.is_blocking(after));
        feed(&b, Outcome::Success, after);
        feed(&b, Outcome::Error, after);
        assert!(
            matches!(b.phase(after), Phase::Open { .. }),
            "a failed probe reopens"
        );
        let again = after + Duration::from_secs(5);
        for _ in 0..3 {
            assert!(b.try_admit(again));
        }
        for _ in 0..3 {
            feed(&b, Outcome::Success, again);
        }
        assert_eq!(b.phase(again), Phase::Closed);
        assert!(b.try_admit(again));
    }

    #[test]
    fn connect_failures_in_a_row_open_at_once() {
        let (b, t) = breaker();
        feed(&b, Outcome::ConnectFailure, t);
        feed(&b, Outcome::ConnectFailure, t);
        feed(&b, Outcome::Success, t);
        feed(&b, Outcome::ConnectFailure, t);
        feed(&b, Outcome::ConnectFailure, t);
        assert_eq!(b.phase(t), Phase::Closed, "the run was broken by a success");
        feed(&b, Outcome::ConnectFailure, t);
        assert!(matches!(b.phase(t), Phase::Open { .. }));
    }

    #[test]
    fn probes_that_never_report_are_given_up() {
        let (b, t) = breaker();
        for _ in 0..20 {
            feed(&b, Outcome::Error, t);
        }
        let after = t + Duration::from_secs(5);
        for _ in 0..3 {
            assert!(b.try_admit(after));
        }
        assert!(!b.try_admit(after + Duration::from_secs(1)));
        assert!(b.try_admit(after + Duration::from_secs(5)));
    }

    #[test]
    fn only_gateway_failures_are_errors_unless_listed() {
        let defaults = BreakerSettings::default();
        for status in [502, 503, 504] {
            assert_eq!(defaults.outcome_of(status), Outcome::Error, "{status}");
        }
        for status in [200, 404, 429, 500, 501, 505] {
            assert_eq!(defaults.outcome_of(status), Outcome::Success, "{status}");
        }
        let with_500 = BreakerSettings {
            failure_statuses: StatusSet::EMPTY.with(500),
            ..defaults
        };
        assert_eq!(with_500.outcome_of(500), Outcome::Error);
        assert_eq!(with_500.outcome_of(502), Outcome::Success);
    }

    #[test]
    fn a_status_set_holds_exactly_its_statuses() {
        let set = StatusSet::EMPTY.with(100).with(599).with(500);
        assert_eq!(set.iter().collect::<Vec<_>>(), [100, 500, 599]);
        assert!(!set.contains(0) && !set.contains(99) && !set.contains(600));
        assert!(!set.contains(u16::MAX));
        assert_eq!(StatusSet::EMPTY.with(99).with(600), StatusSet::EMPTY);
        assert_eq!(
            format!("{:?}", StatusSet::GATEWAY_FAILURES),
            "{502, 503, 504}"
        );
    }

    #[test]
    fn the_open_share_rounds_down() {
        let half = BreakerSettings::default();
        assert_eq!(half.max_open(1), 0, "a lone target never opens at 50%");
        assert_eq!(half.max_open(2), 1);
        assert_eq!(half.max_open(3), 1);
        assert_eq!(half.max_open(4), 2);
        let all = BreakerSettings {
            max_open_share: 100,
            ..half
        };
        assert_eq!(all.max_open(1), 1);
        assert_eq!(all.max_open(3), 3);
    }

    #[test]
    fn tripping_asks_the_upstream_and_opens_only_when_told() {
        let (b, t) = breaker();
        for _ in 0..19 {
            assert_eq!(b.record(Outcome::Error, t), Verdict::Stay);
        }
        assert_eq!(b.record(Outcome::Error, t), Verdict::Trip);
        assert_eq!(b.phase(t), Phase::Closed, "record alone never opens");
        assert!(!b.is_open());
        b.trip(t);
        assert!(b.is_open());
        // A second trip while open does not push the end further away.
        b.trip(t + Duration::from_secs(1));
        assert!(b.try_admit(t + Duration::from_secs(5)));
    }

    #[test]
    fn a_spared_target_keeps_traffic_and_asks_again_after_open_for() {
        let (b, t) = breaker();
        for _ in 0..19 {
            b.record(Outcome::Error, t);
        }
        assert_eq!(b.record(Outcome::Error, t), Verdict::Trip);
        b.spare(t);
        assert!(b.try_admit(t) && !b.is_blocking(t));
        let soon = t + Duration::from_secs(4);
        assert_eq!(b.record(Outcome::Error, soon), Verdict::Stay);
        assert_eq!(b.record(Outcome::ConnectFailure, soon), Verdict::Stay);
        // The window was kept: once open_for is over, one failure asks.
        let later = t + Duration::from_secs(5);
        assert_eq!(b.record(Outcome::Error, later), Verdict::Trip);
    }

    #[test]
    fn a_failed_probe_that_is_spared_closes_the_target() {
        let (b, t) = breaker();
        for _ in 0..20 {
            feed(&b, Outcome::Error, t);
        }
        let after = t + Duration::from_secs(5);
        assert!(b.try_admit(after));
        assert_eq!(b.record(Outcome::Error, after), Verdict::Trip);
        b.spare(after);
        assert_eq!(b.phase(after), Phase::Closed);
        assert!(!b.is_open());
        assert!(b.try_admit(after));
    }
}
