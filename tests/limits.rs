//! Traffic control over real sockets: rate limits by client, header and
//! consumer, their headers, trusted proxies, and limits across reloads.

mod support;

use support::upstream::Upstream;
use support::{request, Gateway, Response};
use tollgate::auth::api_key::digest_of;

fn routes(up: &Upstream, extra_top: &str) -> String {
    format!(
        "{extra_top}auth:\n  api_keys: {{ header: X-API-Key }}\nconsumers:\n  alice: {{ api_keys: [\"{}\"], rate_limit: {{ rate: 1/m, burst: 2 }} }}\n  bob: {{ api_keys: [\"{}\"] }}\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: by-ip, path_prefix: /ip, upstream: app, rate_limit: {{ rate: 1/m, burst: 3 }} }}\n  - {{ name: by-tenant, path_prefix: /tenant, upstream: app, rate_limit: {{ key: \"header:X-Tenant\", rate: 1/m, burst: 1 }} }}\n  - {{ name: by-consumer, path_prefix: /consumer, upstream: app, auth: [api_key], rate_limit: {{ key: consumer, rate: 1/m, burst: 4 }} }}\n  - {{ name: shared, path_prefix: /shared, upstream: app, rate_limit: {{ key: route, rate: 1/m, burst: 2 }} }}\n  - {{ name: fast, path_prefix: /fast, upstream: app, rate_limit: {{ rate: 20/s, burst: 5 }} }}\n  - {{ name: guarded, path_prefix: /guarded, upstream: app, ip_deny: [203.0.113.0/24] }}\n  - {{ name: open, path_prefix: /, upstream: app }}\n",
        digest_of("alice-key"),
        digest_of("bob-key"),
        up.addr
    )
}

fn get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Response {
    request(gw.addr, "GET", "h", path, headers, b"")
}

/// Statuses of `n` requests.
fn statuses(gw: &Gateway, n: usize, path: &str, headers: &[(&str, &str)]) -> Vec<u16> {
    (0..n).map(|_| get(gw, path, headers).status).collect()
}

#[test]
fn a_burst_then_429_with_the_ratelimit_headers() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&routes(&up, ""));
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let resp = get(&gw, "/ip", &[]);
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("ratelimit-limit"), Some("3"));
        remaining.push(resp.header("ratelimit-remaining").unwrap().to_owned());
        assert!(
            resp.header("ratelimit-reset")
                .unwrap()
                .parse::<u64>()
                .unwrap()
                <= 180
        );
        assert_eq!(resp.header("retry-after"), None);
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let refused = get(&gw, "/ip", &[]);
    assert_eq!(refused.assert_gateway_error(429), "rate_limited");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    assert_eq!(up.hits(), 3, "a refused request reached the upstream");
    // Routes without a limit carry no headers, and are not limited.
    let open = get(&gw, "/other", &[]);
    assert_eq!(open.status, 200);
    assert_eq!(open.header("ratelimit-limit"), None);
}

#[test]
fn keys_by_header_consumer_and_route() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&routes(&up, ""));
    // One bucket per tenant.
    assert_eq!(
        statuses(&gw, 2, "/tenant", &[("X-Tenant", "a")]),
        [200, 429]
    );
    assert_eq!(
        statuses(&gw, 2, "/tenant", &[("X-Tenant", "b")]),
        [200, 429]
    );
    // Per consumer; alice has her own, smaller limit.
    assert_eq!(
        statuses(&gw, 5, "/consumer", &[("X-API-Key", "bob-key")]),
        [200, 200, 200, 200, 429]
    );
    let alice = get(&gw, "/consumer", &[("X-API-Key", "alice-key")]);
    assert_eq!(alice.header("ratelimit-limit"), Some("2"));
    assert_eq!(
        statuses(&gw, 2, "/consumer", &[("X-API-Key", "alice-key")]),
        [200, 429]
    );
    // One bucket for the whole route, whoever calls.
    assert_eq!(statuses(&gw, 1, "/shared", &[("X-Tenant", "a")]), [200]);
    assert_eq!(
        statuses(&gw, 2, "/shared", &[("X-Tenant", "b")]),
        [200, 429]
    );
}

#[test]
fn forwarded_for_counts_only_from_trusted_proxies() {
    let up = Upstream::start("a");
    // Untrusted: every claimed client is the peer, 127.0.0.1.
    let gw = Gateway::start(&routes(&up, ""));
    let claims = ["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"];
    let got: Vec<u16> = claims
        .iter()
        .map(|ip| get(&gw, "/ip", &[("X-Forwarded-For", ip)]).status)
        .collect();
    assert_eq!(got, [200, 200, 200, 429]);
    assert_eq!(
        get(&gw, "/guarded", &[("X-Forwarded-For", "203.0.113.9")]).status,
        200
    );
    drop(gw);

    // Trusted: the address the proxy reports is the client.
    let gw = Gateway::start(&routes(&up, "trusted_proxies: [127.0.0.0/8]\n"));
    for ip in claims {
        assert_eq!(statuses(&gw, 1, "/ip", &[("X-Forwarded-For", ip)]), [200]);
    }
    let chain = [("X-Forwarded-For", "1.1.1.1, 127.0.0.5")];
    assert_eq!(statuses(&gw, 3, "/ip", &chain), [200, 200, 429]);
    assert_eq!(
        get(&gw, "/guarded", &[("X-Forwarded-For", "203.0.113.9")]).assert_gateway_error(403),
        "forbidden"
    );
    // The upstream still learns the whole chain, the peer appended.
    let resp = get(&gw, "/open", &[("X-Forwarded-For", "198.51.100.1")]);
    assert_eq!(
        resp.upstream_header("x-forwarded-for").as_deref(),
        Some("198.51.100.1, 127.0.0.1")
    );
}

#[test]
fn a_flood_gets_no_more_than_burst_plus_rate_times_t() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&routes(&up, ""));
    let start = std::time::Instant::now();
    let mut allowed = 0u32;
    let mut sent = 0u32;
    while sent < 300 {
        if get(&gw, "/fast", &[]).status == 200 {
            allowed += 1;
        }
        sent += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // 20/s after a burst of 5: the bound holds whatever the pace; a
    // client this fast also gets at least the burst.
    let bound = 5.0 + 20.0 * elapsed;
    println!("{allowed} of {sent} allowed in {elapsed:.2} s (bound {bound:.1})");
    assert!(
        f64::from(allowed) <= bound + 1.0,
        "{allowed} allowed, bound {bound:.1}"
    );
    assert!(allowed >= 5);
    assert!(allowed < sent, "nothing was limited");
}

#[test]
fn buckets_survive_a_reload_unless_their_limit_changed() {
    let up = Upstream::start("a");
    let body = routes(&up, "");
    let gw = Gateway::start(&body);
    assert_eq!(statuses(&gw, 4, "/ip", &[]), [200, 200, 200, 429]);
    assert_eq!(
        statuses(&gw, 2, "/tenant", &[("X-Tenant", "a")]),
        [200, 429]
    );
    // Another route changes: these buckets stay as they were.
    let changed_elsewhere = body.replace("name: open,", "name: open2,");
    assert!(gw.reload_with(&changed_elsewhere)["last_reload_error"].is_null());
    assert_eq!(statuses(&gw, 1, "/ip", &[]), [429]);
    // The limit itself changes: it starts fresh.
    let changed = changed_elsewhere.replace("rate: 1/m, burst: 3", "rate: 1/m, burst: 2");
    assert!(gw.reload_with(&changed)["last_reload_error"].is_null());
    assert_eq!(statuses(&gw, 3, "/ip", &[]), [200, 200, 429]);
    assert_eq!(statuses(&gw, 1, "/tenant", &[("X-Tenant", "a")]), [429]);
}

#[test]
fn t_checks_rate_limits() {
    let text = "listen: [\"127.0.0.1:1\"]\ntrusted_proxies: [10.0.0.1/8]\nconsumers:\n  c: { rate_limit: { rate: 5/d } }\nupstreams:\n  app: { targets: [\"127.0.0.1:2\"] }\nroutes:\n  - { name: a, path_prefix: /a, upstream: app, rate_limit: { key: consumer, rate: 0/s } }\n  - { name: b, path_prefix: /b, upstream: app, rate_limit: { key: \"header:bad header\", rate: 1/s, burst: 0, scope: cluster } }\n";
    let (code, _, err) = support::check_config(text);
    assert_ne!(code, 0);
    for expected in [
        "trusted_proxies[0]",
        "consumers.c.rate_limit.rate",
        "routes[0].rate_limit.key: consumer needs auth",
        "routes[0].rate_limit.rate",
        "routes[1].rate_limit.key",
        "routes[1].rate_limit.burst",
        "routes[1].rate_limit.scope",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

/// An upstream that holds every request until released.
struct Held {
    server: support::upstream::Scripted,
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Held {
    fn start() -> Held {
        use std::io::Write;
        use std::sync::atomic::{AtomicBool, Ordering};
        let release = std::sync::Arc::new(AtomicBool::new(false));
        let released = std::sync::Arc::clone(&release);
        let server = support::upstream::Scripted::start(move |_, _, _, w| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !released.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .is_ok()
        });
        Held { server, release }
    }

    fn let_go(&self) {
        self.release
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Starts `n` requests that will wait at the upstream; returns their
/// threads once the upstream holds all of them.
fn hold(
    gw: &Gateway,
    held: &Held,
    path: &'static str,
    header: (&'static str, &'static str),
    n: usize,
) -> Vec<std::thread::JoinHandle<u16>> {
    let before = held.server.hits();
    let addr = gw.addr;
    let threads: Vec<_> = (0..n)
        .map(|_| std::thread::spawn(move || request(addr, "GET", "h", path, &[header], b"").status))
        .collect();
    gw.wait_until("the upstream holds the requests", || {
        held.server.hits() >= before + n
    });
    threads
}

#[test]
fn requests_over_max_inflight_get_503_at_once() {
    let held = Held::start();
    let gw = Gateway::start(&format!(
        "upstreams:\n  slow: {{ targets: [\"{}\"], max_inflight: 3 }}\nroutes:\n  - {{ name: r, path_prefix: /r, upstream: slow, max_inflight: 2 }}\n  - {{ name: other, path_prefix: /other, upstream: slow }}\n",
        held.server.addr
    ));
    let no_header = ("X-Nothing", "1");
    // The route's ceiling: two in progress, the third refused.
    let route = hold(&gw, &held, "/r", no_header, 2);
    let refused = get(&gw, "/r", &[]);
    assert_eq!(refused.assert_gateway_error(503), "overloaded");
    // The upstream's ceiling (3) counts every route to it.
    let other = hold(&gw, &held, "/other", no_header, 1);
    assert_eq!(
        get(&gw, "/other", &[]).assert_gateway_error(503),
        "overloaded"
    );
    held.let_go();
    for t in route.into_iter().chain(other) {
        assert_eq!(t.join().unwrap(), 200);
    }
    // Every place is given back (refusals included), as each request's
    // context ends just after its answer went out.
    gw.wait_until("the places are given back", || {
        statuses(&gw, 2, "/r", &[]) == [200, 200]
    });
}

#[test]
fn max_inflight_per_client_counts_each_client() {
    let held = Held::start();
    let gw = Gateway::start(&format!(
        "upstreams:\n  slow: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: tenant, path_prefix: /tenant, upstream: slow, max_inflight_per_client: 1, rate_limit: {{ key: \"header:X-Tenant\", rate: 1000/s }} }}\n",
        held.server.addr
    ));
    let a = hold(&gw, &held, "/tenant", ("X-Tenant", "a"), 1);
    assert_eq!(
        get(&gw, "/tenant", &[("X-Tenant", "a")]).assert_gateway_error(503),
        "overloaded"
    );
    let b = hold(&gw, &held, "/tenant", ("X-Tenant", "b"), 1);
    held.let_go();
    for t in a.into_iter().chain(b) {
        assert_eq!(t.join().unwrap(), 200);
    }
    // A place is given back as the request's context ends, just after its
    // answer went out.
    gw.wait_until("tenant a's place is given back", || {
        get(&gw, "/tenant", &[("X-Tenant", "a")]).status == 200
    });
}

#[test]
fn a_key_flood_never_refills_an_active_bucket() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&format!(
        "upstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: tenants, path_prefix: /t, upstream: app, rate_limit: {{ key: \"header:X-Tenant\", rate: 1/m, burst: 3, max_keys: 1000 }} }}\n",
        up.addr
    ));
    let victim = [("X-Tenant", "victim")];
    assert_eq!(statuses(&gw, 4, "/t", &victim), [200, 200, 200, 429]);

    // 1,500 tenants never seen before, as fast as one connection goes.
    let mut conn = support::Connection::open(gw.addr);
    let mut allowed = 0;
    for i in 0..1500 {
        let tenant = format!("flood-{i}");
        conn.send("GET", "h", "/t", &[("X-Tenant", tenant.as_str())], b"");
        allowed += usize::from(conn.read_response().status == 200);
    }
    // A tenant of the flood with a bucket of its own keeps it.
    let flood_0 = [("X-Tenant", "flood-0")];
    assert_eq!(statuses(&gw, 3, "/t", &flood_0), [200, 200, 429]);
    // Sweeps run every second: across several, the drained buckets stay
    // as drained as they were.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < end {
        get(&gw, "/t", &victim).assert_gateway_error(429);
        get(&gw, "/t", &flood_0).assert_gateway_error(429);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // 999 of the flood got a bucket of their own (the victim holds the
    // 1000th); the rest shared one, burst 3.
    assert!(
        (999..=1010).contains(&allowed),
        "{allowed} of the flood allowed"
    );
    gw.wait_until("the full table is reported", || {
        gw.log()
            .contains("max_keys (1000) keys have requests in their buckets")
    });
}

/// Addresses of one /64: a host handed a whole /64 has them all.
const IN_ONE_64: [&str; 3] = ["2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:1:ffff::9"];

#[test]
fn ipv6_clients_count_by_their_64_by_default() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&format!(
        "trusted_proxies: [127.0.0.0/8]\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: by-ip, path_prefix: /ip, upstream: app, rate_limit: {{ rate: 1/m, burst: 2 }} }}\n",
        up.addr
    ));
    let from = |ip: &str| get(&gw, "/ip", &[("X-Forwarded-For", ip)]).status;
    assert_eq!(IN_ONE_64.map(from), [200, 200, 429]);
    assert_eq!(from("2001:db8:0:2::1"), 200, "another /64");
    // IPv4 clients are whole addresses.
    assert_eq!(
        ["192.0.2.1", "192.0.2.2", "192.0.2.3"].map(from),
        [200, 200, 200]
    );
}

#[test]
fn ipv6_prefix_sets_how_much_of_an_address_is_one_client() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&format!(
        "trusted_proxies: [127.0.0.0/8]\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: by-48, path_prefix: /48, upstream: app, rate_limit: {{ rate: 1/m, burst: 2, ipv6_prefix: 48 }} }}\n  - {{ name: by-128, path_prefix: /128, upstream: app, rate_limit: {{ rate: 1/m, burst: 2, ipv6_prefix: 128 }} }}\n",
        up.addr
    ));
    let from = |path: &str, ip: &str| get(&gw, path, &[("X-Forwarded-For", ip)]).status;
    // /48: a whole site; /128: every address.
    let got: Vec<u16> = ["2001:db8:0:1::1", "2001:db8:0:2::1", "2001:db8:0:3::1"]
        .iter()
        .map(|ip| from("/48", ip))
        .collect();
    assert_eq!(got, [200, 200, 429]);
    let got: Vec<u16> = IN_ONE_64.iter().map(|ip| from("/128", ip)).collect();
    assert_eq!(got, [200, 200, 200]);

    // The key is checked.
    let (code, _, err) = support::check_config(
        "listen: [\"127.0.0.1:1\"]\nupstreams:\n  app: { targets: [\"127.0.0.1:2\"] }\nroutes:\n  - { name: a, path_prefix: /, upstream: app, rate_limit: { rate: 1/s, ipv6_prefix: 129 } }\n",
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("routes[0].rate_limit.ipv6_prefix: 129 is not a prefix length"),
        "{err}"
    );
}

#[test]
fn max_inflight_per_client_counts_an_ipv6_client_by_its_prefix() {
    let held = Held::start();
    let gw = Gateway::start(&format!(
        "trusted_proxies: [127.0.0.0/8]\nupstreams:\n  slow: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: r, path_prefix: /r, upstream: slow, max_inflight_per_client: 1 }}\n",
        held.server.addr
    ));
    let a = hold(&gw, &held, "/r", ("X-Forwarded-For", IN_ONE_64[0]), 1);
    // Another address of the same /64: the same client, already at 1.
    let same_64 = [("X-Forwarded-For", IN_ONE_64[1])];
    assert_eq!(
        get(&gw, "/r", &same_64).assert_gateway_error(503),
        "overloaded"
    );
    let b = hold(&gw, &held, "/r", ("X-Forwarded-For", "2001:db8:0:2::1"), 1);
    held.let_go();
    for t in a.into_iter().chain(b) {
        assert_eq!(t.join().unwrap(), 200);
    }
}
