#!/usr/bin/env bash
# `make run`: NATS + a node (nex up), the echo service deployed with devrun, and one request to it.
# Keeps running until Ctrl-C; with NEX_RUN_ONCE=1 it stops after the demonstration.
set -euo pipefail
cd "$(dirname "$0")/.."
NEX=target/release/nex
ECHO=target/x86_64-unknown-linux-musl/release/echoservice
PORT=${NEX_PORT:-4222}
export NATS_URL=nats://127.0.0.1:$PORT
log=$(mktemp -t nex-run.XXXXXX)

"$NEX" up --port "$PORT" -s "$NATS_URL" >"$log" 2>&1 &
up=$!
stop() { kill -INT "$up" 2>/dev/null || true; wait "$up" 2>/dev/null || true; rm -f "$log"; }
trap stop EXIT INT TERM

for _ in $(seq 1 200); do
  grep -q '^NATS URL:' "$log" && break
  kill -0 "$up" 2>/dev/null || { cat "$log"; echo "nex up failed" >&2; exit 1; }
  sleep 0.1
done
grep -q '^NATS URL:' "$log" || { cat "$log"; echo "nex up did not start in 20s" >&2; exit 1; }
grep -v '^\s*$' "$log" | grep -v 'WARN\|INFO' || true

echo
echo "\$ nex devrun $ECHO NATS_URL=$NATS_URL"
"$NEX" devrun "$ECHO" "NATS_URL=$NATS_URL"
echo
echo "\$ nex call svc.echo 'hello from nex'"
for _ in $(seq 1 50); do
  if reply=$("$NEX" call svc.echo 'hello from nex' --timeout 1s 2>/dev/null); then break; fi
  sleep 0.2
done
echo "${reply:?the echo service did not answer}"
echo
"$NEX" node ls
if [ "${NEX_RUN_ONCE:-}" = 1 ]; then exit 0; fi
echo "Running. In another terminal: export NATS_URL=$NATS_URL; nex logs / nex events / nex node info. Ctrl-C stops everything."
wait "$up"
