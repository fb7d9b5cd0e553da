//! Verification keys, each pinned to one algorithm: from the config
//! (`secret`, `secret_env`, `public_key_file`) and from JWKS documents.
//!
//! A key is found by the token's `kid` (an in-memory lookup, never a path
//! or a URL) and used only for its own algorithm, so an RSA public key can
//! never be taken for an HMAC secret, and `none` names no key at all.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

/// One verification key and the only algorithm it verifies.
pub struct PinnedKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: DecodingKey,
}

impl std::fmt::Debug for PinnedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself: a secret must not reach a log.
        f.debug_struct("PinnedKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl PinnedKey {
    /// Feeds what identifies this key into a fingerprint: its `kid`, its
    /// algorithm and its key material, so a changed key changes the
    /// fingerprint (a new RSA key under an old `kid` included) and an
    /// unchanged file does not.
    fn fingerprint(&self, hasher: &mut Sha256) {
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        field(self.kid.as_deref().unwrap_or("").as_bytes());
        field(format!("{:?}", self.alg).as_bytes());
        // Every kind, matched exhaustively: a kind jsonwebtoken adds later
        // fails to compile here instead of hashing as "no material".
        match self.key.kind() {
            // An HMAC secret, a PEM key's DER, an EC point, an OKP's `x`.
            DecodingKeyKind::SecretOrDer(bytes) => {
                field(b"der");
                field(bytes);
            }
            // A JWKS's RSA key: `n` and `e`.
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                field(b"rsa");
                field(n);
                field(e);
            }
        }
    }
}

/// Keys by `kid`; a key without one serves tokens without one.
#[derive(Debug, Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<PinnedKey>>,
    anonymous: Vec<Arc<PinnedKey>>,
}

impl KeySet {
    /// Adds a key; false if its `kid` is taken.
    pub fn add(&mut self, key: PinnedKey) -> bool {
        match key.kid.clone() {
            Some(kid) => {
                if self.by_kid.contains_key(&kid) {
                    return false;
                }
                self.by_kid.insert(kid, Arc::new(key));
            }
            None => self.anonymous.push(Arc::new(key)),
        }
        true
    }

    /// The key for a token's `kid`, or the keys for a token without one.
    pub fn find(&self, kid: Option<&str>) -> &[Arc<PinnedKey>] {
        match kid {
            Some(kid) => self.by_kid.get(kid).map_or(&[], std::slice::from_ref),
            None => &self.anonymous,
        }
    }

    pub fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True if a key of `self` is gone or different in `next`: tokens
    /// verified with it must be verified again.
    pub fn lost_keys_in(&self, next: &KeySet) -> bool {
        let digest = |k: &PinnedKey| {
            let mut h = Sha256::new();
            k.fingerprint(&mut h);
            h.finalize()
        };
        self.by_kid.iter().any(|(kid, key)| {
            next.by_kid
                .get(kid)
                .is_none_or(|other| digest(key) != digest(other))
        }) || self.anonymous.iter().any(|key| {
            !next
                .anonymous
                .iter()
                .any(|other| digest(key) == digest(other))
        })
    }

    pub fn fingerprint(&self, hasher: &mut Sha256) {
        let mut kids: Vec<&String> = self.by_kid.keys().collect();
        kids.sort();
        for kid in kids {
            self.by_kid[kid].fingerprint(hasher);
        }
        for key in &self.anonymous {
            key.fingerprint(hasher);
        }
    }
}

/// An algorithm name as configured; `none` and unknown names are refused.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    Algorithm::from_str(name).map_err(|_| {
        format!(
            "{name:?} is not a supported algorithm; use one of HS256, HS384, HS512, RS256, \
             RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
        )
    })
}

/// The algorithm family, named for messages.
fn family_name(alg: Algorithm) -> &'static str {
    match alg.family() {
        AlgorithmFamily::Hmac => "an HMAC secret",
        AlgorithmFamily::Rsa => "an RSA public key",
        AlgorithmFamily::Ec => "an EC public key",
        AlgorithmFamily::Ed => "an Ed25519 public key",
    }
}

/// An HMAC key from its secret.
pub fn from_secret(alg: Algorithm, secret: &[u8]) -> Result<DecodingKey, String> {
    if alg.family() != AlgorithmFamily::Hmac {
        return Err(format!(
            "{alg:?} verifies with {}, not a secret; use public_key_file",
            family_name(alg)
        ));
    }
    if secret.is_empty() {
        return Err("the secret is empty".into());
    }
    DecodingKey::from_secret(secret).map_err(|e| format!("unusable secret: {e}"))
}

/// A public key from PEM text, checked against its algorithm.
pub fn from_pem(alg: Algorithm, pem: &[u8]) -> Result<DecodingKey, String> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("PRIVATE KEY") {
        return Err("this is a private key; give the public key (openssl pkey -pubout)".into());
    }
    if !text.contains("-----BEGIN ") {
        return Err("not a PEM file (no -----BEGIN line)".into());
    }
    let parsed = match alg.family() {
        AlgorithmFamily::Hmac => {
            return Err(format!(
                "{alg:?} verifies with a secret, never with a public key: use secret or secret_env"
            ))
        }
        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
        AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem),
    };
    let key = parsed.map_err(|e| format!("not {} for {alg:?}: {e}", family_name(alg)))?;
    check_curve(alg, &key)?;
    Ok(key)
}

/// An EC key must be on its algorithm's curve: ES256 takes P-256 points,
/// ES384 P-384 (uncompressed points of 65 and 97 bytes).
fn check_curve(alg: Algorithm, key: &DecodingKey) -> Result<(), String> {
    let want = match alg {
        Algorithm::ES256 => 65,
        Algorithm::ES384 => 97,
        _ => return Ok(()),
    };
    match key.try_get_as_bytes() {
        Ok(point) if point.len() == want => Ok(()),
        _ => Err(format!(
            "the EC key is not on the curve {alg:?} uses ({})",
            if alg == Algorithm::ES256 {
                "P-256"
            } else {
                "P-384"
            }
        )),
    }
}

/// What reading a JWKS document gave: its usable keys, and why any other
/// was left out.
#[derive(Debug, Default)]
pub struct Jwks {
    pub keys: Vec<PinnedKey>,
    pub skipped: Vec<String>,
}

/// Largest JWKS document read.
pub const MAX_JWKS_BYTES: usize = 1 << 20;

/// Reads a JWKS document. Keys for encryption (`use: enc`) and of
/// algorithms tollgate does not verify are skipped; a key that claims to be
/// usable but is malformed is an error, and so is a document without any
/// usable key. Symmetric (`oct`) keys are refused: secrets are configured
/// with `secret`/`secret_env`, never published.
pub fn parse_jwks(text: &[u8]) -> Result<Jwks, String> {
    if text.len() > MAX_JWKS_BYTES {
        return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
    }
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document =
        serde_json::from_slice(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut out = Jwks::default();
    for (i, value) in doc.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(e) => {
                out.skipped.push(format!("keys[{i}]: {e}"));
                continue;
            }
        };
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        match pin_jwk(&jwk) {
            Ok(Some(key)) => out.keys.push(key),
            Ok(None) => out.skipped.push(format!(
                "keys[{i}]: not a signature verification key tollgate supports"
            )),
            Err(e) => return Err(format!("keys[{i}]: {e}")),
        }
    }
    if out.keys.is_empty() {
        return Err("holds no usable signature key".into());
    }
    Ok(out)
}

/// A JWK pinned to its algorithm: the `alg` it names, or the one its curve
/// implies (P-256: ES256, P-384: ES384, Ed25519: EdDSA); an RSA key without
/// `alg` is taken as RS256, the usual default of identity providers.
fn pin_jwk(jwk: &Jwk) -> Result<Option<PinnedKey>, String> {
    let named = jwk
        .common
        .key_algorithm
        .map(|a| parse_algorithm(&a.to_string()));
    let alg = match (&jwk.algorithm, named) {
        (_, Some(Err(_))) => return Ok(None),
        (_, Some(Ok(alg))) => alg,
        (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
        (AlgorithmParameters::EllipticCurve(p), None) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return Ok(None),
        },
        (AlgorithmParameters::OctetKeyPair(p), None) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return Ok(None),
    };
    let fits = matches!(
        (&jwk.algorithm, alg.family()),
        (AlgorithmParameters::RSA(_), AlgorithmFamily::Rsa)
            | (AlgorithmParameters::EllipticCurve(_), AlgorithmFamily::Ec)
            | (AlgorithmParameters::OctetKeyPair(_), AlgorithmFamily::Ed)
    );
    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
        return Err(
            "symmetric (oct) keys are not taken from a JWKS; configure them with secret_env".into(),
        );
    }
    if !fits {
        return Err(format!("its key type does not fit its algorithm {alg:?}"));
    }
    if let AlgorithmParameters::EllipticCurve(p) = &jwk.algorithm {
        let curve_fits = matches!(
            (alg, &p.curve),
            (Algorithm::ES256, EllipticCurve::P256) | (Algorithm::ES384, EllipticCurve::P384)
        );
        if !curve_fits {
            return Err(format!("its curve does not fit its algorithm {alg:?}"));
        }
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("malformed key: {e}"))?;
    check_curve(alg, &key)?;
    Ok(Some(PinnedKey {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_are_named_strictly() {
        assert_eq!(parse_algorithm("RS256"), Ok(Algorithm::RS256));
        assert!(parse_algorithm("none").is_err());
        assert!(parse_algorithm("rs256").is_err());
    }

    #[test]
    fn a_secret_is_only_for_hmac() {
        assert!(from_secret(Algorithm::HS256, b"s3cret").is_ok());
        assert!(from_secret(Algorithm::HS256, b"").is_err());
        assert!(from_secret(Algorithm::RS256, b"s3cret").is_err());
        assert!(from_pem(Algorithm::HS256, b"-----BEGIN PUBLIC KEY-----").is_err());
    }

    #[test]
    fn a_jwks_needs_a_usable_key() {
        assert!(parse_jwks(b"{}").is_err());
        assert!(parse_jwks(b"{\"keys\": []}").is_err());
        let oct = br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256", "kid": "a"}]}"#;
        assert!(parse_jwks(oct).unwrap_err().contains("symmetric"));
        // An encryption key alone leaves nothing to verify with.
        let enc =
            br#"{"keys": [{"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB", "kid": "e"}]}"#;
        assert!(parse_jwks(enc).is_err());
        // x and y of a P-256 point, with an alg of the wrong curve.
        let ec = br#"{"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES384", "kid": "k",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        assert!(parse_jwks(ec).unwrap_err().contains("curve"));
        let good = String::from_utf8_lossy(ec).replace("ES384", "ES256");
        let jwks = parse_jwks(good.as_bytes()).unwrap();
        assert_eq!(jwks.keys.len(), 1);
        assert_eq!(jwks.keys[0].alg, Algorithm::ES256);
    }

    /// A key set from a JWKS document holding `keys`.
    fn jwks_set(keys: &str) -> KeySet {
        let mut set = KeySet::default();
        for key in parse_jwks(format!("{{\"keys\": [{keys}]}}").as_bytes())
            .unwrap()
            .keys
        {
            assert!(set.add(key));
        }
        set
    }

    #[test]
    fn new_key_material_under_an_old_kid_is_a_lost_key() {
        let rsa = |n: &str| format!(r#"{{"kty": "RSA", "kid": "j1", "n": "{n}", "e": "AQAB"}}"#);
        let ec = |x: &str| {
            format!(
                r#"{{"kty": "EC", "crv": "P-256", "kid": "j1", "x": "{x}",
                    "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}}"#
            )
        };
        let ed =
            |x: &str| format!(r#"{{"kty": "OKP", "crv": "Ed25519", "kid": "j1", "x": "{x}"}}"#);
        let pairs = [
            (rsa("xjlCRBqkOC1Ed8dWdWr3"), rsa("yjlCRBqkOC1Ed8dWdWr3")),
            (
                ec("f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU"),
                ec("g83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU"),
            ),
            (
                ed("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"),
                ed("21qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"),
            ),
        ];
        for (a, b) in pairs {
            let (old, same, new) = (jwks_set(&a), jwks_set(&a), jwks_set(&b));
            assert!(!old.lost_keys_in(&same), "{a}");
            assert!(old.lost_keys_in(&new), "{a} -> {b}");
            let digest = |set: &KeySet| {
                let mut h = Sha256::new();
                set.fingerprint(&mut h);
                h.finalize()
            };
            assert_eq!(digest(&old), digest(&same));
            assert_ne!(digest(&old), digest(&new), "{a} -> {b}");
        }
    }

    #[test]
    fn lost_keys_are_noticed() {
        let key = |kid: &str, secret: &[u8]| PinnedKey {
            kid: Some(kid.into()),
            alg: Algorithm::HS256,
            key: from_secret(Algorithm::HS256, secret).unwrap(),
        };
        let mut old = KeySet::default();
        assert!(old.add(key("a", b"1")));
        assert!(!old.add(key("a", b"2")), "a kid is taken once");
        let mut grown = KeySet::default();
        grown.add(key("a", b"1"));
        grown.add(key("b", b"2"));
        assert!(!old.lost_keys_in(&grown));
        assert!(grown.lost_keys_in(&old));
        let mut changed = KeySet::default();
        changed.add(key("a", b"3"));
        assert!(old.lost_keys_in(&changed));
        assert_eq!(old.find(Some("a")).len(), 1);
        assert!(old.find(Some("zz")).is_empty());
        assert!(old.find(None).is_empty());
    }
}
