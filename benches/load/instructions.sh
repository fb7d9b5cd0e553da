#!/usr/bin/env bash
# Instructions per request of a proxy, counted by callgrind: repeatable on a
# noisy machine where CPU time varies by +-20% between runs. The proxy runs
# under valgrind twice, serving N1 and then N2 requests from oha against the
# bench upstream; (Ir(N2) - Ir(N1)) / (N2 - N1) cancels start-up and shutdown.
#
# Usage (after benches/load/run.sh has built everything once):
#   benches/load/instructions.sh tollgate
#   benches/load/instructions.sh bare
#   TOLLGATE=/path/to/other/tollgate benches/load/instructions.sh tollgate
#   BARE=/path/to/other/bare_pingora benches/load/instructions.sh bare
#   BENCH_AUTH=api_key benches/load/instructions.sh tollgate   (route behind an API key)
#   BENCH_AUTH=jwt benches/load/instructions.sh tollgate       (behind a JWT provider, one HS256 token)
#   BENCH_AUTH=header|bearer: the same headers to a route without auth (the baselines)
#   BENCH_LIMIT=local benches/load/instructions.sh tollgate  (a local rate limit that never trips)
#   BENCH_BREAKER=1 benches/load/instructions.sh tollgate    (a circuit breaker on the upstream)
#   BENCH_LIMIT=global benches/load/instructions.sh tollgate (a Redis rate limit; starts redis-server)
#   BENCH_ACCESS_LOG=1 benches/load/instructions.sh tollgate (the access log to a file)
#   BENCH_AUTH=jwt BENCH_LIMIT=local BENCH_ACCESS_LOG=1 ... (the full chain)
#   BENCH_TLS=1 benches/load/instructions.sh tollgate         (HTTPS keepalive: the listener terminates TLS)
#   BENCH_H2=1 benches/load/instructions.sh tollgate          (HTTP/2 over TLS: 4 connections, 4 streams each)
set -euo pipefail
cd "$(dirname "$0")/../.."
raw=benches/results/raw
mkdir -p "$raw"
n1=${N1:-2000}
n2=${N2:-8000}

case "${1:-tollgate}" in
  tollgate)
    python3 -c 'import sys; sys.path.insert(0, "benches/load"); import bench; bench.RAW.mkdir(parents=True, exist_ok=True); bench.tollgate_config("tollgate", 1)'
    cmd=("${TOLLGATE:-target/release/tollgate}" -c "$raw/tollgate/tollgate.yaml") ;;
  bare) cmd=("${BARE:-target/release/examples/bare_pingora}" 127.0.0.1:18080 127.0.0.1:18000 1) ;;
  *) echo "usage: $0 tollgate|bare" >&2; exit 2 ;;
esac

python3 -c 'import sys; sys.path.insert(0, "benches/load"); import bench; bench.RAW.mkdir(parents=True, exist_ok=True); bench.nginx_conf("upstream", f"listen 127.0.0.1:18000;\n  location / {{ default_type application/json; return 200 \x27{bench.BODY}\x27; }}")'
taskset -c 1 nginx -c "$PWD/$raw/upstream/nginx.conf" &
upstream=$!
redis=
if [ "${BENCH_LIMIT:-}" = global ]; then
  taskset -c 1 redis-server --port "${BENCH_REDIS_PORT:-16379}" --bind 127.0.0.1 --save "" --appendonly no > "$raw/redis.log" 2>&1 &
  redis=$!
fi
trap 'kill $upstream $redis 2>/dev/null || true' EXIT
sleep 0.5

count() {
  local n=$1 out="$raw/callgrind-$1.out"
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" "${cmd[@]}" > "$raw/callgrind-$n.log" 2>&1 &
  local proxy=$!
  for _ in $(seq 1 150); do
    (exec 3<>/dev/tcp/127.0.0.1/18080) 2>/dev/null && break
    sleep 0.2
  done
  local auth=()
  # BENCH_AUTH=header (bearer) sends the same key (token) to a route
  # without auth: the baseline that isolates what authentication costs.
  while IFS= read -r line; do
    [ -n "$line" ] && auth+=(-H "$line")
  done < <(python3 -c 'import os, sys; sys.path.insert(0, "benches/load"); import bench; [print(f"{n}: {v}") for n, v in bench.auth_headers(os.environ.get("BENCH_AUTH"))]')
  local url=http://127.0.0.1:18080/api/bench tls=()
  if [ "${BENCH_TLS:-}" = 1 ]; then
    url=https://127.0.0.1:18080/api/bench
    tls=(--insecure)
  elif [ "${BENCH_H2:-}" = 1 ]; then
    url=https://127.0.0.1:18080/api/bench
    tls=(--insecure --http2 -p 4)
  fi
  local conns=16
  [ "${BENCH_H2:-}" = 1 ] && conns=4
  benches/.tools/bin/oha -n "$n" -c "$conns" --no-tui --output-format json "${tls[@]}" "${auth[@]}" "$url" > "$raw/callgrind-oha-$n.json"
  kill -INT $proxy
  wait $proxy 2>/dev/null || true
  grep -h '^summary:' "$out" | awk '{print $2}'
}

a=$(count "$n1")
b=$(count "$n2")
echo "$1: $(( (b - a) / (n2 - n1) )) instructions per request (callgrind, $n1 vs $n2 requests)"
