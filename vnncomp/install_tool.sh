#!/bin/bash
# VNN-COMP tool interface: install diffprobe (CPU) into vnncomp/.venv.
#   install_tool.sh v1
set -euo pipefail
[ "${1:-v1}" = "v1" ] || { echo "expected version string v1, got $1" >&2; exit 1; }
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
python3 -m venv "$HERE/.venv"
"$HERE/.venv/bin/pip" install --quiet --upgrade pip
"$HERE/.venv/bin/pip" install --quiet "torch>=2.4,<2.14"
"$HERE/.venv/bin/pip" install --quiet "$ROOT[onnx,vnnlib]"
# auto-lirpa 0.3's metadata pins torch<1.13; diffprobe.lirpa_compat makes it run on torch 2.x
"$HERE/.venv/bin/pip" install --quiet --no-deps "auto-lirpa==0.3"
"$HERE/.venv/bin/diffprobe" --version
