# benches/lib.sh — shell helpers shared by benches/load.sh and benches/quick.sh (sourced,
# not run). The sourcing script defines `die` and sets PORTS_TAKEN to a file in its temp dir.

# A loopback port nothing listens on and no earlier call of this run handed out (recorded
# in $PORTS_TAKEN, since callers run this in a $(...) subshell). Below the kernel's
# ephemeral range (ip_local_port_range, 32768-60999 by default): thousands of client
# connections of a streams run must not take a listener's port.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    grep -qx "$p" "$PORTS_TAKEN" 2>/dev/null && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p" >>"$PORTS_TAKEN"
      echo "$p"
      return
    fi
  done
}

# Wait up to 30 s for PORT to accept connections; die if PID exits first.
wait_port() { # port pid what
  local i
  for i in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || die "$3 exited during start-up (see its log)"
    sleep 0.1
  done
  die "$3 not listening on 127.0.0.1:$1 after 30 s"
}

# Sum of utime+stime (clock ticks) of the given pids; a pid that is gone counts 0.
cpu_ticks() {
  local total=0 pid stat rest
  for pid in "$@"; do
    read -r stat <"/proc/$pid/stat" 2>/dev/null || continue
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    total=$((total + ${12} + ${13}))
  done
  echo "$total"
}

# Resident memory (KiB) of the given pids, summed; a pid that is gone counts 0.
rss_kib() {
  local total=0 pid v
  for pid in "$@"; do
    v=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$pid/status" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# Direct children of a pid (nginx workers), from /proc.
children_of() {
  local parent=$1 f stat rest
  for f in /proc/[0-9]*/stat; do
    read -r stat <"$f" 2>/dev/null || continue
    rest=${stat##*) } # "STATE PPID ..."
    rest=${rest#* }
    if [[ ${rest%% *} == "$parent" ]]; then
      f=${f#/proc/}
      echo "${f%/stat}"
    fi
  done
}
