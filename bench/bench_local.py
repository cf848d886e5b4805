"""Local generation speed: our edge loop (every layer on the edge) next to ``model.generate()``.

Both run in this process on the same weights, greedy, the same prompts and exactly the same
number of new tokens (end-of-sequence ignored), interleaved so machine noise hits both alike.
ms/token is (time for N tokens - time for 1 token) / (N - 1): decode only, prefill excluded.
Target (issue 2): ours within 5% of generate().

``--compiled`` adds a third: ``generate()`` with transformers' static cache and the model's
forward through ``torch.compile`` (inductor's generated C++ on a CPU), the compiled step issue 17
asked to measure against ours. Its compilation (minutes on two cores) happens in the warm-up
and is reported apart; its tokens are compared with ours, not required to be equal.

``--prefix``: only the time to the first token of chat prompts that share the system prompt,
with the engine's prefix cache and without.

    .venv/bin/python bench/bench_local.py [--model smollm2-135m] [--tokens 64] [--reps 5] [--json] [--compiled]
    .venv/bin/python bench/bench_local.py --prefix [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROMPTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--compiled", action="store_true", help="also generate() with a static cache and torch.compile")
    parser.add_argument("--prefix", action="store_true",
                        help="only the time to the first token of chat prompts sharing the system prompt, with the "
                             "engine's prefix cache and without")
    args = parser.parse_args()
    if args.prefix:
        prefix_bench(args)
        return

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine
    from partition.models import resolve_model
    from partition.tokens import encode_prompt

    hf_logging.set_verbosity_error()
    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    hf = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32).eval()
    ours = EdgeEngine(source, EdgeConfig(force_local=True), tokenizer=tokenizer)
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]

    def run_hf(ids: list[int], n: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0, out[0, len(ids):].tolist()

    def run_ours(ids: list[int], n: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        res = ours.generate(ids, ours.params(max_new_tokens=n, ignore_eos=True))
        return time.perf_counter() - t0, res.token_ids

    runners = [("generate()", run_hf), ("edgecloud local", run_ours)]
    compiled_info = {}
    if args.compiled:
        hfc = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32).eval()
        hfc.generation_config.cache_implementation = "static"
        hfc.forward = torch.compile(hfc.forward)

        def run_compiled(ids: list[int], n: int) -> tuple[float, list[int]]:
            t0 = time.perf_counter()
            out = hfc.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return time.perf_counter() - t0, out[0, len(ids):].tolist()

        t0 = time.perf_counter()
        agree = total = 0
        for ids in prompts:  # compiles the prefill and decode graphs
            run_compiled(ids, 1)
            _, c = run_compiled(ids, args.tokens)
            _, b = run_ours(ids, args.tokens)
            agree += sum(x == y for x, y in zip(c, b, strict=True))
            total += len(b)
        compiled_info = {"compile_and_warm_s": round(time.perf_counter() - t0, 1),
                         "tokens_equal_to_ours": f"{agree}/{total}"}
        runners.append(("generate() compiled", run_compiled))
    for ids in prompts:  # warm-up, and the exactness check
        _, a = run_hf(ids, 8)
        _, b = run_ours(ids, 8)
        assert a == b, f"outputs differ: {a} vs {b}"
    n = args.tokens
    per_token: dict[str, list[float]] = {name: [] for name, _ in runners}
    for _ in range(args.reps):
        for ids in prompts:
            for name, fn in runners:
                t_n, _ = fn(ids, n)
                t_1, _ = fn(ids, 1)
                per_token[name].append((t_n - t_1) * 1e3 / (n - 1))
    med = {k: statistics.median(v) for k, v in per_token.items()}
    ratio = med["edgecloud local"] / med["generate()"]
    result = {"model": source.name, "tokens": n, "reps": args.reps, "threads": torch.get_num_threads(),
              "ms_per_token": med, "ratio_ours_over_generate": ratio, **compiled_info}
    if args.json:
        print(json.dumps(result))
        return
    print(f"model {source.name}, {n} tokens x {len(prompts)} prompts x {args.reps} reps, "
          f"{torch.get_num_threads()} torch threads (median decode ms/token)")
    for k, v in med.items():
        print(f"  {k:18} {v:7.2f}")
    print(f"  ratio ours / generate(): {ratio:.3f}  (target <= 1.05)")
    if compiled_info:
        print(f"  ratio ours / compiled generate(): {med['edgecloud local'] / med['generate() compiled']:.3f}; "
              f"compile and warm-up {compiled_info['compile_and_warm_s']} s, tokens equal to ours "
              f"{compiled_info['tokens_equal_to_ours']}")


def prefix_bench(args) -> None:
    """Time to the first token of the benchmark prompts through the chat template (which starts
    each with the same system prompt), each prompt after one other prompt has run: with the
    engine's prefix cache (its system prompt then copied) and without (``prefix_cache_mb=0``),
    alternated; the tokens must be the same."""
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine
    from partition.models import resolve_model
    from partition.tokens import encode_prompt

    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    engines = {name: EdgeEngine(source, EdgeConfig(force_local=True, mini="none", prefix_cache_mb=mb),
                                tokenizer=tokenizer) for name, mb in (("cached", 64.0), ("uncached", 0.0))}
    ttft: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list[list[int]]] = {name: [] for name in engines}
    for _ in range(args.reps):
        for i, ids in enumerate(prompts):
            for name, engine in engines.items():
                if engine.prefixes is not None:  # one other prompt has run: only the system prompt is known
                    engine.prefixes = type(engine.prefixes)(engine.prefixes.limit_bytes)
                    engine.generate(prompts[i - 1], engine.params(max_new_tokens=1))
                res = engine.generate(ids, engine.params(max_new_tokens=8, ignore_eos=True))
                ttft[name].append(res.ttft_ms)
                tokens[name].append(res.token_ids)
    med = {k: statistics.median(v) for k, v in ttft.items()}
    shared = min(len(a) for a in prompts)
    shared = next((j for j in range(shared) if any(p[j] != prompts[0][j] for p in prompts)), shared)
    result = {"model": source.name, "prompt_tokens": [len(p) for p in prompts], "shared_tokens": shared,
              "ttft_ms": med, "ratio": med["cached"] / med["uncached"], "same_tokens": tokens["cached"] == tokens["uncached"]}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {source.name}, prompts of {result['prompt_tokens']} tokens sharing their first {shared}: "
              f"time to the first token {med['cached']:.1f} ms with the prefix cache, {med['uncached']:.1f} without "
              f"({result['ratio']:.2f}x), same tokens: {result['same_tokens']}")
    if not result["same_tokens"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
