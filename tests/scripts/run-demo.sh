#!/usr/bin/env bash
# `make run`: Envoy with the autohttps filter and the demo policy (envoy/demo-policy.json) on
# 127.0.0.1:8080 (HTTP) and 127.0.0.1:8443 (HTTPS, a self-signed demo certificate).
# Stops everything on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUN=.run/demo
mkdir -p "$RUN"
ENVOY=.tools/venv/bin/envoy
HTTP_PORT=${HTTP_PORT:-8080}
HTTPS_PORT=${HTTPS_PORT:-8443}
ADMIN_PORT=${ADMIN_PORT:-9901}

for port in "$HTTP_PORT" "$HTTPS_PORT" "$ADMIN_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use; stop what listens there or set HTTP_PORT/HTTPS_PORT/ADMIN_PORT" >&2
    exit 1
  fi
done

echo "==> making a self-signed demo certificate for the demo names"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
  -keyout "$RUN/key.pem" -out "$RUN/cert.pem" -subj "/CN=autohttps demo" \
  -addext "subjectAltName=DNS:force.demo.test,DNS:www.force.demo.test,DNS:auto.demo.test,DNS:off.demo.test" 2>/dev/null
chmod 600 "$RUN/key.pem"

policy=$(sed "s/\"http_port\": 8080/\"http_port\": $HTTP_PORT/; s/\"https_port\": 8443/\"https_port\": $HTTPS_PORT/" envoy/demo-policy.json)
python3 tests/scripts/render.py envoy/filter-demo.yaml \
  HTTP_PORT="$HTTP_PORT" HTTPS_PORT="$HTTPS_PORT" ADMIN_PORT="$ADMIN_PORT" \
  WASM="$PWD/target/wasm32-wasip1/wasm-release/autohttps_filter.wasm" \
  TLS_CERT="$PWD/$RUN/cert.pem" TLS_KEY="$PWD/$RUN/key.pem" POLICY_JSON="$policy" > "$RUN/envoy.yaml"

echo "==> starting Envoy $($ENVOY --version | sed -n 's/.*version: [^/]*\/\([^/]*\)\/.*/\1/p') with the filter (log: $RUN/envoy.log)"
"$ENVOY" -c "$RUN/envoy.yaml" --concurrency 1 --use-dynamic-base-id -l info --log-path "$RUN/envoy.log" &
envoy_pid=$!
trap 'echo; echo "==> stopping Envoy"; kill $envoy_pid 2>/dev/null; wait $envoy_pid 2>/dev/null; exit 0' INT TERM EXIT

for _ in $(seq 1 100); do
  if [ "$(curl -s "http://127.0.0.1:$ADMIN_PORT/ready" || true)" = "LIVE" ]; then break; fi
  kill -0 $envoy_pid 2>/dev/null || { echo "Envoy exited; see $RUN/envoy.log" >&2; tail -20 "$RUN/envoy.log" >&2; exit 1; }
  sleep 0.1
done

r="--resolve force.demo.test:$HTTP_PORT:127.0.0.1 --resolve force.demo.test:$HTTPS_PORT:127.0.0.1"
cat <<TXT

autohttps demo is up: Envoy on 127.0.0.1:$HTTP_PORT (HTTP) and 127.0.0.1:$HTTPS_PORT (HTTPS).
Sites: force.demo.test (force, HSTS, CSP upgrade), auto.demo.test (auto, CSP report-only),
off.demo.test (HTTPS disabled). Try, in another terminal:

  # force: HTTP → HTTPS with path and query kept
  curl -i $r http://force.demo.test:$HTTP_PORT/some/page?x=1
  # HTTPS with HSTS and the mixed-content upgrade header
  curl -i --cacert $RUN/cert.pem $r https://force.demo.test:$HTTPS_PORT/
  # the ACME challenge path is never redirected
  curl -i $r http://force.demo.test:$HTTP_PORT/.well-known/acme-challenge/abc
  # disable: HTTPS → HTTP with Strict-Transport-Security: max-age=0
  curl -i -k --resolve off.demo.test:$HTTPS_PORT:127.0.0.1 https://off.demo.test:$HTTPS_PORT/
  # the filter's stats
  curl -s http://127.0.0.1:$ADMIN_PORT/stats | grep autohttps

Ctrl-C stops it.
TXT
wait $envoy_pid
