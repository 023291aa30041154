#!/usr/bin/env bash
# Install what building tollgate needs on Debian/Ubuntu: a C toolchain and cmake
# (pingora's zlib-ng), plus Rust if absent. With --test also redis-server and PostgreSQL,
# which the test suite starts privately (and uses the local services if running),
# Chromium, which renders the admin usage page headless (tests/usage_page.rs), promtool
# (Debian's prometheus package) for the alerting rules (tests/alert_rules.rs), and the
# official OpenAI and Anthropic SDKs for Python and Node.js at the pinned versions of
# tests/sdk/ (tests/sdk.rs), with python3-venv and nodejs/npm when absent.
set -euo pipefail
cd "$(dirname "$0")/.."
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
  # promtool checks and unit-tests docs/prometheus-rules.yml (tests/alert_rules.rs).
  command -v promtool >/dev/null || need+=(prometheus)
  command -v python3 >/dev/null || need+=(python3)
  python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
  command -v node >/dev/null || need+=(nodejs)
  command -v npm >/dev/null || need+=(npm)
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
if [[ "${1:-}" == "--test" ]]; then
  # The SDK conformance suite's pinned SDKs, reinstalled only when a pin changes.
  sdk=tests/sdk
  stamp() { sha256sum "$1" | cut -d' ' -f1; }
  if [[ "$(cat "$sdk/.venv/.requirements.sha256" 2>/dev/null)" != "$(stamp "$sdk/python/requirements.txt")" ]]; then
    echo "installing the Python SDKs into $sdk/.venv"
    rm -rf "$sdk/.venv"
    # ensurepip has been seen to fail once under heavy load and succeed at once after.
    python3 -m venv "$sdk/.venv" || { rm -rf "$sdk/.venv"; sleep 2; python3 -m venv "$sdk/.venv"; }
    "$sdk/.venv/bin/pip" install -q --disable-pip-version-check -r "$sdk/python/requirements.txt"
    stamp "$sdk/python/requirements.txt" >"$sdk/.venv/.requirements.sha256"
  fi
  if [[ "$(cat "$sdk/node/node_modules/.package-lock.sha256" 2>/dev/null)" != "$(stamp "$sdk/node/package-lock.json")" ]]; then
    echo "installing the Node.js SDKs into $sdk/node/node_modules"
    (cd "$sdk/node" && npm ci --no-audit --no-fund --loglevel=error)
    stamp "$sdk/node/package-lock.json" >"$sdk/node/node_modules/.package-lock.sha256"
  fi
fi
