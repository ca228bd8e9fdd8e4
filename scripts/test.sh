#!/usr/bin/env bash
# Set up (when needed) and run the test suite, notebooks included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests notebooks --nbmake
