"""The mini-LLM next to plain hybrid, side by side in one run, at several emulated round trips.

Starts a broker and one cloud worker as processes, then for each emulated round trip and each
prompt runs the edge CLI (a fresh process each time) in plain hybrid mode (``--mini none``), with
the defaults a fresh clone gets (``default``: ``--mini auto``) and with each drafter,
pipelined (the default: guesses go out while earlier frames are in flight) and, with
``--no-pipeline-too``, also one frame of drafts per round trip, in turn, so every configuration
sees the same machine state. Reports per configuration: decode ms/token (median over prompts),
frames sent and waits for the cloud per generated token, the share of drafts the main model
kept, tokens/s relative to plain hybrid at the same round trip, and whether the output equals
local-only output (it must, in verify mode; trust mode reports how often it differs).

Targets (issue 6): at 100 ms, at least 2x the tokens/s of plain hybrid with identical greedy
output; at 0 ms, no more than 5% slower than plain hybrid.

    .venv/bin/python bench/bench_mini.py [--model smollm2-135m] [--split 15] [--tokens 64]
        [--rtt-ms 0 20 100] [--drafters int8 self lookup self=ADAPTER.pt] [--no-pipeline-too] [--trust]
        [--trees 16] [--groups 1 4]
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 20.0, 100.0])
    parser.add_argument("--drafters", nargs="*", default=["int8", "self", "lookup"])
    parser.add_argument("--threshold", type=float, default=None, help="--mini-threshold (default: the CLI's)")
    parser.add_argument("--trust", action="store_true", help="also run the self-drafter in trust mode")
    parser.add_argument("--no-pipeline-too", action="store_true",
                        help="also run each drafter with --no-mini-pipeline (one frame of drafts per round trip)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N fixed prompts")
    parser.add_argument("--trees", type=int, default=0,
                        help="also run each drafter drafting token trees of this many nodes (--mini-tree)")
    parser.add_argument("--groups", type=int, nargs="*", default=[],
                        help="also run each drafter with --mini-group N (guesses per pipelined frame), for each N")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every prompt this many times per configuration (medians over all runs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    prompts = PROMPTS[:args.prompts]

    # "plain": no drafter; "default": the edge's defaults, what a fresh clone runs (--mini auto).
    configs: dict[str, list[str]] = {"plain": ["--mini", "none"], "default": []}
    for d in args.drafters:
        # "self=FILE": the self-drafter with that adapter (to compare calibrations in one run)
        name, _, adapter = d.partition("=")
        configs[d] = (["--mini", name] + (["--mini-adapter", adapter] if adapter else [])
                      + (["--mini-threshold", str(args.threshold)] if args.threshold is not None else []))
        if args.no_pipeline_too:
            configs[f"{d}-nopipe"] = [*configs[d], "--no-mini-pipeline"]
        for n in args.groups:
            configs[f"{d}-g{n}"] = [*configs[d], "--mini-group", str(n)]
        if args.trees:
            configs[f"{d}-tree{args.trees}"] = [*configs[d], "--mini-tree", str(args.trees)]
    if args.trust:
        configs["self-trust"] = ["--mini", "self", "--mini-mode", "trust", "--mini-threshold", "0.8"]
    rows = []
    with LocalCluster(model=args.model) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1)

        def run(*extra: str) -> dict:
            out = cluster.edge(*extra, "--json", "--tokens", str(args.tokens))
            if out.returncode != 0:
                raise SystemExit(f"edge {' '.join(extra)} failed:\n{out.stderr[-2000:]}")
            return json.loads(out.stdout)

        local = {p: run("--force-local", "--prompt", p)["token_ids"] for p in prompts}
        for rtt in args.rtt_ms:
            results: dict[str, list[dict]] = {c: [] for c in configs}
            runs = [p for _ in range(args.repeat) for p in prompts]
            for i, prompt in enumerate(runs):
                # Each run starts the round of configurations at another one: whatever the
                # machine does to the first run of a round (or the last) falls on each in turn.
                order = list(configs.items())
                for name, extra in order[i % len(order):] + order[:i % len(order)]:
                    results[name].append(run("--split", str(args.split), "--cloud-latency", str(rtt / 1e3),
                                             "--prompt", prompt, *extra))
            plain_ms = statistics.median(r["ms_per_token"] for r in results["plain"])
            for name, rs in results.items():
                ms = statistics.median(r["ms_per_token"] for r in rs)
                tokens = sum(len(r["token_ids"]) for r in rs)
                drafted = sum(r["tokens_drafted"] for r in rs)
                rows.append({
                    "rtt_ms": rtt, "config": name, "ms_per_token": round(ms, 2),
                    "speedup": round(plain_ms / ms, 3),
                    "round_trips_per_token": round(sum(r["cloud_round_trips"] for r in rs) / tokens, 3),
                    "waits_per_token": round(sum(r.get("cloud_waits", 0) for r in rs) / tokens, 3),
                    "acceptance": round(sum(r["tokens_from_mini"] for r in rs) / drafted, 3) if drafted else None,
                    "drafted_per_token": round(drafted / tokens, 3),
                    "identical": sum(r["token_ids"] == local[p] for r, p in zip(rs, runs, strict=True)),
                    "prompts": len(runs),
                })
    load = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps({"load_average": load, "model": args.model, "split": args.split, "tokens": args.tokens, "rows": rows}))
        return
    print(f"model {args.model}, split {args.split}, {args.tokens} tokens x {len(prompts)} prompts x {args.repeat}; "
          f"median decode ms/token; speedup = plain ms / config ms at the same round trip; load average {load}")
    print(f"{'rtt ms':>6} {'config':>13} {'ms/tok':>7} {'speedup':>7} {'frames/tok':>10} {'waits/tok':>9} "
          f"{'accept':>6} {'identical':>9}")
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        print(f"{r['rtt_ms']:6.0f} {r['config']:>13} {r['ms_per_token']:7.1f} {r['speedup']:7.2f} "
              f"{r['round_trips_per_token']:10.2f} {r['waits_per_token']:9.2f} {acc:>6} {r['identical']:>5}/{r['prompts']}")


if __name__ == "__main__":
    main()
