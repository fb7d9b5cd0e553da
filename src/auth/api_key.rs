//! API keys: a key from a header (or the query, when configured) names a
//! consumer. Keys are configured as SHA-256 digests, never in clear; the
//! presented key is hashed and its digest looked up, then compared in
//! constant time.
//!
//! A key that verified is remembered in memory, so its next request costs
//! a map lookup instead of a SHA-256 (~3,500 instructions without the CPU's
//! SHA extensions). Only valid keys are remembered, so the map is bounded
//! by the configured keys and a stream of wrong keys cannot grow it; it is
//! rebuilt with every configuration, so a key removed by a reload is
//! forgotten at once. The map's hash is keyed per process, so nobody can
//! aim a presented key at a remembered one's bucket.

use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use subtle::ConstantTimeEq;

/// Longest key looked at: a longer one is refused without hashing.
const MAX_KEY_BYTES: usize = 512;

/// A caller known by its key.
#[derive(Debug, PartialEq, Eq)]
pub struct Consumer {
    pub name: String,
    pub groups: Vec<String>,
    /// `name` as the `X-Consumer` value, built once: forwarding it is a
    /// reference count, not a copy.
    pub header: HeaderValue,
}

impl Consumer {
    /// `name` must be a valid header value (consumer names are checked
    /// when the config compiles); an invalid one forwards as empty.
    pub fn new(name: String, groups: Vec<String>) -> Self {
        let header = HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(name.clone()))
            .unwrap_or(HeaderValue::from_static(""));
        Consumer {
            name,
            groups,
            header,
        }
    }
}

/// Where keys are read, and whose they are.
#[derive(Debug)]
pub struct ApiKeys {
    pub header: HeaderName,
    /// A query parameter also taken, when configured.
    pub query: Option<String>,
    consumers: HashMap<[u8; 32], Arc<Consumer>, ahash::RandomState>,
    /// Keys already verified, as presented.
    verified: RwLock<HashMap<Box<[u8]>, Arc<Consumer>, ahash::RandomState>>,
}

/// What a request's key says.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyCheck {
    Missing,
    Invalid,
    /// More than one key (repeated header or query parameter): which one
    /// the gateway checked and which one an upstream reads could differ.
    Ambiguous,
    Valid(Arc<Consumer>),
}

impl ApiKeys {
    pub fn new(header: HeaderName, query: Option<String>) -> Self {
        ApiKeys {
            header,
            query,
            consumers: HashMap::default(),
            verified: RwLock::new(HashMap::default()),
        }
    }

    /// Adds a consumer's key by its digest; false if another consumer
    /// already has it.
    pub fn add(&mut self, digest: [u8; 32], consumer: Arc<Consumer>) -> bool {
        if self.consumers.contains_key(&digest) {
            return false;
        }
        self.consumers.insert(digest, consumer);
        true
    }

    /// Checks the key the request carries.
    pub fn check(&self, req: &RequestHeader) -> KeyCheck {
        let mut values = req.headers.get_all(&self.header).iter();
        let query = match self.query.as_deref() {
            Some(name) => query_values(req, name),
            None => (None, None),
        };
        // Two keys of any kind (two headers, two parameters, a header and a
        // parameter): which one was checked and which one an upstream reads
        // could differ.
        let key = match (values.next(), values.next(), query) {
            (Some(_), Some(_), _) | (Some(_), _, (Some(_), _)) | (None, _, (Some(_), Some(_))) => {
                return KeyCheck::Ambiguous
            }
            (Some(value), None, (None, _)) => Some(value.as_bytes()),
            (None, _, (first, _)) => first,
        };
        let Some(key) = key else {
            return KeyCheck::Missing;
        };
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return KeyCheck::Invalid;
        }
        if let Some(consumer) = self.remembered(key) {
            return KeyCheck::Valid(consumer);
        }
        let digest: [u8; 32] = Sha256::digest(key).into();
        match self.consumers.get_key_value(&digest) {
            // The map found it by the digest; the final comparison does not
            // stop at the first differing byte.
            Some((stored, consumer)) if bool::from(stored.ct_eq(&digest)) => {
                self.verified
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key.into(), Arc::clone(consumer));
                KeyCheck::Valid(Arc::clone(consumer))
            }
            _ => KeyCheck::Invalid,
        }
    }

    /// The consumer of a key that verified before.
    fn remembered(&self, key: &[u8]) -> Option<Arc<Consumer>> {
        let verified = self.verified.read().unwrap_or_else(PoisonError::into_inner);
        let (stored, consumer) = verified.get_key_value(key)?;
        bool::from(stored.ct_eq(key)).then(|| Arc::clone(consumer))
    }
}

/// A query parameter's raw values (keys are not percent-decoded: they are
/// tokens, and a key needing escapes is not one): the first two, to tell a
/// repeated parameter. Parameter names are compared as a query parser
/// reads them (`api%5Fkey` is `api_key`), and a name without `=` counts,
/// with an empty value.
fn query_values<'a>(req: &'a RequestHeader, name: &str) -> (Option<&'a [u8]>, Option<&'a [u8]>) {
    let Some(query) = req.uri.query() else {
        return (None, None);
    };
    let mut values = query.split('&').filter_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        same_name(k, name).then_some(v.as_bytes())
    });
    (values.next(), values.next())
}

/// Whether a query parameter's name, as sent, is `name` once decoded
/// (`+` is a space; `%XX` a byte).
fn same_name(sent: &str, name: &str) -> bool {
    if !sent.contains(['%', '+']) {
        return sent == name;
    }
    let sent = sent.as_bytes();
    let mut decoded = Vec::with_capacity(sent.len());
    let mut i = 0;
    while i < sent.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match sent[i] {
            b'%' if i + 2 < sent.len() => match (hex(sent[i + 1]), hex(sent[i + 2])) {
                (Some(h), Some(l)) => {
                    decoded.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => decoded.push(b'%'),
            },
            b'+' => decoded.push(b' '),
            b => decoded.push(b),
        }
        i += 1;
    }
    decoded == name.as_bytes()
}

/// Parses a configured key, `sha256:<64 hex digits>`.
pub fn parse_digest(text: &str) -> Result<[u8; 32], String> {
    let hex_digits = text.strip_prefix("sha256:").ok_or_else(|| {
        "API keys are written as sha256:<hex of sha256(key)>, never in clear \
         (printf %s \"$KEY\" | sha256sum)"
            .to_owned()
    })?;
    let bytes = hex::decode(hex_digits)
        .map_err(|_| "sha256: must be followed by 64 hex digits".to_owned())?;
    bytes
        .try_into()
        .map_err(|_| "sha256: must be followed by 64 hex digits".to_owned())
}

/// The configured form of a key, for tests and tools.
pub fn digest_of(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_are_compared_decoded() {
        assert!(same_name("api_key", "api_key"));
        assert!(same_name("api%5Fkey", "api_key"));
        assert!(same_name("api%5fkey", "api_key"));
        assert!(same_name("api+key", "api key"));
        assert!(!same_name("api%5", "api_key"));
        assert!(!same_name("api%zzkey", "api_key"));
        assert!(!same_name("apikey", "api_key"));
    }

    #[test]
    fn every_second_key_is_ambiguous() {
        let keys = keys();
        let with = |target: &str, header: Option<&str>| {
            let mut req = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
            if let Some(h) = header {
                req.insert_header("X-API-Key", h).unwrap();
            }
            keys.check(&req)
        };
        for (target, header) in [
            ("/?api_key=a&api%5Fkey=b", None),
            ("/?api_key=a&api_key", None),
            ("/?api_key=a", Some("a")),
        ] {
            assert_eq!(
                with(target, header),
                KeyCheck::Ambiguous,
                "{target} {header:?}"
            );
        }
        assert_eq!(with("/?api_key", None), KeyCheck::Invalid);
        assert_eq!(with("/?other=1", None), KeyCheck::Missing);
    }

    fn keys() -> ApiKeys {
        let mut keys = ApiKeys::new(HeaderName::from_static("x-api-key"), Some("api_key".into()));
        let alice = Arc::new(Consumer::new("alice".into(), vec!["partners".into()]));
        let digest = parse_digest(&digest_of("alice-secret")).unwrap();
        assert!(keys.add(digest, alice));
        assert!(!keys.add(digest, Arc::new(Consumer::new("bob".into(), vec![]))));
        keys
    }

    fn req(path: &str, key: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        if let Some(key) = key {
            req.insert_header("X-API-Key", key).unwrap();
        }
        req
    }

    #[test]
    fn a_key_names_its_consumer() {
        let keys = keys();
        match keys.check(&req("/", Some("alice-secret"))) {
            KeyCheck::Valid(c) => assert_eq!(c.name, "alice"),
            other => panic!("{other:?}"),
        }
        assert_eq!(keys.check(&req("/", Some("wrong"))), KeyCheck::Invalid);
        assert_eq!(keys.check(&req("/", None)), KeyCheck::Missing);
        assert!(matches!(
            keys.check(&req("/x?a=1&api_key=alice-secret", None)),
            KeyCheck::Valid(_)
        ));
        assert_eq!(keys.check(&req("/x?api_key=nope", None)), KeyCheck::Invalid);
        // The second time a key is remembered, and wrong keys never are.
        assert!(matches!(
            keys.check(&req("/", Some("alice-secret"))),
            KeyCheck::Valid(_)
        ));
        assert_eq!(keys.verified.read().unwrap().len(), 1);
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(keys.check(&req("/", Some(&long))), KeyCheck::Invalid);
    }

    #[test]
    fn keys_are_configured_as_digests_only() {
        assert!(parse_digest("alice-secret").is_err());
        assert!(parse_digest("sha256:abc").is_err());
        assert!(parse_digest(&digest_of("k")).is_ok());
    }
}
