//! Who is calling, and whether they may: per route, after routing and
//! before a byte goes upstream.
//!
//! - [`ip`]: client IP allow and deny lists (403);
//! - [`api_key`]: API keys naming consumers (401 when missing or wrong);
//! - [`cors`]: which browser origins may call the route.
//!
//! A route lists the methods it accepts (`auth: [api_key]`); any one that
//! succeeds identifies the caller. `allow_groups` then requires one of the
//! caller's groups (403). A route without methods is public.

pub mod api_key;
pub mod cors;
pub mod ip;

use crate::error::GatewayError;
use api_key::{ApiKeys, Consumer, KeyCheck};
use http::HeaderValue;
use ip::IpRules;
use pingora::http::RequestHeader;
use std::net::IpAddr;
use std::sync::Arc;

/// Why a request is unauthenticated, as the 401's message says; the
/// `WWW-Authenticate` challenge adds `error="invalid_token"` for the first.
pub const INVALID_CREDENTIALS: &str = "the credentials are not valid";
pub const MISSING_CREDENTIALS: &str = "this route needs credentials";

/// One way a route accepts to identify a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    ApiKey,
}

/// A route's access rules, compiled once.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Any one suffices; empty: the route is public.
    pub methods: Vec<Method>,
    /// Empty: any identified caller.
    pub allow_groups: Vec<String>,
    pub ip: IpRules,
    /// The API keys, when `methods` holds `ApiKey`.
    pub api_keys: Option<Arc<ApiKeys>>,
}

impl PartialEq for AccessPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.methods == other.methods
            && self.allow_groups == other.allow_groups
            && self.ip == other.ip
            && match (&self.api_keys, &other.api_keys) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl Eq for AccessPolicy {}

/// The caller, as the upstream learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Consumer(Arc<Consumer>),
}

impl Identity {
    pub fn name(&self) -> &str {
        match self {
            Identity::Consumer(c) => &c.name,
        }
    }

    /// The identity as the `X-Consumer` value.
    pub fn header(&self) -> &HeaderValue {
        match self {
            Identity::Consumer(c) => &c.header,
        }
    }

    fn groups(&self) -> &[String] {
        match self {
            Identity::Consumer(c) => &c.groups,
        }
    }
}

impl AccessPolicy {
    pub fn is_open(&self) -> bool {
        self.methods.is_empty() && self.allow_groups.is_empty() && self.ip.is_empty()
    }

    /// Decides whether the request may go on, and as whom.
    pub fn check(
        &self,
        req: &RequestHeader,
        client: Option<IpAddr>,
    ) -> Result<Option<Identity>, GatewayError> {
        if !self.ip.permits(client) {
            return Err(GatewayError::Forbidden(
                "the client address may not use this route",
            ));
        }
        if self.methods.is_empty() {
            return Ok(None);
        }
        let mut invalid = false;
        let mut identity = None;
        for method in &self.methods {
            match method {
                Method::ApiKey => match self.api_keys.as_ref().map(|k| k.check(req)) {
                    Some(KeyCheck::Valid(consumer)) => {
                        identity = Some(Identity::Consumer(consumer));
                        break;
                    }
                    Some(KeyCheck::Invalid) => invalid = true,
                    Some(KeyCheck::Missing) | None => {}
                },
            }
        }
        let Some(identity) = identity else {
            return Err(GatewayError::Unauthorized(if invalid {
                INVALID_CREDENTIALS
            } else {
                MISSING_CREDENTIALS
            }));
        };
        if !self.allow_groups.is_empty()
            && !identity
                .groups()
                .iter()
                .any(|g| self.allow_groups.contains(g))
        {
            return Err(GatewayError::Forbidden(
                "the caller is not in a group this route allows",
            ));
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
            methods: vec![Method::ApiKey],
            allow_groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ip: IpRules::default(),
            api_keys: Some(Arc::new(keys)),
        }
    }

    fn req(key: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        if let Some(key) = key {
            req.insert_header("X-API-Key", key).unwrap();
        }
        req
    }

    #[test]
    fn credentials_then_groups() {
        let p = policy(&["partners"]);
        let who = p.check(&req(Some("ka")), None).unwrap().unwrap();
        assert_eq!(who.name(), "alice");
        assert_eq!(p.check(&req(Some("kb")), None).unwrap_err().status(), 403);
        assert_eq!(p.check(&req(Some("zz")), None).unwrap_err().status(), 401);
        assert_eq!(p.check(&req(None), None).unwrap_err().status(), 401);
        assert!(policy(&[]).check(&req(Some("kb")), None).is_ok());
        assert_eq!(AccessPolicy::default().check(&req(None), None), Ok(None));
    }
}
