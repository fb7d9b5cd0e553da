//! Verified tokens, remembered: a repeated token costs one hash and one
//! lookup instead of a signature check and JSON parsing.
//!
//! An entry is found by a hash of the whole token under a key drawn per
//! cache, so nobody can aim a token at another's slot; the entry keeps the
//! token itself and a hit compares it in full, so a hash collision is a
//! miss, never someone else's identity. The comparison is a plain one: a
//! presented token meets a stored one only when their keyed 64-bit hashes
//! agree, which a client cannot arrange, so its timing tells nothing
//! (a constant-time comparison of a 300-byte token would cost more than
//! the rest of the lookup). An entry is
//! used only before the token's `exp` and only while the key set it was
//! verified against has not lost a key. Only successes are stored.
//!
//! The cache is a bounded S3-FIFO map (quick_cache): a flood of distinct
//! valid tokens evicts the least useful entries, it never grows past its
//! size.

use quick_cache::sync::Cache;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The number of tokens a provider remembers unless configured.
pub const DEFAULT_ENTRIES: usize = 100_000;

/// One remembered token and what a request needs from it.
struct Entry<T> {
    token: Box<[u8]>,
    /// The token's `exp`, in seconds since the epoch.
    expires: u64,
    /// The key-set generation it was verified under.
    generation: u64,
    value: Arc<T>,
}

/// Tokens that verified, with what they yielded.
pub struct TokenCache<T> {
    entries: Cache<u64, Arc<Entry<T>>>,
    hasher: ahash::RandomState,
    /// Tokens answered from the cache, for the admin listener.
    hits: AtomicU64,
    /// Tokens verified from scratch (signature and claims), good or not.
    pub verifications: AtomicU64,
}

impl<T> TokenCache<T> {
    pub fn new(capacity: usize) -> Self {
        TokenCache {
            // Memory grows with use: the estimate sizes the first tables
            // (a provider with few callers holds no megabytes for 100,000),
            // the capacity bounds the entries.
            entries: Cache::with(
                capacity.min(1024),
                capacity as u64,
                Default::default(),
                Default::default(),
                Default::default(),
            ),
            hasher: ahash::RandomState::new(),
            hits: AtomicU64::new(0),
            verifications: AtomicU64::new(0),
        }
    }

    /// What `token` yielded when it verified, if that is still good at
    /// `now` (seconds since the epoch) under key-set `generation`.
    pub fn get(&self, token: &[u8], now: u64, generation: u64) -> Option<Arc<T>> {
        let entry = self.entries.get(&self.hasher.hash_one(token))?;
        if !(*entry.token == *token && now < entry.expires && entry.generation == generation) {
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(Arc::clone(&entry.value))
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Remembers a token that verified, until `expires`.
    pub fn insert(&self, token: &[u8], expires: u64, generation: u64, value: Arc<T>) {
        let entry = Entry {
            token: token.into(),
            expires,
            generation,
            value,
        };
        self.entries
            .insert(self.hasher.hash_one(token), Arc::new(entry));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_remembered_until_it_expires() {
        let cache = TokenCache::new(16);
        cache.insert(b"a.b.c", 100, 0, Arc::new("alice"));
        assert_eq!(cache.get(b"a.b.c", 99, 0).as_deref(), Some(&"alice"));
        assert_eq!(cache.get(b"a.b.c", 100, 0), None, "expired");
        assert_eq!(cache.get(b"a.b.c", 99, 1), None, "a key was removed");
        assert_eq!(cache.get(b"a.b.d", 99, 0), None);
    }

    #[test]
    fn a_colliding_hash_is_a_miss() {
        let cache: TokenCache<&str> = TokenCache::new(16);
        // Plant an entry under the hash of another token.
        let entry = Entry {
            token: Box::from(&b"someone.else.s"[..]),
            expires: 100,
            generation: 0,
            value: Arc::new("bob"),
        };
        cache
            .entries
            .insert(cache.hasher.hash_one(&b"a.b.c"[..]), Arc::new(entry));
        assert_eq!(cache.get(b"a.b.c", 1, 0), None);
    }

    #[test]
    fn the_size_is_bounded() {
        let cache = TokenCache::new(100);
        for i in 0..1_000u32 {
            cache.insert(format!("t{i}").as_bytes(), 100, 0, Arc::new(i));
        }
        assert!(cache.len() <= 100, "{}", cache.len());
    }
}
