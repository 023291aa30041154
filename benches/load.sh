#!/usr/bin/env bash
# benches/load.sh — end-to-end load measurement of tollgate against a plain nginx reverse
# proxy, all measured in the same run on the same machine (`make bench`).
#
# Targets (each in front of one shared `tollgate mock-upstream`):
#   direct       the mock itself, no hop: the baseline every "added latency" is taken from
#   nginx        nginx as a plain reverse proxy (keepalive upstream pool, no buffering,
#                no access log, worker_processes = BENCH_PROXY_THREADS)
#   pingora      examples/pingora_floor: a pingora proxy that only forwards (same pingora
#                version, threads and upstream settings as tollgate) — the floor of the
#                stack tollgate is built on
#   passthrough  tollgate embedded mode, a key with no limits (auth, parse, estimate,
#                journal, meter, settle — but no counter)
#   embedded     tollgate embedded mode, a key with three limits (requests:minute,
#                tokens:day, usd:month) far above what the run uses
#   litellm      (opt-in) a LiteLLM proxy (`pip install 'litellm[proxy]'`; BENCH_LITELLM names
#                its `litellm` executable) with a master key, the mock as an OpenAI-compatible
#                upstream and BENCH_PROXY_THREADS workers, forwarding the client's headers
#                (so the x-mock-* controls reach the mock); no database, so no budgets or
#                spend tracking: a pure LLM-proxy hop. Not in the streams phase by default.
#   shared       tollgate shared mode (Redis counters, Postgres ledger of record, local
#                SQLite journal shipped in the background), the same three limits; a
#                private redis-server and PostgreSQL are started here on free loopback
#                ports (needs redis-server and initdb/pg_ctl; never the machine's own)
# Scenarios:
#   chat         POST /v1/chat/completions, non-stream, 20-word answer
#   stream200    the same with "stream": true, 200 content chunks (x-mock-words/chunks)
#
# Every target × scenario × connection count gets a warm-up run (discarded) and a
# measured run of wrk (closed loop: each connection sends its next request only when the
# previous answer is complete, so throughput and latency are coupled — see
# docs/performance.md). Added latency is a difference of percentiles: target pXX minus the
# direct pXX of the same scenario and connection count.
#
# Environment (all optional):
#   BENCH_DURATION=10       seconds per measured run
#   BENCH_WARMUP=2          seconds of warm-up per run (0 disables)
#   BENCH_CONNS="1 64"      connection counts
#   BENCH_SCENARIOS="chat stream200"   (empty: only the streams phase)
#   BENCH_TARGETS="direct nginx pingora passthrough embedded shared"   (direct and nginx are
#                           required for the added-latency and ratio columns; they are added
#                           if absent; "litellm" is opt-in)
#   BENCH_PROXY_THREADS=2   tollgate [server] threads and nginx worker_processes
#   BENCH_WRK_THREADS=1     wrk threads (capped by the connection count)
#   BENCH_ROUNDS=1          repeat the whole sweep; the report shows per-cell medians
#   BENCH_TOLLGATE_LOG=info tollgate log level (its per-request log line goes to a file)
#   BENCH_OUT=path          also write the final table there
#   BENCH_KEEP=1            keep the temp dir (configs, logs, wrk output, ledgers)
#   BENCH_NO_BUILD=1        do not run `cargo build --release`
#   CARGO_TARGET_DIR        where the release binary is (default ./target)
#   BENCH_BIN=path          use this tollgate binary instead (implies BENCH_NO_BUILD)
#   BENCH_STREAMS=5000      concurrent slow streams per target in the streams phase (0 skips it)
#   BENCH_STREAM_DELAY_MS=1000 gap the mock leaves between chunks. 5,000 streams at 20 ms are
#                           250,000 events/s, more than 2 CPUs carry even with no proxy (the
#                           mock alone then shows 170 ms gaps); at 1 s the machine is not
#                           saturated and the added gap is the proxy's. Lower it to find the
#                           saturation point.
#   BENCH_STREAM_CHUNKS=15    content chunks per slow stream (the stream lasts chunks × delay)
#   BENCH_STREAM_RAMP_MS=3000 connections are opened evenly over this long
#   BENCH_STREAM_TARGETS    targets of the streams phase (default: BENCH_TARGETS)
#   BENCH_PINGORA_FLOOR=path  the pingora target's binary (default: examples/pingora_floor)
#   BENCH_STREAMLOAD=path   the streams client (default: examples/streamload next to the build)
#
# Streams phase: after the load sweep, `examples/streamload` opens BENCH_STREAMS streams
# (one connection each) to every target at once and reports time to first byte, the gaps
# between SSE events as the client sees them (added gap = target minus direct), and the
# target's resident memory per open stream (RSS with every stream open minus RSS before,
# over the number of streams).
#
# Everything listens on 127.0.0.1 only; every process started here is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-2}
CONNS=${BENCH_CONNS:-"1 64"}
SCENARIOS=${BENCH_SCENARIOS-"chat stream200"}
TARGETS=${BENCH_TARGETS:-"direct nginx pingora passthrough embedded shared"}
PROXY_THREADS=${BENCH_PROXY_THREADS:-2}
WRK_THREADS=${BENCH_WRK_THREADS:-1}
ROUNDS=${BENCH_ROUNDS:-1}
TOLLGATE_LOG=${BENCH_TOLLGATE_LOG:-info}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${BENCH_BIN:-$TARGET_DIR/release/tollgate}
NGINX=${NGINX:-/usr/sbin/nginx}
EMBEDDED_LIMITS=(requests:minute=100000000 tokens:day=100000000000 usd:month=100000000)

log() { printf '[load] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- prerequisites
install_missing() {
  local need=()
  command -v wrk >/dev/null || need+=(wrk)
  command -v curl >/dev/null || need+=(curl)
  if [[ " $TARGETS " == *" shared "* ]]; then
    command -v redis-server >/dev/null || need+=(redis-server)
    if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
      need+=(postgresql)
    fi
  fi
  local want_nginx=""
  [[ -x $NGINX ]] || want_nginx=1
  ((${#need[@]})) || [[ -n $want_nginx ]] || return 0
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  log "installing: ${need[*]} ${want_nginx:+nginx-light}"
  $sudo apt-get update -qq
  if ((${#need[@]})); then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  if [[ -n $want_nginx ]]; then
    # nginx-light is bookworm's minimal build; later releases fold it into `nginx`.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx-light >/dev/null 2>&1 ||
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx >/dev/null
  fi
}
install_missing

if [[ -z ${BENCH_NO_BUILD:-} && -z ${BENCH_BIN:-} ]]; then
  log "cargo build --release (no-op when up to date)"
  (cd "$ROOT" && cargo build --release --bin tollgate --example streamload --example pingora_floor)
fi
[[ -x $BIN ]] || die "$BIN not found (build it or set CARGO_TARGET_DIR)"
STREAMS=${BENCH_STREAMS:-5000}
STREAMLOAD=${BENCH_STREAMLOAD:-$TARGET_DIR/release/examples/streamload}
PINGORA_FLOOR=${BENCH_PINGORA_FLOOR:-$TARGET_DIR/release/examples/pingora_floor}
LITELLM=${BENCH_LITELLM:-$(command -v litellm || true)}
if ((STREAMS > 0)) && [[ ! -x $STREAMLOAD ]]; then
  die "$STREAMLOAD not found (cargo build --release --example streamload, or BENCH_STREAMS=0)"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-load.XXXXXX")
PIDS=()
PG_DATA=""
cleanup() {
  local pid
  # PostgreSQL forks its own children; pg_ctl stops the whole server (immediate: the data
  # is thrown away with the temp dir anyway).
  if [[ -n $PG_DATA ]]; then
    pg_tool pg_ctl -D "$PG_DATA" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ -n ${BENCH_KEEP:-} ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
PORTS_TAKEN=$WORK/ports

CLK_TCK=$(getconf CLK_TCK)

# PostgreSQL tools (shared target): /usr/local/bin first, else the newest
# /usr/lib/postgresql/*/bin. As root they run as the `postgres` user (initdb refuses root).
PG_BIN=""
find_pg_bin() {
  local d
  if [[ -x /usr/local/bin/initdb && -x /usr/local/bin/pg_ctl ]]; then
    PG_BIN=/usr/local/bin
    return
  fi
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x $d/initdb && -x $d/pg_ctl ]] && PG_BIN=$d
  done
  [[ -n $PG_BIN ]] || die "shared target: no initdb/pg_ctl in /usr/local/bin or /usr/lib/postgresql/*/bin"
}
pg_tool() { # tool args...
  local tool=$1; shift
  if [[ $(id -u) -eq 0 ]]; then
    setpriv --reuid=postgres --regid=postgres --init-groups "$PG_BIN/$tool" "$@"
  else
    "$PG_BIN/$tool" "$@"
  fi
}

# ---------------------------------------------------------------- the shared mock
MOCK_PORT=$(free_port)
"$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" 2>"$WORK/mock.log" &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
wait_port "$MOCK_PORT" "$MOCK_PID" "mock upstream"
log "mock upstream on 127.0.0.1:$MOCK_PORT (pid $MOCK_PID)"

# ---------------------------------------------------------------- targets
# Each start_<target> sets T_PORT (where wrk connects), T_KEY (the bearer it sends) and
# T_PIDS (the processes whose CPU time is the target's cost). For the shared target that
# is the tollgate process only: the private redis-server and PostgreSQL (whose backends
# come and go with the pool) are not counted.
declare -A PORT KEY TPIDS

start_direct() {
  T_PORT=$MOCK_PORT
  T_KEY=sk-bench-direct
  T_PIDS="$MOCK_PID"
}

start_nginx() {
  local dir=$WORK/nginx port pid
  mkdir -p "$dir/temp"
  port=$(free_port)
  cat >"$dir/nginx.conf" <<EOF
# A plain reverse proxy, configured as a careful operator would for streaming APIs.
worker_processes $PROXY_THREADS;
worker_rlimit_nofile 20000;
daemon off;
pid $dir/nginx.pid;
error_log stderr warn;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $dir/temp/body;
  proxy_temp_path $dir/temp/proxy;
  fastcgi_temp_path $dir/temp/fastcgi;
  uwsgi_temp_path $dir/temp/uwsgi;
  scgi_temp_path $dir/temp/scgi;
  upstream mock {
    server 127.0.0.1:$MOCK_PORT;
    keepalive 256;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$port;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
  "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e stderr 2>"$dir/error.log" &
  pid=$!
  PIDS+=("$pid")
  wait_port "$port" "$pid" "nginx"
  sleep 0.2
  T_PORT=$port
  T_KEY=sk-bench-nginx
  # shellcheck disable=SC2046
  T_PIDS="$pid $(children_of "$pid" | tr '\n' ' ')"
}

start_pingora() {
  local port pid
  [[ -x $PINGORA_FLOOR ]] || die "$PINGORA_FLOOR not found (cargo build --release --example pingora_floor)"
  port=$(free_port)
  "$PINGORA_FLOOR" --listen "127.0.0.1:$port" --upstream "127.0.0.1:$MOCK_PORT" \
    --threads "$PROXY_THREADS" >/dev/null 2>"$WORK/pingora.log" &
  pid=$!
  PIDS+=("$pid")
  wait_port "$port" "$pid" "pingora floor"
  T_PORT=$port
  T_KEY=sk-bench-pingora
  T_PIDS="$pid"
}

start_litellm() {
  local dir=$WORK/litellm port pid i
  [[ -n $LITELLM && -x $LITELLM ]] || die "litellm target: set BENCH_LITELLM to the litellm executable (pip install 'litellm[proxy]')"
  mkdir -p "$dir"
  port=$(free_port)
  printf '%s\n' \
    "model_list:" \
    "  - model_name: gpt-4o-mini" \
    "    litellm_params:" \
    "      model: openai/gpt-4o-mini" \
    "      api_base: http://127.0.0.1:$MOCK_PORT/v1" \
    "      api_key: sk-bench-litellm" \
    "general_settings:" \
    "  master_key: sk-bench-litellm-master" \
    "  forward_client_headers_to_llm_api: true" >"$dir/config.yaml"
  (cd "$dir" && exec "$LITELLM" --config "$dir/config.yaml" --host 127.0.0.1 --port "$port" \
    --num_workers "$PROXY_THREADS") >"$dir/litellm.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  for i in $(seq 600); do
    curl -s -o /dev/null "http://127.0.0.1:$port/health/liveliness" && break
    kill -0 "$pid" 2>/dev/null || die "litellm exited during start-up (see $dir/litellm.log)"
    sleep 0.1
  done
  sleep 1
  T_PORT=$port
  T_KEY=sk-bench-litellm-master
  # shellcheck disable=SC2046
  T_PIDS="$pid $(children_of "$pid" | tr '\n' ' ')"
}

# start_tollgate NAME STORAGE_TOML [--limit SPEC]...
# STORAGE_TOML: the [storage] lines after `journal_path` (mode and its settings).
start_tollgate() {
  local name=$1 storage=$2; shift 2
  local dir=$WORK/$name port admin pid out key code i
  mkdir -p "$dir"
  port=$(free_port)
  admin=$(free_port)
  cat >"$dir/config.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
admin_token = "bench-admin-token"
max_request_body = "10MiB"
threads = $PROXY_THREADS
instance_id = "bench-$name"
grace_period = "1s"

[storage]
journal_path = "$dir/tollgate.db"
$storage

[[upstreams]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT"
api_key = "sk-bench-upstream"
connect_timeout = "1s"
first_byte_timeout = "10s"
idle_timeout = "10s"

[log]
level = "$TOLLGATE_LOG"
format = "json"
EOF
  # The operator's first step: create or upgrade the schema (in shared mode the Postgres
  # ledger too), so a schema or connection problem shows here rather than as a start-up exit.
  env -u TOLLGATE_CONFIG "$BIN" migrate --config "$dir/config.toml" >"$dir/migrate.log" 2>&1 ||
    die "tollgate migrate for $name failed: $(cat "$dir/migrate.log")"
  env -u TOLLGATE_CONFIG "$BIN" serve --config "$dir/config.toml" >/dev/null 2>"$dir/tollgate.log" &
  pid=$!
  PIDS+=("$pid")
  wait_port "$port" "$pid" "tollgate $name"
  out=$(env -u TOLLGATE_CONFIG "$BIN" keys create --name "bench-$name" --json \
    --config "$dir/config.toml" "$@")
  key=$(printf '%s\n' "$out" | sed -n 's/.*"key": *"\([^"]*\)".*/\1/p' | head -n1)
  [[ -n $key ]] || die "could not read the key secret from: $out"
  # A new key goes live within 1 s; wait for it.
  for i in $(seq 50); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $key" \
      "http://127.0.0.1:$port/v1/tollgate/usage" || true)
    [[ $code == 200 ]] && break
    sleep 0.1
  done
  [[ $code == 200 ]] || die "key for $name not live (last status $code)"
  T_PORT=$port
  T_KEY=$key
  T_PIDS="$pid"
}

start_passthrough() { start_tollgate passthrough 'mode = "embedded"'; }
start_embedded() {
  local args=() l
  for l in "${EMBEDDED_LIMITS[@]}"; do args+=(--limit "$l"); done
  start_tollgate embedded 'mode = "embedded"' "${args[@]}"
}

# Shared mode against a private redis-server (no persistence) and a private PostgreSQL
# (initdb into the temp dir, trust auth on 127.0.0.1, fsync off — the ledger's durability
# is not what is measured, and the run's data is discarded on exit).
start_shared() {
  local dir=$WORK/shared-services rport pport pid i args=() l storage
  command -v redis-server >/dev/null || die "shared target: redis-server not installed"
  command -v redis-cli >/dev/null || die "shared target: redis-cli not installed"
  find_pg_bin
  mkdir -p "$dir/redis" "$dir/pg"

  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no \
    --protected-mode no --dir "$dir/redis" --logfile "$dir/redis/redis.log" >/dev/null 2>&1 &
  pid=$!
  PIDS+=("$pid")
  for i in $(seq 100); do
    [[ $(redis-cli -h 127.0.0.1 -p "$rport" PING 2>/dev/null) == PONG ]] && break
    kill -0 "$pid" 2>/dev/null || die "redis-server exited during start-up (see $dir/redis/redis.log)"
    sleep 0.1
  done
  [[ $(redis-cli -h 127.0.0.1 -p "$rport" PING 2>/dev/null) == PONG ]] || die "redis-server not answering on $rport"
  log "private redis-server on 127.0.0.1:$rport (pid $pid)"

  pport=$(free_port)
  if [[ $(id -u) -eq 0 ]]; then
    # The server runs as `postgres`, which must reach its data dir inside our temp dir.
    chmod 711 "$WORK" "$dir"
    chown postgres:postgres "$dir/pg"
  fi
  pg_tool initdb -D "$dir/pg/data" -A trust -U postgres -E UTF8 --no-sync >"$WORK/initdb.log" 2>&1 ||
    die "initdb failed (see $WORK/initdb.log)"
  PG_DATA=$dir/pg/data
  PG_PORT=$pport
  REDIS_PORT=$rport
  pg_tool pg_ctl -D "$PG_DATA" -l "$dir/pg/postgres.log" -w -t 60 \
    -o "-p $pport -c listen_addresses=127.0.0.1 -k $dir/pg -c fsync=off -c full_page_writes=off -c max_connections=50" \
    start >"$WORK/pg_ctl.log" 2>&1 || die "pg_ctl start failed (see $dir/pg/postgres.log)"
  log "private PostgreSQL on 127.0.0.1:$pport ($PG_DATA)"

  storage=$(printf 'mode = "shared"\nredis_url = "redis://127.0.0.1:%s"\npostgres_url = "postgres://postgres@127.0.0.1:%s/postgres?connect_timeout=2"' "$rport" "$pport")
  for l in "${EMBEDDED_LIMITS[@]}"; do args+=(--limit "$l"); done
  start_tollgate shared "$storage" "${args[@]}"
}

# direct and nginx anchor the derived columns.
[[ " $TARGETS " == *" nginx "* ]] || TARGETS="nginx $TARGETS"
[[ " $TARGETS " == *" direct "* ]] || TARGETS="direct $TARGETS"
for t in $TARGETS; do
  declare -F "start_$t" >/dev/null || die "unknown target: $t"
  "start_$t"
  PORT[$t]=$T_PORT
  KEY[$t]=$T_KEY
  TPIDS[$t]=$T_PIDS
  log "target $t on 127.0.0.1:$T_PORT (pids $T_PIDS)"
done

# ---------------------------------------------------------------- scenarios
# Both scenarios ask for the usage chunk themselves (stream_options.include_usage), so the
# mock sends byte-identical answers to every target and tollgate does not rewrite the body.
scenario_body() {
  case $1 in
    chat) echo '{"model":"gpt-4o-mini","max_tokens":1024,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something about load testing."}]}' ;;
    stream200) echo '{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"max_tokens":1024,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something about load testing."}]}' ;;
    *) die "unknown scenario: $1" ;;
  esac
}
scenario_headers() { # one "name: value" per line
  case $1 in
    chat) echo "x-mock-words: 20" ;;
    stream200) printf 'x-mock-words: 200\nx-mock-chunks: 200\n' ;;
  esac
}

write_lua() { # target scenario file
  local body h name value
  body=$(scenario_body "$2")
  {
    echo 'wrk.method = "POST"'
    echo 'wrk.headers["Content-Type"] = "application/json"'
    echo "wrk.headers[\"Authorization\"] = \"Bearer ${KEY[$1]}\""
    while IFS= read -r h; do
      [[ -n $h ]] || continue
      name=${h%%:*}; value=${h#*: }
      echo "wrk.headers[\"$name\"] = \"$value\""
    done < <(scenario_headers "$2")
    echo "wrk.body = '$body'"
    cat <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %.0f %.0f %.0f %d %d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), e.connect + e.read + e.write + e.timeout, e.status))
end
EOF
  } >"$3"
}

# One request by curl: the target must answer 200, and a stream must end with [DONE].
check_target() { # target scenario
  local url="http://127.0.0.1:${PORT[$1]}/v1/chat/completions" args=() h out code
  while IFS= read -r h; do [[ -n $h ]] && args+=(-H "$h"); done < <(scenario_headers "$2")
  out=$WORK/check-$1-$2.out
  code=$(curl -s -o "$out" -w '%{http_code}' -X POST "$url" \
    -H "content-type: application/json" -H "authorization: Bearer ${KEY[$1]}" \
    "${args[@]}" --data "$(scenario_body "$2")")
  [[ $code == 200 ]] || die "$1/$2 answered $code: $(head -c 300 "$out")"
  if [[ $2 == stream* ]]; then
    grep -q 'data: \[DONE\]' "$out" || die "$1/$2: stream did not end with [DONE]"
    local chunks
    chunks=$(grep -c '"chat.completion.chunk"' "$out" || true)
    log "check $1/$2: 200, $chunks SSE chunks, $(wc -c <"$out") bytes"
  else
    log "check $1/$2: 200, $(wc -c <"$out") bytes"
  fi
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"

# Machine-wide CPU counters from /proc/stat: "busy total" in clock ticks. Steal counts as
# busy: on a VM it is CPU this benchmark did not get.
machine_ticks() {
  local _cpu user nice system idle iowait irq softirq steal _rest
  read -r _cpu user nice system idle iowait irq softirq steal _rest </proc/stat
  local busy=$((user + nice + system + irq + softirq + steal))
  echo "$busy $((busy + idle + iowait))"
}

# CPU time (ms) of this shell's finished children — wrk, which runs in the foreground —
# into CHILDREN_MS. `times` must run in this very shell, not in a $(...) subshell, which
# has its own, empty, child accounting.
CHILDREN_MS=0
children_ms() {
  local a b v
  times >"$WORK/times"
  read -r a b < <(sed -n 2p "$WORK/times")
  CHILDREN_MS=0
  for v in "$a" "$b"; do
    [[ $v =~ ^([0-9]+)m([0-9]+)[.,]([0-9]{3})s$ ]] || continue
    CHILDREN_MS=$((CHILDREN_MS + 10#${BASH_REMATCH[1]} * 60000 + 10#${BASH_REMATCH[2]} * 1000 + 10#${BASH_REMATCH[3]}))
  done
}

ALL_PIDS="$MOCK_PID"
for t in $TARGETS; do ALL_PIDS+=" ${TPIDS[$t]}"; done
ALL_PIDS=$(tr ' ' '\n' <<<"$ALL_PIDS" | sort -u | tr '\n' ' ')

run_one() { # round target scenario conns
  local r=$1 t=$2 s=$3 c=$4 lua=$WORK/$2-$3.lua url threads line out
  local tgt0 tgt1 all0 all1 m0 m1 w0 w1 req dur p50 p99 p999 serr nonok rss
  url="http://127.0.0.1:${PORT[$t]}/v1/chat/completions"
  out=$WORK/wrk-$t-$s-$c-r$r.txt
  threads=$WRK_THREADS
  ((threads > c)) && threads=$c
  if ((WARMUP > 0)); then
    wrk -t"$threads" -c"$c" -d"${WARMUP}s" -s "$lua" "$url" >/dev/null
  fi
  # shellcheck disable=SC2086
  tgt0=$(cpu_ticks ${TPIDS[$t]})
  # shellcheck disable=SC2086
  all0=$(cpu_ticks $ALL_PIDS)
  m0=$(machine_ticks)
  children_ms
  w0=$CHILDREN_MS
  wrk -t"$threads" -c"$c" -d"${DURATION}s" --latency -s "$lua" "$url" >"$out"
  children_ms
  w1=$CHILDREN_MS
  m1=$(machine_ticks)
  # shellcheck disable=SC2086
  all1=$(cpu_ticks $ALL_PIDS)
  # shellcheck disable=SC2086
  tgt1=$(cpu_ticks ${TPIDS[$t]})
  # shellcheck disable=SC2086
  rss=$(rss_kib ${TPIDS[$t]})
  line=$(grep '^RESULT ' "$out") || die "no result from wrk for $t/$s/$c"
  read -r _ req dur p50 p99 p999 serr nonok <<<"$line"
  # CPU not spent by the mock, the targets or wrk: other tenants of the machine.
  local busy total other
  read -r busy total <<<"$(awk -v a="$m0" -v b="$m1" 'BEGIN{split(a,x," ");split(b,y," ");print y[1]-x[1], y[2]-x[2]}')"
  other=$(awk -v busy="$busy" -v ours="$((all1 - all0))" -v wrk="$((w1 - w0))" -v tck="$CLK_TCK" -v total="$total" \
    'BEGIN{o = busy - ours - wrk * tck / 1000; if (o < 0) o = 0; printf "%.0f", (total > 0) ? 100 * o / total : 0}')
  # round target scenario conns requests duration_us p50_us p99_us socket_errors non2xx
  # target_cpu_ticks other_cpu_pct p999_us rss_kib
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$s" "$c" "$req" "$dur" \
    "$p50" "$p99" "$serr" "$nonok" "$((tgt1 - tgt0))" "$other" "$p999" "$rss" >>"$RESULTS"
  log "$(printf 'r%s %-12s %-10s c=%-3s %8.0f req/s  p50 %6d us  p99 %6d us  errors %s/%s  other cpu %s%%' \
    "$r" "$t" "$s" "$c" "$(awk -v r="$req" -v d="$dur" 'BEGIN{print r/(d/1e6)}')" "$p50" "$p99" "$serr" "$nonok" "$other")"
}

for s in $SCENARIOS; do
  for t in $TARGETS; do
    write_lua "$t" "$s" "$WORK/$t-$s.lua"
    check_target "$t" "$s"
  done
done

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${LOAD_BEFORE%% *}" 'BEGIN{exit !(l > 0.5)}'; then
  log "warning: load average ${LOAD_BEFORE%% *} before the run — other processes compete for the CPU"
fi
T0=$(date +%s)
log "measuring: $ROUNDS round(s) of ${DURATION}s runs (+${WARMUP}s warm-up), conns: $CONNS, wrk threads: $WRK_THREADS"
# Targets run back to back inside each (scenario, conns) cell, so slow drifts of the
# machine hit them alike; rounds repeat the whole sweep and the report takes medians.
for r in $(seq "$ROUNDS"); do
  for s in $SCENARIOS; do
    for c in $CONNS; do
      for t in $TARGETS; do
        run_one "$r" "$t" "$s" "$c"
      done
    done
  done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# Shared target: show that the traffic really went through Redis and reached the Postgres
# ledger (the shipper runs in the background, so the count can trail by its last batch).
if [[ -n $PG_DATA ]]; then
  psql_bin=$PG_BIN/psql
  [[ -x $psql_bin ]] || psql_bin=$(command -v psql || true)
  sleep 2
  if [[ -n $psql_bin ]]; then
    log "shared: Postgres ledger rows by status: $("$psql_bin" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc \
      "SELECT string_agg(status || '=' || n, ' ') FROM (SELECT status, count(*) n FROM billing_transactions GROUP BY status ORDER BY status) s" 2>&1)"
  fi
  log "shared: Redis keys: $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" DBSIZE 2>&1)"
fi

# ---------------------------------------------------------------- slow streams
STREAM_RESULTS=$WORK/streams.jsonl
: >"$STREAM_RESULTS"
if ((STREAMS > 0)); then
  S_DELAY=${BENCH_STREAM_DELAY_MS:-1000}
  S_CHUNKS=${BENCH_STREAM_CHUNKS:-15}
  S_RAMP=${BENCH_STREAM_RAMP_MS:-3000}
  S_TARGETS=${BENCH_STREAM_TARGETS:-$(tr ' ' '\n' <<<"$TARGETS" | grep -vx litellm | paste -sd' ')}
  [[ " $S_TARGETS " == *" direct "* ]] || S_TARGETS="direct $S_TARGETS"
  log "streams: $STREAMS concurrent per target, $S_CHUNKS chunks $S_DELAY ms apart, opened over $S_RAMP ms"
  for t in $S_TARGETS; do
    [[ -n ${PORT[$t]:-} ]] || die "streams: target $t was not started (add it to BENCH_TARGETS)"
    # Memory: every process of the target (nginx: master and workers), summed.
    "$STREAMLOAD" --addr "127.0.0.1:${PORT[$t]}" --key "${KEY[$t]}" --label "$t" \
      --streams "$STREAMS" --chunks "$S_CHUNKS" --delay-ms "$S_DELAY" --ramp-ms "$S_RAMP" \
      --rss-pids "$(tr -s ' ' '\n' <<<"${TPIDS[$t]}" | grep . | paste -sd,)" >>"$STREAM_RESULTS" 2>"$WORK/streams-$t.log" ||
      die "streams: client failed for $t (see $WORK/streams-$t.log)"
    log "streams $t: $(tail -n1 "$STREAM_RESULTS")"
    sleep 1
  done
fi

# ---------------------------------------------------------------- report
report() {
  echo "tollgate load benchmark — $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
  echo "tools: $(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-2), $("$NGINX" -v 2>&1 | sed 's/.*version: //')"
  echo "runs: $ROUNDS round(s) × ${DURATION}s per cell after ${WARMUP}s warm-up; wrk threads ${WRK_THREADS}; proxy threads/workers ${PROXY_THREADS}; tollgate log ${TOLLGATE_LOG}"
  echo "loadavg before ${LOAD_BEFORE}, after ${LOAD_AFTER}; $(($(date +%s) - T0))s of measuring"
  echo
  [[ -s $RESULTS ]] && awk -F'\t' -v tck="$CLK_TCK" -v rounds="$ROUNDS" '
    function median(list,   v, n, i, j, x) {
      n = split(list, v, " ")
      for (i = 2; i <= n; i++) { x = v[i]; for (j = i - 1; j >= 1 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
      return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    function lo(list,   v, n, i, m) { n = split(list, v, " "); m = v[1]; for (i = 2; i <= n; i++) if (v[i] < m) m = v[i]; return m }
    function hi(list,   v, n, i, m) { n = split(list, v, " "); m = v[1]; for (i = 2; i <= n; i++) if (v[i] > m) m = v[i]; return m }
    {
      k = $2 SUBSEP $3 SUBSEP $4
      if (!(k in seen)) { seen[k] = 1; order[n++] = k; tgt[k] = $2; scn[k] = $3; con[k] = $4 }
      rps[k] = rps[k] " " ($5 / ($6 / 1e6))
      p50[k] = p50[k] " " $7
      p99[k] = p99[k] " " $8
      p999[k] = p999[k] " " $13
      rss[k] = rss[k] " " $14
      cpu[k] = cpu[k] " " (($5 > 0) ? $11 * 1e6 / tck / $5 : 0)
      oth[k] = oth[k] " " $12
      err[k] += $9; bad[k] += $10
    }
    END {
      for (i = 0; i < n; i++) {
        k = order[i]
        mr[k] = median(rps[k]); m50[k] = median(p50[k]); m99[k] = median(p99[k]); m999[k] = median(p999[k])
      }
      printf "%-12s %-10s %5s %9s %13s %8s %8s %8s %8s %8s %9s %7s %8s %7s %6s %7s\n", \
        "target", "scenario", "conns", "req/s", "req/s range", "p50 us", "p99 us", "p99.9 us", "+p50 us", "+p99 us", \
        "+p99.9 us", "x nginx", "cpu us/r", "RSS MiB", "other", "errors"
      for (i = 0; i < n; i++) {
        k = order[i]
        d = "direct" SUBSEP scn[k] SUBSEP con[k]
        g = "nginx" SUBSEP scn[k] SUBSEP con[k]
        add50 = (tgt[k] == "direct") ? "-" : sprintf("%d", m50[k] - m50[d])
        add99 = (tgt[k] == "direct") ? "-" : sprintf("%d", m99[k] - m99[d])
        add999 = (tgt[k] == "direct") ? "-" : sprintf("%d", m999[k] - m999[d])
        ratio = (g in mr && mr[g] > 0) ? sprintf("%.2f", mr[k] / mr[g]) : "-"
        printf "%-12s %-10s %5s %9.0f %13s %8d %8d %8d %8s %8s %9s %7s %8.0f %7.1f %5.0f%% %7s\n", \
          tgt[k], scn[k], con[k], mr[k], sprintf("%.0f-%.0f", lo(rps[k]), hi(rps[k])), m50[k], m99[k], m999[k], \
          add50, add99, add999, ratio, median(cpu[k]), hi(rss[k]) / 1024, median(oth[k]), err[k] "/" bad[k]
      }
    }' "$RESULTS"
  echo
  echo "Medians over rounds (req/s range: lowest-highest round). +p50/+p99: target percentile"
  echo "minus the direct (mock-only) percentile of the same scenario and connection count."
  echo "x nginx: req/s over nginx req/s. cpu us/r: CPU time of the target's own processes per"
  echo "request (direct: the mock; nginx: master + workers; tollgate: its process) — the mock"
  echo "and wrk are not included. RSS: resident memory of those processes at the end of the run"
  echo "(highest over rounds). other: machine CPU used by processes outside the benchmark"
  echo "(incl. VM steal) during the run, % of all CPUs. errors: socket errors / non-2xx."
  if [[ -s $STREAM_RESULTS ]]; then
    echo
    python3 - "$STREAM_RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
d = next((r for r in rows if r["label"] == "direct"), None)
print(f"slow streams: {rows[0]['streams']} concurrent per target, {rows[0]['chunks']} chunks "
      f"{rows[0]['delay_ms']} ms apart")
print()
hdr = ("target", "complete", "ttfb p50", "ttfb p99", "+ttfb p50", "+ttfb p99", "gap p50",
       "gap p99", "gap p99.9", "+gap p99", "RSS open MiB", "B/stream", "errors")
print("%-12s %9s %9s %9s %10s %10s %8s %8s %10s %9s %13s %9s  %s" % hdr)
for r in rows:
    g, t = r["gap_us"], r["ttfb_us"]
    add_t50 = "-" if d is None or r is d else str(t["p50"] - d["ttfb_us"]["p50"])
    add_t = "-" if d is None or r is d else str(t["p99"] - d["ttfb_us"]["p99"])
    add_g = "-" if d is None or r is d else str(g["p99"] - d["gap_us"]["p99"])
    rss = r["rss_kib"].get("open")
    per = r.get("rss_per_stream_bytes")
    errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
    print("%-12s %9s %9d %9d %10s %10s %8d %8d %10d %9s %13s %9s  %s" % (
        r["label"], f"{r['complete']}/{r['streams']}", t["p50"], t["p99"], add_t50, add_t, g["p50"],
        g["p99"], g["p999"], add_g, "-" if rss is None else f"{rss / 1024:.1f}",
        "-" if per is None else per, errs))
print()
print("Times in microseconds. ttfb: request sent -> response headers. gap: time between two")
print("consecutive SSE events of one stream at the client; +: target minus direct. RSS open:")
print("the target's resident memory with every stream open; B/stream: (that - RSS before the")
print("streams) / streams.")
PY
  fi
}
if [[ -n ${BENCH_OUT:-} ]]; then report | tee "$BENCH_OUT"; else report; fi
