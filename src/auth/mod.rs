//! Who is calling, and whether they may: per route, after routing and
//! before a byte goes upstream.
//!
//! - [`ip`]: client IP allow and deny lists (403);
//! - [`api_key`]: API keys naming consumers (401 when missing or wrong);
//! - [`jwt`]: bearer tokens of JWT providers (401), remembered in
//!   [`cache`] once verified;
//! - [`cors`]: which browser origins may call the route.
//!
//! A route lists the methods it accepts (`auth: [jwt:main, api_key]`); the
//! first that succeeds identifies the caller. `require_scopes` then
//! requires every listed scope of a token, and `allow_groups` one of the
//! caller's groups (403). A route without methods is public.

pub mod api_key;
pub mod cache;
pub mod cors;
pub mod ip;
pub mod jwt;

use crate::error::GatewayError;
use api_key::{ApiKeys, Consumer, KeyCheck};
use http::HeaderValue;
use ip::IpRules;
use jwt::{Provider, TokenCheck, Verified};
use pingora::http::RequestHeader;
use std::net::IpAddr;
use std::sync::Arc;

/// Why a request is unauthenticated, as the 401's message says; the
/// `WWW-Authenticate` challenge adds `error="invalid_token"` for the first.
pub const INVALID_CREDENTIALS: &str = "the credentials are not valid";
pub const MISSING_CREDENTIALS: &str = "this route needs credentials";

const FORBIDDEN_ADDRESS: &str = "the client address may not use this route";
const FORBIDDEN_GROUP: &str = "the caller is not in a group this route allows";
const FORBIDDEN_SCOPE: &str = "the caller lacks a scope this route requires";

/// The `reason` label of `tollgate_auth_failures_total` for a refusal.
pub fn failure_reason(error: GatewayError) -> Option<&'static str> {
    match error {
        GatewayError::Unauthorized(why) if why == MISSING_CREDENTIALS => {
            Some("missing_credentials")
        }
        GatewayError::Unauthorized(why) if why == INVALID_CREDENTIALS => Some("invalid_api_key"),
        GatewayError::Unauthorized(why) => Some(jwt::Refusal::reason_of(why)),
        GatewayError::Forbidden(why) if why == FORBIDDEN_ADDRESS => Some("ip_denied"),
        GatewayError::Forbidden(why) if why == FORBIDDEN_GROUP => Some("group"),
        GatewayError::Forbidden(why) if why == FORBIDDEN_SCOPE => Some("scope"),
        GatewayError::Forbidden(_) => Some("forbidden"),
        _ => None,
    }
}

/// One way a route accepts to identify a caller.
#[derive(Debug, Clone)]
pub enum Method {
    ApiKey(Arc<ApiKeys>),
    Jwt(Arc<Provider>),
}

impl PartialEq for Method {
    /// The same compiled keys or provider: compiled state is shared, never
    /// compared by content.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Method::ApiKey(a), Method::ApiKey(b)) => Arc::ptr_eq(a, b),
            (Method::Jwt(a), Method::Jwt(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Method {}

/// A route's access rules, compiled once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Tried in order, the first that identifies the caller wins; empty:
    /// the route is public.
    pub methods: Vec<Method>,
    /// Empty: any identified caller.
    pub allow_groups: Vec<String>,
    /// Scopes a token must all hold; API-key callers hold none.
    pub require_scopes: Vec<String>,
    pub ip: IpRules,
}

/// The caller, as the upstream learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Known by API key.
    Consumer(Arc<Consumer>),
    /// Known by a verified JWT.
    Token(Arc<Verified>),
}

impl Identity {
    /// The consumer's name, or the token's subject.
    pub fn name(&self) -> &str {
        match self {
            Identity::Consumer(c) => &c.name,
            Identity::Token(t) => &t.subject,
        }
    }

    /// The identity as the upstream receives it: `X-Consumer` for a
    /// consumer, the forwarded claims for a token.
    pub fn headers(&self) -> IdentityHeaders<'_> {
        match self {
            Identity::Consumer(c) => IdentityHeaders::Consumer(&c.header),
            Identity::Token(t) => IdentityHeaders::Claims(&t.headers),
        }
    }

    fn groups(&self) -> &[String] {
        match self {
            Identity::Consumer(c) => &c.groups,
            Identity::Token(t) => &t.groups,
        }
    }

    fn scopes(&self) -> &[String] {
        match self {
            Identity::Consumer(_) => &[],
            Identity::Token(t) => &t.scopes,
        }
    }
}

/// See [`Identity::headers`].
pub enum IdentityHeaders<'a> {
    Consumer(&'a HeaderValue),
    Claims(&'a [(bytes::Bytes, HeaderValue)]),
}

impl AccessPolicy {
    pub fn is_open(&self) -> bool {
        self.methods.is_empty() && self.allow_groups.is_empty() && self.ip.is_empty()
    }

    /// The route's address rules alone (what a CORS preflight, which
    /// carries no credentials, is held to).
    pub fn check_address(&self, client: Option<IpAddr>) -> Result<(), GatewayError> {
        if self.ip.permits(client) {
            Ok(())
        } else {
            Err(GatewayError::Forbidden(FORBIDDEN_ADDRESS))
        }
    }

    /// Decides whether the request may go on, and as whom. Waits only when
    /// a token names a key its provider's JWKS may have gained since.
    pub async fn check(
        &self,
        req: &RequestHeader,
        client: Option<IpAddr>,
    ) -> Result<Option<Identity>, GatewayError> {
        self.check_address(client)?;
        if self.methods.is_empty() {
            return Ok(None);
        }
        // The first refusal explains the 401 when nothing succeeds.
        let mut invalid = None;
        let mut identity = None;
        for method in &self.methods {
            match method {
                Method::ApiKey(keys) => match keys.check(req) {
                    KeyCheck::Valid(consumer) => {
                        identity = Some(Identity::Consumer(consumer));
                        break;
                    }
                    KeyCheck::Invalid => {
                        invalid.get_or_insert(INVALID_CREDENTIALS);
                    }
                    KeyCheck::Missing => {}
                    KeyCheck::Ambiguous => {
                        return Err(GatewayError::BadRequest(
                            "the request carries more than one API key",
                        ))
                    }
                },
                Method::Jwt(provider) => match provider.check(req).await {
                    TokenCheck::Valid(verified) => {
                        identity = Some(Identity::Token(verified));
                        break;
                    }
                    TokenCheck::Invalid(refusal) => {
                        invalid.get_or_insert(refusal.message());
                    }
                    TokenCheck::Missing => {}
                },
            }
        }
        let Some(identity) = identity else {
            return Err(GatewayError::Unauthorized(
                invalid.unwrap_or(MISSING_CREDENTIALS),
            ));
        };
        if !self
            .require_scopes
            .iter()
            .all(|s| identity.scopes().contains(s))
        {
            return Err(GatewayError::Forbidden(FORBIDDEN_SCOPE));
        }
        if !self.allow_groups.is_empty()
            && !identity
                .groups()
                .iter()
                .any(|g| self.allow_groups.contains(g))
        {
            return Err(GatewayError::Forbidden(FORBIDDEN_GROUP));
        }
        Ok(Some(identity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api_key::{digest_of, parse_digest};
    use http::HeaderName;

    fn policy(groups: &[&str]) -> AccessPolicy {
        let mut keys = ApiKeys::new(HeaderName::from_static("x-api-key"), None);
        for (name, key, group) in [("alice", "ka", "partners"), ("bob", "kb", "staff")] {
            let consumer = Arc::new(Consumer::new(name.into(), vec![group.into()]));
            keys.add(parse_digest(&digest_of(key)).unwrap(), consumer);
        }
        AccessPolicy {
            methods: vec![Method::ApiKey(Arc::new(keys))],
            allow_groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ..AccessPolicy::default()
        }
    }

    fn req(key: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        if let Some(key) = key {
            req.insert_header("X-API-Key", key).unwrap();
        }
        req
    }

    #[tokio::test]
    async fn credentials_then_groups() {
        let p = policy(&["partners"]);
        let who = p.check(&req(Some("ka")), None).await.unwrap().unwrap();
        assert_eq!(who.name(), "alice");
        let status = |r: Result<_, GatewayError>| r.unwrap_err().status();
        assert_eq!(status(p.check(&req(Some("kb")), None).await), 403);
        assert_eq!(status(p.check(&req(Some("zz")), None).await), 401);
        assert_eq!(status(p.check(&req(None), None).await), 401);
        assert!(policy(&[]).check(&req(Some("kb")), None).await.is_ok());
        let scoped = AccessPolicy {
            require_scopes: vec!["orders:read".into()],
            ..policy(&[])
        };
        assert_eq!(status(scoped.check(&req(Some("ka")), None).await), 403);
        assert_eq!(
            AccessPolicy::default().check(&req(None), None).await,
            Ok(None)
        );
    }
}
