"""OpenMP (and allocator) settings when the edge and a worker share the cores: local and hybrid
ms/token per setting.

For each setting, a broker and one worker start with that OpenMP environment, then the edge CLI
(same environment) alternates local-only (split N) and hybrid (``--split``) generations. What to
look for is not the mean but the spread: an unbound pool sometimes runs a whole generation several
times slower (BENCHMARKS.md, "OpenMP threads of two processes on two cores").

    .venv/bin/python bench/bench_openmp.py [--settings bound spin passive] [--reps 3] [--tokens 32]

A setting named twice runs twice (``--settings bound thp bound thp``: alternated, side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import OPENMP_DEFAULTS  # noqa: E402
from cli.cluster import LocalCluster  # noqa: E402

SETTINGS = {
    "bound": dict(OPENMP_DEFAULTS),  # the defaults: spin 30000, bound to cores
    "spin": {"GOMP_SPINCOUNT": "30000"},  # the old default: spin, unbound
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # never spin
    "nospin": {"GOMP_SPINCOUNT": "0"},
    # The defaults, and torch's CPU allocator asking for transparent huge pages (2 MiB) for large
    # tensors (the weights): fewer TLB misses streaming them, perhaps less cost after a switch.
    "thp": {**OPENMP_DEFAULTS, "THP_MEM_ALLOC_ENABLE": "1"},
    # The defaults with the layers' products on the float32 weights instead of the GGUF file's
    # Q4_1 blocks (partition/gguf_blocks.py): the same tokens.
    "f32": {**OPENMP_DEFAULTS, "EDGECLOUD_GGUF_BLOCKS": "off"},
    # The head's Q8_0 blocks on both sides (the worker's too, as --head-blocks), and on neither
    # (the edge reads them by default, a worker does not: partition/gguf_blocks.py).
    "head": {**OPENMP_DEFAULTS, "EDGECLOUD_GGUF_HEAD": "on"},
    "nohead": {**OPENMP_DEFAULTS, "EDGECLOUD_GGUF_HEAD": "off"},
}
OPENMP_VARS = ("GOMP_SPINCOUNT", "OMP_PROC_BIND", "OMP_PLACES", "OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE",
               "EDGECLOUD_GGUF_BLOCKS", "EDGECLOUD_GGUF_HEAD")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", type=int, default=15)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", default="Explain why the sky is blue.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    results = {}
    for name in args.settings:
        for var in OPENMP_VARS:  # the children inherit exactly this setting
            os.environ.pop(var, None)
        os.environ.update(SETTINGS[name])
        runs = []
        with LocalCluster(model=args.model) as cluster:
            cluster.start_broker()
            cluster.add_worker()
            cluster.wait_for_workers(1)
            for _ in range(args.reps):
                for mode in ("local", "hybrid"):
                    split = ["--force-local"] if mode == "local" else ["--split", str(args.split)]
                    r = cluster.edge("--json", "--no-replan", "--tokens", str(args.tokens), "--prompt",
                                     args.prompt, *split)
                    if r.returncode != 0:
                        raise SystemExit(f"edge failed ({name}, {mode}):\n{r.stderr[-2000:]}")
                    runs.append((mode, round(json.loads(r.stdout)["ms_per_token"], 1)))
        results.setdefault(name, []).extend(runs)
        if not args.json:
            print(f"{name:8} " + ", ".join(f"{mode} {ms}" for mode, ms in runs), flush=True)
    if args.json:
        print(json.dumps({"model": args.model, "split": args.split, "tokens": args.tokens, "runs": results}))


if __name__ == "__main__":
    main()
