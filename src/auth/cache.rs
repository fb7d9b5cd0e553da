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
//! The cache is a bounded S3-FIFO map (quick_cache), bounded twice: by
//! entries (`cache_size`) and by bytes (`cache_bytes`), whichever binds
//! first. A flood of distinct valid tokens evicts the least useful
//! entries; large tokens (up to 8 KiB each, and their claims) cannot make
//! it grow past its bytes.

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Weighter};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The number of tokens a provider remembers unless configured.
pub const DEFAULT_ENTRIES: usize = 100_000;

/// The bytes a provider's remembered tokens may take unless configured.
pub const DEFAULT_BYTES: u64 = 64 << 20;

/// The least `cache_bytes` allowed: the cache is split into up to 32
/// shards, and an entry must fit in one; from 1 MiB on, one holds 32 KiB,
/// room for the largest token (8 KiB) and its claims.
pub const MIN_BYTES: u64 = 1 << 20;

/// What a cached value owns on the heap, for the byte bound.
pub trait HeapSize {
    /// Bytes allocated for this value, not counting its own size.
    fn heap_bytes(&self) -> usize;
}

/// What the cache's own structures spend per entry: the map's slot (key,
/// pointer, list links, index, room left for growth), its share of the
/// recently-evicted list, and the reference counts of the two shared
/// allocations. Set from measurement (docs/configuration.md): with it the
/// count stays within 10% of the RSS a cached token adds.
const SLOT_BYTES: usize = 128;

/// One remembered token and what a request needs from it.
struct Entry<T> {
    token: Box<[u8]>,
    /// The token's `exp`, in seconds since the epoch.
    expires: u64,
    /// The key-set generation it was verified under.
    generation: u64,
    /// What this entry counts against the bounds (see [`TokenCache::new`]).
    weight: u64,
    value: Arc<T>,
}

/// Reads the weight each entry was given when it was made.
#[derive(Clone, Copy)]
struct EntryWeight;

impl<T> Weighter<u64, Arc<Entry<T>>> for EntryWeight {
    fn weight(&self, _: &u64, entry: &Arc<Entry<T>>) -> u64 {
        entry.weight
    }
}

/// Tokens that verified, with what they yielded.
pub struct TokenCache<T> {
    entries: Cache<u64, Arc<Entry<T>>, EntryWeight>,
    /// The least weight of an entry, so that the byte capacity bounds
    /// the count as well.
    min_weight: u64,
    hasher: ahash::RandomState,
    /// Tokens answered from the cache, for the admin listener.
    hits: AtomicU64,
    /// Tokens verified from scratch (signature and claims), good or not.
    pub verifications: AtomicU64,
}

impl<T: HeapSize> TokenCache<T> {
    /// A cache of at most `entries` tokens and `bytes` bytes.
    ///
    /// quick_cache bounds one thing, a total weight: here `bytes`. An entry
    /// weighs its bytes, but at least `bytes / (entries + 1) + 1`, more
    /// than an `(entries + 1)`th of the capacity, so no more than `entries`
    /// fit. (`+ 1` rather than `entries` alone: quick_cache admits nothing
    /// heavier than 97% of a shard, and a cache of one entry must hold it.)
    pub fn new(entries: usize, bytes: u64) -> Self {
        let entries = entries.max(1) as u64;
        let min_weight = bytes / entries.saturating_add(1) + 1;
        TokenCache {
            // Memory grows with use: the estimate sizes the first tables
            // (a provider with few callers holds no megabytes for 100,000),
            // the capacity bounds the entries. It also caps the shards at
            // 32 (quick_cache keeps 32 entries per shard in the estimate),
            // so one shard holds 1/32 of the bytes or more.
            entries: Cache::with(
                entries.min(1024) as usize,
                bytes,
                EntryWeight,
                DefaultHashBuilder::default(),
                Default::default(),
            ),
            min_weight,
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

    /// Remembers a token that verified, until `expires`. An entry heavier
    /// than a shard can hold is not remembered: that token is verified
    /// each time.
    pub fn insert(&self, token: &[u8], expires: u64, generation: u64, value: Arc<T>) {
        let bytes = SLOT_BYTES
            + std::mem::size_of::<Entry<T>>()
            + token.len()
            + std::mem::size_of::<T>()
            + value.heap_bytes();
        let entry = Entry {
            token: token.into(),
            expires,
            generation,
            weight: (bytes as u64).max(self.min_weight),
            value,
        };
        self.entries
            .insert(self.hasher.hash_one(token), Arc::new(entry));
    }
}

impl<T> TokenCache<T> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes the entries count against `cache_bytes` (an entry counts
    /// at least `cache_bytes / cache_size`).
    pub fn weight(&self) -> u64 {
        self.entries.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_remembered_until_it_expires() {
        let cache = TokenCache::new(16, DEFAULT_BYTES);
        cache.insert(b"a.b.c", 100, 0, Arc::new("alice"));
        assert_eq!(cache.get(b"a.b.c", 99, 0).as_deref(), Some(&"alice"));
        assert_eq!(cache.get(b"a.b.c", 100, 0), None, "expired");
        assert_eq!(cache.get(b"a.b.c", 99, 1), None, "a key was removed");
        assert_eq!(cache.get(b"a.b.d", 99, 0), None);
    }

    #[test]
    fn a_colliding_hash_is_a_miss() {
        let cache: TokenCache<&str> = TokenCache::new(16, DEFAULT_BYTES);
        // Plant an entry under the hash of another token.
        let entry = Entry {
            token: Box::from(&b"someone.else.s"[..]),
            expires: 100,
            generation: 0,
            weight: 1,
            value: Arc::new("bob"),
        };
        cache
            .entries
            .insert(cache.hasher.hash_one(&b"a.b.c"[..]), Arc::new(entry));
        assert_eq!(cache.get(b"a.b.c", 1, 0), None);
    }

    #[test]
    fn the_count_is_bounded() {
        for entries in [1, 2, 100, 1000] {
            let cache = TokenCache::new(entries, DEFAULT_BYTES);
            for i in 0..10 * entries as u32 {
                cache.insert(format!("t{i}").as_bytes(), 100, 0, Arc::new(i));
            }
            assert!(cache.len() <= entries, "{entries}: {}", cache.len());
            assert!(!cache.is_empty(), "{entries}");
        }
    }

    #[test]
    fn the_bytes_are_bounded() {
        let bytes = 1 << 20;
        let cache = TokenCache::new(DEFAULT_ENTRIES, bytes);
        let token = vec![b'x'; 8000];
        for i in 0..1_000u32 {
            let mut token = token.clone();
            token[..4].copy_from_slice(&i.to_le_bytes());
            cache.insert(&token, 100, 0, Arc::new(i));
        }
        // 1,000 tokens of 8,000 bytes: about 8 MB unbounded.
        assert!(cache.weight() <= bytes, "{}", cache.weight());
        assert!(cache.len() <= 131, "{}", cache.len());
        assert!(cache.len() >= 64, "{}", cache.len());
    }

    #[test]
    fn claims_count_against_the_bytes() {
        struct Claims(Vec<String>);
        impl HeapSize for Claims {
            fn heap_bytes(&self) -> usize {
                self.0.capacity() * std::mem::size_of::<String>()
                    + self.0.iter().map(String::capacity).sum::<usize>()
            }
        }
        let cache = TokenCache::new(DEFAULT_ENTRIES, 1 << 20);
        let many = Claims((0..1000).map(|i| i.to_string()).collect());
        cache.insert(b"a.b.c", 100, 0, Arc::new(many));
        assert!(cache.weight() > 24_000, "{}", cache.weight());
    }

    impl HeapSize for u32 {
        fn heap_bytes(&self) -> usize {
            0
        }
    }

    impl HeapSize for &str {
        fn heap_bytes(&self) -> usize {
            0
        }
    }
}
