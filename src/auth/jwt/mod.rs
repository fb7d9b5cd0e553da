//! JWT bearer tokens: a provider's keys verify them, strictly; a verified
//! token is remembered so its next request costs a lookup.
//!
//! Verification, for a token not remembered:
//! 1. `Authorization: Bearer <token>`, at most [`MAX_AUTHORIZATION_BYTES`],
//!    checked before any parsing;
//! 2. the header: a `crit` parameter is refused (tollgate understands no
//!    extension); `jku`, `x5u`, `jwk` and `x5c` are never looked at;
//! 3. the key by `kid`, from the configured keys, then the JWKS;
//! 4. the token's `alg` must be the key's own algorithm;
//! 5. signature, then claims: `exp` required, `nbf` and `iat` within the
//!    leeway, `iss` and `aud` when configured, each of the right JSON
//!    type (jsonwebtoken does the signature, `exp`, `nbf`, `aud`, and `iss`
//!    but for its type: it takes a list holding the issuer as the issuer).

pub mod keys;
pub mod remote;

use super::cache::{HeapSize, TokenCache};
use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use keys::{KeySet, PinnedKey};
use pingora::http::RequestHeader;
use remote::RemoteKeys;
use serde_json::{Map, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest `Authorization` header looked at; a longer one is refused
/// before any parsing.
pub const MAX_AUTHORIZATION_BYTES: usize = 8 * 1024;

/// What a verified token gives the request, computed once per token.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// The `sub` claim.
    pub subject: String,
    /// From `scope` (space-separated) and `scp` (a list or a string).
    pub scopes: Vec<String>,
    /// From `groups` (a list or a string).
    pub groups: Vec<String>,
    /// The `forward_claims` headers, named as configured (Pingora keeps
    /// the case of a name given as bytes, without a copy per insert).
    pub headers: Vec<(Bytes, HeaderValue)>,
}

impl HeapSize for Verified {
    fn heap_bytes(&self) -> usize {
        fn strings(list: &Vec<String>) -> usize {
            list.capacity() * std::mem::size_of::<String>()
                + list.iter().map(String::capacity).sum::<usize>()
        }
        // A header's name is shared with the provider's configuration;
        // its value is the entry's own.
        self.subject.capacity()
            + strings(&self.scopes)
            + strings(&self.groups)
            + self.headers.capacity() * std::mem::size_of::<(Bytes, HeaderValue)>()
            + self.headers.iter().map(|(_, v)| v.len()).sum::<usize>()
    }
}

/// Why a token was refused: the 401's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooLarge,
    Malformed,
    Critical,
    UnknownKey,
    WrongAlgorithm,
    BadSignature,
    Expired,
    NotYetValid,
    MissingClaim,
    BadClaim,
    Issuer,
    Audience,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::TooLarge => "the Authorization header is too large",
            Refusal::Malformed => "the token is malformed",
            Refusal::Critical => "the token requires header extensions tollgate does not support",
            Refusal::UnknownKey => "the token names no known key",
            Refusal::WrongAlgorithm => "the token's algorithm is not its key's",
            Refusal::BadSignature => "the token's signature does not verify",
            Refusal::Expired => "the token has expired",
            Refusal::NotYetValid => "the token is not valid yet",
            Refusal::MissingClaim => "the token lacks a required claim",
            Refusal::BadClaim => "a claim of the token has the wrong type",
            Refusal::Issuer => "the token's issuer is not accepted",
            Refusal::Audience => "the token's audience is not accepted",
        }
    }

    /// The label of the refusal whose message is `message` ("invalid"
    /// for one that is no token refusal's).
    pub fn reason_of(message: &str) -> &'static str {
        const ALL: [Refusal; 12] = [
            Refusal::TooLarge,
            Refusal::Malformed,
            Refusal::Critical,
            Refusal::UnknownKey,
            Refusal::WrongAlgorithm,
            Refusal::BadSignature,
            Refusal::Expired,
            Refusal::NotYetValid,
            Refusal::MissingClaim,
            Refusal::BadClaim,
            Refusal::Issuer,
            Refusal::Audience,
        ];
        ALL.iter()
            .find(|r| r.message() == message)
            .map_or("invalid", |r| r.reason())
    }

    /// A short label, for logs and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::TooLarge => "too_large",
            Refusal::Malformed => "malformed",
            Refusal::Critical => "crit",
            Refusal::UnknownKey => "unknown_kid",
            Refusal::WrongAlgorithm => "wrong_alg",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::MissingClaim => "missing_claim",
            Refusal::BadClaim => "bad_claim",
            Refusal::Issuer => "issuer",
            Refusal::Audience => "audience",
        }
    }
}

/// What a request's bearer token says.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenCheck {
    Missing,
    Invalid(Refusal),
    Valid(Arc<Verified>),
}

/// One `forward_claims` entry.
#[derive(Debug, Clone)]
pub struct Forward {
    pub claim: String,
    pub header: HeaderName,
    /// The header name as configured.
    pub name: Bytes,
}

impl Forward {
    /// `header` must be a valid header name (checked when compiling).
    pub fn new(claim: String, header: &str) -> Option<Self> {
        Some(Forward {
            claim,
            header: HeaderName::from_bytes(header.as_bytes()).ok()?,
            name: Bytes::copy_from_slice(header.as_bytes()),
        })
    }
}

/// Claim rules shared by a provider's keys.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    /// Seconds of clock skew allowed for `exp`, `nbf` and `iat`.
    pub leeway: u64,
}

/// One configured JWT provider, compiled.
pub struct Provider {
    pub name: String,
    /// Keys from `keys` and `jwks_file`.
    keys: KeySet,
    remote: Option<Arc<RemoteKeys>>,
    /// One validation per algorithm, built once.
    validations: Vec<(Algorithm, Validation)>,
    /// `iss` must be this string, when set.
    issuer: Option<String>,
    leeway: u64,
    /// `forward_claims`: claim name, header name.
    forward: Vec<Forward>,
    cache: Arc<TokenCache<Verified>>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("keys", &self.keys.len())
            .field("remote", &self.remote.as_ref().map(|r| &r.settings.url))
            .finish_non_exhaustive()
    }
}

const ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

impl Provider {
    pub fn new(
        name: String,
        keys: KeySet,
        remote: Option<Arc<RemoteKeys>>,
        rules: &ClaimRules,
        forward: Vec<Forward>,
        cache: Arc<TokenCache<Verified>>,
    ) -> Self {
        let validations = ALGORITHMS
            .iter()
            .map(|&alg| (alg, validation(alg, rules)))
            .collect();
        Provider {
            name,
            keys,
            remote,
            validations,
            issuer: rules.issuer.clone(),
            leeway: rules.leeway,
            forward,
            cache,
        }
    }

    /// The headers this provider forwards, to strip from every request.
    pub fn forwarded_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.forward.iter().map(|f| &f.header)
    }

    /// Checks the request's bearer token.
    pub async fn check(&self, req: &RequestHeader) -> TokenCheck {
        let token = match bearer_token(req) {
            Ok(Some(token)) => token,
            Ok(None) => return TokenCheck::Missing,
            Err(refusal) => return TokenCheck::Invalid(refusal),
        };
        let now = now_seconds();
        // Read before verifying: a key dropped meanwhile makes this entry
        // stale, never a token verified with it current.
        let mut generation = self.remote.as_ref().map_or(0, |r| r.generation());
        if let Some(verified) = self.cache.get(token, now, generation) {
            return TokenCheck::Valid(verified);
        }
        self.cache.verifications.fetch_add(1, Ordering::Relaxed);
        let mut result = self.verify(token, now);
        if let (Err(Refusal::UnknownKey), Some(remote)) = (&result, &self.remote) {
            // Boxed: the wait (a timer, a channel) is rare, and inline it
            // would enlarge every request's future.
            if Box::pin(remote.refetch_for_unknown_kid()).await {
                generation = remote.generation();
                result = self.verify(token, now_seconds());
            }
        }
        match result {
            Ok((verified, exp)) => {
                let verified = Arc::new(verified);
                self.cache
                    .insert(token, exp, generation, Arc::clone(&verified));
                TokenCheck::Valid(verified)
            }
            Err(refusal) => TokenCheck::Invalid(refusal),
        }
    }

    /// Verifies a token from scratch: what it yields, and its `exp`.
    pub fn verify(&self, token: &[u8], now: u64) -> Result<(Verified, u64), Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        if header.crit.is_some() {
            return Err(Refusal::Critical);
        }
        let remote_keys = self.remote.as_ref().map(|r| r.keys());
        let kid = header.kid.as_deref();
        let mut candidates: Vec<&Arc<PinnedKey>> = self.keys.find(kid).iter().collect();
        if let Some(remote) = &remote_keys {
            candidates.extend(remote.find(kid));
        }
        if candidates.is_empty() {
            return Err(Refusal::UnknownKey);
        }
        let mut refusal = Refusal::WrongAlgorithm;
        for key in candidates {
            if key.alg != header.alg {
                continue;
            }
            let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == key.alg) else {
                continue;
            };
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => return self.accept(&data.claims, now),
                Err(e) => refusal = refusal_of(e.kind()),
            }
        }
        Err(refusal)
    }

    /// The claims jsonwebtoken does not check, then what the request needs.
    fn accept(&self, claims: &Map<String, Value>, now: u64) -> Result<(Verified, u64), Refusal> {
        if let Some(issuer) = &self.issuer {
            // RFC 7519 makes `iss` one string; jsonwebtoken also takes a
            // list that holds the issuer among others.
            match claims.get("iss") {
                Some(Value::String(iss)) if iss == issuer => {}
                Some(Value::String(_)) => return Err(Refusal::Issuer),
                Some(_) => return Err(Refusal::BadClaim),
                None => return Err(Refusal::MissingClaim),
            }
        }
        if let Some(iat) = claims.get("iat") {
            let iat = numeric_date(iat).ok_or(Refusal::BadClaim)?;
            if iat > now.saturating_add(self.leeway) {
                return Err(Refusal::NotYetValid);
            }
        }
        let exp = claims
            .get("exp")
            .and_then(numeric_date)
            .ok_or(Refusal::MissingClaim)?;
        let subject = match claims.get("sub") {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(Refusal::BadClaim),
        };
        let mut scopes = Vec::new();
        match claims.get("scope") {
            None => {}
            Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_owned)),
            Some(_) => return Err(Refusal::BadClaim),
        }
        scopes.extend(string_list(claims.get("scp"))?);
        let groups = string_list(claims.get("groups"))?;
        let headers = self
            .forward
            .iter()
            .filter_map(|f| {
                let value = header_value(claims.get(&f.claim)?)?;
                Some((f.name.clone(), value))
            })
            .collect();
        Ok((
            Verified {
                subject,
                scopes,
                groups,
                headers,
            },
            exp,
        ))
    }

    /// How many verified tokens are remembered.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The provider's keys and cache, as the admin listener shows them.
    pub fn status(&self) -> Value {
        serde_json::json!({
            "keys": self.keys.len(),
            "jwks": self.remote.as_ref().map(|r| r.status()),
            "cache": {
                "entries": self.cache.len(),
                "bytes": self.cache.weight(),
                "hits": self.cache.hits(),
                "verifications": self.cache.verifications.load(Ordering::Relaxed),
            },
        })
    }
}

/// The rules jsonwebtoken applies for one algorithm: `exp` always, `nbf`
/// when present, `iss` and `aud` required when configured.
fn validation(alg: Algorithm, rules: &ClaimRules) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = rules.leeway;
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(issuer) = &rules.issuer {
        v.set_issuer(&[issuer]);
        required.push("iss");
    }
    if rules.audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&rules.audiences);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

fn refusal_of(kind: &ErrorKind) -> Refusal {
    match kind {
        ErrorKind::InvalidSignature => Refusal::BadSignature,
        ErrorKind::ExpiredSignature => Refusal::Expired,
        ErrorKind::ImmatureSignature => Refusal::NotYetValid,
        ErrorKind::InvalidIssuer => Refusal::Issuer,
        ErrorKind::InvalidAudience => Refusal::Audience,
        ErrorKind::MissingRequiredClaim(_) => Refusal::MissingClaim,
        ErrorKind::InvalidClaimFormat(_) => Refusal::BadClaim,
        ErrorKind::InvalidAlgorithm => Refusal::WrongAlgorithm,
        _ => Refusal::Malformed,
    }
}

/// The token of `Authorization: Bearer <token>`. Another scheme, or no
/// header, is no token (another method may apply).
fn bearer_token(req: &RequestHeader) -> Result<Option<&[u8]>, Refusal> {
    let Some(value) = req.headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.as_bytes();
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(Refusal::TooLarge);
    }
    match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => {}
        _ => return Ok(None),
    }
    let token = value[7..].trim_ascii();
    if token.is_empty() {
        return Err(Refusal::Malformed);
    }
    Ok(Some(token))
}

/// A NumericDate: a non-negative JSON number, in whole seconds.
fn numeric_date(value: &Value) -> Option<u64> {
    let n = value.as_number()?;
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

/// A claim holding a list of strings, or one space-separated string.
fn string_list(value: Option<&Value>) -> Result<Vec<String>, Refusal> {
    match value {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s.split_whitespace().map(str::to_owned).collect()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or(Refusal::BadClaim))
            .collect(),
        Some(_) => Err(Refusal::BadClaim),
    }
}

/// A claim as a header value: strings as they are, lists space-separated,
/// anything else as JSON. A value a header cannot carry is not forwarded.
fn header_value(value: &Value) -> Option<HeaderValue> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        Value::Null => return None,
        other => other.to_string(),
    };
    HeaderValue::from_str(&text).ok()
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn provider(rules: ClaimRules) -> Provider {
        let mut keys = KeySet::default();
        keys.add(PinnedKey {
            kid: Some("hs1".into()),
            alg: Algorithm::HS256,
            key: keys::from_secret(Algorithm::HS256, SECRET).unwrap(),
        });
        Provider::new(
            "main".into(),
            keys,
            None,
            &rules,
            vec![Forward::new("sub".into(), "X-User-Id").unwrap()],
            Arc::new(TokenCache::new(100, 1 << 20)),
        )
    }

    fn rules() -> ClaimRules {
        ClaimRules {
            issuer: Some("https://id.example.com".into()),
            audiences: vec!["orders-api".into()],
            leeway: 30,
        }
    }

    fn token(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(&header, claims, &EncodingKey::from_secret(SECRET).unwrap()).unwrap()
    }

    fn claims(now: u64) -> Value {
        json!({"sub": "alice", "iss": "https://id.example.com", "aud": "orders-api",
               "exp": now + 600, "iat": now, "scope": "orders:read orders:write",
               "groups": ["partners"]})
    }

    #[test]
    fn a_good_token_yields_its_claims() {
        let p = provider(rules());
        let now = now_seconds();
        let t = token(Algorithm::HS256, Some("hs1"), &claims(now));
        let (v, exp) = p.verify(t.as_bytes(), now).unwrap();
        assert_eq!(exp, now + 600);
        assert_eq!(v.subject, "alice");
        assert_eq!(v.scopes, ["orders:read", "orders:write"]);
        assert_eq!(v.groups, ["partners"]);
        assert_eq!(v.headers[0].1, "alice");
    }

    #[test]
    fn claims_are_checked() {
        let p = provider(rules());
        let now = now_seconds();
        let with = |edit: &dyn Fn(&mut Value)| {
            let mut c = claims(now);
            edit(&mut c);
            p.verify(token(Algorithm::HS256, Some("hs1"), &c).as_bytes(), now)
                .map(|_| ())
        };
        assert_eq!(with(&|c| c["exp"] = json!(now - 31)), Err(Refusal::Expired));
        assert_eq!(with(&|c| c["exp"] = json!(now - 29)), Ok(()), "leeway");
        // A string is no NumericDate: the token has no usable `exp`.
        assert_eq!(
            with(&|c| c["exp"] = json!("9999999999")),
            Err(Refusal::MissingClaim)
        );
        assert_eq!(with(&|c| c["nbf"] = json!("0")), Err(Refusal::BadClaim));
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            Err(Refusal::MissingClaim)
        );
        assert_eq!(
            with(&|c| c["nbf"] = json!(now + 60)),
            Err(Refusal::NotYetValid)
        );
        assert_eq!(
            with(&|c| c["iat"] = json!(now + 60)),
            Err(Refusal::NotYetValid)
        );
        assert_eq!(with(&|c| c["iat"] = json!("now")), Err(Refusal::BadClaim));
        assert_eq!(
            with(&|c| c["iss"] = json!("https://evil")),
            Err(Refusal::Issuer)
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("iss");
            }),
            Err(Refusal::MissingClaim)
        );
        assert_eq!(
            with(&|c| c["iss"] = json!(["https://id.example.com", "x"])),
            Err(Refusal::BadClaim)
        );
        assert_eq!(
            with(&|c| c["iss"] = json!(["https://id.example.com"])),
            Err(Refusal::BadClaim)
        );
        assert_eq!(with(&|c| c["aud"] = json!("other")), Err(Refusal::Audience));
        assert_eq!(with(&|c| c["aud"] = json!(["other", "orders-api"])), Ok(()));
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            Err(Refusal::MissingClaim)
        );
        assert_eq!(
            with(&|c| c["groups"] = json!({"a": 1})),
            Err(Refusal::BadClaim)
        );
    }

    #[test]
    fn keys_are_pinned() {
        let p = provider(rules());
        let now = now_seconds();
        let c = claims(now);
        let verify = |t: &str| p.verify(t.as_bytes(), now).map(|_| ());
        assert_eq!(
            verify(&token(Algorithm::HS384, Some("hs1"), &c)),
            Err(Refusal::WrongAlgorithm)
        );
        assert_eq!(
            verify(&token(Algorithm::HS256, Some("zz"), &c)),
            Err(Refusal::UnknownKey)
        );
        assert_eq!(
            verify(&token(Algorithm::HS256, None, &c)),
            Err(Refusal::UnknownKey)
        );
        let good = token(Algorithm::HS256, Some("hs1"), &c);
        let (head, _) = good.rsplit_once('.').unwrap();
        assert_eq!(verify(&format!("{head}.")), Err(Refusal::BadSignature));
        assert_eq!(verify("not a token"), Err(Refusal::Malformed));
        // alg "none", hand-made.
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","kid":"hs1"}"#),
            b64(&c.to_string())
        );
        assert_eq!(verify(&none), Err(Refusal::Malformed));
    }

    #[tokio::test]
    async fn a_verified_token_is_remembered() {
        let p = provider(rules());
        let t = token(Algorithm::HS256, Some("hs1"), &claims(now_seconds()));
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("Authorization", format!("Bearer {t}"))
            .unwrap();
        let TokenCheck::Valid(first) = p.check(&req).await else {
            panic!("not valid")
        };
        assert_eq!(p.cached(), 1);
        let TokenCheck::Valid(second) = p.check(&req).await else {
            panic!("not valid")
        };
        assert!(
            Arc::ptr_eq(&first, &second),
            "the second check was a lookup"
        );
        req.insert_header("Authorization", "Basic YTpi").unwrap();
        assert_eq!(p.check(&req).await, TokenCheck::Missing);
        req.insert_header("Authorization", format!("Bearer {}", "a".repeat(9000)))
            .unwrap();
        assert_eq!(p.check(&req).await, TokenCheck::Invalid(Refusal::TooLarge));
    }
}
