"""The packed products' kernel next to MKL (torch's F.linear) on SmolLM2's weight shapes.

For each shape (q/k/v stacked, o, gate/up stacked, down, the head) and 1, 2, 4, 8 and 16 rows:
microseconds per product of ``partition/rowkernel.py`` and of ``F.linear``, both on the same
inputs, interleaved, weights rotated through 30 copies (as 30 layers are) so that they stream from
memory as in a real step rather than sit in cache. Also checked: every row of the kernel's
product equals that row's product alone, bit for bit, and the products are close to MKL's.

``--step``: whole decode steps instead (SmolLM2's 30 layers and head, ``forward_many`` of 1, 8 and
16 sessions whose caches hold 100 or 400 positions), three ways, alternated, all with the kernel's
products: each layer as torch operations with transformers' SDPA per session (``ops+sdpa``), the
same with the kernel's ``attend`` for all sessions at once (``ops+attend``), and each layer as one
call of the kernel's ``decode_layer`` (``fused``, the default).

``--prefill``: prompts of 8 to 64 tokens, one and eight at once, through transformers' layers
(each frame by itself) and packed on the kernel.

    .venv/bin/python bench/bench_rowkernel.py [--threads 2] [--json] [--step | --prefill]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the repository root on sys.path)

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}
ROWS = (1, 2, 4, 8, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated row counts of the products")
    ap.add_argument("--step", action="store_true", help="whole decode steps, attention on the kernel and on SDPA")
    ap.add_argument("--prefill", action="store_true",
                    help="prompts of 8 to 64 tokens through transformers' layers and through the kernel")
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    from partition import rowkernel

    torch.set_num_threads(args.threads)
    if rowkernel.kernel() is None:
        raise SystemExit(f"the row kernel does not run here: {rowkernel.reason()}")
    if args.step:
        step_bench(args)
        return
    if args.prefill:
        prefill_bench(args)
        return

    def per_call_us(fn, weights, x) -> float:
        for w in weights[:3]:
            fn(x, w)
        t0 = time.perf_counter()
        for i in range(args.repeats):
            fn(x, weights[i % len(weights)])
        return (time.perf_counter() - t0) / args.repeats * 1e6

    rows_out = []
    rows_wanted = [int(r) for r in args.rows.split(",")]
    for name, (n, k) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(n, k, generator=gen) for _ in range(2 if name == "head" else 30)]
        x = torch.randn(max(rows_wanted), k, generator=gen)
        out = rowkernel.linear(x, weights[0])
        invariant = all(torch.equal(rowkernel.linear(x[i:i + 1], weights[0])[0], out[i]) for i in range(len(x)))
        close = torch.allclose(out, F.linear(x, weights[0]), rtol=1e-4, atol=1e-4)
        for r in rows_wanted:
            mkl = kern = 0.0
            for _ in range(2):  # interleaved: noise hits both alike
                mkl += per_call_us(F.linear, weights, x[:r])
                kern += per_call_us(rowkernel.linear, weights, x[:r])
            row = {"shape": name, "rows": r, "mkl_us": round(mkl / 2, 1), "kernel_us": round(kern / 2, 1),
                   "mkl_over_kernel": round(mkl / kern, 2), "invariant": invariant, "close_to_mkl": close}
            rows_out.append(row)
            if args.json:
                print(json.dumps(row))
            else:
                print(f"{name:8s} {r:2d} rows: MKL {row['mkl_us']:8.1f} us, kernel {row['kernel_us']:8.1f} us, "
                      f"{row['mkl_over_kernel']:.2f}x  (rows invariant: {invariant}, close: {close})")
    if not all(r["invariant"] and r["close_to_mkl"] for r in rows_out):
        raise SystemExit(1)


def prefill_bench(args) -> None:
    """One prompt's prefill through SmolLM2's 30 layers and head, two ways, alternated: each frame
    by itself through transformers' layers (MKL's products, SDPA), as frames longer than
    ``PACK_MAX_ROWS`` ran before, and packed on the row kernel (``rowkernel.decode_layer``), as
    they run now; and eight prompts in one pass, as a worker packs prefills arriving together."""
    import torch

    from partition.models import resolve_model
    from partition.segment import ModelSegment, StepInput

    source = resolve_model(None)
    whole = ModelSegment.load(source, 0, source.n_layers)

    def ms(rows: int, way: str, sessions: int = 1, reps: int = 5) -> float:
        ids = torch.arange(100, 100 + rows).unsqueeze(0)
        best = float("inf")
        for _ in range(reps):
            steps = [StepInput(ids, whole.new_cache()) for _ in range(sessions)]
            t0 = time.perf_counter()
            if way == "alone":
                for s in steps:
                    whole._forward_alone(s)
            else:
                whole._forward_packed(steps)
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    for rows in (8, 16, 37, 64):
        for sessions in (1, 8):
            alone = kern = float("inf")
            for _ in range(2):
                alone = min(alone, ms(rows, "alone", sessions))
                kern = min(kern, ms(rows, "kernel", sessions))
            row = {"rows": rows, "sessions": sessions, "transformers_ms": round(alone, 1),
                   "kernel_ms": round(kern, 1), "ratio": round(kern / alone, 2)}
            print(json.dumps(row) if args.json else
                  f"prefill of {rows:2d} tokens x{sessions}: transformers' layers {alone:7.1f} ms, "
                  f"row kernel {kern:7.1f} ms ({kern / alone:.2f}x)")


def step_bench(args) -> None:
    import torch

    from partition import batching, rowkernel
    from partition.models import resolve_model
    from partition.segment import ModelSegment, StepInput

    source = resolve_model(None)
    whole = ModelSegment.load(source, 0, source.n_layers)
    kernel_attend, fused_weights = rowkernel.usable_attend, batching.fused_weights
    gen = torch.Generator().manual_seed(0)
    ways = {"ops+sdpa": (lambda q: False, lambda layer: None), "ops+attend": (kernel_attend, lambda layer: None),
            "fused": (kernel_attend, fused_weights)}

    def step_ms(batch: int, past: int, way: str, steps: int = 12) -> float:
        rowkernel.usable_attend, batching.fused_weights = ways[way]
        try:
            caches = [whole.new_cache() for _ in range(batch)]
            for c in caches:
                whole(torch.randint(0, 5000, (1, past), generator=gen), c, logits="none")
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                whole.forward_many([StepInput(torch.randint(0, 5000, (1, 1), generator=gen), c) for c in caches])
                times.append((time.perf_counter() - t0) * 1e3)
            return sorted(times)[len(times) // 2]
        finally:
            rowkernel.usable_attend, batching.fused_weights = kernel_attend, fused_weights

    for past in (100, 400):
        for batch in (1, 8, 16):
            ms = dict.fromkeys(ways, 0.0)
            for _ in range(2):  # alternated: the VM's drift hits each alike
                for way in ways:
                    ms[way] += step_ms(batch, past, way) / 2
            row = {"past": past, "sessions": batch, **{f"{w}_ms": round(v, 2) for w, v in ms.items()},
                   "ops_sdpa_over_fused": round(ms["ops+sdpa"] / ms["fused"], 3)}
            print(json.dumps(row) if args.json else
                  f"past {past:3d}, {batch:2d} sessions: ms/step " + ", ".join(f"{w} {v:6.2f}" for w, v in ms.items())
                  + f"; ops+sdpa / fused {row['ops_sdpa_over_fused']:.3f}x")


if __name__ == "__main__":
    main()
