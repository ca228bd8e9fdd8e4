#!/bin/bash
# VNN-COMP tool interface: answer one instance.
#   run_instance.sh v1 CATEGORY NETWORKS VNNLIB RESULT_FILE TIMEOUT
# NETWORKS: one ONNX path, or instances.csv's field "[('f', 'a.onnx'), ('g', 'b.onnx')]".
# RESULT_FILE gets sat (and the counterexample, checked on the networks), unsat, unknown or timeout,
# within TIMEOUT seconds including start-up.
[ "$1" = "v1" ] || { echo "expected version string v1, got $1" >&2; exit 1; }
CATEGORY="$2"; NETWORKS="$3"; VNNLIB="$4"; RESULT="$5"; TIMEOUT="$6"
HERE="$(cd "$(dirname "$0")" && pwd)"
DIFFPROBE="${DIFFPROBE:-$HERE/.venv/bin/diffprobe}"
# the answer's own budget leaves time for Python's start-up and the result file
BUDGET=$(python3 -c "print(max(float('$TIMEOUT') - 4.0, 1.0))")
timeout --kill-after=2 "$(python3 -c "print(float('$TIMEOUT') - 0.5)")" \
    "$DIFFPROBE" solve "$VNNLIB" "$NETWORKS" --timeout "$BUDGET" --result "$RESULT" --force
CODE=$?
case $CODE in
    0|10|5) ;;                                   # unsat / sat / unknown or timeout: written by diffprobe
    124|137) echo timeout > "$RESULT" ;;         # killed at the limit
    *) echo unknown > "$RESULT" ;;               # refused (one line on stderr says why)
esac
exit 0
