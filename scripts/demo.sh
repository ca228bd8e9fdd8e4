#!/usr/bin/env bash
# Set up (when needed) and run the main job on the built-in example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/diffprobe demo "$@"
