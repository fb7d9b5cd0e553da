#!/usr/bin/env bash
# Installs what building and testing tollgate needs beyond the Rust toolchain.
# As root it installs the missing Debian packages; otherwise it names them and
# stops. Safe to run repeatedly: it does nothing when everything is present.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)   # Pingora's C dependencies build with it
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v make >/dev/null 2>&1 || need+=(make)
command -v curl >/dev/null 2>&1 || need+=(curl)     # make run's hint, the docs' examples
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)   # global rate limit tests start their own
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)   # the unit file's test runs systemd-analyze verify
command -v openssl >/dev/null 2>&1 || need+=(openssl)   # the JWT tests make their RSA, EC and Ed25519 keys with it
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)   # finds the system libssl for TLS
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)   # TLS links the system OpenSSL (.cargo/config.toml: OPENSSL_NO_VENDOR)
curl --version 2>/dev/null | grep -q nghttp2 || need+=(curl)   # the HTTP/2 tests speak h2 and h2c through curl
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)   # HTTP/2 limit tests (nghttp, h2load)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "tollgate needs these Debian packages: ${need[*]}" >&2
  echo "install them with: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing ${need[*]} ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
