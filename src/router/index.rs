//! The route index: from (host, path, method) to a route, most specific first.
//!
//! Precedence does not depend on file order: an exact host beats a wildcard
//! host (a longer wildcard suffix beats a shorter one), which beats "any host";
//! within a host, an exact path beats a longer prefix, which beats a shorter
//! one. Prefixes match on segment boundaries only (`/api` matches `/api` and
//! `/api/x`, never `/apix`).
//!
//! Every level is a hash lookup, and the number of lookups depends on the
//! request (labels in its host, segments in its path), never on how many
//! routes exist, so 10,000 routes cost what one does.

use http::{HeaderValue, Method};

/// The index's maps are built once from the config and only read per
/// request, so a fast keyed hash is enough: requests can choose lookup keys
/// but never insert, which is what hash flooding needs.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

/// Which hosts a route accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `api.example.com`, stored lower-case.
    Exact(String),
    /// `*.example.org`, stored as the suffix `.example.org`.
    Wildcard(String),
    Any,
}

/// Which paths a route accepts. Both are stored normalized.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathPattern {
    Exact(String),
    /// Without a trailing slash, except for the root prefix `/`.
    Prefix(String),
}

/// The result of a lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The index of the matched route, as given to [`RouteIndexBuilder::insert`].
    Route(usize),
    /// The most specific host and path matched, but no route of theirs
    /// allows the method; the value is the `Allow` header: the methods of
    /// the routes with that host and path pattern.
    MethodNotAllowed(HeaderValue),
    NotFound,
}

/// Routes sharing one host pattern and one path pattern, told apart by method.
#[derive(Debug)]
struct MethodSet {
    /// Routes with a method list come before a route without one, so an
    /// explicit method wins over "any method".
    entries: Vec<(Option<Vec<Method>>, usize)>,
}

impl MethodSet {
    fn find(&self, method: &Method) -> Option<usize> {
        self.entries
            .iter()
            .find(|(methods, _)| methods.as_ref().is_none_or(|m| m.contains(method)))
            .map(|(_, route)| *route)
    }
}

#[derive(Debug, Default)]
struct PathTable {
    exact: HashMap<Box<str>, MethodSet>,
    prefix: HashMap<Box<str>, MethodSet>,
}

impl PathTable {
    /// Visits the route sets whose path matches, most specific first,
    /// until `visit` returns a route.
    fn walk<'a>(
        &'a self,
        path: &str,
        mut visit: impl FnMut(&'a MethodSet) -> Option<usize>,
    ) -> Option<usize> {
        if !self.exact.is_empty() {
            if let Some(found) = self.exact.get(path).and_then(&mut visit) {
                return Some(found);
            }
        }
        if self.prefix.is_empty() {
            return None;
        }
        // Walk the segment boundaries from the longest candidate down to "/".
        let mut end = path.len();
        loop {
            if let Some(found) = self.prefix.get(&path[..end]).and_then(&mut visit) {
                return Some(found);
            }
            if end <= 1 {
                return None;
            }
            end = match path[..end].rfind('/') {
                Some(0) => 1,
                Some(i) => i,
                None => return None,
            };
        }
    }
}

/// An immutable route index; built once per config snapshot.
#[derive(Debug, Default)]
pub struct RouteIndex {
    exact_hosts: HashMap<Box<str>, PathTable>,
    wildcard_hosts: HashMap<Box<str>, PathTable>,
    any_host: PathTable,
}

impl RouteIndex {
    /// Finds the most specific route for a request. `host` is the request's
    /// host, lower-case and without port; `path` is the normalized path.
    pub fn lookup(&self, host: Option<&str>, path: &str, method: &Method) -> Lookup {
        // The most specific host and path decide alone: a method they do
        // not allow is refused, never passed to a less specific route
        // (`GET /api` with auth beside a public `/` must not turn
        // `POST /api` public).
        let mut decides = None;
        self.walk(host, path, |set| {
            decides = Some(set);
            Some(0)
        });
        match decides {
            None => Lookup::NotFound,
            Some(set) => match set.find(method) {
                Some(route) => Lookup::Route(route),
                None => Lookup::MethodNotAllowed(allow_header(
                    set.entries
                        .iter()
                        .flat_map(|(m, _)| m.iter().flatten())
                        .collect(),
                )),
            },
        }
    }

    /// The routes whose host and path pattern decide a request's method:
    /// those of the most specific pattern that matches (for `explain`).
    pub fn deciding(&self, host: Option<&str>, path: &str) -> Vec<usize> {
        let mut routes = Vec::new();
        self.walk(host, path, |set| {
            routes.extend(set.entries.iter().map(|(_, route)| *route));
            Some(0)
        });
        routes
    }

    /// Visits matching route sets in precedence order: exact host, then
    /// wildcard hosts by longest suffix, then any host.
    fn walk<'a>(
        &'a self,
        host: Option<&str>,
        path: &str,
        mut visit: impl FnMut(&'a MethodSet) -> Option<usize>,
    ) -> Option<usize> {
        if let Some(host) = host {
            if let Some(table) = self.exact_hosts.get(host) {
                if let Some(route) = table.walk(path, &mut visit) {
                    return Some(route);
                }
            }
            if !self.wildcard_hosts.is_empty() {
                // Longest suffix first: for a.b.example.org try
                // .b.example.org, then .example.org, then .org.
                for (i, _) in host.match_indices('.') {
                    if let Some(table) = self.wildcard_hosts.get(&host[i..]) {
                        if let Some(route) = table.walk(path, &mut visit) {
                            return Some(route);
                        }
                    }
                }
            }
        }
        self.any_host.walk(path, &mut visit)
    }
}

/// Two routes claim the same host, path and method.
#[derive(Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The route already in the index.
    pub existing: usize,
}

/// Collects routes, then freezes them into a [`RouteIndex`].
#[derive(Debug, Default)]
pub struct RouteIndexBuilder {
    index: RouteIndex,
}

impl RouteIndexBuilder {
    /// The route already taking `host`, `path` and one of `methods`, if any.
    /// `methods: None` means any method.
    pub fn conflict(
        &self,
        host: &HostPattern,
        path: &PathPattern,
        methods: Option<&[Method]>,
    ) -> Option<Conflict> {
        let table = match host {
            HostPattern::Exact(h) => self.index.exact_hosts.get(h.as_str())?,
            HostPattern::Wildcard(s) => self.index.wildcard_hosts.get(s.as_str())?,
            HostPattern::Any => &self.index.any_host,
        };
        let set = match path {
            PathPattern::Exact(p) => table.exact.get(p.as_str())?,
            PathPattern::Prefix(p) => table.prefix.get(p.as_str())?,
        };
        set.entries
            .iter()
            .find(|(existing, _)| match (existing, methods) {
                (Some(a), Some(b)) => a.iter().any(|m| b.contains(m)),
                _ => existing.is_none() && methods.is_none(),
            })
            .map(|&(_, existing)| Conflict { existing })
    }

    /// Adds route number `route` under one host pattern. Fails, adding
    /// nothing, if an earlier route already takes the same host, path and
    /// (some of the same) methods. A route with several hosts must check
    /// them all with [`Self::conflict`] first, or a conflict on a later host
    /// leaves the earlier ones pointing at a route that was never added.
    pub fn insert(
        &mut self,
        host: &HostPattern,
        path: &PathPattern,
        methods: Option<&[Method]>,
        route: usize,
    ) -> Result<(), Conflict> {
        if let Some(conflict) = self.conflict(host, path, methods) {
            return Err(conflict);
        }
        let table = match host {
            HostPattern::Exact(h) => self.index.exact_hosts.entry(h.as_str().into()).or_default(),
            HostPattern::Wildcard(s) => self
                .index
                .wildcard_hosts
                .entry(s.as_str().into())
                .or_default(),
            HostPattern::Any => &mut self.index.any_host,
        };
        let (map, key) = match path {
            PathPattern::Exact(p) => (&mut table.exact, p),
            PathPattern::Prefix(p) => (&mut table.prefix, p),
        };
        let set = map.entry(key.as_str().into()).or_insert_with(|| MethodSet {
            entries: Vec::new(),
        });
        set.entries.push((methods.map(<[Method]>::to_vec), route));
        set.entries.sort_by_key(|(m, _)| m.is_none());
        Ok(())
    }

    pub fn build(self) -> RouteIndex {
        self.index
    }
}

/// An `Allow` value: the methods, each once, in a stable order.
fn allow_header(methods: Vec<&Method>) -> HeaderValue {
    let mut methods: Vec<&str> = methods.into_iter().map(Method::as_str).collect();
    methods.sort_unstable();
    methods.dedup();
    // Method names are tokens, so the joined list is always a valid value.
    HeaderValue::from_str(&methods.join(", ")).unwrap_or(HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(h: &str) -> HostPattern {
        HostPattern::Exact(h.into())
    }
    fn wild(suffix: &str) -> HostPattern {
        HostPattern::Wildcard(suffix.into())
    }
    fn prefix(p: &str) -> PathPattern {
        PathPattern::Prefix(p.into())
    }
    fn path(p: &str) -> PathPattern {
        PathPattern::Exact(p.into())
    }

    fn index(routes: &[(HostPattern, PathPattern, Option<&[Method]>)]) -> RouteIndex {
        let mut b = RouteIndexBuilder::default();
        for (i, (h, p, m)) in routes.iter().enumerate() {
            b.insert(h, p, *m, i).unwrap();
        }
        b.build()
    }

    #[test]
    fn prefix_matches_on_segment_boundaries_only() {
        let idx = index(&[(HostPattern::Any, prefix("/api"), None)]);
        assert_eq!(idx.lookup(None, "/api", &Method::GET), Lookup::Route(0));
        assert_eq!(idx.lookup(None, "/api/x", &Method::GET), Lookup::Route(0));
        assert_eq!(idx.lookup(None, "/api/", &Method::GET), Lookup::Route(0));
        assert_eq!(idx.lookup(None, "/apix", &Method::GET), Lookup::NotFound);
        assert_eq!(idx.lookup(None, "/", &Method::GET), Lookup::NotFound);
    }

    #[test]
    fn exact_path_beats_longer_prefix_beats_shorter_prefix() {
        let idx = index(&[
            (HostPattern::Any, prefix("/"), None),
            (HostPattern::Any, prefix("/api"), None),
            (HostPattern::Any, prefix("/api/users"), None),
            (HostPattern::Any, path("/api/users/me"), None),
        ]);
        assert_eq!(
            idx.lookup(None, "/api/users/me", &Method::GET),
            Lookup::Route(3)
        );
        assert_eq!(
            idx.lookup(None, "/api/users/7", &Method::GET),
            Lookup::Route(2)
        );
        assert_eq!(
            idx.lookup(None, "/api/orders", &Method::GET),
            Lookup::Route(1)
        );
        assert_eq!(idx.lookup(None, "/other", &Method::GET), Lookup::Route(0));
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any_host() {
        let idx = index(&[
            (HostPattern::Any, prefix("/"), None),
            (wild(".example.org"), prefix("/"), None),
            (wild(".a.example.org"), prefix("/"), None),
            (exact("x.a.example.org"), prefix("/"), None),
        ]);
        assert_eq!(
            idx.lookup(Some("x.a.example.org"), "/", &Method::GET),
            Lookup::Route(3)
        );
        assert_eq!(
            idx.lookup(Some("y.a.example.org"), "/", &Method::GET),
            Lookup::Route(2)
        );
        assert_eq!(
            idx.lookup(Some("y.example.org"), "/", &Method::GET),
            Lookup::Route(1)
        );
        assert_eq!(
            idx.lookup(Some("example.org"), "/", &Method::GET),
            Lookup::Route(0)
        );
        assert_eq!(idx.lookup(None, "/", &Method::GET), Lookup::Route(0));
    }

    #[test]
    fn a_more_specific_host_without_the_path_falls_back() {
        let idx = index(&[
            (exact("api.example.com"), prefix("/api"), None),
            (HostPattern::Any, prefix("/static"), None),
        ]);
        assert_eq!(
            idx.lookup(Some("api.example.com"), "/static/a", &Method::GET),
            Lookup::Route(1)
        );
    }

    #[test]
    fn method_mismatch_gives_allow_of_every_matching_route() {
        let get: &[Method] = &[Method::GET];
        let post: &[Method] = &[Method::POST, Method::PUT];
        let idx = index(&[
            (HostPattern::Any, prefix("/api"), Some(get)),
            (HostPattern::Any, prefix("/api"), Some(post)),
        ]);
        assert_eq!(idx.lookup(None, "/api/x", &Method::PUT), Lookup::Route(1));
        match idx.lookup(None, "/api/x", &Method::DELETE) {
            Lookup::MethodNotAllowed(allow) => assert_eq!(allow, "GET, POST, PUT"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_most_specific_host_and_path_decide_the_method_alone() {
        let get: &[Method] = &[Method::GET];
        let post: &[Method] = &[Method::POST];
        let idx = index(&[
            (exact("api.example.com"), prefix("/a"), Some(get)),
            (HostPattern::Any, prefix("/a/b"), Some(post)),
            (HostPattern::Any, prefix("/"), None),
        ]);
        // The exact host is more specific than any host, whatever the path.
        match idx.lookup(Some("api.example.com"), "/a/b", &Method::POST) {
            Lookup::MethodNotAllowed(allow) => assert_eq!(allow, "GET"),
            other => panic!("{other:?}"),
        }
        // A longer prefix beats the catch-all, which is not consulted.
        match idx.lookup(Some("other"), "/a/b/c", &Method::DELETE) {
            Lookup::MethodNotAllowed(allow) => assert_eq!(allow, "POST"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            idx.lookup(Some("other"), "/x", &Method::DELETE),
            Lookup::Route(2)
        );
    }

    #[test]
    fn a_failed_insert_adds_nothing() {
        let mut b = RouteIndexBuilder::default();
        b.insert(&exact("x"), &path("/p"), None, 0).unwrap();
        assert!(b.conflict(&exact("y"), &path("/p"), None).is_none());
        assert_eq!(
            b.conflict(&exact("x"), &path("/p"), None),
            Some(Conflict { existing: 0 })
        );
        let idx = b.build();
        assert_eq!(idx.lookup(Some("y"), "/p", &Method::GET), Lookup::NotFound);
    }

    #[test]
    fn overlapping_methods_on_the_same_key_conflict() {
        let get: &[Method] = &[Method::GET];
        let mut b = RouteIndexBuilder::default();
        b.insert(&HostPattern::Any, &prefix("/a"), Some(get), 0)
            .unwrap();
        assert_eq!(
            b.insert(&HostPattern::Any, &prefix("/a"), Some(get), 1),
            Err(Conflict { existing: 0 })
        );
        b.insert(&HostPattern::Any, &prefix("/a"), None, 2).unwrap();
        assert_eq!(
            b.insert(&HostPattern::Any, &prefix("/a"), None, 3),
            Err(Conflict { existing: 2 })
        );
    }
}
