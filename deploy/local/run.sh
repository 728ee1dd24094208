#!/usr/bin/env bash
# One command for the local two-replica deployment and its checks (see deploy/local/run.py
# --help): two `graphserver serve` replicas, nginx in front, the fake trainer rolling versions.
# Uses the repository's .venv when there is one and none is active.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
    . .venv/bin/activate
fi
exec python deploy/local/run.py "$@"
