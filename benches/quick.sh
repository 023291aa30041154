#!/usr/bin/env bash
# benches/quick.sh — a quick A/B measurement of one tollgate binary (embedded mode), for
# comparing builds of a change back to back; `make bench` (benches/load.sh) is the full,
# comparative run.
#
#   benches/quick.sh BIN chat|stream CONNS SECONDS     wrk load: req/s, p50/p99, CPU µs/request
#   benches/quick.sh BIN streams STREAMS [DELAY_MS]    slow streams (examples/streamload):
#                                                      ttfb, gaps, RSS per open stream
#
# Environment: QUICK_LIMITS=0 creates the key without limits (default: the three limits of
# the load script); QUICK_PERF=1 records `perf record -g` of the tollgate process during the
# measured run (the data file's path is printed); QUICK_STREAMLOAD=path (default:
# target/release/examples/streamload). The mock upstream is BIN's own `mock-upstream`.
# Everything listens on 127.0.0.1; every process started here is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:?usage: quick.sh BIN chat|stream|streams N [SECONDS|DELAY_MS]}
MODE=${2:?mode}
N=${3:?connections or streams}
ARG4=${4:-}
STREAMLOAD=${QUICK_STREAMLOAD:-$ROOT/target/release/examples/streamload}

W=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-quick.XXXXXX")
PIDS=()
die() { echo "quick: $*" >&2; exit 1; }
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
PORTS_TAKEN=$W/ports
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -n ${QUICK_PERF:-} ]] || rm -rf "$W"
}
trap cleanup EXIT

MOCK=$(free_port)
"$BIN" mock-upstream --listen "127.0.0.1:$MOCK" 2>"$W/mock.log" &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
LISTEN=$(free_port)
ADMIN=$(free_port)
cat >"$W/config.toml" <<EOF
[server]
listen = "127.0.0.1:$LISTEN"
admin_listen = "127.0.0.1:$ADMIN"
admin_token = "quick-admin-token"
threads = 2
instance_id = "quick"
grace_period = "1s"

[storage]
journal_path = "$W/tollgate.db"
mode = "embedded"

[[upstreams]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:$MOCK"
api_key = "sk-quick"

[log]
level = "info"
format = "json"
EOF
wait_port "$MOCK" "$MOCK_PID" "mock upstream"
"$BIN" serve --config "$W/config.toml" >/dev/null 2>"$W/tollgate.log" &
TP=$!
PIDS+=("$TP")
wait_port "$LISTEN" "$TP" "tollgate"
LIMITS=(--limit requests:minute=100000000 --limit tokens:day=100000000000 --limit usd:month=100000000)
[[ ${QUICK_LIMITS:-1} == 0 ]] && LIMITS=()
KEY=$("$BIN" keys create --name quick --json --config "$W/config.toml" "${LIMITS[@]}" |
  sed -n 's/.*"key": *"\([^"]*\)".*/\1/p')
sleep 1.2 # a new key is live within 1 s

perf_start() {
  [[ -n ${QUICK_PERF:-} ]] || return 0
  (sleep 1; perf record -F 2999 -g -p "$TP" -o "$W/perf.data" -- sleep "$1" >/dev/null 2>&1) &
  PERF_PID=$!
}
perf_wait() {
  [[ -n ${QUICK_PERF:-} ]] || return 0
  wait "$PERF_PID" || true
  echo "perf data: $W/perf.data"
}

case $MODE in
  chat | stream)
    SECONDS_=${ARG4:-10}
    BODY='{"model":"gpt-4o-mini","max_tokens":1024,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something about load testing."}]}'
    HEADERS='wrk.headers["x-mock-words"] = "20"'
    if [[ $MODE == stream ]]; then
      BODY='{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"max_tokens":1024,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something about load testing."}]}'
      HEADERS='wrk.headers["x-mock-words"] = "200"; wrk.headers["x-mock-chunks"] = "200"'
    fi
    cat >"$W/s.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
$HEADERS
wrk.body = '$BODY'
EOF
    URL="http://127.0.0.1:$LISTEN/v1/chat/completions"
    wrk -t1 -c"$N" -d2s -s "$W/s.lua" "$URL" >/dev/null
    T0=$(cpu_ticks "$TP")
    perf_start $((SECONDS_ - 2))
    wrk -t1 -c"$N" -d"${SECONDS_}s" --latency -s "$W/s.lua" "$URL" >"$W/wrk.txt"
    T1=$(cpu_ticks "$TP")
    perf_wait
    REQ=$(awk '/requests in/ {print $1}' "$W/wrk.txt")
    RPS=$(awk '/Requests\/sec/ {print $2}' "$W/wrk.txt")
    P50=$(awk '$1 == "50%" {print $2}' "$W/wrk.txt")
    P99=$(awk '$1 == "99%" {print $2}' "$W/wrk.txt")
    echo "$MODE c=$N: $RPS req/s, p50 $P50, p99 $P99, tollgate CPU $(((T1 - T0) * 1000000 / $(getconf CLK_TCK) / REQ)) us/request"
    ;;
  streams)
    [[ -x $STREAMLOAD ]] || { echo "$STREAMLOAD missing (cargo build --release --example streamload)" >&2; exit 1; }
    DELAY=${ARG4:-200}
    T0=$(cpu_ticks "$TP")
    perf_start 6
    "$STREAMLOAD" --addr "127.0.0.1:$LISTEN" --key "$KEY" --streams "$N" --chunks 50 \
      --delay-ms "$DELAY" --ramp-ms 3000 --rss-pids "$TP" --label quick
    T1=$(cpu_ticks "$TP")
    perf_wait
    echo "tollgate CPU: $(((T1 - T0) * 1000 / $(getconf CLK_TCK))) ms"
    ;;
  *)
    echo "unknown mode: $MODE" >&2
    exit 2
    ;;
esac
