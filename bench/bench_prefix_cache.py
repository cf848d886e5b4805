"""The prefix cache's own bookkeeping, apart from copying keys and values: what keeping a session
(and evicting the oldest to make room) and looking a prompt up cost as the cache grows.

A worker's cache fills with ended conversations: every entry starts with the same system prompt
and runs 300-800 positions. Positions hold one tiny layer here (16 bytes), so the times are the
index's (digests, families, bisection), not the copies; a real cache of the same number of
positions holds 46 KiB per position for SmolLM2 (SmolLM2's 128 MiB default: about 2,800
positions) and up to gigabytes on a GPU worker (hundreds of thousands of positions).

``--compare-with REV`` runs the same workload on ``partition/prefix_cache.py`` as of git revision
REV too, alternating, in this process.

    .venv/bin/python bench/bench_prefix_cache.py [--positions 3000 30000 300000] [--compare-with HEAD~1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT

from partition.kv_cache import SegmentKVCache  # noqa: E402
from partition.prefix_cache import row_digests  # noqa: E402

BYTES_PER_POSITION = 16  # one layer, one head of two dims, keys and values in float32
SYSTEM = 40


def load_at(rev: str):
    """``partition/prefix_cache.py`` as of ``rev``, imported under another name."""
    text = subprocess.run(["git", "show", f"{rev}:partition/prefix_cache.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"prefix_cache_{rev.replace('~', '_').replace('^', '_')}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def cache_of(n: int) -> SegmentKVCache:
    cache = SegmentKVCache()
    cache.update(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2), 0)
    cache.advance(n)
    return cache


def workload(positions: int, seed: int = 0) -> tuple[list[list[bytes]], list[list[bytes]]]:
    """Conversations to add (twice the cache's room, so the second half evicts at every add) and
    prompts to look up (half continue a kept conversation, half are new)."""
    rng = random.Random(seed)
    system = [rng.randrange(49152) for _ in range(SYSTEM)]
    convs = []
    total = 0
    while total < 2 * positions:
        ids = system + [rng.randrange(49152) for _ in range(rng.randrange(300 - SYSTEM, 800 - SYSTEM))]
        convs.append(row_digests(torch.tensor([ids]), "bench"))
        total += len(ids)
    lookups = []
    for i in range(200):
        if i % 2:
            lookups.append(convs[-1 - rng.randrange(10)] + [bytes(16)] * 40)  # a kept one's next turn
        else:
            ids = system + [rng.randrange(49152) for _ in range(rng.randrange(300, 2000))]
            lookups.append(row_digests(torch.tensor([ids]), "bench"))
    return convs, lookups


def run(module, positions: int, convs, lookups) -> dict:
    pc = module.PrefixCache(positions * BYTES_PER_POSITION)
    caches = {}
    add_ms = []
    for digests in convs:
        cache = caches.setdefault(len(digests), cache_of(len(digests)))
        evicting = pc.nbytes + len(digests) * BYTES_PER_POSITION > pc.limit_bytes
        t0 = time.perf_counter()
        pc.add(digests, cache)
        if evicting:
            add_ms.append((time.perf_counter() - t0) * 1e3)
    look_ms = []
    for digests in lookups:
        t0 = time.perf_counter()
        pc.longest(digests, len(digests))
        look_ms.append((time.perf_counter() - t0) * 1e3)
    return {"adds_evicting": len(add_ms), "add_ms_median": round(statistics.median(add_ms), 4),
            "lookup_ms_median": round(statistics.median(look_ms), 4), "entries": len(pc)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", nargs="+", type=int, default=[3000, 30000, 300000])
    parser.add_argument("--compare-with", help="git revision whose prefix cache runs the same workload")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    import partition.prefix_cache as current

    impls = {"this tree": current}
    if args.compare_with:
        impls = {args.compare_with: load_at(args.compare_with), **impls}
    rows = []
    for positions in args.positions:
        convs, lookups = workload(positions)
        for rep in range(args.reps):
            for name, module in impls.items():
                row = {"positions": positions, "impl": name, "rep": rep, **run(module, positions, convs, lookups)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
