#!/usr/bin/env bash
# `make bench`: installs the peers and load generators that are missing
# (Debian: nginx, HAProxy, Caddy, Go, wrk; PyPI: Flask, gunicorn, requests,
# matplotlib; crates.io: oha), builds tollgate, the bare Pingora peer and the
# Go gateway, then runs benches/load/bench.py. BENCH_QUICK=1 for a short run.
set -euo pipefail
cd "$(dirname "$0")/../.."

apt_need=()
command -v nginx >/dev/null || apt_need+=(nginx)
command -v haproxy >/dev/null || apt_need+=(haproxy)
command -v caddy >/dev/null || apt_need+=(caddy)
command -v go >/dev/null || apt_need+=(golang-go)
command -v wrk >/dev/null || apt_need+=(wrk)
command -v taskset >/dev/null || apt_need+=(util-linux)
command -v h2load >/dev/null || apt_need+=(nghttp2-client)   # the h2 scenarios
command -v openssl >/dev/null || apt_need+=(openssl)   # the TLS scenarios' certificate
if [ ${#apt_need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "benchmarks need: ${apt_need[*]} (sudo apt-get install -y ${apt_need[*]})" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # The packages' own services are not wanted: the bench starts its own.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_need[@]}" >/dev/null
fi

python3 - <<'PY' 2>/dev/null || python3 -m pip install -q flask gunicorn requests matplotlib
import flask, gunicorn, requests, matplotlib
PY

if [ ! -x benches/.tools/bin/oha ]; then
  cargo install oha --locked --root benches/.tools
fi

cargo build --release --bin tollgate --example bare_pingora
mkdir -p benches/results/raw
(cd benches/load/peers/go-gateway && GOFLAGS=-mod=mod go build -o ../../../results/raw/go-gateway-bin .)

exec python3 benches/load/bench.py
