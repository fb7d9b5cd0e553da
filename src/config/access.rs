//! The `auth:` section, `consumers`, and each route's access rules and
//! CORS: compiled into shared, immutable policy once per load.

use super::compile::{duration_at, valid_name, Errors, FRAMING_HEADERS};
use super::file::{CorsSpec, FileConfig, JwtKeySpec, JwtProviderSpec, RouteSpec};
use super::values::{parse_duration, parse_size};
use crate::auth::api_key::{parse_digest, ApiKeys, Consumer};
use crate::auth::cache::{TokenCache, DEFAULT_BYTES, DEFAULT_ENTRIES, MIN_BYTES};
use crate::auth::cors::CorsPolicy;
use crate::auth::ip::Cidr;
use crate::auth::jwt::keys::{self, KeySet, PinnedKey};
use crate::auth::jwt::remote::{RemoteKeys, RemoteSettings};
use crate::auth::jwt::{ClaimRules, Forward, Provider};
use crate::auth::{AccessPolicy, Method as AuthMethod};
use crate::snapshot::{Draws, Pools};
use http::{HeaderName, HeaderValue, Method};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Clock skew allowed unless `leeway` says otherwise.
const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// The most clock skew `leeway` may allow: beyond it, an expired token is
/// no longer expired in any useful sense, and a clock that far off needs
/// fixing, not tolerating.
const MAX_LEEWAY: Duration = Duration::from_secs(300);
const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(600);
/// Largest key file read.
const MAX_KEY_FILE_BYTES: u64 = 1 << 20;

/// Headers a claim may not be forwarded in, besides the framing ones: the
/// ones that route or authenticate the message, and the gateway's own.
const RESERVED_FORWARD_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "x-consumer",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// The API keys of every consumer, read from `auth.api_keys` (or the
/// default header) and `consumers`. Keys are digests only.
pub(super) fn compile_api_keys(file: &FileConfig, errors: &mut Errors) -> Arc<ApiKeys> {
    let spec = file.auth.api_keys.as_ref();
    let header = spec
        .and_then(|s| s.header.as_deref())
        .unwrap_or("X-API-Key");
    let header = match HeaderName::from_bytes(header.as_bytes()) {
        Ok(h) => h,
        Err(_) => {
            errors.add(
                "auth.api_keys.header",
                format!("{header:?} is not a valid header name"),
            );
            HeaderName::from_static("x-api-key")
        }
    };
    let query = spec.and_then(|s| s.query.clone());
    if query
        .as_deref()
        .is_some_and(|q| q.is_empty() || q.bytes().any(|b| matches!(b, b'&' | b'=' | b'#' | b' ')))
    {
        errors.add(
            "auth.api_keys.query",
            "must be a plain query parameter name",
        );
    }
    let mut keys = ApiKeys::new(header, query);
    for (name, consumer) in &file.consumers {
        let at = format!("consumers.{name}");
        if !valid_name(name) {
            errors.add(
                &at,
                "consumer names use only letters, digits, '-', '_' and '.'",
            );
        }
        let shared = Arc::new(Consumer::new(name.clone(), consumer.groups.clone()));
        for (i, key) in consumer.api_keys.iter().enumerate() {
            match parse_digest(key) {
                Ok(digest) => {
                    if !keys.add(digest, Arc::clone(&shared)) {
                        errors.add(
                            format!("{at}.api_keys[{i}]"),
                            "the same key is configured for another consumer",
                        );
                    }
                }
                Err(e) => errors.add(format!("{at}.api_keys[{i}]"), e),
            }
        }
    }
    Arc::new(keys)
}

/// A route's CORS rules.
pub(super) fn compile_cors(
    at: &str,
    spec: &CorsSpec,
    route_methods: Option<&[Method]>,
    errors: &mut Errors,
) -> Option<Arc<CorsPolicy>> {
    let before = errors.0.len();
    let any = spec.origins.iter().any(|o| o == "*");
    if spec.origins.is_empty() {
        errors.add(
            format!("{at}.origins"),
            "list at least one origin, or \"*\"",
        );
    }
    if any && spec.origins.len() > 1 {
        errors.add(format!("{at}.origins"), "\"*\" stands alone");
    }
    if any && spec.credentials {
        errors.add(
            format!("{at}.credentials"),
            "browsers refuse credentials with any origin (\"*\"); list the origins",
        );
    }
    let mut origins = Vec::new();
    for (i, origin) in spec.origins.iter().enumerate().filter(|(_, o)| *o != "*") {
        let valid = origin.split_once("://").is_some_and(|(scheme, rest)| {
            matches!(scheme, "http" | "https")
                && !rest.is_empty()
                && !rest.contains(['/', '?', '#', ' '])
        });
        match HeaderValue::from_str(origin) {
            Ok(v) if valid => origins.push(v),
            _ => errors.add(
                format!("{at}.origins[{i}]"),
                format!("{origin:?} is not an origin like https://app.example.com (no path)"),
            ),
        }
    }
    let methods: Vec<String> = match (&spec.methods, route_methods) {
        (Some(list), _) => list.clone(),
        (None, Some(route)) => route.iter().map(|m| m.as_str().to_owned()).collect(),
        (None, None) => vec!["GET".into(), "HEAD".into(), "POST".into()],
    };
    for (i, m) in methods.iter().enumerate() {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            errors.add(
                format!("{at}.methods[{i}]"),
                format!("{m:?} is not a method; methods are upper-case, like GET"),
            );
        }
    }
    let headers = spec.headers.as_ref().map(|list| {
        for (i, h) in list.iter().enumerate() {
            if HeaderName::from_bytes(h.as_bytes()).is_err() {
                errors.add(
                    format!("{at}.headers[{i}]"),
                    format!("{h:?} is not a header name"),
                );
            }
        }
        list.join(", ")
    });
    let max_age = spec
        .max_age
        .as_ref()
        .and_then(|d| duration_at(errors, format!("{at}.max_age"), d))
        .map(|d| HeaderValue::from(d.as_secs()));
    if errors.0.len() > before {
        return None;
    }
    Some(Arc::new(CorsPolicy {
        origins: (!any).then_some(origins),
        methods: HeaderValue::from_str(&methods.join(", ")).ok()?,
        headers: headers.and_then(|h| HeaderValue::from_str(&h).ok()),
        max_age,
        credentials: spec.credentials,
    }))
}

/// What routes may authenticate with, compiled once per load.
pub(super) struct Authenticators {
    pub api_keys: Arc<ApiKeys>,
    pub jwt: BTreeMap<String, Arc<Provider>>,
    /// Every header that carries an identity upstream.
    pub identity_headers: Arc<[HeaderName]>,
}

/// A route's access rules.
pub(super) fn compile_access(
    at: &str,
    spec: &RouteSpec,
    file: &FileConfig,
    auth: &Authenticators,
    errors: &mut Errors,
) -> AccessPolicy {
    let mut policy = AccessPolicy::default();
    for (i, method) in spec.auth.iter().flatten().enumerate() {
        let at = format!("{at}.auth[{i}]");
        let method = match method.as_str() {
            "api_key" => AuthMethod::ApiKey(Arc::clone(&auth.api_keys)),
            other => match other.strip_prefix("jwt:") {
                Some(name) => match auth.jwt.get(name) {
                    Some(provider) => AuthMethod::Jwt(Arc::clone(provider)),
                    None => {
                        // A provider with errors of its own is reported
                        // there, not again here.
                        if !file.auth.jwt.contains_key(name) {
                            errors.add(at, format!("no JWT provider named {name:?} in auth.jwt"));
                        }
                        continue;
                    }
                },
                None => {
                    errors.add(
                        at,
                        format!(
                            "{other:?} is not an authentication method; use api_key or jwt:<provider>"
                        ),
                    );
                    continue;
                }
            },
        };
        if policy.methods.contains(&method) {
            errors.add(at, "listed twice");
            continue;
        }
        policy.methods.push(method);
    }
    if let Some(scopes) = &spec.require_scopes {
        if !spec.auth.iter().flatten().any(|m| m.starts_with("jwt:")) {
            errors.add(
                format!("{at}.require_scopes"),
                "needs a jwt:<provider> in auth: scopes come from tokens",
            );
        }
        for (i, scope) in scopes.iter().enumerate() {
            if scope.is_empty() || scope.contains(char::is_whitespace) {
                errors.add(
                    format!("{at}.require_scopes[{i}]"),
                    "a scope is one word, without spaces",
                );
            }
        }
        policy.require_scopes = scopes.clone();
    }
    if let Some(groups) = &spec.allow_groups {
        if policy.methods.is_empty() {
            errors.add(
                format!("{at}.allow_groups"),
                "needs auth: a route without authentication has no caller to check",
            );
        }
        policy.allow_groups = groups.clone();
    }
    for (key, list, out) in [
        ("ip_allow", &spec.ip_allow, &mut policy.ip.allow),
        ("ip_deny", &spec.ip_deny, &mut policy.ip.deny),
    ] {
        for (i, text) in list.iter().flatten().enumerate() {
            match Cidr::parse(text) {
                Ok(c) => out.push(c),
                Err(e) => errors.add(format!("{at}.{key}[{i}]"), e),
            }
        }
    }
    policy
}

/// Every JWT provider of `auth.jwt`; the ones with errors are left out
/// (and reported).
pub(super) fn compile_jwt_providers(
    file: &FileConfig,
    base: &Path,
    pools: &Pools,
    draws: &mut Draws,
    errors: &mut Errors,
) -> BTreeMap<String, Arc<Provider>> {
    let mut providers = BTreeMap::new();
    for (name, spec) in &file.auth.jwt {
        if let Some(p) = compile_jwt_provider(name, spec, base, pools, draws, errors) {
            providers.insert(name.clone(), Arc::new(p));
        }
    }
    providers
}

/// The identity headers of a load: `X-Consumer` and every forwarded
/// claim's header, each once.
pub(super) fn identity_headers(providers: &BTreeMap<String, Arc<Provider>>) -> Arc<[HeaderName]> {
    let mut names = vec![HeaderName::from_static("x-consumer")];
    for header in providers.values().flat_map(|p| p.forwarded_headers()) {
        if !names.contains(header) {
            names.push(header.clone());
        }
    }
    names.into()
}

fn compile_jwt_provider(
    name: &str,
    spec: &JwtProviderSpec,
    base: &Path,
    pools: &Pools,
    draws: &mut Draws,
    errors: &mut Errors,
) -> Option<Provider> {
    let at = format!("auth.jwt.{name}");
    let before = errors.0.len();
    if !valid_name(name) {
        errors.add(
            &at,
            "provider names use only letters, digits, '-', '_' and '.'",
        );
    }
    // Everything that changes what a verified token yields goes into the
    // fingerprint: a reload that changes it starts the provider's cache
    // afresh, one that does not keeps it.
    let mut fingerprint = Sha256::new();
    let mut field = |bytes: &[u8]| {
        fingerprint.update((bytes.len() as u64).to_le_bytes());
        fingerprint.update(bytes);
    };
    let leeway = match &spec.leeway {
        Some(text) => match parse_duration(&text.0) {
            Ok(leeway) if leeway > MAX_LEEWAY => {
                errors.add(
                    format!("{at}.leeway"),
                    format!(
                        "{:?} is more than the {}s allowed; fix the clocks instead",
                        text.0,
                        MAX_LEEWAY.as_secs()
                    ),
                );
                DEFAULT_LEEWAY
            }
            Ok(leeway) => leeway,
            Err(e) => {
                errors.add(format!("{at}.leeway"), e);
                DEFAULT_LEEWAY
            }
        },
        None => DEFAULT_LEEWAY,
    };
    if spec.issuer.as_deref() == Some("") {
        errors.add(
            format!("{at}.issuer"),
            "must not be empty; leave it out to accept any",
        );
    }
    let audiences = spec.audiences.clone().unwrap_or_default();
    if spec.audiences.as_ref().is_some_and(Vec::is_empty) || audiences.iter().any(String::is_empty)
    {
        errors.add(
            format!("{at}.audiences"),
            "list at least one non-empty audience, or leave it out to accept any",
        );
    }
    let rules = ClaimRules {
        issuer: spec.issuer.clone(),
        audiences,
        leeway: leeway.as_secs(),
    };
    field(rules.issuer.as_deref().unwrap_or("").as_bytes());
    field(rules.audiences.join("\n").as_bytes());
    field(&rules.leeway.to_le_bytes());

    let mut set = KeySet::default();
    for (i, key) in spec.keys.iter().enumerate() {
        let at = format!("{at}.keys[{i}]");
        if let Some(key) = compile_jwt_key(&at, key, base, errors) {
            let kid = key.kid.clone();
            if !set.add(key) {
                errors.add(
                    format!("{at}.kid"),
                    format!("kid {kid:?} is used by another key"),
                );
            }
        }
    }
    if let Some(file) = &spec.jwks_file {
        let at = format!("{at}.jwks_file");
        match read_limited(base, file).and_then(|text| keys::parse_jwks(&text)) {
            Ok(jwks) => {
                for skipped in jwks.skipped {
                    log::warn!("{at}: {file}: skipped {skipped}");
                }
                for key in jwks.keys {
                    let kid = key.kid.clone();
                    if !set.add(key) {
                        errors.add(&at, format!("kid {kid:?} is also used by another key"));
                    }
                }
            }
            Err(e) => errors.add(&at, format!("{file}: {e}")),
        }
    }
    set.fingerprint(&mut fingerprint);

    let remote = spec.jwks_url.as_ref().and_then(|url| {
        let refresh = match &spec.jwks_refresh {
            Some(text) => duration_at(errors, format!("{at}.jwks_refresh"), text)?,
            None => DEFAULT_JWKS_REFRESH,
        };
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                errors.add(
                    format!("{at}.jwks_url"),
                    format!("{url:?} is not an http:// or https:// URL"),
                );
                return None;
            }
        }
        let settings = RemoteSettings {
            url: url.clone(),
            refresh,
        };
        pools
            .jwks
            .draw::<()>(&mut draws.jwks, name, &settings, || {
                Ok(RemoteKeys::new(name, settings.clone()))
            })
            .ok()
    });
    if spec.jwks_refresh.is_some() && spec.jwks_url.is_none() {
        errors.add(format!("{at}.jwks_refresh"), "needs jwks_url");
    }
    fingerprint.update(spec.jwks_url.as_deref().unwrap_or("").as_bytes());
    if set.is_empty() && spec.jwks_url.is_none() && errors.0.len() == before {
        errors.add(&at, "has no keys: give keys, jwks_file or jwks_url");
    }

    let mut forward = Vec::new();
    for (claim, header) in &spec.forward_claims {
        let at = format!("{at}.forward_claims.{claim}");
        let lower = header.to_ascii_lowercase();
        if RESERVED_FORWARD_HEADERS.contains(&lower.as_str())
            || FRAMING_HEADERS.contains(&lower.as_str())
        {
            errors.add(
                at,
                format!("{header} is a header tollgate sets or relies on"),
            );
            continue;
        }
        match Forward::new(claim.clone(), header) {
            Some(f) if !claim.is_empty() => {
                fingerprint.update(claim.as_bytes());
                fingerprint.update([0]);
                fingerprint.update(lower.as_bytes());
                fingerprint.update([0]);
                forward.push(f);
            }
            _ => errors.add(at, format!("{header:?} is not a header name")),
        }
    }
    let cache_size = spec.cache_size.unwrap_or(DEFAULT_ENTRIES);
    if cache_size == 0 {
        errors.add(format!("{at}.cache_size"), "must be at least 1");
    }
    fingerprint.update(cache_size.to_le_bytes());
    let cache_bytes = match &spec.cache_bytes {
        Some(text) => match parse_size(&text.0) {
            Ok(bytes) if bytes < MIN_BYTES => {
                errors.add(
                    format!("{at}.cache_bytes"),
                    format!("must be at least {}MiB", MIN_BYTES >> 20),
                );
                DEFAULT_BYTES
            }
            Ok(bytes) => bytes,
            Err(e) => {
                errors.add(format!("{at}.cache_bytes"), e);
                DEFAULT_BYTES
            }
        },
        None => DEFAULT_BYTES,
    };
    fingerprint.update(cache_bytes.to_le_bytes());
    if errors.0.len() > before {
        return None;
    }
    let digest: [u8; 32] = fingerprint.finalize().into();
    let cache = pools
        .token_caches
        .draw::<()>(&mut draws.token_caches, name, &digest, || {
            Ok(TokenCache::new(cache_size, cache_bytes))
        })
        .ok()?;
    Some(Provider::new(
        name.to_owned(),
        set,
        remote,
        &rules,
        forward,
        cache,
    ))
}

/// One configured key: exactly one of `secret`, `secret_env`,
/// `public_key_file`, fitting its `alg`.
fn compile_jwt_key(
    at: &str,
    spec: &JwtKeySpec,
    base: &Path,
    errors: &mut Errors,
) -> Option<PinnedKey> {
    let alg = match keys::parse_algorithm(&spec.alg) {
        Ok(alg) => alg,
        Err(e) => {
            errors.add(format!("{at}.alg"), e);
            return None;
        }
    };
    if spec.kid.as_deref() == Some("") {
        errors.add(
            format!("{at}.kid"),
            "must not be empty; leave it out for tokens without one",
        );
    }
    let sources = [
        spec.secret.is_some(),
        spec.secret_env.is_some(),
        spec.public_key_file.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        errors.add(
            at,
            "give exactly one of secret, secret_env and public_key_file",
        );
        return None;
    }
    let key = if let Some(secret) = &spec.secret {
        keys::from_secret(alg, secret.as_bytes()).map_err(|e| (format!("{at}.secret"), e))
    } else if let Some(var) = &spec.secret_env {
        match std::env::var(var) {
            Ok(secret) => keys::from_secret(alg, secret.as_bytes())
                .map_err(|e| (format!("{at}.secret_env"), format!("{var}: {e}"))),
            Err(_) => Err((
                format!("{at}.secret_env"),
                format!("the environment variable {var} is not set"),
            )),
        }
    } else if let Some(file) = &spec.public_key_file {
        read_limited(base, file)
            .and_then(|pem| keys::from_pem(alg, &pem).map_err(|e| format!("{file}: {e}")))
            .map_err(|e| (format!("{at}.public_key_file"), e))
    } else {
        return None;
    };
    match key {
        Ok(key) => Some(PinnedKey {
            kid: spec.kid.clone().filter(|k| !k.is_empty()),
            alg,
            key,
        }),
        Err((at, e)) => {
            errors.add(at, e);
            None
        }
    }
}

/// A file named in the config, relative to the config file's directory.
fn read_limited(base: &Path, name: &str) -> Result<Vec<u8>, String> {
    let path = base.join(name);
    let meta =
        std::fs::metadata(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(format!(
            "{} is larger than {MAX_KEY_FILE_BYTES} bytes",
            path.display()
        ));
    }
    std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use crate::config::compile::compile;
    use crate::config::parse_partial;
    use crate::snapshot::Pools;
    use std::path::Path;

    /// The errors of a file with one JWT provider whose settings are
    /// `provider` (YAML flow-map entries).
    fn provider_errors(provider: &str) -> Vec<String> {
        let text = format!(
            "listen: [\"127.0.0.1:1\"]\nauth:\n  jwt:\n    main: {{ keys: [{{ kid: k, alg: HS256, secret: s3cret }}], {provider} }}\nupstreams:\n  a: {{ targets: [\"127.0.0.1:2\"] }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: a, auth: [jwt:main] }}\n"
        );
        let (file, parse_errors) = match parse_partial(&text) {
            Ok(parsed) => parsed,
            Err(e) => return e.0.iter().map(ToString::to_string).collect(),
        };
        match compile(file, parse_errors, None, &Pools::default(), Path::new(".")) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn leeway_is_bounded() {
        assert!(provider_errors("leeway: 5m").is_empty());
        assert!(provider_errors("leeway: 0s").is_empty());
        let errors = provider_errors("leeway: 301s");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("auth.jwt.main.leeway: \"301s\" is more than the 300s"),
            "{errors:?}"
        );
    }

    #[test]
    fn cache_bytes_is_a_size_of_at_least_1_mib() {
        assert!(provider_errors("cache_bytes: 1MiB").is_empty());
        assert!(provider_errors("cache_bytes: 1GiB, cache_size: 10").is_empty());
        for (text, error) in [
            ("cache_bytes: 1023KiB", "must be at least 1MiB"),
            ("cache_bytes: 64MB", "unknown unit"),
            ("cache_bytes: 65536", "has no unit"),
        ] {
            let errors = provider_errors(text);
            assert!(
                errors[0].starts_with("auth.jwt.main.cache_bytes") && errors[0].contains(error),
                "{text}: {errors:?}"
            );
        }
    }
}
