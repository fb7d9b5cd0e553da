//! State that outlives a reload: one mechanism for all of it.
//!
//! A reload compiles a new snapshot, but some state must not start over
//! with it: health probes (and, as they land, rate-limit buckets, breaker
//! state, key sets, token caches, metric handles). Each kind lives in a
//! [`StatePool`] keyed by name. Compiling *draws* from the pools: the same
//! name with the same settings gets the same state, changed settings get a
//! fresh one. What a compile drew is kept in a [`Drawn`] set, which the
//! store *commits* once the new snapshot is swapped in: the pool then holds
//! exactly what the running snapshot uses. A reload that fails commits
//! nothing, so nothing is dropped or replaced by a file that never ran.
//!
//! The mechanism knows nothing of what it holds; the pools of each kind
//! are listed in [`crate::snapshot::Pools`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// States of one kind, by name, each with the settings it was made for.
pub struct StatePool<K, S> {
    entries: Mutex<HashMap<String, (K, Arc<S>)>>,
}

impl<K, S> Default for StatePool<K, S> {
    fn default() -> Self {
        StatePool {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

/// What one compile drew from a pool, waiting to be committed.
pub struct Drawn<K, S> {
    entries: HashMap<String, (K, Arc<S>)>,
}

impl<K, S> Default for Drawn<K, S> {
    fn default() -> Self {
        Drawn {
            entries: HashMap::new(),
        }
    }
}

impl<K: PartialEq + Clone, S> StatePool<K, S> {
    /// The state for `name` with `settings`: the pool's own if its settings
    /// are equal, otherwise one made by `make`. Either way it is recorded in
    /// `drawn`; the pool itself is not changed until [`Self::commit`].
    pub fn draw<E>(
        &self,
        drawn: &mut Drawn<K, S>,
        name: &str,
        settings: &K,
        make: impl FnOnce() -> Result<S, E>,
    ) -> Result<Arc<S>, E> {
        let existing = self
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .filter(|(k, _)| k == settings)
            .map(|(_, state)| Arc::clone(state));
        let state = match existing {
            Some(state) => state,
            None => Arc::new(make()?),
        };
        drawn
            .entries
            .insert(name.to_owned(), (settings.clone(), Arc::clone(&state)));
        Ok(state)
    }

    /// Makes the pool hold exactly what a compile drew: called after its
    /// snapshot is swapped in. States it did not draw are dropped.
    pub fn commit(&self, drawn: Drawn<K, S>) {
        *self.entries.lock().unwrap_or_else(PoisonError::into_inner) = drawn.entries;
    }

    /// The states the running snapshot uses, for services that work on
    /// them (the health checker).
    pub fn active(&self) -> Vec<Arc<S>> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|(_, state)| Arc::clone(state))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pool = StatePool<u32, String>;

    fn draw(pool: &Pool, drawn: &mut Drawn<u32, String>, name: &str, settings: u32) -> Arc<String> {
        pool.draw::<()>(drawn, name, &settings, || Ok(format!("{name}/{settings}")))
            .unwrap()
    }

    #[test]
    fn the_same_name_and_settings_keep_their_state() {
        let pool = Pool::default();
        let mut first = Drawn::default();
        let a = draw(&pool, &mut first, "a", 1);
        pool.commit(first);
        let mut second = Drawn::default();
        assert!(Arc::ptr_eq(&a, &draw(&pool, &mut second, "a", 1)));
    }

    #[test]
    fn changed_settings_get_a_fresh_state() {
        let pool = Pool::default();
        let mut first = Drawn::default();
        let a = draw(&pool, &mut first, "a", 1);
        pool.commit(first);
        let mut second = Drawn::default();
        let changed = draw(&pool, &mut second, "a", 2);
        assert!(!Arc::ptr_eq(&a, &changed));
        assert_eq!(*changed, "a/2");
    }

    #[test]
    fn a_removed_name_is_dropped_after_the_swap() {
        let pool = Pool::default();
        let mut first = Drawn::default();
        let a = draw(&pool, &mut first, "a", 1);
        draw(&pool, &mut first, "b", 1);
        pool.commit(first);
        assert_eq!(pool.active().len(), 2);
        let mut second = Drawn::default();
        draw(&pool, &mut second, "b", 1);
        // Until the commit, the running snapshot's states stay.
        assert_eq!(pool.active().len(), 2);
        pool.commit(second);
        assert_eq!(pool.active().len(), 1);
        assert_eq!(Arc::strong_count(&a), 1, "only the test holds a now");
    }

    #[test]
    fn a_failed_reload_drops_and_replaces_nothing() {
        let pool = Pool::default();
        let mut first = Drawn::default();
        let a = draw(&pool, &mut first, "a", 1);
        pool.commit(first);
        // A compile that draws a changed "a" and a new "c", then fails:
        // its draws are never committed.
        let mut failed = Drawn::default();
        draw(&pool, &mut failed, "a", 2);
        draw(&pool, &mut failed, "c", 1);
        drop(failed);
        let mut next = Drawn::default();
        assert!(Arc::ptr_eq(&a, &draw(&pool, &mut next, "a", 1)));
        assert_eq!(pool.active().len(), 1);
    }
}
