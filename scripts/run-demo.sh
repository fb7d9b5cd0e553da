#!/usr/bin/env bash
# `make run`: the demo upstream in the background, the gateway in the
# foreground on conf/tollgate.yaml. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

config=${TOLLGATE_CONFIG:-conf/tollgate.yaml}
target/release/examples/demo_upstream &
demo=$!
trap 'kill $demo 2>/dev/null || true' EXIT INT TERM

cat <<MSG
tollgate: starting on $config
  try:   curl -i localhost:8080/api/users/7
         curl -i localhost:8080/api/orders/1
         curl -i localhost:9901/readyz
  reload the config:  kill -HUP \$(pgrep -f 'tollgate -c')
MSG
target/release/tollgate -c "$config"
