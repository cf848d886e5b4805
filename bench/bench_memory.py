"""Resident memory of a process holding segment [0, k) of a model, next to the whole model.

Each measurement runs in a fresh process so nothing is shared. For every k it reports the RSS
right after loading ("loaded": safetensors maps the file, so untouched pages are not resident),
the RSS once every weight has been read ("RSS": the working set while generating), the peak
RSS (VmHWM), and the expected figure

    import overhead + embedding + k/N of the layer weights (+ final norm when k = N)

computed from the checkpoint's own tensor sizes. Targets (issue 2): RSS within 10% of the
expectation, the peak not far above it.

    .venv/bin/python bench/bench_memory.py [--model smollm2-135m] [--splits 0,8,15,30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROBE = r"""
import json, os, sys, time
def mem():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out
what, model, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch, transformers
from partition.models import resolve_model
from partition.segment import ModelSegment
source = resolve_model(model)
# Import overhead includes the architecture's modeling code (transformers imports it lazily):
# build the weightless meta skeleton once before the baseline, so only weights are measured.
from partition.arch import meta_skeleton
meta_skeleton(source.config)
import gc; gc.collect()
base = mem()
t0 = time.perf_counter()
if what == "segment":
    seg = ModelSegment.load(source, 0, k)
elif what == "hf-full":
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32)
elif what == "hf-gguf":
    from transformers import AutoModelForCausalLM
    from partition.models import smollm2_gguf_path
    p = smollm2_gguf_path()
    m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
elapsed = time.perf_counter() - t0
after = mem()
# safetensors maps the file: pages become resident when first read. Touch every weight so the
# figure is the working set of a process that has generated, not of one that only opened a file.
held = seg if what == "segment" else m
with torch.no_grad():
    for p in held.parameters():
        p.sum()
warm = mem()
print(json.dumps({"base_rss": base["VmRSS"], "rss_loaded": after["VmRSS"], "rss": warm["VmRSS"],
                  "peak": warm["VmHWM"], "load_s": elapsed}))
"""


def measure(what: str, model: str, k: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, what, model, str(k)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def expected_weight_bytes(source, k: int) -> int:
    family = source.family
    store = source.weights
    sizes = _tensor_bytes(store)
    total = sum(sizes[n] for p in family.embed_prefixes for n in store.with_prefix(p))
    for i in range(k):
        total += sum(sizes[n] for n in store.with_prefix(family.layer_prefix.format(i=i)))
    if k == source.n_layers:
        total += sum(sizes[n] for n in store.with_prefix(family.norm_prefix))
        if family.head_weight in store:
            total += sizes[family.head_weight]
    return total


def _tensor_bytes(store) -> dict[str, int]:
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    files = {store._file_of[n] for n in store.names()}
    for file in files:
        with safe_open(store.directory / file, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                sizes[name] = n * 4  # loaded as fp32
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--splits", default="0,8,15,30")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from partition.models import resolve_model

    source = resolve_model(args.model)  # converts once, outside the measured processes
    rows = []
    for k in [int(s) for s in args.splits.split(",")]:
        m = measure("segment", args.model, k)
        expect = m["base_rss"] + expected_weight_bytes(source, k)
        rows.append({"what": f"segment [0,{k})", **m, "expected": expect})
    rows.append({"what": "HF full (safetensors)", **measure("hf-full", args.model, source.n_layers),
                 "expected": None})
    if args.model.startswith("smollm2"):
        rows.append({"what": "HF full (from GGUF)", **measure("hf-gguf", args.model, source.n_layers),
                     "expected": None})
    if args.json:
        print(json.dumps(rows))
        return
    mib = 1 / 2**20
    print(f"model {source.name}, {source.n_layers} layers; import overhead {rows[0]['base_rss'] * mib:.0f} MiB")
    print(f"{'process holds':24} {'loaded':>7} {'RSS MiB':>8} {'peak MiB':>9} {'expected':>9} {'RSS/exp':>8} "
          f"{'peak/RSS':>9} {'load s':>7}")
    for r in rows:
        exp = f"{r['expected'] * mib:9.0f}" if r["expected"] else f"{'':9}"
        ratio = f"{r['rss'] / r['expected']:8.3f}" if r["expected"] else f"{'':8}"
        print(f"{r['what']:24} {r['rss_loaded'] * mib:7.0f} {r['rss'] * mib:8.0f} {r['peak'] * mib:9.0f} {exp} {ratio} "
              f"{r['peak'] / r['rss']:9.3f} {r['load_s']:7.2f}")


if __name__ == "__main__":
    main()
