"""The row kernel on SmolLM2's own Q4_1 blocks next to the same kernel on its float32 weights.

SmolLM2's GGUF file (the default model) holds its 210 layer matrices as Q4_1: per 32 weights, a
scale d, a minimum m and 32 four-bit q, each weight being d * q + m. The float32 weights every
segment computes with are exactly those blocks dequantized (``tests/test_rowkernel_q41.py``), so
a kernel that reads the blocks and widens them as they stream computes the same numbers, bit for
bit, from 0.19x the bytes. A decode step is bound by streaming the weights: this measures one
pass over all 210 products of the 30 layers (q, k, v, o, gate, up, down, as a decode step makes
them, each matrix once), float32 and Q4_1 alternated, for 1, 2, 8 and 16 rows, and checks that
both give the same bits.

Not yet in the model's path: the segments still compute with the float32 weights.

    .venv/bin/python bench/bench_q41.py [--reps 15] [--rows 1 2 8 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the repository root on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 16])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from partition import gguf_blocks, rowkernel
    from partition.models import resolve_model, smollm2_gguf_path

    if rowkernel.kernel() is None:
        raise SystemExit(f"no row kernel here: {rowkernel.reason()}")
    source = resolve_model("smollm2-135m")
    f32, q41 = [], []
    for i in range(source.n_layers):
        # The loader the segments use: the file's blocks in our rows' order (q and k un-permuted).
        blocks = gguf_blocks.layer_blocks(smollm2_gguf_path(), source.config, i)
        for name in gguf_blocks.MATRICES:
            full = f"model.layers.{i}.{name}.weight"
            weight = source.weights.load([full], torch.float32)[full].contiguous()
            k = weight.shape[1]
            assert torch.equal(rowkernel.dequantize_q41(blocks[name], k), weight), full
            f32.append(weight)
            q41.append((blocks[name], k))
    gen = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(max(args.rows), k, generator=gen) for k in (576, 1536)}

    def one_pass(rows: int, quantized: bool) -> tuple[float, list]:
        outs = []
        t0 = time.perf_counter()
        if quantized:
            for blocks, k in q41:
                outs.append(rowkernel.linear_q41(xs[k][:rows], blocks))
        else:
            for weight in f32:
                outs.append(rowkernel.linear(xs[weight.shape[1]][:rows], weight))
        return (time.perf_counter() - t0) * 1e3, outs

    mb = {"float32": sum(w.numel() * 4 for w in f32) / 2**20, "q4_1": sum(b.numel() for b, _ in q41) / 2**20}
    results = []
    for rows in args.rows:
        a, b = [], []
        for _ in range(args.reps):
            ms, out_a = one_pass(rows, False)
            a.append(ms)
            ms, out_b = one_pass(rows, True)
            b.append(ms)
        same = all(torch.equal(x, y) for x, y in zip(out_a, out_b, strict=True))
        results.append({"rows": rows, "float32_ms": round(statistics.median(a), 2),
                        "q4_1_ms": round(statistics.median(b), 2),
                        "speedup": round(statistics.median(a) / statistics.median(b), 2), "identical": same})
    if args.json:
        print(json.dumps({"mib": {k: round(v, 1) for k, v in mb.items()}, "results": results}))
        return
    print(f"SmolLM2's 210 layer products per pass: float32 {mb['float32']:.1f} MiB, Q4_1 {mb['q4_1']:.1f} MiB "
          f"(medians of {args.reps}, alternated)")
    print(f"{'rows':>5} {'float32 ms':>11} {'Q4_1 ms':>8} {'speed-up':>9} {'identical':>10}")
    for r in results:
        print(f"{r['rows']:>5} {r['float32_ms']:>11.2f} {r['q4_1_ms']:>8.2f} {r['speedup']:>8.2f}x "
              f"{str(r['identical']):>10}")


if __name__ == "__main__":
    main()
