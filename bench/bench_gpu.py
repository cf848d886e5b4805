"""The GPU check (issue 17): a worker's decode step on an accelerator, its batch invariance, and a
split equal to the whole model. ``bench/gpu_check.sh`` runs it on a lent GPU machine (the
``device`` tool) in a few minutes; ``--device cpu --quick`` runs the same code on this CPU in
seconds, and the test suite does so, so that the script works the day a GPU is lent.

No weights travel (a GPU machine here takes at most 64 MiB of files): each model is built on the
device from a config with random weights: SmolLM2-135M's shape and a 1B-class Llama shape
(Llama-3.2-1B's: 16 layers of 2048, 32 heads over 8 key-value heads, a 128256-token vocabulary).
For each model and dtype:

1. **Decode steps at batch 1, 2, 4, ... 64**: every session has its own random prefix, then each
   step runs all sessions' next positions through the worker's packed forward
   (``ModelSegment.forward_many``, what a cloud worker calls); ms per step (the median of the
   timed steps, the device synchronised around each) and tokens/s.
2. **Batch invariance**: every session's greedy tokens at every batch size, and its last step's
   logits bit for bit, equal to that session run alone.
2b. **CUDA graphs** (``partition/graphs.py``): the same steps again with the segment's decode
   passes captured as graphs between the attentions (run eagerly on a CPU): ms per step, and
   every session's tokens and logits against that session run alone, eagerly.
3. **The split equals the whole**: layers ``[0, k)`` then ``[k, N)`` (with ``k = N // 2``) give
   the whole model's greedy tokens, and the same logits.
4. With ``--cluster`` (needs pyzmq and PyNaCl on the machine), a real broker and a cloud worker
   process on the device (``--device``, ``--dtype``, and ``--cuda-graphs`` on a GPU) serving
   tiny-llama to a cloud-only edge: tokens equal to the same layers run eagerly in process.

    python3 bench/bench_gpu.py [--device cuda] [--dtypes bfloat16 float16] [--models smollm2-shape llama-1b-shape]
        [--batches 1 2 4 8 16 32 64] [--steps 8] [--json FILE] [--quick] [--cluster]

Exit status 1 when a check fails (the figures are still printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the repository root on sys.path)

SHAPES = {
    # SmolLM2-135M-Instruct's config (the default model), random weights.
    "smollm2-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                          max_position_embeddings=8192),
    # Llama-3.2-1B's shape (without its rope scaling, which changes no cost), random weights.
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                           max_position_embeddings=8192),
    # For --quick on a CPU: the same code in seconds.
    "tiny-shape": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=1024),
}
PREFIX = 64  # positions of random prompt each session holds before the timed steps


def build(shape: str, dtype, device):
    """A Llama-shaped model with random weights, made on ``device``, as this project's source."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from partition.models import source_of

    config = LlamaConfig(**SHAPES[shape], initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.name_or_path = shape
    return source_of(model)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_alone(seg, prompt, steps: int):
    """One session by itself: its tokens and its last step's logits."""
    import torch

    cache = seg.new_cache()
    logits = seg(prompt, cache, logits="last").logits[0, -1]
    tokens = []
    for _ in range(steps):
        token = int(logits.argmax())
        tokens.append(token)
        logits = seg(torch.tensor([[token]], device=seg.device), cache, logits="last").logits[0, -1]
    return tokens, logits


def decode_batch(seg, prompts, steps: int):
    """All sessions at once through ``forward_many``: ms per step, tokens and last logits per session."""
    import torch

    from partition.segment import StepInput

    caches = [seg.new_cache() for _ in prompts]
    logits = torch.stack([seg(p, c, logits="last").logits[0, -1] for p, c in zip(prompts, caches, strict=True)])
    tokens: list[list[int]] = [[] for _ in prompts]
    times = []
    for _ in range(steps):
        nxt = logits.argmax(dim=-1)
        for t, v in zip(tokens, nxt.tolist(), strict=True):
            t.append(v)
        frames = [StepInput(nxt[i].view(1, 1), caches[i], None, "last") for i in range(len(prompts))]
        sync(seg.device)
        t0 = time.perf_counter()
        outs = seg.forward_many(frames)
        sync(seg.device)
        times.append((time.perf_counter() - t0) * 1e3)
        logits = torch.stack([o.logits[0, -1] for o in outs])
    return statistics.median(times[1:] if len(times) > 2 else times), tokens, logits


def check_model(shape: str, dtype_name: str, device, batches: list[int], steps: int) -> dict:
    import torch

    from partition.graphs import DecodeGraphs
    from partition.segment import ModelSegment

    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    source = build(shape, dtype, device)
    seg = ModelSegment.load(source, 0, source.n_layers, embed=True, head=True, dtype=dtype, device=device)
    built_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    vocab = source.config.vocab_size
    prompts = [torch.randint(0, vocab, (1, PREFIX), generator=gen).to(device) for _ in range(max(batches))]
    alone = [greedy_alone(seg, p, steps) for p in prompts]
    graphs = DecodeGraphs(seg, capture=device.type == "cuda")
    graphs_error = None
    rows = []
    for b in batches:
        seg.graphs = None
        ms, tokens, logits = decode_batch(seg, prompts[:b], steps)
        same_tokens = all(tokens[i] == alone[i][0] for i in range(b))
        same_logits = all(torch.equal(logits[i], alone[i][1]) for i in range(b))
        row = {"batch": b, "ms_per_step": round(ms, 3), "tokens_per_s": round(b * 1e3 / ms, 1),
               "tokens_equal_alone": same_tokens, "logits_equal_alone": same_logits,
               "graphs_ms_per_step": None, "graphs_tokens_per_s": None, "graphs_equal_alone": False}
        if graphs_error is None:
            # Never run on a GPU before its first lent one: a failure is reported, and the eager
            # figures of the other batches still come back.
            try:
                seg.graphs = graphs  # the first step of a bucket captures its pieces (not timed)
                g_ms, g_tokens, g_logits = decode_batch(seg, prompts[:b], steps)
                row.update(graphs_ms_per_step=round(g_ms, 3), graphs_tokens_per_s=round(b * 1e3 / g_ms, 1),
                           graphs_equal_alone=all(g_tokens[i] == alone[i][0] and torch.equal(g_logits[i], alone[i][1])
                                                  for i in range(b)))
            except Exception as exc:  # noqa: BLE001
                graphs_error = f"batch {b}: {type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                seg.graphs = None
        rows.append(row)
    # The split: [0, k) on the "edge", [k, N) with the head on the "worker", the same device.
    k = source.n_layers // 2
    edge = ModelSegment.load(source, 0, k, embed=True, head=False, dtype=dtype, device=device)
    cloud = ModelSegment.load(source, k, source.n_layers, embed=False, head=True, dtype=dtype, device=device)
    e_cache, c_cache = edge.new_cache(), cloud.new_cache()

    def split_pass(x):
        return cloud(edge(x, e_cache, logits="none").hidden, c_cache, logits="last").logits[0, -1]

    logits, split_tokens = split_pass(prompts[0]), []
    for _ in range(steps):
        split_tokens.append(int(logits.argmax()))
        logits = split_pass(torch.tensor([[split_tokens[-1]]], device=device))
    split_equal = split_tokens == alone[0][0] and torch.equal(logits, alone[0][1])
    return {"model": shape, "dtype": dtype_name, "device": str(device), "params_m": round(
        sum(p.numel() for p in seg.parameters()) / 1e6, 1), "build_s": round(built_s, 1), "steps": steps,
        "rows": rows, "split": k, "split_equals_whole": split_equal, "graphs_captured": graphs.captured,
        "graphs_capture_s": round(graphs.capture_s, 2), "graphs_passes": graphs.passes, "graphs_error": graphs_error}


def cluster_check(device: str, dtype: str) -> dict:
    """A real broker and cloud worker process (--device, --dtype) serving tiny-llama to a cloud-only
    edge engine in this process; its tokens against the engine running every layer here on the
    same device and dtype (the edge's --device, --dtype)."""
    from broker.wire.crypto import load_api_keys
    from cli.cluster import LocalCluster
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    prompts = [[(11 * i + 5 * j) % 250 + 3 for j in range(4 + i)] for i in range(6)]
    wire = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    with LocalCluster(model="tiny-llama") as cluster:
        cluster.start_broker()
        # On a GPU the worker captures its decode passes (--cuda-graphs); the reference below is eager.
        graphs = ("--cuda-graphs",) if device.startswith("cuda") else ()
        cluster.add_worker(extra_args=("--device", device, "--dtype", dtype, *graphs))
        cluster.wait_for_workers(1, timeout_s=120)
        key = sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]
        settings = EdgeConfig(model="tiny-llama", force_cloud=True, broker=cluster.endpoint, wire_dtype=wire,
                              keys_dir=cluster.keys_dir, api_key=key, max_new_tokens=40)
        with EdgeEngine("tiny-llama", settings) as engine:
            params = engine.params(ignore_eos=True)
            alone = [engine.generate(p, params).token_ids for p in prompts]
            together = [r.token_ids for r in engine.generate_many(prompts, params)]
    here = EdgeConfig(model="tiny-llama", force_local=True, device=device, dtype=dtype, max_new_tokens=40)
    with EdgeEngine("tiny-llama", here) as engine:
        params = engine.params(ignore_eos=True)
        expected = [engine.generate(p, params).token_ids for p in prompts]
    return {"device": device, "dtype": dtype, "worker_equals_in_process": alone == expected,
            "batched_equals_in_process": together == expected}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--models", nargs="+", default=["smollm2-shape", "llama-1b-shape"], choices=sorted(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny-shape, batches 1 2 4, 3 steps (a CPU dry run)")
    parser.add_argument("--cluster", action="store_true", help="also a real broker and worker on --device")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.steps = ["tiny-shape"], [1, 2, 4], 3

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    report: dict = {"torch": torch.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "models": []}
    ok = True
    for shape in args.models:
        for dtype in args.dtypes:
            r = check_model(shape, dtype, device, args.batches, args.steps)
            report["models"].append(r)
            print(f"\n{shape} ({r['params_m']}M parameters) in {dtype} on {device}, built in {r['build_s']} s; "
                  f"split {r['split']} equals the whole: {r['split_equals_whole']}")
            print(f"{'batch':>5} {'ms/step':>9} {'tokens/s':>9} {'tokens = alone':>15} {'logits = alone':>15} "
                  f"{'graphs ms':>10} {'tokens/s':>9} {'= alone':>8}")
            for row in r["rows"]:
                print(f"{row['batch']:>5} {row['ms_per_step']:>9.2f} {row['tokens_per_s']:>9.1f} "
                      f"{str(row['tokens_equal_alone']):>15} {str(row['logits_equal_alone']):>15} "
                      f"{row['graphs_ms_per_step'] or float('nan'):>10.2f} "
                      f"{row['graphs_tokens_per_s'] or float('nan'):>9.1f} {str(row['graphs_equal_alone']):>8}")
                ok = ok and row["tokens_equal_alone"] and row["logits_equal_alone"] and row["graphs_equal_alone"]
            print(f"graphs: {r['graphs_captured']} pieces captured in {r['graphs_capture_s']} s, "
                  f"{r['graphs_passes']} passes" + (f"; FAILED at {r['graphs_error']}" if r["graphs_error"] else ""))
            ok = ok and r["split_equals_whole"]
            sys.stdout.flush()
    if args.cluster:
        c = cluster_check(args.device, args.dtypes[0])
        report["cluster"] = c
        print(f"\nbroker + worker process on {args.device} in {args.dtypes[0]}: one at a time equal to in process "
              f"{c['worker_equals_in_process']}, batched {c['batched_equals_in_process']}")
        ok = ok and c["worker_equals_in_process"] and c["batched_equals_in_process"]
    report["all_checks_pass"] = ok
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"\nall checks pass: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
