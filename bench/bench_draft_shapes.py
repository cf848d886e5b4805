"""Which draft shape pays: chains or token trees, for each drafter, measured before building trees.

For every drafter it counts, on the generated positions of held-out prompts (the main model's
own greedy answers, teacher-forced), where the main model's token falls in the drafter's ranking
(top 1 / 2 / 4 / 8). From those ranks it computes what a verification would accept: a draft
shape is a set of rank paths (a chain of n is ``1, 1-1, 1-1-1, ...``; a tree branches where the
drafter is often right at its second or third choice), and at each position the accepted length
is the longest path of the shape the true continuation's ranks follow. Shapes of 8, 16, 32 and 64
nodes are built best-first from the rank frequencies of half the prompts and scored on the other
half (then the halves swap), so no shape is scored on the positions it was built from. The drafter
at each depth sees the true tokens before it (teacher-forced), which is exactly what it sees along
the path that verification accepts.

Then the cost of one pass over n positions: the edge's layers, the worker's layers and head
(verification), and the int8 copy. With those, the predicted ms per token of a round-based draft
(one frame per round trip) for each shape and round trip: the copy guesses a depth's nodes from
their exact activations, so each depth costs an edge pass and a copy pass, then the round trip
and one verification pass. (Pipelined chains, the default, hide the round trip instead; they are
measured end to end by ``bench_mini.py``.) Sequences are at most ``--tokens`` long, which caps
what a long chain can accept.

Drafters: early exit (the edge's activations through the final norm and head), the installed
``--mini self`` adapter when there is one, the int8 copy of the cloud's layers (``--mini int8``),
and a 4-bit copy (groups of 32, simulated by rounding the weights; nothing runs it yet).

    .venv/bin/python bench/bench_draft_shapes.py [--split 15] [--tokens 64] [--rtt-ms 0 20 50 100]
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_drafter_ceiling import EVAL_PROMPTS  # noqa: E402

import cli  # noqa: E402,F401  (the OpenMP defaults, set before torch loads)

# isort: split
import torch  # noqa: E402

from edge_worker.drafter_calibration import generate_answers  # noqa: E402
from edge_worker.drafting import DrafterError, adapter_path, load_adapter  # noqa: E402
from edge_worker.mini_llm import default_adapters_dir  # noqa: E402
from partition.models import resolve_model  # noqa: E402
from partition.quantize import quantize_segment  # noqa: E402
from partition.segment import ModelSegment  # noqa: E402

MAX_RANK = 64
SHAPE_SIZES = (8, 16, 32, 64)


def round_4bit(segment: ModelSegment, group: int = 32) -> ModelSegment:
    """The segment with every matrix rounded to 4 bits in groups of ``group`` (symmetric, a
    scale per group), computed in float32: agreement only, not speed."""
    with torch.no_grad():
        for name, p in segment.named_parameters():
            if p.dim() == 2 and "norm" not in name:
                w = p.view(p.shape[0], -1, group)
                scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 7
                p.copy_((torch.round(w / scale).clamp(-7, 7) * scale).view_as(p))
    return segment


@torch.inference_mode()
def ranks_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target in its row of logits (capped at MAX_RANK + 1)."""
    picked = logits.gather(-1, targets[:, None])
    return ((logits > picked).sum(-1) + 1).clamp(max=MAX_RANK + 1)


def build_shape(rank_seqs: list[list[int]], nodes: int, chain: bool = False) -> set[tuple[int, ...]]:
    """``nodes`` rank paths, best first: a path's value is the product of the frequency of each
    of its ranks at its depth among positions that got that far (rank 1 only: a chain)."""
    depth_counts: dict[int, dict[int, int]] = {}
    for seq in rank_seqs:
        for t in range(len(seq)):
            for d in range(min(8, len(seq) - t)):
                depth_counts.setdefault(d, {}).setdefault(seq[t + d], 0)
                depth_counts[d][seq[t + d]] += 1
                if seq[t + d] != 1:
                    break

    def q(d: int, r: int) -> float:
        counts = depth_counts.get(min(d, max(depth_counts)), {})
        total = sum(counts.values())
        return counts.get(r, 0) / total if total else 0.0

    shape: set[tuple[int, ...]] = set()
    heap = [(-q(0, r), (r,)) for r in ([1] if chain else range(1, MAX_RANK + 1))]
    heapq.heapify(heap)
    while heap and len(shape) < nodes:
        value, path = heapq.heappop(heap)
        shape.add(path)
        for r in ([1] if chain else range(1, MAX_RANK + 1)):
            score = -value * q(len(path), r)
            if score > 0:
                heapq.heappush(heap, (-score, (*path, r)))
    return shape


def accepted(rank_seqs: list[list[int]], shape: set[tuple[int, ...]]) -> float:
    """Mean tokens a verification yields (accepted drafts + the one the main model adds)."""
    total = count = 0
    for seq in rank_seqs:
        for t in range(len(seq)):
            d = 0
            while t + d < len(seq) and tuple(seq[t:t + d + 1]) in shape:
                d += 1
            total += d + 1
            count += 1
    return total / max(1, count)


def depth_widths(shape: set[tuple[int, ...]]) -> list[int]:
    widths: dict[int, int] = {}
    for path in shape:
        widths[len(path)] = widths.get(len(path), 0) + 1
    return [widths[d] for d in sorted(widths)]


@torch.inference_mode()
def pass_ms(segment: ModelSegment, x_of, rows: int, prefix: int = 128, repeats: int = 7) -> float:
    """Median ms of a pass over ``rows`` new positions after ``prefix`` cached ones."""
    cache = segment.new_cache()
    segment(x_of(prefix), cache, logits="none")
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        segment(x_of(rows), cache, logits=rows if segment.lm_head is not None else "none")
        samples.append((time.perf_counter() - t0) * 1e3)
        cache.crop(prefix)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 20.0, 50.0, 100.0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    k, n = args.split, source.n_layers
    lower = ModelSegment.load(source, 0, k)
    upper = ModelSegment.load(source, k, n, embed=False, head=True)
    answers = [a for a in generate_answers(source, tokenizer, EVAL_PROMPTS, args.tokens, batch=1) if len(a[1]) >= 2]

    drafters = {"early exit": lambda h, c: upper.lm_head(upper.norm(h))[0]}
    try:
        from edge_worker.drafting import SelfDrafter

        adapter = load_adapter(adapter_path(default_adapters_dir(), source.model_id, k), source.model_id, k,
                               source.hidden_size)
        self_drafter = SelfDrafter(upper.norm, upper.lm_head, adapter)

        def self_scores(h: torch.Tensor, count: int) -> torch.Tensor:
            scores = self_drafter._scores(h[0])
            if self_drafter.vocab is None:
                return scores
            full = torch.full((scores.shape[0], source.vocab_size), float("-inf"))
            full[:, self_drafter.vocab] = scores  # the adapter guesses only within its vocabulary
            return full

        drafters["self + adapter"] = self_scores
    except DrafterError:
        pass
    int8 = quantize_segment(ModelSegment.load(source, k, n, embed=False, head=True))
    four = round_4bit(ModelSegment.load(source, k, n, embed=False, head=True))
    drafters["int8 copy"] = lambda h, c: int8(h, int8.new_cache(), logits=c).logits[0]
    drafters["4-bit copy (g32)"] = lambda h, c: four(h, four.new_cache(), logits=c).logits[0]

    # Rank sequences per drafter and prompt, at the generated positions after the first.
    seqs: dict[str, list[list[int]]] = {name: [] for name in drafters}
    with torch.inference_mode():
        for prompt, answer in answers:
            ids = prompt + answer[:-1]
            h = lower(torch.tensor([ids]), lower.new_cache(), logits="none").hidden
            count = len(ids) - len(prompt)
            targets = upper(h, upper.new_cache(), logits=count).logits[0].argmax(-1)
            for name, run in drafters.items():
                logits = run(h, count)[-count:]
                seqs[name].append(ranks_of(logits, targets).tolist())
    positions = sum(len(s) for s in seqs["early exit"])

    rows = []
    for name, rank_seqs in seqs.items():
        flat = [r for s in rank_seqs for r in s]
        row = {"drafter": name, "top": {str(t): round(sum(r <= t for r in flat) / len(flat), 4) for t in (1, 2, 4, 8)}}
        half = len(rank_seqs) // 2
        folds = [(rank_seqs[:half], rank_seqs[half:]), (rank_seqs[half:], rank_seqs[:half])]
        for label, chain in (("chain", True), ("tree", False)):
            for size in SHAPE_SIZES:
                scores, widths = [], None
                for build, score in folds:
                    shape = build_shape(build, size, chain=chain)
                    scores.append(accepted(score, shape))
                    widths = depth_widths(shape)
                row[f"{label}{size}"] = {"tokens": round(statistics.mean(scores), 3), "widths": widths}
        rows.append(row)

    # Cost of one pass over n positions, each side.
    width = source.hidden_size
    costs = {}
    for rows_n in (1, 2, 4, 8, 16, 32, 64):
        costs[rows_n] = {
            "edge": pass_ms(lower, lambda t: torch.randint(0, 1000, (1, t)), rows_n),
            "worker": pass_ms(upper, lambda t: torch.randn(1, t, width), rows_n),
            "int8": pass_ms(int8, lambda t: torch.randn(1, t, width), rows_n),
        }

    def cost(rows_n: int, side: str) -> float:
        known = sorted(costs)
        below = max(r for r in known if r <= rows_n)
        above = min((r for r in known if r >= rows_n), default=below)
        if above == below:
            return costs[below][side]
        f = (rows_n - below) / (above - below)
        return costs[below][side] * (1 - f) + costs[above][side] * f

    # Round-based prediction for the int8 copy. The copy needs the exact activations of each node
    # from the edge's layers before it can guess the node's children, so a shape is drafted depth
    # by depth: an edge pass and a copy pass over each depth's nodes (the pending token first),
    # an edge pass over the last depth, the round trip, and one verification pass over them all.
    int8_row = next(r for r in rows if r["drafter"] == "int8 copy")
    predictions = []
    for rtt in args.rtt_ms:
        plain = cost(1, "edge") + rtt + cost(1, "worker")
        for label in ("chain", "tree"):
            for size in SHAPE_SIZES:
                entry = int8_row[f"{label}{size}"]
                levels = [1, *entry["widths"]]
                ms = (sum(cost(w, "edge") + cost(w, "int8") for w in levels[:-1]) + cost(levels[-1], "edge")
                      + rtt + cost(1 + size, "worker"))
                predictions.append({"rtt_ms": rtt, "shape": f"{label}{size}", "ms_per_token":
                                    round(ms / entry["tokens"], 2), "speedup": round(plain / (ms / entry["tokens"]), 2)})
    result = {"model": args.model, "split": k, "positions": positions, "prompts": len(answers), "drafters": rows,
              "pass_ms": costs, "round_based_int8": predictions, "seconds": round(time.perf_counter() - t_start)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}, split {k}: {positions} generated positions of {len(answers)} held-out prompts "
          f"({result['seconds']} s)")
    print(f"{'drafter':18} {'top1':>6} {'top2':>6} {'top4':>6} {'top8':>6} | tokens per verification: "
          + " ".join(f"{f'{lbl}{s}':>8}" for lbl in ("chain", "tree") for s in SHAPE_SIZES))
    for r in rows:
        tops = " ".join(f"{r['top'][t]:6.1%}" for t in ("1", "2", "4", "8"))
        shapes = " ".join(f"{r[f'{lbl}{s}']['tokens']:8.2f}" for lbl in ("chain", "tree") for s in SHAPE_SIZES)
        print(f"{r['drafter']:18} {tops} | {'':24}{shapes}")
    print("ms per pass over n new positions (after 128 cached):")
    for rows_n, c in costs.items():
        print(f"  n={rows_n:3}  edge {c['edge']:7.2f}  worker+head {c['worker']:7.2f}  int8 copy {c['int8']:7.2f}")
    print("round-based drafting with the int8 copy, predicted ms/token and speed-up over plain hybrid:")
    for p in predictions:
        print(f"  rtt {p['rtt_ms']:5.0f}  {p['shape']:8} {p['ms_per_token']:8.2f} ms  {p['speedup']:5.2f}x")


if __name__ == "__main__":
    main()
