//! What a JWT costs: verification from scratch for HS256, RS256, ES256 and
//! EdDSA (a token seen for the first time), and the cached path every
//! repeated token takes (bearer parsing, one hash, one lookup).
//!
//! `cargo bench --bench jwt`; keys are made with openssl, as the tests do.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pingora::http::RequestHeader;
use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::process::Command;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{SystemTime, UNIX_EPOCH};
use tollgate::auth::cache::{TokenCache, DEFAULT_BYTES};
use tollgate::auth::jwt::keys::{self, KeySet, PinnedKey};
use tollgate::auth::jwt::{ClaimRules, Forward, Provider, TokenCheck};

const SECRET: &[u8] = b"a bench secret of thirty-two bytes!";

/// (private PEM, public PEM) made by openssl.
fn key_pair(dir: &Path, name: &str, args: &[&str]) -> (Vec<u8>, Vec<u8>) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let run = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "openssl {args:?} failed");
    };
    let mut genpkey = vec!["genpkey"];
    genpkey.extend_from_slice(args);
    genpkey.extend_from_slice(&["-out", private.to_str().unwrap()]);
    run(&genpkey);
    run(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (
        std::fs::read(private).unwrap(),
        std::fs::read(public).unwrap(),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Polls a future that completes without waiting (a cached check).
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the check waited"),
    }
}

fn jwt(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("tollgate-bench-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rsa = key_pair(
        &dir,
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let ec = key_pair(
        &dir,
        "ec",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let ed = key_pair(&dir, "ed", &["-algorithm", "ed25519"]);
    let _ = std::fs::remove_dir_all(&dir);

    let cases = [
        (
            Algorithm::HS256,
            "hs",
            EncodingKey::from_secret(SECRET).unwrap(),
            keys::from_secret(Algorithm::HS256, SECRET).unwrap(),
        ),
        (
            Algorithm::RS256,
            "rs",
            EncodingKey::from_rsa_pem(&rsa.0).unwrap(),
            keys::from_pem(Algorithm::RS256, &rsa.1).unwrap(),
        ),
        (
            Algorithm::ES256,
            "es",
            EncodingKey::from_ec_pem(&ec.0).unwrap(),
            keys::from_pem(Algorithm::ES256, &ec.1).unwrap(),
        ),
        (
            Algorithm::EdDSA,
            "ed",
            EncodingKey::from_ed_pem(&ed.0).unwrap(),
            keys::from_pem(Algorithm::EdDSA, &ed.1).unwrap(),
        ),
    ];
    let claims = serde_json::json!({
        "sub": "alice", "iss": "https://id.example.com", "aud": "orders-api",
        "exp": now() + 3600, "iat": now(), "scope": "orders:read orders:write",
    });
    let mut set = KeySet::default();
    let mut tokens = Vec::new();
    for (alg, kid, signing, verifying) in cases {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        tokens.push((alg, encode(&header, &claims, &signing).unwrap()));
        set.add(PinnedKey {
            kid: Some(kid.to_owned()),
            alg,
            key: verifying,
        });
    }
    let provider = Provider::new(
        "main".into(),
        set,
        None,
        &ClaimRules {
            issuer: Some("https://id.example.com".into()),
            audiences: vec!["orders-api".into()],
            leeway: 30,
        },
        vec![Forward::new("sub".into(), "X-User-Id").unwrap()],
        Arc::new(TokenCache::new(1000, DEFAULT_BYTES)),
    );

    let mut group = c.benchmark_group("jwt_verify_uncached");
    for (alg, token) in &tokens {
        group.bench_function(format!("{alg:?}"), |b| {
            b.iter(|| provider.verify(black_box(token.as_bytes()), now()).unwrap())
        });
    }
    group.finish();

    let (_, hs) = &tokens[0];
    let mut req = RequestHeader::build("GET", b"/orders", None).unwrap();
    req.insert_header("Authorization", format!("Bearer {hs}"))
        .unwrap();
    assert!(matches!(ready(provider.check(&req)), TokenCheck::Valid(_)));
    c.bench_function("jwt_check_cached/HS256", |b| {
        b.iter(|| match ready(provider.check(black_box(&req))) {
            TokenCheck::Valid(v) => v,
            other => panic!("{other:?}"),
        })
    });
}

criterion_group!(benches, jwt);
criterion_main!(benches);
