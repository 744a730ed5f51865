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
# Two pytest workers (PYTEST_WORKERS), each taking whole files (their module fixtures are built
# once): most of the suite is single-threaded process start-up, which two cores overlap.
exec "$PY" -m pytest tests -q -p no:cacheprovider --timeout=900 --durations=15 \
    -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
