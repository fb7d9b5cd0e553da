//! `tollgate explain -c FILE METHOD URL [-H 'Name: value' ...] [--json]`:
//! which route a request would take and why, without starting a server.
//!
//! The winner is decided by the same lookup the proxy uses; every other
//! route is then explained against the request (its host, path or method
//! not matching, or matching but being less specific), so an operator sees
//! both the answer and the near misses.

use crate::auth::Method as AuthMethod;
use crate::error::GatewayError;
use crate::limit::{KeyKind, Limiter};
use crate::proxy::request;
use crate::router::{
    normalize_path, routing_host, without_parameters, HostPattern, PathPattern, Route,
};
use crate::snapshot::Snapshot;
use crate::store::ConfigStore;
use http::Method;
use pingora::http::RequestHeader;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;

/// A route's match keys, kept for explanation (the index keeps them in its
/// own shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePattern {
    pub hosts: Vec<HostPattern>,
    pub path: PathPattern,
    /// `None`: any method.
    pub methods: Option<Vec<Method>>,
}

impl RoutePattern {
    fn host_text(&self) -> String {
        if self.hosts.iter().all(|h| *h == HostPattern::Any) {
            return "any host".into();
        }
        self.hosts
            .iter()
            .map(|h| match h {
                HostPattern::Exact(s) => s.clone(),
                HostPattern::Wildcard(suffix) => format!("*{suffix}"),
                HostPattern::Any => "any host".into(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn path_text(&self) -> String {
        match &self.path {
            PathPattern::Exact(p) => format!("path {p}"),
            PathPattern::Prefix(p) => format!("path prefix {p}"),
        }
    }

    fn methods_text(&self) -> String {
        match &self.methods {
            None => "any method".into(),
            Some(list) => list
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    fn host_matches(&self, host: Option<&str>) -> bool {
        self.hosts.iter().any(|h| match (h, host) {
            (HostPattern::Any, _) => true,
            (HostPattern::Exact(s), Some(host)) => s == host,
            (HostPattern::Wildcard(suffix), Some(host)) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
            _ => false,
        })
    }

    fn path_matches(&self, path: &str) -> bool {
        match &self.path {
            PathPattern::Exact(p) => path == p,
            PathPattern::Prefix(p) => {
                p == "/"
                    || path == p
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }

    fn method_matches(&self, method: &Method) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|list| list.contains(method))
    }
}

/// What `explain` found.
fn explain(snapshot: &Snapshot, method: &Method, req: &RequestHeader) -> Value {
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(routing_host)
        .map(|h| h.into_owned());
    let normalized = match normalize_path(req.uri.path()) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            return json!({
                "status": 400,
                "error": "bad_request",
                "reason": e.message(),
                "path": req.uri.path(),
            });
        }
    };
    let winner = request::route(snapshot, req, method);
    let winner_name = winner.as_ref().ok().map(|m| m.route.name.clone());
    // The routes of the most specific host and path: they alone decide
    // which methods are allowed there.
    let deciding: Vec<&str> = snapshot
        .index
        .deciding(host.as_deref(), &without_parameters(&normalized))
        .into_iter()
        .filter_map(|i| snapshot.routes.get(i).map(|r| r.name.as_str()))
        .collect();
    let candidates: Vec<Value> = snapshot
        .routes
        .iter()
        .map(|r| {
            let p = &r.pattern;
            let verdict = if winner_name.as_deref() == Some(r.name.as_str()) {
                "matches: this route is taken".to_owned()
            } else if !p.host_matches(host.as_deref()) {
                format!(
                    "host {} does not match {}",
                    host.as_deref().unwrap_or("(none)"),
                    p.host_text()
                )
            } else if !p.path_matches(&normalized) {
                format!("{normalized} does not match its {}", p.path_text())
            } else if !p.method_matches(method) {
                format!("{method} is not among {}", p.methods_text())
            } else if winner.is_err() && !deciding.contains(&r.name.as_str()) {
                format!(
                    "matches, but the more specific host and path of {} decide the methods allowed here, and {method} is not among them (405; less specific routes are not consulted)",
                    deciding.join(", ")
                )
            } else {
                "matches too, but a more specific route (exact host before wildcard before any; exact path before the longest prefix) wins".to_owned()
            };
            json!({
                "route": r.name,
                "hosts": p.host_text(),
                "path": p.path_text(),
                "methods": p.methods_text(),
                "verdict": verdict,
            })
        })
        .collect();
    let mut out = json!({
        "request": { "method": method.as_str(), "host": host, "path": req.uri.path(), "normalized_path": normalized },
        "candidates": candidates,
    });
    match winner {
        Ok(m) => {
            let route = &m.route;
            let forwarded = if m.path_parameters {
                route.upstream_path_by_segments(&normalized)
            } else {
                route.upstream_path(&normalized)
            };
            out["status"] = json!(200);
            out["route"] = json!(route.name);
            out["upstream"] = json!({
                "name": m.cluster.name,
                "balance": format!("{:?}", m.cluster.balance),
                "targets": m.cluster.targets.iter().map(|t| t.addr.to_string()).collect::<Vec<_>>(),
                "forwarded_path": forwarded,
            });
            out["policy"] = policy(route);
        }
        Err(rejection) => {
            let error = rejection.error;
            out["status"] = json!(error.status());
            out["error"] = json!(error.code());
            if error == GatewayError::MethodNotAllowed {
                out["allow"] = json!(rejection
                    .allow
                    .and_then(|a| a.to_str().ok().map(str::to_owned)));
            }
        }
    }
    out
}

/// The rules a route applies, as `explain` shows them.
fn policy(route: &Route) -> Value {
    let p = &route.policy;
    let auth: Vec<String> = p
        .access
        .methods
        .iter()
        .map(|m| match m {
            AuthMethod::ApiKey(_) => "api_key".to_owned(),
            AuthMethod::Jwt(provider) => format!("jwt:{}", provider.name),
        })
        .collect();
    let rate_limit = p.rate_limit.as_ref().map(|r| {
        json!({
            "key": match &r.kind {
                KeyKind::ClientIp => "client_ip".to_owned(),
                KeyKind::Consumer => "consumer".to_owned(),
                KeyKind::Route => "route".to_owned(),
                KeyKind::Header(h) => format!("header:{h}"),
            },
            "burst": r.limit_header.to_str().unwrap_or(""),
            "scope": if matches!(r.limiter, Limiter::Global(_)) { "global" } else { "local" },
            "consumer_overrides": r.overrides.keys().collect::<Vec<_>>(),
        })
    });
    json!({
        "auth": auth,
        "require_scopes": p.access.require_scopes,
        "allow_groups": p.access.allow_groups,
        "ip_rules": !p.access.ip.is_empty(),
        "rate_limit": rate_limit,
        "max_inflight": p.max_inflight.as_ref().map(|c| c.max),
        "max_inflight_per_client": p.per_client.as_ref().map(|c| c.limit.max),
        "timeout_ms": p.timeout.map(|t| t.as_millis() as u64),
        "max_body_bytes": (p.max_body_bytes != u64::MAX).then_some(p.max_body_bytes),
        "websocket": p.websocket,
        "cors": p.cors.is_some(),
        "strip_prefix": route.strip_prefix.is_some(),
    })
}

/// The route table as JSON, for the admin listener's `GET /routes`.
pub fn route_table(snapshot: &Snapshot) -> Value {
    let routes: Vec<Value> = snapshot
        .routes
        .iter()
        .map(|r| {
            let upstream = snapshot.clusters.get(r.upstream).map(|c| c.name.clone());
            json!({
                "name": r.name,
                "hosts": r.pattern.host_text(),
                "path": r.pattern.path_text(),
                "methods": r.pattern.methods_text(),
                "upstream": upstream,
                "policy": policy(r),
            })
        })
        .collect();
    json!({ "routes": routes })
}

const USAGE: &str = "usage: tollgate explain [-c FILE] [--json] [-H 'Name: value' ...] METHOD URL";

/// Runs `tollgate explain ARGS`.
pub fn run(args: &[String], default_config: &str) -> ExitCode {
    let mut config = PathBuf::from(default_config);
    let mut json_out = false;
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut positional = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-c" | "--conf" => match args.get(i + 1) {
                Some(path) => {
                    config = PathBuf::from(path);
                    i += 1;
                }
                None => return usage("-c needs a file"),
            },
            "--json" => json_out = true,
            "-H" | "--header" => match args.get(i + 1).and_then(|h| h.split_once(':')) {
                Some((name, value)) => {
                    headers.push((name.trim().to_owned(), value.trim().to_owned()));
                    i += 1;
                }
                None => return usage("-H needs 'Name: value'"),
            },
            other => positional.push(other.to_owned()),
        }
        i += 1;
    }
    let [method, url] = positional.as_slice() else {
        return usage("give a METHOD and a URL");
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return usage("not a method");
    };
    let Ok(uri) = url.parse::<http::Uri>() else {
        return usage("not a URL (http://host/path or /path)");
    };
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(mut req) = RequestHeader::build(method.clone(), target.as_bytes(), None) else {
        return usage("not a request target");
    };
    let host_given = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host"));
    if let (Some(authority), false) = (uri.authority(), host_given) {
        if req
            .insert_header(http::header::HOST, authority.as_str())
            .is_err()
        {
            return usage("not a host");
        }
    }
    for (name, value) in headers {
        if req.append_header(name, value).is_err() {
            return usage("not a header");
        }
    }
    let store = match ConfigStore::open(&config) {
        Ok(store) => store,
        Err(errors) => {
            eprintln!("tollgate: configuration errors in {}:", config.display());
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let result = explain(&store.current(), &method, &req);
    if json_out {
        println!("{result}");
    } else {
        print!("{}", text(&result));
    }
    ExitCode::SUCCESS
}

fn usage(why: &str) -> ExitCode {
    eprintln!("tollgate explain: {why}\n{USAGE}");
    ExitCode::from(2)
}

/// The human form of an explanation.
fn text(v: &Value) -> String {
    let mut out = String::new();
    let req = &v["request"];
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    out.push_str(&format!(
        "{} {} (host {}, normalized path {})\n",
        s(&req["method"]),
        s(&req["path"]),
        req["host"].as_str().unwrap_or("none"),
        s(&req["normalized_path"])
    ));
    match v["route"].as_str() {
        Some(route) => {
            let up = &v["upstream"];
            out.push_str(&format!(
                "=> route {route:?}: upstream {} ({}, targets {}), forwarded path {}\n",
                s(&up["name"]),
                s(&up["balance"]),
                up["targets"],
                s(&up["forwarded_path"])
            ));
            let p = &v["policy"];
            out.push_str(&format!(
                "   auth {}; require_scopes {}; allow_groups {}; rate_limit {}; max_inflight {}; timeout_ms {}\n",
                p["auth"], p["require_scopes"], p["allow_groups"], p["rate_limit"], p["max_inflight"], p["timeout_ms"]
            ));
        }
        None => {
            out.push_str(&format!("=> {} {}", v["status"], s(&v["error"])));
            if let Some(reason) = v["reason"].as_str() {
                out.push_str(&format!(": {reason}"));
            }
            if let Some(allow) = v["allow"].as_str() {
                out.push_str(&format!(" (Allow: {allow})"));
            }
            out.push('\n');
        }
    }
    if let Some(candidates) = v["candidates"].as_array() {
        out.push_str("routes considered:\n");
        for c in candidates {
            out.push_str(&format!(
                "  {:<20} {} / {} / {}: {}\n",
                s(&c["route"]),
                s(&c["hosts"]),
                s(&c["path"]),
                s(&c["methods"]),
                s(&c["verdict"])
            ));
        }
    }
    out
}
