"""Hybrid generation through the real broker and a worker, next to local-only, in one run.

Starts a broker and one cloud worker as processes (as ``edgecloud demo`` does), then runs the
edge CLI alternately in local-only and hybrid mode on the same prompts, each in a fresh process,
and reports the median decode ms/token of each and their ratio. The per-token trace splits the
hybrid time into edge compute, cloud compute and transport (everything between the edge's send
and its receive other than the worker's compute: serialisation, encryption, two ZeroMQ hops and
the broker).

Target (issue 3): hybrid at split 15 with no added delay at most 1.05x local-only.

    .venv/bin/python bench/bench_pipeline.py [--model smollm2-135m] [--split 15] [--tokens 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROMPTS  # noqa: E402

from cli.cluster import LocalCluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-encryption", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    modes = {"local": ["--force-local"], "hybrid": ["--split", str(args.split)]}
    if args.no_encryption:
        modes["hybrid"].append("--no-encryption")
    per_token: dict[str, list[float]] = {m: [] for m in modes}
    parts: dict[str, list[float]] = {"edge_ms": [], "cloud_ms": [], "transport_ms": []}
    with LocalCluster(model=args.model, encryption=not args.no_encryption) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1)
        for _ in range(args.reps):
            for prompt in PROMPTS:
                outputs = {}
                for mode, extra in modes.items():
                    out = cluster.edge(*extra, "--json", "--tokens", str(args.tokens), "--prompt", prompt)
                    if out.returncode != 0:
                        raise SystemExit(f"edge failed in {mode} mode:\n{out.stderr[-2000:]}")
                    r = json.loads(out.stdout)
                    outputs[mode] = r["token_ids"]
                    per_token[mode].append(r["ms_per_token"])
                    if mode == "hybrid":
                        for step in r["trace"][1:]:
                            for key in parts:
                                parts[key].append(step[key])
                if outputs["local"] != outputs["hybrid"]:
                    raise SystemExit(f"hybrid output differs from local on {prompt!r}")
    med = {m: statistics.median(v) for m, v in per_token.items()}
    result = {
        "model": args.model, "split": args.split, "tokens": args.tokens, "reps": args.reps,
        "encryption": not args.no_encryption, "ms_per_token": med,
        "ratio_hybrid_over_local": med["hybrid"] / med["local"],
        "hybrid_step_median_ms": {k: statistics.median(v) for k, v in parts.items()},
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"model {args.model}, split {args.split}, {args.tokens} tokens x {len(PROMPTS)} prompts x {args.reps} reps "
          f"(median decode ms/token; outputs identical)")
    for m, v in med.items():
        print(f"  {m:8} {v:7.2f}")
    print(f"  ratio hybrid / local: {result['ratio_hybrid_over_local']:.3f}  (target <= 1.05)")
    print("  hybrid step, median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in result["hybrid_step_median_ms"].items()))


if __name__ == "__main__":
    main()
