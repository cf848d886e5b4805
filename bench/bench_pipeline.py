"""Hybrid generation through the real broker and a worker, next to local-only, in one run.

Starts a broker and one cloud worker as processes (as ``edgecloud demo`` does), then runs the
edge CLI alternately in local-only and hybrid mode on the same prompts, each in a fresh process,
and reports the median decode ms/token of each and their ratio. The per-token trace splits the
hybrid time into edge compute, cloud compute and transport (everything between the edge's send
and its receive other than the worker's compute: serialisation, encryption, two ZeroMQ hops and
the broker).

Target (issue 3): hybrid at split 15 with no added delay at most 1.05x local-only.

    .venv/bin/python bench/bench_pipeline.py [--model smollm2-135m] [--split 15] [--tokens 64] [--reps 3]
        [--placements shared,disjoint]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROMPTS  # noqa: E402

from cli.cluster import LocalCluster  # noqa: E402

# Where the edge and the worker run when they share this host: "shared" lets both use every core
# (each with one torch thread per core, taking turns); "disjoint" pins the edge to the first core
# and the worker to the second (EDGECLOUD_CPUS), one thread each, as llama.cpp's RPC backend was
# measured fastest here. Local-only runs on every core either way.
PLACEMENTS = {"shared": ({}, {}), "disjoint": ({"EDGECLOUD_CPUS": "0"}, {"EDGECLOUD_CPUS": "1"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-encryption", action="store_true")
    parser.add_argument("--placements", default="shared",
                        help="comma-separated: shared (edge and worker on every core) and/or disjoint (edge on "
                             "core 0, worker on core 1); each is its own hybrid row, side by side")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    placements = args.placements.split(",")
    unknown = set(placements) - set(PLACEMENTS)
    if unknown:
        raise SystemExit(f"unknown placements {sorted(unknown)}; choose from {sorted(PLACEMENTS)}")

    hybrid = ["--split", str(args.split)] + (["--no-encryption"] if args.no_encryption else [])
    modes = ["local", *(f"hybrid-{p}" for p in placements)]
    per_token: dict[str, list[float]] = {m: [] for m in modes}
    parts: dict[str, dict[str, list[float]]] = {m: {"edge_ms": [], "cloud_ms": [], "transport_ms": []}
                                                for m in modes[1:]}
    with contextlib.ExitStack() as stack:
        clusters = {}
        for p in placements:
            cluster = stack.enter_context(LocalCluster(model=args.model, encryption=not args.no_encryption))
            cluster.start_broker()
            cluster.add_worker(env=PLACEMENTS[p][1])
            clusters[p] = cluster
        for cluster in clusters.values():
            cluster.wait_for_workers(1)
        for _ in range(args.reps):
            for prompt in PROMPTS:
                outputs = {}
                for mode in modes:
                    placement = mode.removeprefix("hybrid-")
                    cluster = clusters.get(placement, next(iter(clusters.values())))
                    extra = ["--force-local"] if mode == "local" else hybrid
                    env = PLACEMENTS[placement][0] if mode != "local" else {}
                    out = cluster.edge(*extra, "--json", "--tokens", str(args.tokens), "--prompt", prompt, env=env)
                    if out.returncode != 0:
                        raise SystemExit(f"edge failed in {mode} mode:\n{out.stderr[-2000:]}")
                    r = json.loads(out.stdout)
                    outputs[mode] = r["token_ids"]
                    per_token[mode].append(r["ms_per_token"])
                    if mode != "local":
                        for step in r["trace"][1:]:
                            for key in parts[mode]:
                                parts[mode][key].append(step[key])
                if any(o != outputs["local"] for o in outputs.values()):
                    raise SystemExit(f"hybrid output differs from local on {prompt!r}")
    med = {m: statistics.median(v) for m, v in per_token.items()}
    result = {
        "model": args.model, "split": args.split, "tokens": args.tokens, "reps": args.reps,
        "encryption": not args.no_encryption, "ms_per_token": med,
        "ratio_over_local": {m: med[m] / med["local"] for m in modes[1:]},
        "hybrid_step_median_ms": {m: {k: statistics.median(v) for k, v in parts[m].items()} for m in modes[1:]},
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"model {args.model}, split {args.split}, {args.tokens} tokens x {len(PROMPTS)} prompts x {args.reps} reps "
          f"(median decode ms/token; outputs identical)")
    for m, v in med.items():
        print(f"  {m:16} {v:7.2f}" + (f"  ({v / med['local']:.3f}x local)" if m != "local" else ""))
    for m in modes[1:]:
        print(f"  {m} step, median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in result["hybrid_step_median_ms"][m].items()))


if __name__ == "__main__":
    main()
