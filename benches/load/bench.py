#!/usr/bin/env python3
"""Load benchmarks: tollgate against nginx, HAProxy, Caddy, a bare Pingora
proxy and the seed's Flask and Go gateways, on one machine, in one run.

Method (docs/performance.md): the proxy under test is pinned to core 0, the
load generator and the upstream (nginx, fixed ~100-byte JSON body,
keepalive) share core 1. Load is HTTP/1.1 keepalive over 64 connections.

For each scenario:
  - max requests/s, closed loop (wrk);
  - proxy CPU microseconds per request (utime+stime of the proxy's process
    tree from /proc over the wrk run, divided by the requests served);
  - peak RSS of the proxy's process tree;
  - p50 / p99 / p99.9 latency at a fixed rate (oha -q with latency
    correction), at 80% of the slower of nginx's and tollgate's max, so
    coordinated omission does not hide the tail;
  - errors.
Then memory: RSS idle, holding 10,000 idle keepalive client connections,
and after they close.

A scenario is a few lines in SCENARIOS below. BENCH_QUICK=1 shortens every
phase; BENCH_ONLY=name1,name2 runs a subset; BENCH_PHASES=max (or
max,latency, ...) runs only those phases.
"""

import asyncio
import hashlib
import json
import statistics
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "benches" / "load"
RESULTS = ROOT / "benches" / "results"
RAW = RESULTS / "raw"
TOOLS = ROOT / "benches" / ".tools" / "bin"

QUICK = os.environ.get("BENCH_QUICK") == "1"
DURATION = 4 if QUICK else 15
# The max phase runs every scenario ROUNDS times, interleaved, for
# DURATION / ROUNDS seconds each and reports medians: on a shared VM one
# 15 s run of a scenario can be 20% off the next one.
ROUNDS = 1 if QUICK else 3
LATENCY_DURATION = 4 if QUICK else 15
# The max phase runs every scenario ROUNDS times, interleaved, for
# DURATION / ROUNDS seconds each and reports medians: on a shared VM one
# 15 s run of a scenario can be 20% off the next one.
ROUNDS = 1 if QUICK else 3
CONNECTIONS = 64
IDLE_CONNECTIONS = 10_000
PROXY_CPU = "0"
LOAD_CPU = "1"
UPSTREAM = ("127.0.0.1", 18000)
PROXY = ("127.0.0.1", 18080)
BODY = '{"ok":true,"service":"bench-upstream","message":"a fixed body of about one hundred bytes!!"}'


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# ---------------------------------------------------------------- processes

def wait_port(addr, timeout=20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(addr, timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def port_free(addr) -> bool:
    try:
        with socket.create_connection(addr, timeout=0.2):
            return False
    except OSError:
        return True


def tree(pid: int) -> list:
    """pid and all its descendants."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / ticks


def memory_kb(pids, key: str) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Proc:
    """A process started pinned to a core, its output kept under RAW."""

    def __init__(self, name, argv, env=None, cpu=PROXY_CPU, cwd=None):
        self.name = name
        out = open(RAW / f"{name}.log", "w")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = subprocess.Popen(
            ["taskset", "-c", cpu] + argv,
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=full_env, cwd=cwd, start_new_session=True,
        )

    def pids(self):
        return tree(self.p.pid)

    def stop(self):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()


# ---------------------------------------------------------------- peers' configs

def nginx_conf(name: str, server_block: str, upstream_block: str = "") -> Path:
    d = RAW / name
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 20000; }}
worker_rlimit_nofile 65536;
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  {upstream_block}
  server {{ {server_block} }}
}}
""")
    return conf


def start_upstream() -> Proc:
    conf = nginx_conf(
        "upstream",
        f"listen {UPSTREAM[0]}:{UPSTREAM[1]} reuseport backlog=4096;\n"
        f"  location / {{ default_type application/json; return 200 '{BODY}'; }}",
    )
    return Proc("upstream-nginx", ["nginx", "-c", str(conf)], cpu=LOAD_CPU)


def start_nginx_proxy() -> Proc:
    conf = nginx_conf(
        "nginx-proxy",
        f"listen {PROXY[0]}:{PROXY[1]} backlog=4096;\n"
        "  location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }",
        f"upstream backend {{ server {UPSTREAM[0]}:{UPSTREAM[1]}; keepalive 128; }}",
    )
    return Proc("nginx", ["nginx", "-c", str(conf)])


def bench_certificate() -> tuple:
    """A self-signed P-256 certificate for the TLS scenarios, made once:
    nginx and tollgate serve the same one."""
    d = RAW / "tls"
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "bench.pem", d / "bench.key"
    if not cert.exists() or not key.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "30", "-subj", "/CN=bench.test",
             "-addext", "subjectAltName=DNS:bench.test"],
            check=True, capture_output=True,
        )
    return cert, key


def start_nginx_tls() -> Proc:
    """nginx terminating TLS (HTTP/2 by ALPN, as tollgate's listener) in
    front of the same upstream."""
    cert, key = bench_certificate()
    conf = nginx_conf(
        "nginx-tls",
        f"listen {PROXY[0]}:{PROXY[1]} ssl http2 backlog=4096;\n"
        f"  ssl_certificate {cert}; ssl_certificate_key {key};\n"
        "  ssl_protocols TLSv1.2 TLSv1.3;\n"
        "  location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }",
        f"upstream backend {{ server {UPSTREAM[0]}:{UPSTREAM[1]}; keepalive 128; }}",
    )
    return Proc("nginx-tls", ["nginx", "-c", str(conf)])


def start_haproxy() -> Proc:
    d = RAW / "haproxy"
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "haproxy.cfg"
    conf.write_text(f"""
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  option http-keep-alive
frontend fe
  bind {PROXY[0]}:{PROXY[1]}
  default_backend be
backend be
  http-reuse always
  server s1 {UPSTREAM[0]}:{UPSTREAM[1]}
""")
    return Proc("haproxy", ["haproxy", "-f", str(conf)])


def start_caddy() -> Proc:
    d = RAW / "caddy"
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "Caddyfile"
    conf.write_text(f"""{{
  admin off
  auto_https off
}}
http://{PROXY[0]}:{PROXY[1]} {{
  reverse_proxy {UPSTREAM[0]}:{UPSTREAM[1]}
}}
""")
    return Proc("caddy", ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"],
                env={"GOMAXPROCS": "1", "HOME": str(d), "XDG_DATA_HOME": str(d), "XDG_CONFIG_HOME": str(d)})


BENCH_API_KEY = "bench-key-0123456789abcdef"
BENCH_JWT_SECRET = "bench-jwt-secret-0123456789abcdef"


def bench_jwt() -> str:
    """An HS256 token for the bench provider, valid for a day: the same
    token on every request, so the gateway verifies it once and then
    finds it in its cache."""
    import base64
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "bench"}).encode())
    now = int(time.time())
    payload = b64(json.dumps({"sub": "bench-user", "iss": "https://id.bench", "aud": "bench",
                              "iat": now, "exp": now + 86400, "scope": "bench:read"}).encode())
    signature = hmac.new(BENCH_JWT_SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def auth_headers(auth: Optional[str]) -> list:
    """What the load generators send for a BENCH_AUTH mode: the same
    header with and without authentication on the route (`header`,
    `bearer`), so the difference is what authenticating costs."""
    if auth in ("api_key", "header"):
        return [("X-API-Key", BENCH_API_KEY)]
    if auth in ("jwt", "bearer"):
        return [("Authorization", f"Bearer {bench_jwt()}")]
    return []


def tollgate_config(name: str, routes: int, auth: Optional[str] = None, limit: Optional[str] = None,
                    access_log: bool = False, tls: bool = False) -> Path:
    d = RAW / name
    d.mkdir(parents=True, exist_ok=True)
    lines = [
        "server:",
        "  threads: 1",
        f"  pid_file: {d}/tollgate.pid",
        f"  upgrade_sock: {d}/upgrade.sock",
        "  grace_period_seconds: 0",
        "  graceful_shutdown_timeout_seconds: 0",
        f'listen: ["{PROXY[0]}:{PROXY[1]}"]',
        "upstreams:",
        f'  backend: {{ targets: ["{UPSTREAM[0]}:{UPSTREAM[1]}"]'
        # BENCH_BREAKER=1: a circuit breaker on the upstream (never opens).
        + (", circuit_breaker: {}" if os.environ.get("BENCH_BREAKER") == "1" else "") + " }",
        "routes:",
    ]
    # auth (or BENCH_AUTH) = api_key puts the route behind an API key, jwt
    # behind a JWT provider (the load generators then send auth_headers):
    # the cost of authentication.
    auth = auth or os.environ.get("BENCH_AUTH")
    limit = limit or os.environ.get("BENCH_LIMIT")
    # access_log (or BENCH_ACCESS_LOG=1): the access log to a file.
    if access_log or os.environ.get("BENCH_ACCESS_LOG") == "1":
        lines[lines.index("upstreams:"):lines.index("upstreams:")] = [f'access_log: {{ path: "{d}/access.log" }}']
    if routes == 1 and auth == "api_key":
        digest = hashlib.sha256(BENCH_API_KEY.encode()).hexdigest()
        lines[lines.index("upstreams:"):lines.index("upstreams:")] = [
            "consumers:",
            f'  bench: {{ api_keys: ["sha256:{digest}"] }}',
        ]
        lines.append("  - { name: all, path_prefix: /, upstream: backend, auth: [api_key] }")
    elif routes == 1 and auth == "jwt":
        lines[lines.index("upstreams:"):lines.index("upstreams:")] = [
            "auth:",
            "  jwt:",
            "    main:",
            "      issuer: https://id.bench",
            "      audiences: [bench]",
            f'      keys: [{{ kid: bench, alg: HS256, secret: "{BENCH_JWT_SECRET}" }}]',
            "      forward_claims: { sub: X-User-Id }",
        ]
        # limit="local" adds a local rate limit that never trips: the full
        # chain of checks a protected route runs.
        rate = ", rate_limit: { key: consumer, rate: 100000000/s, burst: 1000000 }" if limit == "local" else ""
        lines.append("  - { name: all, path_prefix: /, upstream: backend, auth: [jwt:main], "
                     f"require_scopes: [bench:read]{rate} }}")
    elif routes == 1 and os.environ.get("BENCH_LIMIT") == "global":
        # A global (Redis) rate limit that never trips; Redis on BENCH_REDIS_PORT.
        port = os.environ.get("BENCH_REDIS_PORT", "16379")
        lines[lines.index("upstreams:"):lines.index("upstreams:")] = [
            f'redis: {{ url: "redis://127.0.0.1:{port}", timeout: 50ms }}',
        ]
        lines.append("  - { name: all, path_prefix: /, upstream: backend, "
                     "rate_limit: { rate: 100000000/s, burst: 1000000, scope: global } }")
    elif routes == 1 and os.environ.get("BENCH_LIMIT") in ("local", "local-quiet"):
        # A local rate limit that never trips: the cost of counting (and of
        # the RateLimit-* headers, unless local-quiet).
        headers = ", headers: false" if os.environ["BENCH_LIMIT"] == "local-quiet" else ""
        lines.append("  - { name: all, path_prefix: /, upstream: backend, "
                     f"rate_limit: {{ rate: 100000000/s, burst: 1000000{headers} }} }}")
    elif routes == 1:
        lines.append("  - { name: all, path_prefix: /, upstream: backend }")
    else:
        for i in range(routes):
            lines.append(f"  - {{ name: r{i}, path_prefix: /api/r{i}, upstream: backend }}")
    # BENCH_TLS=1 / BENCH_H2=1 (instructions.sh): the listener terminates TLS.
    if tls or os.environ.get("BENCH_TLS") == "1" or os.environ.get("BENCH_H2") == "1":
        cert, key = bench_certificate()
        lines[lines.index(f'listen: ["{PROXY[0]}:{PROXY[1]}"]')] = (
            f'listen: [{{ address: "{PROXY[0]}:{PROXY[1]}", tls: {{ certificates: [{{ cert: "{cert}", key: "{key}" }}] }} }}]')
    conf = d / "tollgate.yaml"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def start_tollgate(name: str, routes: int, binary: str = "", auth: Optional[str] = None,
                   limit: Optional[str] = None, access_log: bool = False, tls: bool = False) -> Callable[[], Proc]:
    def start() -> Proc:
        conf = tollgate_config(name, routes, auth, limit, access_log, tls)
        exe = binary or str(ROOT / "target/release/tollgate")
        return Proc(name, [exe, "-c", str(conf)], env={"RUST_LOG": "warn"})
    return start


def start_bare_pingora(binary: str = "") -> Proc:
    exe = binary or str(ROOT / "target/release/examples/bare_pingora")
    return Proc("bare-pingora", [exe, f"{PROXY[0]}:{PROXY[1]}", f"{UPSTREAM[0]}:{UPSTREAM[1]}", "1"])


def start_go_gateway() -> Proc:
    return Proc("go-gateway", [str(RAW / "go-gateway-bin"), f"{PROXY[0]}:{PROXY[1]}",
                               f"http://{UPSTREAM[0]}:{UPSTREAM[1]}"], env={"GOMAXPROCS": "1"})


def start_flask() -> Proc:
    return Proc("flask-gunicorn", [sys.executable, "-m", "gunicorn", "-w", "3", "-b", f"{PROXY[0]}:{PROXY[1]}",
                                   "--log-level", "warning", "flask_gateway:app"],
                env={"BACKEND_URL": f"http://{UPSTREAM[0]}:{UPSTREAM[1]}"}, cwd=str(HERE / "peers"))


# ---------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    name: str
    start: Optional[Callable[[], Proc]]  # None: load goes straight to the upstream
    path: str = "/api/bench"
    memory: bool = False  # also measure RSS idle / with 10k idle connections
    headers: list = field(default_factory=list)  # (name, value) sent with every request
    # How load is sent: "h1" (wrk, plain keepalive), "tls" (wrk over TLS,
    # keepalive), "handshake" (wrk over TLS with Connection: close: one new
    # TLS connection per request), "h2" (h2load over TLS, ALPN h2, 10
    # streams per connection). Other than h1: max phase only.
    protocol: str = "h1"
    baseline: str = "nginx"  # the scenario ratios are taken to
    result: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)  # one dict per max-phase round


SCENARIOS = [
    Scenario("direct upstream", None),
    Scenario("tollgate pass-through", start_tollgate("tollgate", 1), memory=True),
    Scenario("tollgate 1000 routes", start_tollgate("tollgate-1000", 1000), path="/api/r999/bench"),
    # JWT (HS256, cached), a local rate limit keyed by its subject, the
    # access log to a file; metrics are always on.
    Scenario("tollgate full chain",
             start_tollgate("tollgate-chain", 1, auth="jwt", limit="local", access_log=True),
             headers=auth_headers("jwt")),
    Scenario("bare Pingora", start_bare_pingora, memory=True),
    Scenario("nginx", start_nginx_proxy, memory=True),
    # TLS termination, each against nginx doing the same in the same run.
    Scenario("tollgate TLS", start_tollgate("tollgate-tls", 1, tls=True), protocol="tls", baseline="nginx TLS"),
    Scenario("nginx TLS", start_nginx_tls, protocol="tls", baseline="nginx TLS"),
    Scenario("tollgate TLS handshakes", start_tollgate("tollgate-tls", 1, tls=True), protocol="handshake",
             baseline="nginx TLS handshakes"),
    Scenario("nginx TLS handshakes", start_nginx_tls, protocol="handshake", baseline="nginx TLS handshakes"),
    Scenario("tollgate h2", start_tollgate("tollgate-tls", 1, tls=True), protocol="h2", baseline="nginx h2"),
    Scenario("nginx h2", start_nginx_tls, protocol="h2", baseline="nginx h2"),
    Scenario("HAProxy", start_haproxy, memory=True),
    Scenario("Caddy", start_caddy),
    Scenario("Go gateway (seed 3.1)", start_go_gateway),
    Scenario("Flask + gunicorn (seed 3.2)", start_flask),
]
# Before/after comparisons: TOLLGATE_BASE=path/to/another/tollgate adds it as
# a scenario of its own (ab.py: BENCH_ONLY="tollgate pass-through,tollgate base").
if os.environ.get("TOLLGATE_BASE"):
    SCENARIOS.append(Scenario("tollgate base", start_tollgate("tollgate-base", 1, os.environ["TOLLGATE_BASE"]),
                              memory=True))
    SCENARIOS.append(Scenario("tollgate TLS base",
                              start_tollgate("tollgate-tls-base", 1, os.environ["TOLLGATE_BASE"], tls=True),
                              protocol="tls", baseline="nginx TLS"))
    SCENARIOS.append(Scenario("tollgate h2 base",
                              start_tollgate("tollgate-tls-base", 1, os.environ["TOLLGATE_BASE"], tls=True),
                              protocol="h2", baseline="nginx h2"))
# The same for the bare Pingora peer: BARE_BASE=path adds "bare Pingora base".
if os.environ.get("BARE_BASE"):
    SCENARIOS.append(Scenario("bare Pingora base", lambda: start_bare_pingora(os.environ["BARE_BASE"]),
                              memory=True))


# ---------------------------------------------------------------- load

def header_args(headers: list) -> list:
    return [arg for name, value in headers for arg in ("-H", f"{name}: {value}")]


def run_wrk(url: str, seconds: int, headers: list = ()) -> dict:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", *header_args(headers), url],
        capture_output=True, text=True,
    ).stdout
    res = {"requests": 0, "rps": 0.0, "errors": 0}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            res["rps"] = float(line.split()[1])
        elif "requests in" in line:
            res["requests"] = int(line.split()[0])
        elif line.startswith("Non-2xx or 3xx responses:"):
            res["errors"] += int(line.split()[-1])
        elif line.startswith("Socket errors:"):
            parts = line.replace(",", "").split()
            res["errors"] += sum(int(parts[i]) for i in (3, 5, 7, 9))
    res["raw"] = out
    return res


def run_h2load(url: str, seconds: int, headers: list = ()) -> dict:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "h2load", "-t1", f"-c{CONNECTIONS}", "-m10", f"-D{seconds}",
         *header_args(headers), url],
        capture_output=True, text=True,
    ).stdout
    res = {"requests": 0, "rps": 0.0, "errors": 0}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            # finished in 5.00s, 30000.00 req/s, 3.00MB/s
            res["rps"] = float(line.split(",")[1].split()[0])
        elif line.startswith("requests:"):
            parts = line.replace(",", "").split()
            # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
            res["requests"] = int(parts[7])
            res["errors"] = int(parts[9]) + int(parts[11]) + int(parts[13])
        elif line.startswith("status codes:"):
            parts = line.replace(",", "").split()
            res["errors"] += sum(int(parts[i]) for i in (4, 6, 8))  # 3xx, 4xx, 5xx
    res["raw"] = out
    return res


def run_load(s, url: str, seconds: int) -> dict:
    if s.protocol == "h2":
        return run_h2load(url, seconds, s.headers)
    if s.protocol == "handshake":
        return run_wrk(url, seconds, [*s.headers, ("Connection", "close")])
    return run_wrk(url, seconds, s.headers)


def run_oha(url: str, rate: float, seconds: int, headers: list = ()) -> dict:
    oha = TOOLS / "oha"
    proc = subprocess.run(
        ["taskset", "-c", LOAD_CPU, str(oha), "-z", f"{seconds}s", "-c", str(CONNECTIONS), "-q", str(int(rate)),
         *header_args(headers),
         "--latency-correction", "--no-tui", "--output-format", "json", url],
        capture_output=True, text=True,
    )
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": (proc.stderr or proc.stdout)[-500:]}
    pct = data.get("latencyPercentiles", {})
    codes = data.get("statusCodeDistribution", {})
    # Requests still in flight when the run's deadline hits are aborted by
    # oha itself; they say nothing about the proxy.
    errors = sum(v for k, v in codes.items() if not k.startswith("2")) + sum(
        v for k, v in data.get("errorDistribution", {}).items() if "deadline" not in k
    )
    return {
        "p50_ms": (pct.get("p50") or 0) * 1000,
        "p99_ms": (pct.get("p99") or 0) * 1000,
        "p999_ms": (pct.get("p99.9") or 0) * 1000,
        "achieved_rps": data.get("summary", {}).get("requestsPerSec", 0),
        "errors": errors,
    }


async def hold_connections(n: int, addr, path: str) -> list:
    """Opens n keepalive connections, each with one answered request, and
    returns the open sockets."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    conns = []

    async def one():
        r, w = await asyncio.open_connection(*addr)
        w.write(request)
        await w.drain()
        await r.readuntil(b"\r\n\r\n")
        return r, w

    sem = asyncio.Semaphore(500)

    async def guarded():
        async with sem:
            try:
                # A proxy at its connection limit leaves new ones waiting
                # in the backlog; count them as not held.
                conns.append(await asyncio.wait_for(one(), 5))
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass

    await asyncio.gather(*(guarded() for _ in range(n)))
    return conns


def measure_memory(s: Scenario, proc: Proc) -> None:
    time.sleep(0.5)
    s.result["rss_idle_mb"] = memory_kb(proc.pids(), "VmRSS") / 1024
    loop = asyncio.new_event_loop()
    conns = loop.run_until_complete(hold_connections(IDLE_CONNECTIONS, PROXY, s.path))
    time.sleep(1.0)
    s.result["held"] = len(conns)
    s.result["rss_10k_mb"] = memory_kb(proc.pids(), "VmRSS") / 1024
    for _, w in conns:
        w.close()
    loop.run_until_complete(asyncio.sleep(0.2))
    loop.close()
    # Long enough for tollgate's memory return, which looks every 2 s.
    time.sleep(5.0)
    s.result["rss_after_mb"] = memory_kb(proc.pids(), "VmRSS") / 1024


def summarize_max(s: Scenario) -> None:
    """Medians of the rounds so far for rate and CPU; errors summed; the
    highest peak RSS."""
    def median(key):
        vals = [x[key] for x in s.samples if key in x]
        return statistics.median(vals) if vals else None
    s.result.update(rps=median("rps"), errors=sum(x["errors"] for x in s.samples),
                    requests=sum(x["requests"] for x in s.samples))
    for key, value in (("cpu_us", median("cpu_us")),
                       ("peak_rss_mb", max((x["peak_rss_mb"] for x in s.samples if "peak_rss_mb" in x), default=None))):
        if value is not None:
            s.result[key] = value


def run_scenario(s: Scenario, phase: str, rate: float = 0) -> None:
    addr = UPSTREAM if s.start is None else PROXY
    scheme = "http" if s.protocol == "h1" else "https"
    url = f"{scheme}://{addr[0]}:{addr[1]}{s.path}"
    if s.protocol != "h1" and phase != "max":
        return
    proc = None
    if s.start is not None:
        if not port_free(PROXY):
            raise SystemExit(f"port {PROXY[1]} is busy; stop whatever listens there")
        proc = s.start()
        if not wait_port(PROXY):
            proc.stop()
            s.result["failed"] = f"did not start; see {RAW}/{proc.name}.log"
            log(f"{s.name}: {s.result['failed']}")
            return
    try:
        if phase == "max":
            run_load(s, url, 2)  # warm-up: connection pools, caches, page faults
            pids = proc.pids() if proc else []
            cpu0 = cpu_seconds(pids)
            w = run_load(s, url, max(1, DURATION // ROUNDS))
            cpu1 = cpu_seconds(pids)
            sample = dict(rps=w["rps"], errors=w["errors"], requests=w["requests"])
            if proc and w["requests"]:
                sample["cpu_us"] = (cpu1 - cpu0) * 1e6 / w["requests"]
                sample["peak_rss_mb"] = memory_kb(proc.pids(), "VmHWM") / 1024
            s.samples.append(sample)
            summarize_max(s)
            log(f"{s.name}: {w['rps']:.0f} req/s, cpu {sample.get('cpu_us', 0):.1f} us/req, errors {w['errors']}")
        elif phase == "latency":
            run_wrk(url, 1, s.headers)
            o = run_oha(url, rate, LATENCY_DURATION, s.headers)
            s.result["latency"] = o
            log(f"{s.name}: at {rate:.0f} req/s p50 {o.get('p50_ms', 0):.2f} ms p99 {o.get('p99_ms', 0):.2f} ms")
        elif phase == "memory" and proc:
            measure_memory(s, proc)
            log(f"{s.name}: RSS idle {s.result['rss_idle_mb']:.1f} MB, with {s.result['held']} conns "
                f"{s.result['rss_10k_mb']:.1f} MB, after {s.result['rss_after_mb']:.1f} MB")
    finally:
        if proc:
            proc.stop()
            time.sleep(0.3)


# ---------------------------------------------------------------- report

def ratio(value, base):
    if not value or not base:
        return ""
    return f" ({value / base:.2f}x)"


def report(scenarios, rate: float) -> str:
    nginx = next((s.result for s in scenarios if s.name == "nginx"), {})
    lines = [
        f"Machine: {os.cpu_count()} cores, proxy pinned to core {PROXY_CPU}, wrk/oha and the upstream on core {LOAD_CPU}; "
        f"{CONNECTIONS} keepalive connections; {'quick' if QUICK else 'full'} run. Max req/s and CPU: median of "
        f"{ROUNDS} interleaved run(s) of {max(1, DURATION // ROUNDS)} s; latency: {LATENCY_DURATION} s at a fixed rate. "
        "Ratios are to nginx in the same run (TLS scenarios: to nginx doing the same; \"handshakes\": a new TLS "
        "connection per request, so req/s is handshakes/s; h2: h2load, 10 streams per connection).",
        "",
        f"| scenario | max req/s | CPU µs/req | p50 ms | p99 ms | p99.9 ms (at {rate:.0f} req/s) | peak RSS MB | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by_name = {s.name: s.result for s in scenarios}
    for s in scenarios:
        r = s.result
        if "failed" in r:
            lines.append(f"| {s.name} | failed: {r['failed']} | | | | | | |")
            continue
        nginx = by_name.get(s.baseline, {})
        lat = r.get("latency", {})
        nginx_lat = nginx.get("latency", {})
        sat = " (saturated)" if lat.get("achieved_rps", rate) < 0.95 * rate else ""
        errors = r.get("errors", 0) + lat.get("errors", 0)
        cpu = f"{r['cpu_us']:.1f}{ratio(r['cpu_us'], nginx.get('cpu_us'))}" if "cpu_us" in r else "–"
        rss = f"{r['peak_rss_mb']:.1f}" if "peak_rss_mb" in r else "–"
        lines.append(
            f"| {s.name} | {r.get('rps', 0):,.0f}{ratio(r.get('rps'), nginx.get('rps'))} | {cpu} "
            f"| {lat.get('p50_ms', 0):.2f}{ratio(lat.get('p50_ms'), nginx_lat.get('p50_ms'))} "
            f"| {lat.get('p99_ms', 0):.2f}{ratio(lat.get('p99_ms'), nginx_lat.get('p99_ms'))} "
            f"| {lat.get('p999_ms', 0):.2f}{sat} | {rss} | {errors} |"
        )
    mem = [s for s in scenarios if "rss_idle_mb" in s.result]
    if mem:
        lines += ["", f"| memory | RSS idle MB | RSS with {IDLE_CONNECTIONS:,} idle keepalive connections MB | RSS after they close MB |",
                  "| --- | --- | --- | --- |"]
        for s in mem:
            r = s.result
            lines.append(f"| {s.name} | {r['rss_idle_mb']:.1f} | {r['rss_10k_mb']:.1f} ({r['held']:,} held) | {r['rss_after_mb']:.1f} |")
    return "\n".join(lines) + "\n"


def chart(scenarios, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no chart")
        return
    shown = [s for s in scenarios if "rps" in s.result]
    names = [s.name for s in shown]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    a.barh(names, [s.result["rps"] for s in shown], color="#4a7ab7")
    a.set_xlabel("max requests/s (one core)")
    a.invert_yaxis()
    with_cpu = [s for s in shown if "cpu_us" in s.result]
    b.barh([s.name for s in with_cpu], [s.result["cpu_us"] for s in with_cpu], color="#c0504d")
    b.set_xlabel("proxy CPU µs per request (lower is better)")
    b.set_xscale("log")
    b.invert_yaxis()
    fig.suptitle("tollgate and peers, same machine, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{start}\n{table}{end}{tail}")


def main() -> None:
    RAW.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, hard), hard))
    only = [n.strip() for n in os.environ.get("BENCH_ONLY", "").split(",") if n.strip()]
    phases = os.environ.get("BENCH_PHASES", "max,latency,memory").split(",")
    scenarios = [s for s in SCENARIOS if not only or s.name in only or s.start is None]
    for tool in ("wrk", "taskset", "nginx", "h2load", "openssl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run benches/load/run.sh")

    upstream = start_upstream()
    if not wait_port(UPSTREAM):
        raise SystemExit(f"upstream nginx did not start; see {RAW}/upstream-nginx.log")
    try:
        for _ in range(ROUNDS):
            for s in scenarios:
                if "failed" not in s.result:
                    run_scenario(s, "max")
        by_name = {s.name: s.result for s in scenarios}
        maxes = [by_name.get(n, {}).get("rps") for n in ("nginx", "tollgate pass-through")]
        maxes = [m for m in maxes if m]
        rate = 0.8 * min(maxes) if maxes else 1000
        if "latency" in phases:
            log(f"latency phase at {rate:.0f} req/s")
            for s in scenarios:
                if "failed" not in s.result:
                    run_scenario(s, "latency", rate)
        if "memory" in phases:
            for s in scenarios:
                if s.memory and "failed" not in s.result:
                    run_scenario(s, "memory")
    finally:
        upstream.stop()

    table = report(scenarios, rate)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load.md").write_text("# Load benchmark\n\n" + table)
    (RESULTS / "load.json").write_text(json.dumps({s.name: s.result for s in scenarios}, indent=2))
    chart(scenarios, RESULTS / "load.png")
    if not only and phases == ["max", "latency", "memory"]:
        update_readme(table)
    print(table)


if __name__ == "__main__":
    main()
