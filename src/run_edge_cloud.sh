#!/usr/bin/env bash
# The original design's path to its example script; the script lives at the project's top level
# (../run_edge_cloud.sh), this one only forwards to it so the design's commands work verbatim:
#   ./src/run_edge_cloud.sh --tokens 20 --cloud-latency 0.5 --energy-weight 0.4
exec "$(dirname "$0")/../run_edge_cloud.sh" "$@"
