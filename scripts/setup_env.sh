#!/usr/bin/env bash
# Create .venv (when missing) and install diffprobe with everything it needs. Needs only python3 + pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# the CPU torch first, so nothing below pulls a CUDA build
python -m pip install -q "torch>=2.4,<2.14"
python -m pip install -q -e ".[dev]"
# auto-lirpa 0.3's metadata pins torch<1.13; diffprobe.lirpa_compat makes it run on torch 2.x
python -m pip install -q --no-deps "auto-lirpa==0.3"
