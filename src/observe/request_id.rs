//! Request ids: kept from the client when sane, generated otherwise.
//!
//! Generated ids are 32 hex digits: a per-process random half and a mixed
//! per-request counter. The mix is a bijection, so ids never repeat within a
//! process, and the random half keeps processes apart. No syscall, lock or
//! allocation beyond the header value itself.

use http::HeaderValue;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The longest client-sent id that is passed through.
pub const MAX_LEN: usize = 128;

/// Whether a client-sent `X-Request-Id` may be kept: 1 to 128 characters,
/// all of them letters, digits or `-_.:/+=@`. Anything else (spaces, quotes,
/// control bytes) could break a log line or a JSON body, and is replaced.
pub fn is_sane(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_LEN
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b))
}

fn process_seed() -> (u64, u64) {
    static SEED: OnceLock<(u64, u64)> = OnceLock::new();
    *SEED.get_or_init(|| {
        // RandomState is seeded from the OS's randomness.
        let a = RandomState::new().build_hasher().finish();
        let mut h = RandomState::new().build_hasher();
        h.write_u64(a);
        (a, h.finish())
    })
}

/// SplitMix64's finalizer: a bijection on u64 with good avalanche.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// A new id, as a header value.
pub fn generate() -> HeaderValue {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (high, salt) = process_seed();
    let low = mix(COUNTER.fetch_add(1, Ordering::Relaxed) ^ salt);
    let mut buf = [0u8; 32];
    write_hex(&mut buf[..16], high);
    write_hex(&mut buf[16..], low);
    // The id is cloned into the upstream request and the response; an
    // owner-backed `Bytes` makes those clones a reference count, where a
    // copied slice would be re-allocated on its first clone.
    // Hex digits are always a valid header value.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .unwrap_or(HeaderValue::from_static("0"))
}

fn write_hex(out: &mut [u8], mut v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = HEX[(v & 15) as usize];
        v >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generated_ids_are_unique_hex() {
        let ids: HashSet<_> = (0..10_000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 10_000);
        let one = generate();
        assert_eq!(one.len(), 32);
        assert!(is_sane(one.as_bytes()));
    }

    #[test]
    fn sanity_rules() {
        assert!(is_sane(b"abc-123_x.y:z"));
        assert!(!is_sane(b""));
        assert!(!is_sane(b"has space"));
        assert!(!is_sane(b"quote\""));
        assert!(!is_sane(&[b'a'; MAX_LEN + 1]));
    }
}
