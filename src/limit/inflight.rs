//! In-flight limits: how many requests may be in progress at once.
//!
//! - [`Ceiling`]: an exact count per route or upstream (`max_inflight`).
//!   Its counter is pooled by name, so requests still running on the
//!   previous snapshot count against the new one after a reload.
//! - [`PerClient`]: per caller (`max_inflight_per_client`), on
//!   pingora-limits' `Inflight` estimator: fixed memory (4 x 8,192
//!   counters) whatever the number of clients. Two clients whose keys
//!   collide in all four rows share a count, so it may over-count, never
//!   under-count: a client is never let past its limit, and rarely held
//!   below it.

use super::LimitKey;
use pingora_limits::inflight::{Guard, Inflight};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// An exact ceiling on requests in progress.
#[derive(Debug, Clone)]
pub struct Ceiling {
    pub max: usize,
    count: Arc<AtomicUsize>,
}

/// One request's place under a ceiling, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Ceiling {
    /// A ceiling of `max` over a (pooled) counter.
    pub fn new(max: usize, count: Arc<AtomicUsize>) -> Self {
        Ceiling { max, count }
    }

    /// A place for one more request, unless `max` are in progress.
    pub fn try_acquire(&self) -> Option<Slot> {
        let before = self.count.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(Arc::clone(&self.count));
        // Over: the slot gives the count back as it drops.
        (before < self.max).then_some(slot)
    }

    pub fn in_flight(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

impl PartialEq for Ceiling {
    fn eq(&self, other: &Self) -> bool {
        self.max == other.max && Arc::ptr_eq(&self.count, &other.count)
    }
}

impl Eq for Ceiling {}

/// Requests in progress per caller, estimated.
pub struct PerClient {
    pub max: usize,
    counts: Arc<Inflight>,
}

impl std::fmt::Debug for PerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerClient")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl PerClient {
    pub fn new(max: usize, counts: Arc<Inflight>) -> Self {
        PerClient { max, counts }
    }

    /// A place for one more request of `key`, unless its estimate is at
    /// `max` already.
    pub fn try_acquire(&self, key: LimitKey<'_>) -> Option<Guard> {
        let (guard, count) = self.counts.incr(key.local(), 1);
        (usize::try_from(count).unwrap_or(usize::MAX) <= self.max).then_some(guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ceiling_is_exact_and_gives_back() {
        let c = Ceiling::new(2, Arc::default());
        let a = c.try_acquire().unwrap();
        let _b = c.try_acquire().unwrap();
        assert!(c.try_acquire().is_none());
        assert_eq!(c.in_flight(), 2, "a refusal leaves no count behind");
        drop(a);
        assert!(c.try_acquire().is_some());
        assert_eq!(c.in_flight(), 1);
    }

    #[test]
    fn exact_across_threads() {
        let c = Ceiling::new(10, Arc::default());
        let held: Vec<Slot> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..100).filter_map(|_| c.try_acquire()).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(held.len(), 10);
        drop(held);
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn per_client_counts_each_key() {
        let p = PerClient::new(2, Arc::new(Inflight::new()));
        let (a, b) = (LimitKey::Header(b"a"), LimitKey::Header(b"b"));
        let a1 = p.try_acquire(a).unwrap();
        let _a2 = p.try_acquire(a).unwrap();
        assert!(p.try_acquire(a).is_none());
        let _b = p.try_acquire(b).unwrap();
        drop(a1);
        assert!(p.try_acquire(a).is_some());
    }
}
