//! Global rate limits: a real redis-server started here on a free port,
//! two gateway processes sharing it, Redis going away and coming back.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::upstream::Upstream;
use support::{free_port, scratch_dir, Gateway};

/// A redis-server of the test's own, stopped when dropped.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    /// Extra `redis-server` arguments (`--requirepass x`).
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    fn start_with(args: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            dir: scratch_dir("redis"),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        server.run();
        server
    }

    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (scripts/install-deps.sh installs it)");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command (after `AUTH password`, when given) and returns
    /// its reply's first line (`+OK`, `-ERR ...`).
    fn command(&self, password: Option<&str>, args: &[&str]) -> String {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        stream.set_read_timeout(Some(support::WAIT)).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut reply = String::new();
        let auth = password.map(|p| vec!["AUTH", p]);
        for command in auth.iter().map(Vec::as_slice).chain([args]) {
            let mut raw = format!("*{}\r\n", command.len());
            for arg in command {
                raw.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
            }
            writer.write_all(raw.as_bytes()).unwrap();
            reply.clear();
            reader.read_line(&mut reply).expect("redis reply");
        }
        reply.trim_end().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(redis: &RedisServer, up: &Upstream, on_error: &str) -> String {
    config_at(&redis.url(), up, on_error)
}

fn config_at(url: &str, up: &Upstream, on_error: &str) -> String {
    format!(
        "redis: {{ url: \"{url}\", timeout: 500ms, on_error: {on_error} }}\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: global, path_prefix: /g, upstream: app, rate_limit: {{ rate: 1/m, burst: 5, scope: global }} }}\n",
        up.addr
    )
}

fn connected(gw: &Gateway) -> bool {
    gw.admin_get("/config").json()["redis"]["connected"] == true
}

/// `GET /config`'s `redis` section.
fn redis_status(gw: &Gateway) -> serde_json::Value {
    gw.admin_get("/config").json()["redis"].clone()
}

/// `tollgate_redis_errors_total` as `/metrics` shows it.
fn metric_redis_errors(gw: &Gateway) -> u64 {
    let text = String::from_utf8(gw.admin_get("/metrics").body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("tollgate_redis_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tollgate_redis_errors_total in:\n{text}"))
}

#[test]
fn two_gateways_share_one_bucket() {
    let redis = RedisServer::start();
    let up = Upstream::start("a");
    let one = Gateway::start(&config(&redis, &up, "allow"));
    let two = Gateway::start(&config(&redis, &up, "allow"));
    for gw in [&one, &two] {
        gw.wait_until("connected to Redis", || connected(gw));
    }
    let mut statuses = Vec::new();
    let mut remaining = Vec::new();
    for i in 0..8 {
        let gw = if i % 2 == 0 { &one } else { &two };
        let resp = gw.get("h", "/g");
        statuses.push(resp.status);
        remaining.push(resp.header("ratelimit-remaining").unwrap_or("-").to_owned());
    }
    // Five in all, not five per gateway; the count runs across both.
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(remaining[..5], ["4", "3", "2", "1", "0"]);
    assert_eq!(up.hits(), 5);
}

#[test]
fn redis_down_follows_on_error_and_its_return_restores_the_limit() {
    let mut redis = RedisServer::start();
    let up = Upstream::start("a");
    let allow = Gateway::start(&config(&redis, &up, "allow"));
    let deny = Gateway::start(&config(&redis, &up, "deny"));
    for gw in [&allow, &deny] {
        gw.wait_until("connected to Redis", || connected(gw));
    }
    assert_eq!(allow.get("h", "/g").header("ratelimit-limit"), Some("5"));

    redis.stop();
    for _ in 0..10 {
        let resp = allow.get("h", "/g");
        assert_eq!(resp.status, 200, "on_error: allow");
        assert_eq!(
            resp.header("ratelimit-limit"),
            None,
            "no figures without Redis"
        );
        assert_eq!(
            deny.get("h", "/g").assert_gateway_error(429),
            "rate_limited"
        );
    }
    let status = allow.admin_get("/config").json();
    assert_eq!(status["redis"]["failing"], true);
    assert!(status["redis"]["errors"].as_u64().unwrap() >= 10);
    let logged = allow
        .log()
        .matches("global rate limits allow requests")
        .count();
    assert_eq!(logged, 1, "one log line per incident:\n{}", allow.log());

    // Redis comes back on the same port: the limit applies again (a fresh
    // Redis: the bucket starts full).
    redis.run();
    allow.wait_until("limits again", || {
        allow.get("h", "/g").header("ratelimit-limit") == Some("5")
    });
    deny.wait_until("limits again", || deny.get("h", "/g").status == 200);
    assert!(allow.log().contains("answers again"), "{}", allow.log());
}

#[test]
fn t_checks_the_redis_section() {
    let (code, _, err) = support::check_config(
        "listen: [\"127.0.0.1:1\"]\nredis: { url: \"http://nope\", on_error: maybe }\nupstreams:\n  app: { targets: [\"127.0.0.1:2\"] }\nroutes:\n  - { name: a, path_prefix: /, upstream: app, rate_limit: { rate: 1/s, scope: global } }\n",
    );
    assert_ne!(code, 0);
    assert!(err.contains("redis.on_error"), "{err}");
    let (code, _, err) = support::check_config(
        "listen: [\"127.0.0.1:1\"]\nupstreams:\n  app: { targets: [\"127.0.0.1:2\"] }\nroutes:\n  - { name: a, path_prefix: /, upstream: app, rate_limit: { rate: 1/s, scope: global } }\n",
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("routes[0].rate_limit.scope: global limits are kept in Redis"),
        "{err}"
    );
}

#[test]
fn a_refusal_by_on_error_deny_says_when_to_retry() {
    let mut redis = RedisServer::start();
    let up = Upstream::start("a");
    let gw = Gateway::start(&config(&redis, &up, "deny"));
    gw.wait_until("connected to Redis", || connected(&gw));
    redis.stop();
    let refused = gw.get("h", "/g");
    assert_eq!(refused.assert_gateway_error(429), "rate_limited");
    // The error body sends the client to Retry-After; without Redis's
    // figures there are no RateLimit-* headers, but a retry time there is.
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.header("ratelimit-limit"), None);
    assert_eq!(up.hits(), 0);
}

#[test]
fn redis_back_after_an_outage_is_used_again_within_seconds() {
    let mut redis = RedisServer::start();
    let up = Upstream::start("a");
    let gw = Gateway::start(&config(&redis, &up, "allow"));
    gw.wait_until("connected to Redis", || connected(&gw));

    redis.stop();
    gw.wait_until("the loss is seen", || {
        assert_eq!(gw.get("h", "/g").status, 200, "on_error: allow");
        redis_status(&gw)["failing"] == true
    });
    // An outage of several seconds, under traffic: long enough for
    // redis-rs's own reconnection backoff to have grown past a minute.
    let outage_end = Instant::now() + Duration::from_secs(7);
    while Instant::now() < outage_end {
        assert_eq!(gw.get("h", "/g").status, 200, "on_error: allow");
        std::thread::sleep(Duration::from_millis(250));
    }
    redis.run();
    // Within the harness's wait (15 s), not a minute or two.
    gw.wait_until("connected again", || connected(&gw));
    gw.wait_until("the limit applies again", || {
        gw.get("h", "/g").header("ratelimit-limit") == Some("5")
    });
    assert_eq!(redis_status(&gw)["failing"], false);
    assert!(gw.log().contains("answers again"), "{}", gw.log());
}

#[test]
fn a_refused_auth_at_start_is_shown_logged_once_and_retried() {
    let redis = RedisServer::start_with(&["--requirepass", "other"]);
    let up = Upstream::start("a");
    let url = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    let gw = Gateway::start(&config_at(&url, &up, "allow"));
    // Failing from the start, with the cause in the log, once.
    gw.wait_until("the refusal is shown", || {
        redis_status(&gw)["failing"] == true
    });
    let status = redis_status(&gw);
    assert_eq!(status["connected"], false, "{status}");
    assert!(status["errors"].as_u64().unwrap() >= 1, "{status}");
    assert!(metric_redis_errors(&gw) >= 1);
    gw.wait_until("a few more attempts", || {
        redis_status(&gw)["errors"].as_u64().unwrap() >= 3
    });
    let log = gw.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot connect"))
        .collect();
    assert_eq!(refusals.len(), 1, "one line per incident:\n{log}");
    assert!(
        refusals[0].contains("AuthenticationFailed"),
        "the cause: {}",
        refusals[0]
    );
    assert_eq!(gw.get("h", "/g").status, 200, "on_error: allow");

    // The password is put right on the server: connected within seconds.
    assert_eq!(
        redis.command(Some("other"), &["CONFIG", "SET", "requirepass", "s3cret"]),
        "+OK"
    );
    gw.wait_until("connected", || connected(&gw));
    gw.wait_until("the limit applies", || {
        gw.get("h", "/g").header("ratelimit-limit") == Some("5")
    });
    assert_eq!(redis_status(&gw)["failing"], false);
}

#[test]
fn a_paused_redis_follows_on_error_then_limits_again() {
    let redis = RedisServer::start();
    let up = Upstream::start("a");
    let gw = Gateway::start(&config(&redis, &up, "deny"));
    gw.wait_until("connected to Redis", || connected(&gw));
    assert_eq!(gw.get("h", "/g").header("ratelimit-remaining"), Some("4"));

    assert_eq!(
        redis.command(None, &["CLIENT", "PAUSE", "4000", "ALL"]),
        "+OK"
    );
    let refused = gw.get("h", "/g");
    assert_eq!(refused.assert_gateway_error(429), "rate_limited");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(redis_status(&gw)["failing"], true);
    // Once the pause ends, the same bucket counts on (the refused
    // request's script was queued by Redis and ran after the pause: a
    // decision that timed out may still have taken its token).
    gw.wait_until("Redis answers again", || {
        redis_status(&gw)["failing"] == false
    });
    let next = gw.get("h", "/g");
    assert_eq!(next.status, 200);
    assert_eq!(next.header("ratelimit-remaining"), Some("2"));
    assert!(connected(&gw));
}

#[test]
fn the_redis_password_is_never_shown() {
    let mut redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let up = Upstream::start("a");
    let url = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    let gw = Gateway::start(&config_at(&url, &up, "allow"));
    gw.wait_until("connected to Redis", || connected(&gw));
    let shown = gw.admin_get("/config");
    let text = String::from_utf8_lossy(&shown.body).into_owned();
    assert!(!text.contains("s3cret"), "{text}");
    assert_eq!(
        shown.json()["redis"]["url"],
        format!("redis://:***@127.0.0.1:{}", redis.port)
    );
    // An incident and its end: every line about it names the server.
    redis.stop();
    gw.wait_until("the loss is seen", || {
        assert_eq!(gw.get("h", "/g").status, 200);
        redis_status(&gw)["failing"] == true
    });
    redis.run();
    gw.wait_until("answers again", || gw.log().contains("answers again"));
    let log = gw.log();
    assert!(
        log.contains(&format!("redis://:***@127.0.0.1:{}", redis.port)),
        "{log}"
    );
    assert!(!log.contains("s3cret"), "{log}");
    // Nor in the errors of a config check.
    let (code, out, err) = support::check_config(
        "listen: [\"127.0.0.1:1\"]\nredis: { url: \"http://:s3cret@127.0.0.1:1\" }\nupstreams:\n  app: { targets: [\"127.0.0.1:2\"] }\nroutes:\n  - { name: a, path_prefix: /, upstream: app, rate_limit: { rate: 1/s, scope: global } }\n",
    );
    assert_ne!(code, 0);
    assert!(err.contains("redis.url"), "{err}");
    assert!(
        !err.contains("s3cret") && !out.contains("s3cret"),
        "{out}{err}"
    );
    // Nor when the URL is too malformed to be taken apart, or the section
    // is not even a mapping (the parser quotes the value back).
    for redis in [
        "{ url: \"redis:///:s3cret@127.0.0.1:1\" }",
        "{ url: \"redis:s3cret@127.0.0.1:1\" }",
        "\"redis://:s3cret@127.0.0.1:1\"",
    ] {
        let (code, out, err) = support::check_config(&format!(
            "listen: [\"127.0.0.1:1\"]\nredis: {redis}\nupstreams:\n  app: {{ targets: [\"127.0.0.1:2\"] }}\nroutes:\n  - {{ name: a, path_prefix: /, upstream: app }}\n"
        ));
        assert_ne!(code, 0, "{redis}");
        assert!(err.contains("redis"), "{err}");
        assert!(
            !err.contains("s3cret") && !out.contains("s3cret"),
            "{redis}: {out}{err}"
        );
    }
}

/// Global limits by tenant header, by consumer, and a consumer's own.
fn keyed_config(redis: &RedisServer, up: &Upstream) -> String {
    use tollgate::auth::api_key::digest_of;
    format!(
        "redis: {{ url: \"{}\", timeout: 500ms, on_error: allow }}\nauth:\n  api_keys: {{ header: X-API-Key }}\nconsumers:\n  alice: {{ api_keys: [\"{}\"], rate_limit: {{ rate: 1/m, burst: 2 }} }}\n  bob: {{ api_keys: [\"{}\"] }}\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: tenant, path_prefix: /tenant, upstream: app, rate_limit: {{ key: \"header:X-Tenant\", rate: 1/m, burst: 3, scope: global }} }}\n  - {{ name: consumer, path_prefix: /consumer, upstream: app, auth: [api_key], rate_limit: {{ key: consumer, rate: 1/m, burst: 3, scope: global }} }}\n",
        redis.url(),
        digest_of("alice-key"),
        digest_of("bob-key"),
        up.addr
    )
}

/// Statuses of three requests through `one`, then three through `two`.
fn three_each(one: &Gateway, two: &Gateway, path: &str, header: (&str, &str)) -> Vec<u16> {
    [one, one, one, two, two, two]
        .iter()
        .map(|gw| support::request(gw.addr, "GET", "h", path, &[header], b"").status)
        .collect()
}

#[test]
fn header_and_consumer_keys_are_one_bucket_for_every_gateway_and_restart() {
    let redis = RedisServer::start();
    let up = Upstream::start("a");
    let body = keyed_config(&redis, &up);
    let one = Gateway::start(&body);
    let mut two = Gateway::start(&body);
    for gw in [&one, &two] {
        gw.wait_until("connected to Redis", || connected(gw));
    }
    // burst 3 in all, not 3 per gateway.
    let tenant = ("X-Tenant", "acme");
    let bob = ("X-API-Key", "bob-key");
    let alice = ("X-API-Key", "alice-key");
    assert_eq!(
        three_each(&one, &two, "/tenant", tenant),
        [200, 200, 200, 429, 429, 429]
    );
    assert_eq!(
        three_each(&one, &two, "/consumer", bob),
        [200, 200, 200, 429, 429, 429]
    );
    // A consumer's own limit (burst 2) is global too.
    assert_eq!(
        three_each(&one, &two, "/consumer", alice),
        [200, 200, 429, 429, 429, 429]
    );
    // Another tenant has its own bucket.
    assert_eq!(
        three_each(&one, &two, "/tenant", ("X-Tenant", "other")),
        [200, 200, 200, 429, 429, 429]
    );

    // A restarted gateway finds the buckets as they were.
    drop(std::mem::replace(&mut two, Gateway::start(&body)));
    two.wait_until("connected to Redis", || connected(&two));
    for (path, header) in [
        ("/tenant", tenant),
        ("/consumer", bob),
        ("/consumer", alice),
    ] {
        let refused = support::request(two.addr, "GET", "h", path, &[header], b"");
        assert_eq!(refused.assert_gateway_error(429), "rate_limited", "{path}");
    }
    // Redis holds no raw value: the tenant is a digest.
    let keys = redis.command(None, &["KEYS", "*acme*"]);
    assert_eq!(keys, "*0", "a Redis key names the tenant");
}
