#!/usr/bin/env bash
# The GPU check of issue 17, for a lent GPU machine (the `device` tool), in a few minutes:
# ms/step and tokens/s of a worker's batched decode step at batch 1..64 for SmolLM2's shape and a
# 1B-class Llama shape (random weights built on the GPU from a config), every session's tokens and
# logits against that session alone (batch invariance), a split against the whole model, and,
# where pyzmq and PyNaCl are there, a real broker and worker process on the GPU.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root
#
# Figures go to $OUT (the device tool's folder that comes back) or to /tmp/gpu_check.
# GPU_CHECK_DEVICE=cpu GPU_CHECK_ARGS=--quick runs the same steps on a CPU in seconds (the test
# suite does, tests/test_gpu_check.py). Wheels for what the machine lacks (pyzmq, pynacl, cffi and
# the transformers pyproject.toml pins: `bash bench/gpu_wheels.sh` fetches them) travel in .whl/:
# where one of those does not import (or transformers is another version), they are installed to
# /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
device="${GPU_CHECK_DEVICE:-cuda}"
read -r -a extra <<< "${GPU_CHECK_ARGS:-}"
export PYTHONUNBUFFERED=1
# What the project needs that the device image may lack or hold in another version: pyzmq,
# PyNaCl, and transformers within pyproject.toml's range.
needs="import tomllib, zmq, nacl, transformers
from packaging.requirements import Requirement
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
wanted = next(Requirement(d) for d in deps if Requirement(d).name == 'transformers')
assert transformers.__version__ in wanted.specifier"
if ! "$py" -c "$needs" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 || true; } | tee "$out/gpu.txt"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
cluster=()
if "$py" -c "import zmq, nacl, msgpack, typer, psutil" 2> /dev/null; then
    cluster=(--cluster)
fi
status=0
# SmolLM2's shape in both half-precision dtypes, then the 1B shape in bfloat16 (a GPU worker's default).
timeout 300 "$py" bench/bench_gpu.py --device "$device" --models smollm2-shape --dtypes bfloat16 float16 \
    "${cluster[@]}" "${extra[@]}" --json "$out/gpu_smollm2.json" 2>&1 | tee "$out/gpu_smollm2.log" || status=1
timeout 240 "$py" bench/bench_gpu.py --device "$device" --models llama-1b-shape --dtypes bfloat16 \
    "${extra[@]}" --json "$out/gpu_1b.json" 2>&1 | tee "$out/gpu_1b.log" || status=1
exit $status
