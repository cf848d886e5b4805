"""Does the planner pick a good split? Measured latency of every candidate split next to the
planner's choice, over a grid of round trips, CPU states and weights, in one run.

For each CPU state (idle, or loaded by a busy-loop process competing for the cores) and each
emulated round trip, the edge CLI runs at every candidate split (a fresh process each, through a
real broker and worker, SmolLM2 by default) and its end-to-end latency (prefill plus decode) is
measured. Then, for each set of weights, the edge runs without ``--split`` so the planner
chooses, and the choice is scored against the best candidate.

Scoring uses the planner's own formula with the *measured* latency in place of the predicted
one: ``w_lat * latency/latency_local + w_energy * energy/energy_local + w_mem * mem/mem_local``.
Energy and memory come from the planner's models (there is no power meter here), under the
conditions the planner itself measured in that cell (median over its decisions: the workers'
per-layer time, the edge's probed slowdown); latency, the quantity that moves with the
conditions, is measured. Regret = chosen / best - 1; the target
(issue 5) is within 10%.

    .venv/bin/python bench/bench_planner_grid.py [--tokens 32] [--rtt-ms 0 20 100]
        [--splits 0 5 10 15 20 25 30] [--plot bench/figures/planner_grid.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROMPTS  # noqa: E402

from cli.cluster import LocalCluster  # noqa: E402
from partition.models import resolve_model  # noqa: E402
from partition.planner import Conditions, Weights, estimate  # noqa: E402
from partition.profile import load_or_measure_profile  # noqa: E402

WEIGHTS = {
    "latency": (1.0, 0.0, 0.0),
    "default": (0.4, 0.3, 0.3),
    "energy": (0.2, 0.6, 0.2),
}


def scoring_conditions(rtt_ms: float, n: int, decisions) -> Conditions:
    """The conditions the planner saw in this cell (medians over its decisions), so that the energy
    and memory it is scored with are its own model's, under its own measurements."""
    measured = [d["measured"] for d in decisions if d.get("measured")]
    if not measured:
        return Conditions(rtt_ms=rtt_ms)
    cloud = [m["cloud_layer_ms"] for m in measured if m.get("cloud_layer_ms")]
    return Conditions(
        rtt_ms=rtt_ms,
        cloud_layer_ms=(statistics.median(cloud),) * n if cloud else None,
        edge_slowdown_measured=statistics.median(m.get("edge_slowdown") or 1.0 for m in measured),
    )


def burner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 20.0, 100.0])
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 5, 10, 15, 20, 25, 30])
    parser.add_argument("--prompts", type=int, default=2, help="prompts per measurement (median)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    source = resolve_model(args.model)
    profile = load_or_measure_profile(source)
    n = source.n_layers
    prompts = PROMPTS[: args.prompts]
    cells = []
    with LocalCluster(model=args.model) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1)

        def run(*extra: str) -> list[dict]:
            out = []
            for p in prompts:
                r = cluster.edge(*extra, "--json", "--tokens", str(args.tokens), "--prompt", p, "--no-replan")
                if r.returncode != 0:
                    raise SystemExit(f"edge {' '.join(extra)} failed:\n{r.stderr[-2000:]}")
                out.append(json.loads(r.stdout))
            return out

        for cpu in ("idle", "loaded"):
            hog = burner() if cpu == "loaded" else None
            try:
                for rtt in args.rtt_ms:
                    link = ["--cloud-latency", str(rtt / 1e3)]
                    measured: dict[int, float] = {}
                    for k in sorted(set(args.splits) | {n}):
                        rs = run("--split", str(k), *link)
                        measured[k] = statistics.median(r["total_ms"] for r in rs)
                    prompt_tokens = rs[0]["prompt_tokens"]
                    choices = {}
                    decisions: dict[str, dict] = {}
                    for name, (wl, we, wm) in WEIGHTS.items():
                        rs = run(*link, "--latency-weight", str(wl), "--energy-weight", str(we),
                                 "--memory-weight", str(wm))
                        k = rs[0]["decision"]["k"]
                        decisions[name] = rs[0]["decision"]
                        if k not in measured:
                            measured[k] = statistics.median(r["total_ms"] for r in run("--split", str(k), *link))
                        choices[name] = k
                    cond = scoring_conditions(rtt, n, decisions.values())
                    rows = {k: estimate(k, profile, cond, prompt_tokens=prompt_tokens, new_tokens=args.tokens)
                            for k in measured}
                    for name, k_chosen in choices.items():
                        wl, we, wm = WEIGHTS[name]
                        w = Weights(energy=we, latency=wl, memory=wm)  # normalised to sum 1

                        def score(k: int, w=w, measured=measured, rows=rows) -> float:
                            return (w.latency * measured[k] / measured[n]
                                    + w.energy * rows[k].energy_j / rows[n].energy_j
                                    + w.memory * rows[k].memory_bytes / rows[n].memory_bytes)

                        best = min(measured, key=score)
                        cells.append({
                            "cpu": cpu, "rtt_ms": rtt, "weights": name, "chosen": k_chosen, "best": best,
                            "regret": round(score(k_chosen) / score(best) - 1, 4),
                            "chosen_ms": round(measured[k_chosen], 1), "best_latency_ms": round(min(measured.values()), 1),
                            # What the planner measured and predicted when it chose (edge_worker/manager.py).
                            "decision": decisions[name],
                        })
                    cells.append({"cpu": cpu, "rtt_ms": rtt, "prompt_tokens": prompt_tokens,
                                  "measured_ms": {str(k): round(v, 1) for k, v in sorted(measured.items())},
                                  # the device energy the planner's model gives each split here
                                  "energy_j": {str(k): round(rows[k].energy_j, 3) for k in sorted(measured)}})
            finally:
                if hog is not None:
                    hog.kill()
    verdicts = [c for c in cells if "regret" in c]
    summary = {"within_10pct": sum(c["regret"] <= 0.10 for c in verdicts), "cells": len(verdicts),
               "worst_regret": max(c["regret"] for c in verdicts)}
    if args.plot:
        draw(cells, args.plot, n)
    if args.json:
        print(json.dumps({"model": args.model, "tokens": args.tokens, "cells": cells, "summary": summary}))
        return
    print(f"model {args.model}, {args.tokens} tokens, median end-to-end ms over {len(prompts)} prompts")
    print(f"{'cpu':>6} {'rtt':>5} {'weights':>8} {'chosen':>6} {'best':>4} {'regret':>7} {'chosen ms':>9}")
    for c in verdicts:
        print(f"{c['cpu']:>6} {c['rtt_ms']:5.0f} {c['weights']:>8} {c['chosen']:6} {c['best']:4} "
              f"{c['regret']:7.1%} {c['chosen_ms']:9.0f}")
    for c in cells:
        if "measured_ms" in c:
            print(f"  measured ({c['cpu']}, rtt {c['rtt_ms']:.0f} ms): " +
                  ", ".join(f"k={k}: {v:.0f}" for k, v in c["measured_ms"].items()))
    print(f"planner within 10% of the best split in {summary['within_10pct']}/{summary['cells']} cells "
          f"(worst regret {summary['worst_regret']:.1%})")


def draw(cells: list[dict], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = [c for c in cells if "measured_ms" in c]
    cols = len({c["rtt_ms"] for c in grids})
    fig, axes = plt.subplots(2, cols, figsize=(4 * cols, 6.5), squeeze=False, sharex=True)
    for i, cpu in enumerate(("idle", "loaded")):
        for j, c in enumerate(c for c in grids if c["cpu"] == cpu):
            ax = axes[i][j]
            ks = [int(k) for k in c["measured_ms"]]
            ax.plot(ks, list(c["measured_ms"].values()), "o-", color="tab:blue")
            for v in (v for v in cells if v.get("cpu") == cpu and v.get("rtt_ms") == c["rtt_ms"] and "chosen" in v):
                ax.axvline(v["chosen"], linestyle="--", alpha=0.6,
                           color={"latency": "tab:red", "default": "tab:green", "energy": "tab:orange"}[v["weights"]],
                           label=f"{v['weights']}: k={v['chosen']}")
            ax.set_title(f"CPU {cpu}, RTT {c['rtt_ms']:.0f} ms", fontsize=9)
            ax.legend(fontsize=7)
            if j == 0:
                ax.set_ylabel("end-to-end ms")
            if i == 1:
                ax.set_xlabel(f"split k (of {n})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
