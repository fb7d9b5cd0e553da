//! JWT over real sockets: tokens minted here with keys made here (openssl),
//! checked by the real binary in front of a real upstream; JWKS served by
//! a local HTTP server.

mod support;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};
use support::upstream::{Scripted, Upstream};
use support::{check_config, request, scratch_dir, Gateway, Response};
use tollgate::auth::api_key::digest_of;

const HS_SECRET: &str = "an HS256 secret of a decent length, 1234";
const ISSUER: &str = "https://id.example.com";

/// Key pairs made once per test run: (private PEM, public PEM path).
struct Keys {
    dir: PathBuf,
    rsa: Vec<u8>,
    ec: Vec<u8>,
    ed: Vec<u8>,
    /// Another RSA key, the attacker's (or the next one of a rotation).
    evil: Vec<u8>,
    /// Another P-256 key.
    ec2: Vec<u8>,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = scratch_dir("jwt-keys");
        let make = |name: &str, gen: &[&str]| {
            let private = dir.join(format!("{name}.key"));
            let public = dir.join(format!("{name}.pub"));
            let mut args = vec!["genpkey"];
            args.extend_from_slice(gen);
            args.extend_from_slice(&["-out", private.to_str().unwrap()]);
            openssl(&args);
            openssl(&[
                "pkey",
                "-in",
                private.to_str().unwrap(),
                "-pubout",
                "-out",
                public.to_str().unwrap(),
            ]);
            std::fs::read(&private).unwrap()
        };
        let rsa_args = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
        Keys {
            rsa: make("rsa", &rsa_args),
            ec: make(
                "ec",
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            ),
            ed: make("ed", &["-algorithm", "ed25519"]),
            evil: make("evil", &rsa_args),
            ec2: make(
                "ec2",
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            ),
            dir,
        }
    })
}

impl Keys {
    fn public(&self, name: &str) -> String {
        self.dir.join(format!("{name}.pub")).display().to_string()
    }

    fn encoding(&self, alg: Algorithm) -> EncodingKey {
        match alg {
            Algorithm::HS256 => EncodingKey::from_secret(HS_SECRET.as_bytes()).unwrap(),
            Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(&self.rsa).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&self.ec).unwrap(),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&self.ed).unwrap(),
            other => panic!("no test key for {other:?}"),
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    json!({
        "sub": "alice", "iss": ISSUER, "aud": "orders-api",
        "exp": now() + 600, "iat": now(),
        "scope": "orders:read orders:write", "groups": ["partners"],
    })
}

fn mint(alg: Algorithm, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    encode(&header, claims, &keys().encoding(alg)).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token put together by hand: any header, any payload, HMAC-signed
/// with `secret` (or unsigned when `None`).
fn forge(header: &Value, payload: &Value, secret: Option<&[u8]>) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes())
    );
    let signature = match secret {
        Some(secret) => jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(secret).unwrap(),
            Algorithm::HS256,
        )
        .unwrap(),
        None => String::new(),
    };
    format!("{signing_input}.{signature}")
}

fn provider(extra: &str) -> String {
    let k = keys();
    format!(
        "      issuer: {ISSUER}\n      audiences: [orders-api]\n      leeway: 30s\n      keys:\n        - {{ kid: hs1, alg: HS256, secret_env: TEST_HS1 }}\n        - {{ kid: rs1, alg: RS256, public_key_file: {rsa} }}\n        - {{ kid: ps1, alg: PS256, public_key_file: {rsa} }}\n        - {{ kid: es1, alg: ES256, public_key_file: {ec} }}\n        - {{ kid: ed1, alg: EdDSA, public_key_file: {ed} }}\n      forward_claims: {{ sub: X-User-Id, scope: X-User-Scopes }}\n{extra}",
        rsa = k.public("rsa"),
        ec = k.public("ec"),
        ed = k.public("ed"),
    )
}

fn config(up: &Upstream) -> String {
    format!(
        "auth:\n  api_keys: {{ header: X-API-Key }}\n  jwt:\n    main:\n{}consumers:\n  bob: {{ api_keys: [\"{}\"], groups: [staff] }}\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: orders, path_prefix: /orders, upstream: app, auth: [jwt:main], require_scopes: [orders:read] }}\n  - {{ name: admin, path_prefix: /admin, upstream: app, auth: [jwt:main], require_scopes: [orders:admin] }}\n  - {{ name: partners, path_prefix: /partners, upstream: app, auth: [jwt:main], allow_groups: [partners] }}\n  - {{ name: staff, path_prefix: /staff, upstream: app, auth: [jwt:main, api_key], allow_groups: [staff] }}\n  - {{ name: either, path_prefix: /either, upstream: app, auth: [jwt:main, api_key] }}\n  - {{ name: inside, path_prefix: /inside, upstream: app, auth: [jwt:main], ip_deny: [127.0.0.0/8] }}\n  - {{ name: public, path_prefix: /, upstream: app }}\n",
        provider(""),
        digest_of("bob-key"),
        up.addr
    )
}

fn start(up: &Upstream) -> Gateway {
    Gateway::start_with_env(&[("TEST_HS1", HS_SECRET)], "", &config(up))
}

fn bearer(gw: &Gateway, path: &str, token: &str) -> Response {
    request(
        gw.addr,
        "GET",
        "h",
        path,
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
}

#[test]
fn a_valid_token_of_every_algorithm_passes_with_its_claims_forwarded() {
    let up = Upstream::start("a");
    let gw = start(&up);
    for (alg, kid) in [
        (Algorithm::HS256, "hs1"),
        (Algorithm::RS256, "rs1"),
        (Algorithm::PS256, "ps1"),
        (Algorithm::ES256, "es1"),
        (Algorithm::EdDSA, "ed1"),
    ] {
        let resp = bearer(&gw, "/orders/1", &mint(alg, kid, &claims()));
        assert_eq!(
            resp.status,
            200,
            "{alg:?}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(resp.upstream_header("x-user-id").as_deref(), Some("alice"));
        assert_eq!(
            resp.upstream_header("x-user-scopes").as_deref(),
            Some("orders:read orders:write")
        );
    }
    assert_eq!(up.hits(), 5);
}

#[test]
fn forged_expired_and_malformed_tokens_get_401() {
    let up = Upstream::start("a");
    let gw = start(&up);
    let k = keys();
    let good = mint(Algorithm::HS256, "hs1", &claims());
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims();
        edit(&mut c);
        c
    };
    let rsa_public = std::fs::read(k.public("rsa")).unwrap();
    let evil_public = {
        let key = EncodingKey::from_rsa_pem(&k.evil).unwrap();
        serde_json::to_value(Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap()).unwrap()
    };
    let evil_signed = |header: Header| {
        encode(
            &header,
            &claims(),
            &EncodingKey::from_rsa_pem(&k.evil).unwrap(),
        )
        .unwrap()
    };
    let (head, payload_and_sig) = good.split_once('.').unwrap();
    let (_, signature) = payload_and_sig.split_once('.').unwrap();
    let tampered = format!(
        "{head}.{}.{signature}",
        b64(with(&|c| c["sub"] = json!("admin")).to_string().as_bytes())
    );
    let cases: Vec<(&str, String)> = vec![
        (
            "alg none",
            forge(&json!({"alg": "none", "kid": "hs1"}), &claims(), None),
        ),
        (
            "HS256 signed with the RSA public key",
            forge(
                &json!({"alg": "HS256", "kid": "rs1", "typ": "JWT"}),
                &claims(),
                Some(&rsa_public),
            ),
        ),
        ("unknown kid", mint(Algorithm::HS256, "nobody", &claims())),
        (
            "expired",
            mint(
                Algorithm::HS256,
                "hs1",
                &with(&|c| c["exp"] = json!(now() - 120)),
            ),
        ),
        (
            "not yet valid",
            mint(
                Algorithm::ES256,
                "es1",
                &with(&|c| c["nbf"] = json!(now() + 600)),
            ),
        ),
        (
            "issued in the future",
            mint(
                Algorithm::HS256,
                "hs1",
                &with(&|c| c["iat"] = json!(now() + 600)),
            ),
        ),
        (
            "wrong issuer",
            mint(
                Algorithm::RS256,
                "rs1",
                &with(&|c| c["iss"] = json!("https://evil.example")),
            ),
        ),
        (
            "wrong audience",
            mint(
                Algorithm::EdDSA,
                "ed1",
                &with(&|c| c["aud"] = json!("other-api")),
            ),
        ),
        (
            "crit present",
            forge(
                &json!({"alg": "HS256", "kid": "hs1", "crit": ["exp"]}),
                &claims(),
                Some(HS_SECRET.as_bytes()),
            ),
        ),
        ("tampered payload", tampered),
        (
            "signature stripped",
            format!("{}.", good.rsplit_once('.').unwrap().0),
        ),
        (
            "string exp",
            mint(
                Algorithm::HS256,
                "hs1",
                &with(&|c| c["exp"] = json!((now() + 600).to_string())),
            ),
        ),
        ("jwk header with the attacker's key", {
            let mut h = Header::new(Algorithm::RS256);
            h.kid = Some("rs1".into());
            h.jwk = serde_json::from_value(evil_public.clone()).ok();
            evil_signed(h)
        }),
        ("jku header pointing at the attacker", {
            let mut h = Header::new(Algorithm::RS256);
            h.kid = Some("evil".into());
            h.jku = Some(format!("http://{}/jwks.json", up.addr));
            evil_signed(h)
        }),
        ("not a JWT", "hello".into()),
        ("oversized header", "a".repeat(9000)),
    ];
    for (what, token) in &cases {
        let resp = bearer(&gw, "/orders/1", token);
        assert_eq!(
            resp.assert_gateway_error(401),
            "unauthorized",
            "{what}: {}",
            resp.status
        );
        assert_eq!(
            resp.header("www-authenticate"),
            Some(r#"Bearer realm="tollgate", error="invalid_token""#),
            "{what}"
        );
    }
    let resp = gw.get("h", "/orders/1");
    assert_eq!(resp.assert_gateway_error(401), "unauthorized");
    assert_eq!(
        resp.header("www-authenticate"),
        Some(r#"Bearer realm="tollgate""#)
    );
    assert_eq!(up.hits(), 0, "a refused token reached the upstream");
    // The good token next to them passes: the refusals were the tokens'.
    assert_eq!(bearer(&gw, "/orders/1", &good).status, 200);
}

#[test]
fn scopes_groups_and_addresses_decide_403() {
    let up = Upstream::start("a");
    let gw = start(&up);
    let token = mint(Algorithm::HS256, "hs1", &claims());
    assert_eq!(bearer(&gw, "/orders", &token).status, 200);
    assert_eq!(bearer(&gw, "/partners", &token).status, 200);
    assert_eq!(
        bearer(&gw, "/admin", &token).assert_gateway_error(403),
        "forbidden"
    );
    assert_eq!(
        bearer(&gw, "/staff", &token).assert_gateway_error(403),
        "forbidden"
    );
    // The tests connect from 127.0.0.1.
    assert_eq!(
        bearer(&gw, "/inside", &token).assert_gateway_error(403),
        "forbidden"
    );
    // `scp` as a list counts as well as `scope`.
    let scp = mint(
        Algorithm::HS256,
        "hs1",
        &json!({"iss": ISSUER, "aud": "orders-api", "exp": now() + 60, "scp": ["orders:admin"]}),
    );
    assert_eq!(bearer(&gw, "/admin", &scp).status, 200);
    assert_eq!(bearer(&gw, "/orders", &scp).status, 403);
}

#[test]
fn an_api_key_or_a_token_and_no_spoofed_identity() {
    let up = Upstream::start("a");
    let gw = start(&up);
    let token = mint(Algorithm::HS256, "hs1", &claims());
    let key = |key: &str| request(gw.addr, "GET", "h", "/either", &[("X-API-Key", key)], b"");
    let resp = key("bob-key");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.upstream_header("x-consumer").as_deref(), Some("bob"));
    assert_eq!(resp.upstream_header("x-user-id"), None);
    assert_eq!(key("wrong").assert_gateway_error(401), "unauthorized");
    assert_eq!(gw.get("h", "/either").status, 401);
    assert_eq!(bearer(&gw, "/either", &token).status, 200);
    // Groups from either kind of caller.
    let staff = request(
        gw.addr,
        "GET",
        "h",
        "/staff",
        &[("X-API-Key", "bob-key")],
        b"",
    );
    assert_eq!(staff.status, 200);

    // Identity headers sent by the client never reach the upstream: on a
    // public route they are dropped, on a JWT route replaced.
    let spoof = [
        ("X-User-Id", "root"),
        ("X-User-Scopes", "everything"),
        ("X-Consumer", "admin"),
    ];
    let resp = request(gw.addr, "GET", "h", "/open", &spoof, b"");
    assert_eq!(resp.status, 200);
    for name in ["x-user-id", "x-user-scopes", "x-consumer"] {
        assert_eq!(
            resp.upstream_header(name),
            None,
            "{name} reached the upstream"
        );
    }
    let auth = format!("Bearer {token}");
    let mut headers = spoof.to_vec();
    headers.push(("Authorization", &auth));
    let resp = request(gw.addr, "GET", "h", "/orders", &headers, b"");
    assert_eq!(resp.status, 200);
    let seen: Vec<Value> = resp.json()["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "x-user-id" || h[0] == "x-consumer")
        .cloned()
        .collect();
    assert_eq!(seen, vec![json!(["x-user-id", "alice"])]);
}

/// The admin listener's counters for provider `main`.
fn cache_stats(gw: &Gateway) -> (u64, u64, u64) {
    let status = gw.admin_get("/auth").json();
    let cache = &status["jwt"]["main"]["cache"];
    (
        cache["entries"].as_u64().unwrap(),
        cache["hits"].as_u64().unwrap(),
        cache["verifications"].as_u64().unwrap(),
    )
}

#[test]
fn a_repeated_token_is_verified_once_until_its_keys_change() {
    let up = Upstream::start("a");
    let gw = start(&up);
    let token = mint(Algorithm::RS256, "rs1", &claims());
    for _ in 0..10 {
        assert_eq!(bearer(&gw, "/orders", &token).status, 200);
    }
    assert_eq!(cache_stats(&gw), (1, 9, 1), "one verification, then hits");
    // A refusal is never remembered as a success.
    let expired = mint(
        Algorithm::RS256,
        "rs1",
        &json!({"iss": ISSUER, "aud": "orders-api", "exp": now() - 100}),
    );
    for _ in 0..3 {
        assert_eq!(bearer(&gw, "/orders", &expired).status, 401);
    }
    assert_eq!(cache_stats(&gw), (1, 9, 4));

    // A reload that leaves the provider alone keeps what it verified...
    let mut body = config(&up);
    body = body.replace(
        "name: public, path_prefix: /,",
        "name: public2, path_prefix: /,",
    );
    assert!(gw.reload_with(&body)["last_reload_error"].is_null());
    assert_eq!(bearer(&gw, "/orders", &token).status, 200);
    assert_eq!(cache_stats(&gw), (1, 10, 4));

    // ...one that changes its keys forgets it: the token signed with the
    // removed key is refused at once, though it was remembered.
    let hs = mint(Algorithm::HS256, "hs1", &claims());
    assert_eq!(bearer(&gw, "/orders", &hs).status, 200);
    let k = keys();
    let without_rsa = body.replace(
        &format!(
            "        - {{ kid: rs1, alg: RS256, public_key_file: {} }}\n",
            k.public("rsa")
        ),
        "",
    );
    assert_ne!(without_rsa, body);
    assert!(gw.reload_with(&without_rsa)["last_reload_error"].is_null());
    assert_eq!(bearer(&gw, "/orders", &token).status, 401);
    assert_eq!(bearer(&gw, "/orders", &hs).status, 200);
}

#[test]
fn a_reload_swaps_keys_without_dropping_requests() {
    let up = Upstream::start("a");
    let body = |secret: &str| {
        format!(
            "auth:\n  jwt:\n    main:\n      keys: [{{ kid: k, alg: HS256, secret: \"{secret}\" }}]\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: app, auth: [jwt:main] }}\n",
            up.addr
        )
    };
    let gw = Gateway::start(&body("first secret, long enough"));
    let sign = |secret: &str| {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k".into());
        let c = json!({"sub": "s", "exp": now() + 600});
        encode(
            &h,
            &c,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let (old, new) = (
        sign("first secret, long enough"),
        sign("second secret, long enough"),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counts = Arc::new(Mutex::new((0u32, 0u32, 0u32)));
    let load = {
        let (stop, counts, addr, old) =
            (Arc::clone(&stop), Arc::clone(&counts), gw.addr, old.clone());
        std::thread::spawn(move || {
            for _ in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let auth = format!("Bearer {old}");
                let status =
                    request(addr, "GET", "h", "/", &[("Authorization", &auth)], b"").status;
                let mut c = counts.lock().unwrap();
                match status {
                    200 => c.0 += 1,
                    401 => c.1 += 1,
                    _ => c.2 += 1,
                }
            }
        })
    };
    gw.wait_until("requests flow", || counts.lock().unwrap().0 > 20);
    assert!(gw.reload_with(&body("second secret, long enough"))["last_reload_error"].is_null());
    gw.wait_until("the old key is refused", || counts.lock().unwrap().1 > 20);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    load.join().unwrap();
    let (ok, refused, other) = *counts.lock().unwrap();
    println!("across the reload: {ok} accepted, {refused} refused, {other} other");
    assert_eq!(other, 0, "requests failed otherwise than by the key change");
    assert_eq!(bearer(&gw, "/", &new).status, 200);
    assert_eq!(bearer(&gw, "/", &old).status, 401);
}

/// A JWKS server: serves the current document, counts fetches.
struct JwksServer {
    server: Scripted,
    doc: Arc<Mutex<(u16, String)>>,
}

impl JwksServer {
    fn start(doc: String) -> JwksServer {
        let doc = Arc::new(Mutex::new((200, doc)));
        let served = Arc::clone(&doc);
        let server = Scripted::start(move |_, _, _, w| {
            let (status, body) = served.lock().unwrap().clone();
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = w.write_all(head.as_bytes());
            let _ = w.write_all(body.as_bytes());
            false
        });
        JwksServer { server, doc }
    }

    fn serve(&self, status: u16, body: String) {
        *self.doc.lock().unwrap() = (status, body);
    }

    fn url(&self) -> String {
        format!("http://{}/jwks.json", self.server.addr)
    }

    fn fetches(&self) -> usize {
        self.server.hits()
    }
}

/// A JWKS document with the test's RSA key under each of `kids`.
fn jwks(kids: &[&str]) -> String {
    let key = EncodingKey::from_rsa_pem(&keys().rsa).unwrap();
    let set = JwkSet {
        keys: kids
            .iter()
            .map(|kid| {
                let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
                jwk.common.key_id = Some((*kid).to_owned());
                jwk
            })
            .collect(),
    };
    serde_json::to_string(&set).unwrap()
}

fn jwks_config(up: &Upstream, url: &str, refresh: &str) -> String {
    format!(
        "auth:\n  jwt:\n    idp:\n      jwks_url: {url}\n      jwks_refresh: {refresh}\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: app, auth: [jwt:idp] }}\n",
        up.addr
    )
}

fn rs(kid: &str) -> String {
    mint(
        Algorithm::RS256,
        kid,
        &json!({"sub": "s", "exp": now() + 600}),
    )
}

#[test]
fn an_unknown_kid_refetches_the_jwks_at_most_once_per_interval() {
    let up = Upstream::start("a");
    let idp = JwksServer::start(jwks(&["k1"]));
    let gw = Gateway::start(&jwks_config(&up, &idp.url(), "10m"));
    gw.wait_until("the first fetch", || {
        bearer(&gw, "/", &rs("k1")).status == 200
    });
    assert_eq!(idp.fetches(), 1);

    // The provider rotates: a token with the new kid triggers a refetch
    // and passes.
    idp.serve(200, jwks(&["k1", "k2"]));
    assert_eq!(bearer(&gw, "/", &rs("k2")).status, 200);
    assert_eq!(idp.fetches(), 2);

    // Within the interval, unknown kids do not fetch again.
    idp.serve(200, jwks(&["k1", "k2", "k3"]));
    for i in 0..20 {
        assert_eq!(bearer(&gw, "/", &rs(&format!("made-up-{i}"))).status, 401);
    }
    assert_eq!(bearer(&gw, "/", &rs("k3")).status, 401);
    assert_eq!(idp.fetches(), 2, "unknown kids fetched more than once");
    let status = gw.admin_get("/auth").json();
    assert_eq!(status["jwt"]["idp"]["jwks"]["keys"], 2);
}

#[test]
fn a_scheduled_refresh_rotates_keys_and_a_failed_fetch_keeps_the_old_ones() {
    let up = Upstream::start("a");
    let idp = JwksServer::start(jwks(&["k1"]));
    let gw = Gateway::start(&jwks_config(&up, &idp.url(), "1s"));
    gw.wait_until("the first fetch", || {
        bearer(&gw, "/", &rs("k1")).status == 200
    });

    for (status, body) in [(500, "{}".to_owned()), (200, "{\"keys\": ".to_owned())] {
        idp.serve(status, body);
        let seen = idp.fetches();
        gw.wait_until("two more fetches", || idp.fetches() >= seen + 2);
        assert_eq!(
            bearer(&gw, "/", &rs("k1")).status,
            200,
            "the last good keys were dropped"
        );
        assert_eq!(
            gw.admin_get("/auth").json()["jwt"]["idp"]["jwks"]["failing"],
            true
        );
    }

    idp.serve(200, jwks(&["k4"]));
    gw.wait_until("the rotated key is taken", || {
        bearer(&gw, "/", &rs("k4")).status == 200
    });
    // k1 is gone from the set: its remembered token is not trusted again.
    assert_eq!(bearer(&gw, "/", &rs("k1")).status, 401);
    assert!(gw.log().contains("fetched again"), "{}", gw.log());
}

#[test]
fn t_validates_providers_and_their_keys() {
    let k = keys();
    let dir = scratch_dir("jwt-check");
    let bad_pem = dir.join("bad.pem");
    std::fs::write(
        &bad_pem,
        "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let bad_jwks = dir.join("bad.json");
    std::fs::write(&bad_jwks, "{\"keys\": [}").unwrap();
    let private = dir.join("rsa.key");
    std::fs::write(&private, &k.rsa).unwrap();
    let check = |provider: &str, route_auth: &str| {
        let text = format!(
            "listen: [\"127.0.0.1:1\"]\nauth:\n  jwt:\n    main:\n{provider}consumers:\n  c: {{ api_keys: [\"plain-text-key\"] }}\nupstreams:\n  app: {{ targets: [\"127.0.0.1:2\"] }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: app, auth: {route_auth} }}\n"
        );
        let (code, _, err) = check_config(&text);
        assert_ne!(code, 0);
        err
    };
    let err = check(
        &format!(
            "      keys:\n        - {{ kid: a, alg: HS256, secret: \"\" }}\n        - {{ kid: b, alg: HS256, secret_env: TOLLGATE_SURELY_UNSET }}\n        - {{ kid: c, alg: RS256, public_key_file: {ec} }}\n        - {{ kid: d, alg: RS256, public_key_file: /nonexistent/key.pem }}\n        - {{ kid: e, alg: ES256, public_key_file: {bad} }}\n        - {{ kid: f, alg: HS256, public_key_file: {rsa} }}\n        - {{ kid: g, alg: none, secret: x }}\n        - {{ kid: h, alg: RS256, public_key_file: {private} }}\n        - {{ kid: i, alg: ES384, public_key_file: {ec} }}\n      jwks_file: {jwks}\n",
            ec = k.public("ec"),
            rsa = k.public("rsa"),
            bad = bad_pem.display(),
            private = private.display(),
            jwks = bad_jwks.display(),
        ),
        "[jwt:main, jwt:other]",
    );
    for expected in [
        "auth.jwt.main.keys[0].secret: the secret is empty",
        "auth.jwt.main.keys[1].secret_env: the environment variable TOLLGATE_SURELY_UNSET is not set",
        "auth.jwt.main.keys[2].public_key_file",
        "auth.jwt.main.keys[3].public_key_file: cannot read /nonexistent/key.pem",
        "auth.jwt.main.keys[4].public_key_file",
        "auth.jwt.main.keys[5].public_key_file",
        "auth.jwt.main.keys[6].alg: \"none\" is not a supported algorithm",
        "auth.jwt.main.keys[7].public_key_file",
        "auth.jwt.main.keys[8].public_key_file",
        "auth.jwt.main.jwks_file",
        "routes[0].auth[1]: no JWT provider named \"other\"",
        "consumers.c.api_keys[0]",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(err.contains("private key"), "{err}");
    assert!(err.contains("curve"), "{err}");
    let err = check("      keys: []\n", "[jwt:main]");
    assert!(err.contains("auth.jwt.main: has no keys"), "{err}");
    let err = check(
        "      jwks_url: ftp://x/keys\n      forward_claims: { sub: Host }\n",
        "[jwt:main]",
    );
    assert!(err.contains("auth.jwt.main.jwks_url"), "{err}");
    assert!(err.contains("auth.jwt.main.forward_claims.sub"), "{err}");
}

/// The encoding key of a private PEM key for `alg`.
fn encoding_of(private: &[u8], alg: Algorithm) -> EncodingKey {
    match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(private).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(private).unwrap(),
        other => panic!("no test key for {other:?}"),
    }
}

/// A token signed with `private` (PEM) for `alg`, naming `kid`.
fn signed_with(private: &[u8], alg: Algorithm, kid: &str) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    let claims = json!({"sub": "s", "exp": now() + 600});
    encode(&header, &claims, &encoding_of(private, alg)).unwrap()
}

/// A JWKS document with the public halves of `keys`: (kid, private PEM,
/// algorithm).
fn jwks_of(keys: &[(&str, &[u8], Algorithm)]) -> String {
    let set = JwkSet {
        keys: keys
            .iter()
            .map(|(kid, private, alg)| {
                let mut jwk = Jwk::from_encoding_key(&encoding_of(private, *alg), *alg).unwrap();
                jwk.common.key_id = Some((*kid).to_owned());
                jwk
            })
            .collect(),
    };
    serde_json::to_string(&set).unwrap()
}

#[test]
fn a_new_key_under_a_remembered_kid_in_a_jwks_file_refuses_the_old_keys_tokens() {
    let up = Upstream::start("a");
    let k = keys();
    let file = scratch_dir("jwt-jwks-file").join("jwks.json");
    let publish = |rsa: &[u8], ec: &[u8]| {
        let doc = jwks_of(&[("j1", rsa, Algorithm::RS256), ("e1", ec, Algorithm::ES256)]);
        std::fs::write(&file, doc).unwrap();
    };
    publish(&k.rsa, &k.ec);
    let body = format!(
        "auth:\n  jwt:\n    main:\n      jwks_file: {}\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: app, auth: [jwt:main] }}\n",
        file.display(),
        up.addr
    );
    let gw = Gateway::start(&body);
    let (old_rsa, old_ec) = (
        signed_with(&k.rsa, Algorithm::RS256, "j1"),
        signed_with(&k.ec, Algorithm::ES256, "e1"),
    );
    for token in [&old_rsa, &old_ec] {
        assert_eq!(bearer(&gw, "/", token).status, 200);
        assert_eq!(bearer(&gw, "/", token).status, 200);
    }
    assert_eq!(cache_stats(&gw), (2, 2, 2), "both tokens are remembered");

    // j1 now names another RSA key: SIGHUP reads the file again.
    publish(&k.evil, &k.ec);
    assert!(gw.reload_with(&body)["last_reload_error"].is_null());
    let new_rsa = signed_with(&k.evil, Algorithm::RS256, "j1");
    assert_eq!(bearer(&gw, "/", &new_rsa).status, 200, "the new key is in");
    assert_eq!(
        bearer(&gw, "/", &old_rsa).assert_gateway_error(401),
        "unauthorized",
        "a token of the replaced RSA key passed from the cache"
    );
    assert_eq!(bearer(&gw, "/", &old_ec).status, 200);

    // The same for an EC key under e1.
    publish(&k.evil, &k.ec2);
    assert!(gw.reload_with(&body)["last_reload_error"].is_null());
    let new_ec = signed_with(&k.ec2, Algorithm::ES256, "e1");
    assert_eq!(bearer(&gw, "/", &new_ec).status, 200, "the new key is in");
    assert_eq!(
        bearer(&gw, "/", &old_ec).assert_gateway_error(401),
        "unauthorized",
        "a token of the replaced EC key passed from the cache"
    );
    assert_eq!(bearer(&gw, "/", &new_rsa).status, 200);
}

#[test]
fn a_refetched_jwks_with_a_new_key_under_a_remembered_kid_refuses_the_old_keys_tokens() {
    let up = Upstream::start("a");
    let k = keys();
    let idp = JwksServer::start(jwks_of(&[("j1", &k.rsa, Algorithm::RS256)]));
    let gw = Gateway::start(&jwks_config(&up, &idp.url(), "1s"));
    let old = signed_with(&k.rsa, Algorithm::RS256, "j1");
    gw.wait_until("the first fetch", || bearer(&gw, "/", &old).status == 200);
    assert_eq!(bearer(&gw, "/", &old).status, 200);
    let hits = gw.admin_get("/auth").json()["jwt"]["idp"]["cache"]["hits"].clone();
    assert!(
        hits.as_u64().unwrap() >= 1,
        "the token is remembered: {hits}"
    );

    idp.serve(200, jwks_of(&[("j1", &k.evil, Algorithm::RS256)]));
    let new = signed_with(&k.evil, Algorithm::RS256, "j1");
    gw.wait_until("the new key is fetched", || {
        bearer(&gw, "/", &new).status == 200
    });
    assert_eq!(
        bearer(&gw, "/", &old).assert_gateway_error(401),
        "unauthorized",
        "a token of the replaced key passed from the cache"
    );
}

#[test]
fn an_issuer_list_holding_the_issuer_is_not_the_issuer() {
    let up = Upstream::start("a");
    let gw = start(&up);
    for iss in [json!([ISSUER, "x"]), json!([ISSUER])] {
        let mut c = claims();
        c["iss"] = iss.clone();
        let resp = bearer(&gw, "/orders", &mint(Algorithm::HS256, "hs1", &c));
        assert_eq!(resp.assert_gateway_error(401), "unauthorized", "iss {iss}");
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(
        bearer(&gw, "/orders", &mint(Algorithm::HS256, "hs1", &claims())).status,
        200
    );
}

#[test]
fn t_refuses_a_leeway_over_five_minutes() {
    let text = |leeway: &str| {
        format!(
            "listen: [\"127.0.0.1:1\"]\nauth:\n  jwt:\n    main:\n      leeway: {leeway}\n      keys: [{{ kid: k, alg: HS256, secret: s3cret }}]\nupstreams:\n  app: {{ targets: [\"127.0.0.1:2\"] }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: app, auth: [jwt:main] }}\n"
        )
    };
    let (code, _, err) = check_config(&text("5m"));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = check_config(&text("1h"));
    assert_ne!(code, 0, "a leeway of an hour passed -t");
    assert!(err.contains("auth.jwt.main.leeway"), "{err}");
}

#[test]
fn the_token_cache_is_bounded_by_bytes() {
    let up = Upstream::start("a");
    let body = format!(
        "auth:\n  jwt:\n    main:\n      keys: [{{ kid: k, alg: HS256, secret: \"{HS_SECRET}\" }}]\n      cache_bytes: 1MiB\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: app, auth: [jwt:main] }}\n",
        up.addr
    );
    let gw = Gateway::start(&body);
    // 400 distinct tokens of about 4 KB: 1.6 MB of tokens alone.
    let padding = "p".repeat(3000);
    for i in 0..400 {
        let token = forge(
            &json!({"alg": "HS256", "kid": "k"}),
            &json!({"sub": format!("user-{i}"), "exp": now() + 600, "pad": padding}),
            Some(HS_SECRET.as_bytes()),
        );
        assert!(token.len() > 4000);
        assert_eq!(bearer(&gw, "/", &token).status, 200, "token {i}");
    }
    let cache = &gw.admin_get("/auth").json()["jwt"]["main"]["cache"];
    let (entries, bytes) = (
        cache["entries"].as_u64().unwrap(),
        cache["bytes"].as_u64().unwrap(),
    );
    assert!(bytes <= 1 << 20, "{bytes} bytes in the cache");
    assert!(
        (100..=256).contains(&entries),
        "{entries} entries of about 4 KB in 1 MiB"
    );
}
