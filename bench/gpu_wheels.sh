#!/usr/bin/env bash
# Wheels a lent GPU machine lacks for bench/gpu_check.sh, for the device image's Python 3.12, into
# .whl/ (ignored by git): pyzmq, PyNaCl and cffi for its cluster part (a real broker and worker
# process on the GPU), and the transformers this project is tested with (partition/arch.py uses
# its internals; the image had 5.17, pyproject.toml pins 5.24). The image has torch, msgpack,
# psutil, typer and transformers' own needs; it cannot reach PyPI, this machine can. About 16 MB.
# Then, with the device tool:
#
#   bash bench/gpu_wheels.sh
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# gpu_check.sh installs what it finds in .whl/ to /tmp/site first. The versions are the ones
# `make setup` installed in .venv (run it first), so the device runs what the tests here ran.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
for name in pyzmq pynacl cffi transformers; do
    pkg="$name==$("$py" -c "from importlib.metadata import version; print(version('$name'))")"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$pkg"
done
ls -l .whl
du -sh .whl
