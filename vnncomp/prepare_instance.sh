#!/bin/bash
# VNN-COMP tool interface: nothing to convert ahead of time (networks and queries are read when
# the instance runs); leftover diffprobe processes of an earlier instance are stopped.
#   prepare_instance.sh v1 CATEGORY NETWORKS VNNLIB
[ "${1:-v1}" = "v1" ] || { echo "expected version string v1, got $1" >&2; exit 1; }
pkill -f "diffprobe solve" 2>/dev/null
exit 0
