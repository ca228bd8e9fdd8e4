#!/usr/bin/env bash
# Set up (when needed) and run the test suite, notebooks included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# one pytest worker per core, one torch thread per worker: the models are small, and torch's
# default (a thread per core in every worker) oversubscribes the cores several times over
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/python -m pytest -q -p no:cacheprovider -n auto "$@" tests notebooks --nbmake
