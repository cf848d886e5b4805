#!/usr/bin/env bash
# The original design's example script: runs the multi-process demo (broker, cloud workers, edge)
# with the original options. Unknown options are passed to `edgecloud demo` unchanged.
#   ./run_edge_cloud.sh --tokens 20 --cloud-latency 0.5 --energy-weight 0.4
# Options: --model M (default smollm2-135m; the original defaulted to distilgpt2, which needs a hub),
# --prompt P, --tokens N, --energy-weight W, --latency-weight W, --memory-weight W,
# --cloud-latency SECONDS, --no-encryption, --force-local, --force-cloud, --min-split K (privacy floor:
# never fewer layers on the edge), --max-leakage F (the floor from the measured leakage table), plus
# any `edgecloud demo` option (for example --mini self|lookup|MODEL, --mini-threshold T,
# --mini-mode verify|trust, --mini-pipeline/--no-mini-pipeline, --wire-dtype int8, or --reduce-dims D: activations projected to D dims
# before they leave).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/edgecloud ] || make setup >&2
exec .venv/bin/edgecloud demo "$@"
