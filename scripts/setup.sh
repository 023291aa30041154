#!/usr/bin/env bash
# Install what building tollgate needs on Debian/Ubuntu: a C toolchain and cmake
# (pingora's zlib-ng), plus Rust if absent. With --test also redis-server and PostgreSQL,
# which the test suite starts privately (and uses the local services if running), and
# Chromium, which renders the admin usage page headless (tests/usage_page.rs).
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v cc >/dev/null || need+=(build-essential)
command -v curl >/dev/null || need+=(curl)
dpkg -s ca-certificates >/dev/null 2>&1 || need+=(ca-certificates)
if [[ "${1:-}" == "--test" ]]; then
  command -v redis-server >/dev/null || need+=(redis-server)
  if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    need+=(postgresql)
  fi
  command -v chromium >/dev/null || need+=(chromium)
fi
if ((${#need[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  source "$HOME/.cargo/env"
fi
