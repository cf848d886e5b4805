"""The row kernel on SmolLM2's own Q4_1 blocks next to the same kernel on its float32 weights.

SmolLM2's GGUF file (the default model) holds its 210 layer matrices as Q4_1: per 32 weights, a
scale d, a minimum m and 32 four-bit q, each weight being d * q + m. The float32 weights every
segment computes with are exactly those blocks dequantized (``tests/test_rowkernel_q41.py``), so
a kernel that reads the blocks and widens them as they stream computes the same numbers, bit for
bit, from 0.19x the bytes. A decode step is bound by streaming the weights: this measures one
pass over all 210 products of the 30 layers (q, k, v, o, gate, up, down, as a decode step makes
them, each matrix once), float32 and Q4_1 alternated, for 1, 2, 8 and 16 rows, and checks that
both give the same bits.

``--peak`` also measures this machine's peak rate of multiply-adds (a loop of independent fused
multiply-adds in the kernel's vectors, compiled with its compiler and flags, on as many threads)
and prints the share of it each row count's products reach: at one row the products wait on
memory; at eight rows on arithmetic and loads (BENCHMARKS.md: "The row kernel's loads").

``--passes`` times a whole worker's pass instead (SmolLM2's 30 layers on the blocks, attention,
the head; eight sessions of 40 positions): process CPU ms per token with 1, 2 and 8 one-token
steps in the pass, the head on float32 against the head on the file's Q8_0 blocks, alternated.

``--compare-with REV`` also builds ``partition/data/rowdot.c`` as of git revision REV (same
compiler and flags) and times its Q4_1 products beside today's, alternated, on the same blocks.

    .venv/bin/python bench/bench_q41.py [--reps 15] [--rows 1 2 8 16] [--peak] [--passes] [--compare-with REV] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the repository root on sys.path)

# The CPUs this process was given, before torch loads: with OMP_PROC_BIND set (as edgecloud sets it),
# torch's first parallel region pins the main thread to one core, and a child started after it
# would inherit that pin (the peak loop's two threads then shared one core: 56 against 113 G/s).
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 16])
    ap.add_argument("--peak", action="store_true", help="and the share of the machine's peak multiply-add rate")
    ap.add_argument("--passes", action="store_true", help="time a worker's whole pass instead, head float32 "
                    "against Q8_0")
    ap.add_argument("--compare-with", metavar="REV", help="and the Q4_1 products of the kernel at this git revision")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.passes:
        return passes(args.reps, args.json)

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

    older = kernel_at(args.compare_with) if args.compare_with else None

    def one_pass(rows: int, quantized: bool, fn=None) -> tuple[float, list]:
        outs = []
        t0 = time.perf_counter()
        if fn is not None:  # the Q4_1 products of the kernel at --compare-with
            for blocks, k in q41:
                outs.append(rowkernel._call(fn, xs[k][:rows], blocks))
        elif quantized:
            for blocks, k in q41:
                outs.append(rowkernel.linear_q41(xs[k][:rows], blocks))
        else:
            for weight in f32:
                outs.append(rowkernel.linear(xs[weight.shape[1]][:rows], weight))
        return (time.perf_counter() - t0) * 1e3, outs

    mb = {"float32": sum(w.numel() * 4 for w in f32) / 2**20, "q4_1": sum(b.numel() for b, _ in q41) / 2**20}
    peak = peak_gmacs(torch.get_num_threads()) if args.peak else None
    macs = sum(w.numel() for w in f32)  # multiply-adds per row of a pass
    results = []
    for rows in args.rows:
        a, b, c = [], [], []
        for _ in range(args.reps):
            ms, out_a = one_pass(rows, False)
            a.append(ms)
            if older is not None:
                ms, out_c = one_pass(rows, True, older)
                c.append(ms)
            ms, out_b = one_pass(rows, True)
            b.append(ms)
        same = all(torch.equal(x, y) for x, y in zip(out_a, out_b, strict=True))
        results.append({"rows": rows, "float32_ms": round(statistics.median(a), 2),
                        "q4_1_ms": round(statistics.median(b), 2),
                        "speedup": round(statistics.median(a) / statistics.median(b), 2), "identical": same})
        if older is not None:
            results[-1].update(q4_1_at_rev_ms=round(statistics.median(c), 2),
                               identical_to_rev=all(torch.equal(x, y) for x, y in zip(out_c, out_b, strict=True)))
        if peak:
            for name in ("float32", "q4_1"):
                rate = rows * macs / results[-1][f"{name}_ms"] / 1e6  # G multiply-adds/s
                results[-1][f"{name}_of_peak"] = round(rate / peak, 2)
    if args.json:
        print(json.dumps({"mib": {k: round(v, 1) for k, v in mb.items()}, "peak_gmacs": peak, "results": results}))
        return
    if peak:
        print(f"peak: {peak:.1f} G multiply-adds/s on {torch.get_num_threads()} threads")
    print(f"SmolLM2's 210 layer products per pass: float32 {mb['float32']:.1f} MiB, Q4_1 {mb['q4_1']:.1f} MiB "
          f"(medians of {args.reps}, alternated)")
    print(f"{'rows':>5} {'float32 ms':>11} {'Q4_1 ms':>8} {'speed-up':>9} {'identical':>10}")
    for r in results:
        share = f"  of peak: float32 {r['float32_of_peak']:.2f}, Q4_1 {r['q4_1_of_peak']:.2f}" if peak else ""
        if older is not None:
            share += (f"  Q4_1 at {args.compare_with}: {r['q4_1_at_rev_ms']:.2f} ms, now "
                      f"{r['q4_1_at_rev_ms'] / r['q4_1_ms']:.2f}x faster, same bits: {r['identical_to_rev']}")
        print(f"{r['rows']:>5} {r['float32_ms']:>11.2f} {r['q4_1_ms']:>8.2f} {r['speedup']:>8.2f}x "
              f"{str(r['identical']):>10}{share}")


# Twelve independent accumulators (more than a fused multiply-add's latency times the units
# that run it), each updated by a multiply-add per turn: the rate the cores can sustain.
PEAK_LOOP = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#ifdef __AVX512F__
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#else
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#endif
int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 1;
    const long turns = 20000000L;
    float sink = 0.0f;
    double t0 = omp_get_wtime();
    #pragma omp parallel num_threads(threads) reduction(+:sink)
    {
        vec a[12];
        const vec x = SET1(0.999999f), y = SET1(1e-7f);
        for (int i = 0; i < 12; i++) a[i] = SET1((float)i);
        for (long n = 0; n < turns; n++)
            for (int i = 0; i < 12; i++) a[i] = FMA(a[i], x, y);
        for (int i = 0; i < 12; i++) sink += ((float *)&a[i])[0];
    }
    const double s = omp_get_wtime() - t0;
    printf("%.3f %g\n", (double)threads * turns * 12 * LANES / s / 1e9, sink);
    return 0;
}
"""


def kernel_at(rev: str):
    """``rowdot_q41`` of ``partition/data/rowdot.c`` as of git revision ``rev``, built and typed
    as the row kernel builds and types its own (``rowkernel._build``, ``rowkernel.products``)."""
    import ctypes
    import subprocess

    from partition import rowkernel

    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{rev}:partition/data/rowdot.c"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    return rowkernel.products(ctypes.CDLL(str(rowkernel._build(rowkernel._compiler(), source))))[1]


def _own_cpus() -> None:
    """In the peak loop's process: the CPUs this bench was started with (CPUS)."""
    if CPUS:
        os.sched_setaffinity(0, CPUS)


def peak_gmacs(threads: int) -> float:
    """G multiply-adds per second the cores sustain (PEAK_LOOP, best of three)."""
    import subprocess
    import tempfile

    from partition import rowkernel

    compiler = rowkernel._compiler()
    if compiler is None:
        raise SystemExit("--peak needs a C compiler")
    flags = [f for f in rowkernel._flags() if f not in ("-shared", "-fPIC")]
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text("#include <stdlib.h>\n" + PEAK_LOOP)
        subprocess.run([compiler, *flags, str(src), "-o", str(exe)], check=True, capture_output=True, timeout=120)
        runs = [float(subprocess.run([str(exe), str(threads)], check=True, capture_output=True, text=True,
                                     timeout=120, preexec_fn=_own_cpus).stdout.split()[0]) for _ in range(3)]
    return max(runs)


def passes(reps: int, as_json: bool) -> None:
    """A worker's segment (layers on the Q4_1 blocks, the head) over 1, 2 and 8 one-token steps of
    sessions with 40 positions each: process CPU ms per token, head float32 against Q8_0."""
    import torch

    from partition.models import resolve_model
    from partition.segment import ModelSegment, StepInput

    source = resolve_model("smollm2-135m")
    gen = torch.Generator().manual_seed(0)
    segments = {name: ModelSegment.load(source, 0, source.n_layers, embed=False, head=True, head_blocks=blocks)
                for name, blocks in (("float32 head", False), ("Q8_0 head", True))}
    assert getattr(segments["Q8_0 head"].lm_head, "q80", None) is not None, "no Q8_0 head in the file"
    width = source.hidden_size
    prompts = [torch.randn(1, 40, width, generator=gen) for _ in range(8)]
    steps = [torch.randn(1, 1, width, generator=gen) for _ in range(8)]
    caches = {}
    for name, seg in segments.items():
        caches[name] = [seg.new_cache() for _ in range(8)]
        for prompt, cache in zip(prompts, caches[name], strict=True):
            seg.forward(prompt, cache, logits="none")

    def one(name: str, n: int) -> tuple[float, torch.Tensor]:
        seg, held = segments[name], caches[name][:n]
        c0 = time.process_time()
        outs = seg.forward_many([StepInput(x, c, None, "last") for x, c in zip(steps[:n], held, strict=False)])
        spent = time.process_time() - c0
        for c in held:
            c.crop(c.length - 1)
        return spent, torch.cat([o.logits for o in outs])

    rows = []
    for n in (1, 2, 8):
        spent: dict[str, list[float]] = {name: [] for name in segments}
        logits = {}
        for name in segments:
            for _ in range(3):
                one(name, n)  # warm
        for _ in range(reps * 4):
            for name in segments:
                s, logits[name] = one(name, n)
                spent[name].append(s * 1e3 / n)
        a, b = (statistics.median(spent[name]) for name in segments)
        rows.append({"sessions": n, "float32_head_cpu_ms_per_token": round(a, 2), "q80_head_cpu_ms_per_token": round(b, 2),
                     "identical": torch.equal(*logits.values())})
    if as_json:
        print(json.dumps(rows))
        return
    print(f"a worker's pass, process CPU ms per token (medians of {reps * 4}, alternated)")
    print(f"{'sessions':>8} {'float32 head':>13} {'Q8_0 head':>10} {'identical':>10}")
    for r in rows:
        print(f"{r['sessions']:>8} {r['float32_head_cpu_ms_per_token']:>13.2f} {r['q80_head_cpu_ms_per_token']:>10.2f} "
              f"{str(r['identical']):>10}")


if __name__ == "__main__":
    main()
