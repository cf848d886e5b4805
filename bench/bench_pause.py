"""What a pause costs the next decode pass: the same layers timed back to back and after idle gaps.

In hybrid mode each side of the split waits while the other computes (at split 15 of SmolLM2 the
edge idles ~20 ms a step, the worker ~15 ms); local-only never pauses. If a pass run after a pause
is slower than one run back to back, hybrid pays that on both sides of every step, on top of the
transport. This measures it in one process, no network involved: layers ``[0, K)`` of the model,
one token with a 64-position cache, alternating blocks of back-to-back passes and passes after a
``time.sleep`` gap, and after a busy-wait gap of the same length (the CPU kept busy by Python, so
the core never idles).

    .venv/bin/python bench/bench_pause.py [--model smollm2-135m] [--layers 15] [--gaps 0 2 20] [--passes 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402,F401  (the OpenMP defaults every edgecloud process runs with, set before torch loads)

# isort: split
import torch  # noqa: E402

from partition.models import resolve_model  # noqa: E402
from partition.profile import PROFILE_PROMPT_TOKENS, _decode_sample  # noqa: E402
from partition.segment import ModelSegment  # noqa: E402


def _passes(segment, x, cache, n: int, gap_s: float, busy: bool) -> list[float]:
    out = []
    for _ in range(n):
        if gap_s and busy:
            end = time.perf_counter() + gap_s
            while time.perf_counter() < end:
                pass
        elif gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        _decode_sample(segment, x, cache, PROFILE_PROMPT_TOKENS, None, None)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=15, help="time layers [0, K)")
    ap.add_argument("--gaps", type=float, nargs="+", default=[0, 2, 20], help="pauses before each pass, ms")
    ap.add_argument("--passes", type=int, default=40, help="timed passes per block")
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks per setting")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    source = resolve_model(args.model)
    segment = ModelSegment.load(source, 0, args.layers, embed=False, head=False)
    generator = torch.Generator().manual_seed(0)
    settings = [(g, False) for g in args.gaps] + [(g, True) for g in args.gaps if g > 0]
    samples: dict[str, list[float]] = {}
    with torch.inference_mode():
        cache = segment.new_cache()
        segment(torch.randn(1, PROFILE_PROMPT_TOKENS, source.hidden_size, generator=generator), cache, logits="none")
        x = torch.randn(1, 1, source.hidden_size, generator=generator)
        _passes(segment, x, cache, 10, 0.0, False)  # warm-up
        for r in range(args.rounds):
            for gap_ms, busy in settings if r % 2 == 0 else settings[::-1]:
                key = f"{'busy' if busy else 'sleep'} {gap_ms:g} ms" if gap_ms else "back to back"
                samples.setdefault(key, []).extend(_passes(segment, x, cache, args.passes, gap_ms / 1e3, busy))
    base = statistics.median(samples["back to back"]) * 1e3
    result = {"model": args.model, "layers": args.layers, "passes": args.passes * args.rounds,
              "median_ms": {k: statistics.median(v) * 1e3 for k, v in samples.items()}}  # fmt: skip
    result["ratio_to_back_to_back"] = {k: v / base for k, v in result["median_ms"].items()}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}, layers [0, {args.layers}), one token, {result['passes']} passes per setting")
    for k, v in result["median_ms"].items():
        print(f"  {k:18} {v:7.2f} ms  ({result['ratio_to_back_to_back'][k]:.3f}x)")


if __name__ == "__main__":
    main()
