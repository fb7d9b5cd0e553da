//! Request ids: kept from the client when sane, generated otherwise.
//!
//! Generated ids are 32 hex digits: 128 random bits from a per-thread
//! ChaCha8 generator seeded from the operating system, so an id reveals
//! nothing about other requests and cannot be predicted. No syscall, lock
//! or allocation beyond the header value itself. (rand's `thread_rng`
//! would do, at about twice the cost per id: it reseeds and checks for
//! forks on every call.)

use http::HeaderValue;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;

thread_local! {
    static RNG: RefCell<ChaCha8Rng> = RefCell::new(seeded());
}

fn seeded() -> ChaCha8Rng {
    ChaCha8Rng::from_rng(rand::rngs::OsRng).unwrap_or_else(|_| {
        // The OS refused randomness (it does not on Linux once booted);
        // RandomState's keys still come from it or from the clock.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        ChaCha8Rng::seed_from_u64(h.finish())
    })
}

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

/// A new id, as a header value.
pub fn generate() -> HeaderValue {
    let (high, low) = RNG.with(|rng| {
        let mut rng = rng.borrow_mut();
        (rng.next_u64(), rng.next_u64())
    });
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
    fn generated_ids_share_no_fixed_part() {
        // The previous scheme kept a per-process half constant; random ids
        // differ in both halves.
        let a = generate();
        let b = generate();
        assert_ne!(a.as_bytes()[..16], b.as_bytes()[..16]);
        assert_ne!(a.as_bytes()[16..], b.as_bytes()[16..]);
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
