#!/usr/bin/env bash
# Runs the whole mesh on this machine (etcd, placement, 2 runtime pods, router on :8033, demo
# models). Installs what it needs into .venv first. Extra arguments go to `mesh up`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec mesh up "$@"
