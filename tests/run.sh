#!/usr/bin/env bash
# Install what is missing, then run the CPU test suite (single- and multi-process tests).
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
bash "$root/toolkits/install_requirements.sh" test
cd "$root"
# Keep each process to its share of the cores: torchrun tests start two ranks at a time.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m pytest tests -q -p no:cacheprovider --timeout=900 --durations=15 "$@"
