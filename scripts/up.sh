#!/usr/bin/env bash
# Runs the whole mesh on this machine (etcd, Redis when installed, 2 placement replicas, 2 runtime
# pods, router on :8033, demo models), restarting any child that dies, until Ctrl-C. Installs what
# it needs into .venv first. Extra arguments go to `mesh up` (--pods N, --placements N,
# --routers N, --lease-ttl S, --port P, --etcd HOST:PORT, --no-demo; `mesh up --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec mesh up "$@"
