"""Continuous batching in one cloud worker: aggregate tokens/s, per-session ms/token and the
worker's CPU seconds per token at 1, 2, 4, 8 and 16 concurrent sessions, side by side with the
same worker run one step at a time (``--max-batch 1``).

One broker and one worker (real processes on loopback, ``cli.cluster.LocalCluster``); the edges
are generations of one ``EdgeEngine`` in this process, one thread each (the engine's own
concurrency), with one torch thread so that they take as little of the machine as they can.
Every phase generates ``--tokens`` tokens per session, greedy and ignoring EOS, from different
prompts; each session's tokens are checked against the same prompt run alone (concurrency 1),
so the figures are also a batch-invariance check. Cloud-only (split 0) and split 15.

The worker's CPU time (user + system, from /proc through psutil) over the phase, divided by the
tokens it produced, is steadier than wall-clock throughput on a shared machine: it is what a
batch saves, whatever else runs. KV bytes per session: the largest cache the worker reported in
a heartbeat during the phase over the sessions it held then.

    .venv/bin/python bench/bench_batching.py [--model smollm2-135m] [--tokens 32] [--json] [--plot PNG]

``--seed-check`` runs only the check an issue asked for: the seed's ``EdgeCloudManager`` in
cloud-only mode, eight prompts one after another and then as one batch, the worker's CPU per
token in each: with the worker's defaults, with the head on the GGUF file's blocks
(``--head-blocks``), without its prefix cache (``--prefix-cache-mb 0``), and with its row kernel
off (``EDGECLOUD_ROW_KERNEL``; the prefix cache is then off too). ``--seed-mini`` gives the manager
the seed example's ``MiniLLMHandler(model=None, tokenizer=...)`` (the self-drafter) as well.
``--seed-threads`` runs the eight at once as eight threads, each calling ``process_hybrid`` with
one prompt on the one manager, instead of one call with the list.

``--cold-burst`` runs only this: eight chat prompts (one system prompt, eight questions) reaching
a fresh worker at once, cloud-only, eight tokens each; the worker's CPU over the burst and the
time to the first token, with its prefix cache (the first prompt computes the shared beginning,
the others wait one pass and copy it) and without, each on a fresh cluster, ``--reps`` times.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the repository root on sys.path)

SUBJECTS = ["the sea", "a violin", "bread", "rain", "a library", "winter", "bees", "a bridge", "chess",
            "the moon", "a kettle", "maps", "snow", "a garden", "trains", "a lighthouse"]
CONCURRENCY = (1, 2, 4, 8, 16)


def prompts() -> list[str]:
    return [f"Write two sentences about {s}." for s in SUBJECTS]


def phase(cluster, engine, texts: list[str], params, concurrency: int) -> dict:
    """Generate every prompt, ``concurrency`` at a time; tokens, wall time, worker CPU."""
    import psutil

    worker = psutil.Process(cluster.workers[0].popen.pid)
    results: dict[int, list[int]] = {}
    peak = {"cache_bytes": 0, "sessions": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            try:
                w = engine.client.status()["workers"][0]  # in process: `edgecloud status` is a whole process
            except Exception:  # noqa: BLE001 - a missed reading is no reason to stop measuring
                continue
            if w["cache_bytes"] > peak["cache_bytes"]:
                peak.update(cache_bytes=w["cache_bytes"], sessions=w["reported_sessions"])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cpu0 = sum(worker.cpu_times()[:2])
    t0 = time.perf_counter()
    per_token_ms = []
    for lo in range(0, len(texts), concurrency):
        group = list(range(lo, min(lo + concurrency, len(texts))))

        def run(i: int) -> None:
            r = engine.generate(texts[i], params)
            results[i] = r.token_ids
            per_token_ms.append(r.ms_per_token)

        threads = [threading.Thread(target=run, args=(i,)) for i in group]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    cpu = sum(worker.cpu_times()[:2]) - cpu0
    done.set()
    watcher.join()
    tokens = sum(len(t) for t in results.values())
    return {"concurrency": concurrency, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "worker_cpu_ms_per_token": round(cpu / tokens * 1e3, 3),
            "ms_per_token": round(sorted(per_token_ms)[len(per_token_ms) // 2], 2),
            "kv_bytes_per_session": peak["cache_bytes"] // max(1, peak["sessions"]),
            "token_ids": [results[i] for i in range(len(texts))]}


def run_worker(model: str, max_batch: int, split: int, tokens: int, texts: list[str], prefix_mb: float = 0.0) -> list[dict]:
    from broker.wire.crypto import load_api_keys
    from cli.cluster import LocalCluster
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    with LocalCluster(model=model, heartbeat_s=0.5) as cluster:
        cluster.start_broker()
        cluster.add_worker(extra_args=("--max-batch", str(max_batch), "--prefix-cache-mb", f"{prefix_mb:g}"))
        cluster.wait_for_workers(1, timeout_s=600)
        key = sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]
        settings = EdgeConfig(model=model, split=split, broker=cluster.endpoint, keys_dir=cluster.keys_dir,
                              api_key=key, max_new_tokens=tokens, torch_threads=1, mini="none",
                              prefix_cache_mb=prefix_mb)
        with EdgeEngine(model, settings) as engine:
            params = engine.params(ignore_eos=True)
            engine.generate(texts[0], params)  # warm both sides
            rows = []
            for c in CONCURRENCY:
                row = phase(cluster, engine, texts, params, c)
                row.update(max_batch=max_batch, split=split)
                rows.append(row)
                print(f"split {split:2d} max-batch {max_batch:2d} x{c:2d}: {row['tokens_per_s']:7.1f} tok/s, "
                      f"{row['ms_per_token']:6.1f} ms/token per session, worker {row['worker_cpu_ms_per_token']:6.1f} "
                      f"CPU ms/token, KV {row['kv_bytes_per_session'] / 2**20:.2f} MiB/session", file=sys.stderr)
    return rows


def seed_check(model: str, tokens: int, kernel: str, prefix_mb: float = 128.0, head_blocks: bool = False,
               seed_mini: bool = False, threads: bool = False) -> dict:
    """The seed's ``EdgeCloudManager`` in cloud-only mode against one worker: eight prompts one
    after another, then the eight as one batch (``process_hybrid`` of a list: eight sessions at
    once); the worker's (and the broker's) CPU per generated token and the wall time in each phase, and whether
    every row equals its prompt alone. ``kernel`` is the worker's ``EDGECLOUD_ROW_KERNEL``,
    ``prefix_mb`` its ``--prefix-cache-mb`` (with it, the batch finds its prompts computed by the
    first phase, as a service finds a system prompt or a conversation's earlier turns),
    ``head_blocks`` its ``--head-blocks``; ``seed_mini``: the manager gets the seed example's
    ``MiniLLMHandler(model=None, tokenizer=...)`` (the self-drafter) instead of its default;
    ``threads``: the eight at once are eight threads, each calling ``process_hybrid`` with one
    prompt on the one manager, instead of one call with the list."""
    import os

    import psutil

    from cli.cluster import LocalCluster
    from edge_worker import EdgeCloudManager
    from partition.rowkernel import SWITCH
    from partition.tokens import encode_prompt

    with LocalCluster(model=model) as cluster:
        broker = cluster.start_broker()
        worker = cluster.add_worker(env={SWITCH: kernel}, extra_args=("--prefix-cache-mb", f"{prefix_mb:g}",
                                                                      *(["--head-blocks"] if head_blocks else [])))
        cluster.wait_for_workers(1, timeout_s=600)
        os.environ.update(EDGECLOUD_BROKER=cluster.endpoint, EDGECLOUD_KEYS=str(cluster.keys_dir))
        mini = None
        if seed_mini:
            from edge_worker import MiniLLMHandler
            from partition.models import source_of

            mini = MiniLLMHandler(model=None, tokenizer=source_of(model).load_tokenizer())
        manager = EdgeCloudManager(model=model, force_mode="cloud-only", mini_llm=mini)
        try:
            ids = [encode_prompt(manager.tokenizer, t) for t in prompts()[:8]]
            process, broker_process = psutil.Process(worker.popen.pid), psutil.Process(broker.popen.pid)
            manager.process_hybrid(ids[0], max_new_tokens=4)  # warm both sides

            def cpu(proc: psutil.Process = process) -> float:
                return sum(proc.cpu_times()[:2])

            c0, b0, t0 = cpu(), cpu(broker_process), time.perf_counter()
            alone = [manager.process_hybrid(p, max_new_tokens=tokens)[0, len(p):].tolist() for p in ids]
            c1, b1, t1 = cpu(), cpu(broker_process), time.perf_counter()
            if threads:
                rows: list = [None] * len(ids)

                def one(i: int) -> None:
                    rows[i] = manager.process_hybrid(ids[i], max_new_tokens=tokens)[0]

                pool = [threading.Thread(target=one, args=(i,)) for i in range(len(ids))]
                for thread in pool:
                    thread.start()
                for thread in pool:
                    thread.join()
            else:
                rows = list(manager.process_hybrid(ids, max_new_tokens=tokens))
            c2, b2, t2 = cpu(), cpu(broker_process), time.perf_counter()
            together = [None if r is None else r[len(p):len(p) + len(alone[i])].tolist()
                        for i, (r, p) in enumerate(zip(rows, ids, strict=True))]
            status = manager.cloud_client.status()["workers"][0]
        finally:
            manager.close()
    n = sum(len(a) for a in alone)
    row = {"kernel": kernel, "prefix_cache_mb": prefix_mb, "head_blocks": head_blocks, "seed_mini": seed_mini,
           "threads": threads, "tokens": n,
           "alone_cpu_ms_per_token": round((c1 - c0) / n * 1e3, 2),
           "together_cpu_ms_per_token": round((c2 - c1) / n * 1e3, 2), "cpu_ratio": round((c1 - c0) / (c2 - c1), 2),
           "tokens_per_s_ratio": round((t1 - t0) / (t2 - t1), 2), "alone_s": round(t1 - t0, 2),
           "together_s": round(t2 - t1, 2), "identical": together == alone, "mean_batch": status["mean_batch"],
           "broker_alone_cpu_ms_per_token": round((b1 - b0) / n * 1e3, 3),
           "broker_together_cpu_ms_per_token": round((b2 - b1) / n * 1e3, 3)}
    print(f"seed check, worker kernel {kernel}, prefix cache {prefix_mb:g} MiB{', --head-blocks' if head_blocks else ''}"
          f"{', the seed example MiniLLMHandler' if seed_mini else ''}"
          f"{', eight threads at once' if threads else ''}: "
          f"{row['alone_cpu_ms_per_token']:.2f} against {row['together_cpu_ms_per_token']:.2f} ms, {row['cpu_ratio']:.2f}x less worker CPU per token at once, "
          f"{row['tokens_per_s_ratio']:.2f}x the tokens/s, identical: {row['identical']}; the broker "
          f"{row['broker_alone_cpu_ms_per_token']:.2f} against {row['broker_together_cpu_ms_per_token']:.2f} ms",
          file=sys.stderr)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for split in sorted({r["split"] for r in rows}):
        for max_batch in sorted({r["max_batch"] for r in rows}):
            sel = [r for r in rows if r["split"] == split and r["max_batch"] == max_batch]
            label = f"split {split}, " + ("one step at a time" if max_batch == 1 else f"batched (max {max_batch})")
            xs = [r["concurrency"] for r in sel]
            axes[0].plot(xs, [r["tokens_per_s"] for r in sel], marker="o", label=label)
            axes[1].plot(xs, [r["worker_cpu_ms_per_token"] for r in sel], marker="o", label=label)
    axes[0].set(xscale="log", xlabel="concurrent sessions", ylabel="aggregate tokens/s", xticks=list(CONCURRENCY))
    axes[1].set(xscale="log", xlabel="concurrent sessions", ylabel="worker CPU ms per token",
                xticks=list(CONCURRENCY))
    for ax in axes:
        ax.set_xticklabels([str(c) for c in CONCURRENCY])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("One cloud worker, SmolLM2-135M, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cold_burst(model: str, prefix_mb: float) -> dict:
    """One ``--cold-burst`` run on a fresh cluster: worker CPU and times to the first token."""
    import statistics

    import psutil

    from broker.wire.crypto import load_api_keys
    from cli.cluster import LocalCluster
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    with LocalCluster(model=model) as cluster:
        cluster.start_broker()
        worker = cluster.add_worker(extra_args=("--prefix-cache-mb", f"{prefix_mb:g}"))
        cluster.wait_for_workers(1, timeout_s=600)
        settings = EdgeConfig(model=model, force_cloud=True, mini="none", dynamic=False, prefix_cache_mb=0,
                              broker=cluster.endpoint, keys_dir=cluster.keys_dir,
                              api_key=sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0])
        with EdgeEngine(model, settings) as engine:
            # Both sides warm, without the chat template's system prompt: the burst finds nothing.
            engine.generate("warm up", engine.params(max_new_tokens=2, raw_prompt=True))
            ids = [engine.encode(t) for t in prompts()[:8]]
            process = psutil.Process(worker.popen.pid)
            c0, t0 = sum(process.cpu_times()[:2]), time.perf_counter()
            results = engine.generate_many(ids, engine.params(max_new_tokens=8, ignore_eos=True))
            c1, t1 = sum(process.cpu_times()[:2]), time.perf_counter()
            time.sleep(3 * cluster.heartbeat_s)  # the next heartbeats carry the reuse count
            status = engine.client.status()["workers"][0]
    return {"prefix_cache_mb": prefix_mb, "worker_cpu_ms": round((c1 - c0) * 1e3, 1),
            "wall_ms": round((t1 - t0) * 1e3, 1), "ttft_ms_median": round(statistics.median(r.ttft_ms for r in results), 1),
            "prompt_tokens": [len(i) for i in ids], "positions_reused": status.get("prefix_reused", 0),
            "token_ids": [r.token_ids for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--splits", default="0,15", help="comma-separated splits (0: cloud-only)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print every row as JSON")
    ap.add_argument("--prefix-cache-mb", type=float, default=0.0,
                    help="the worker's and the edge's prefix caches (default off: every phase repeats the same "
                         "prompts, which would find them all computed after the first)")
    ap.add_argument("--plot", type=Path, default=None, help="write the figure to this PNG")
    ap.add_argument("--seed-check", action="store_true",
                    help="only the seed manager's check: eight prompts one after another, then as one batch, "
                         "with the worker's defaults, with --head-blocks, without its prefix cache, and with MKL tiles")
    ap.add_argument("--default-only", action="store_true",
                    help="--seed-check: only the worker's defaults (alternate two trees with it)")
    ap.add_argument("--seed-mini", action="store_true",
                    help="--seed-check: the manager gets the seed example's MiniLLMHandler(model=None, tokenizer=...)")
    ap.add_argument("--seed-threads", action="store_true",
                    help="--seed-check: at once as eight threads, each calling process_hybrid with one prompt")
    ap.add_argument("--cold-burst", action="store_true",
                    help="only eight chat prompts at once at a fresh worker, with its prefix cache and without")
    ap.add_argument("--reps", type=int, default=3, help="--cold-burst: runs of each")
    args = ap.parse_args()
    if args.cold_burst:
        runs = [cold_burst(args.model, mb) for _ in range(args.reps) for mb in (128.0, 0.0)]
        same = all(r["token_ids"] == runs[0]["token_ids"] for r in runs)
        for r in runs:
            print(json.dumps({k: v for k, v in r.items() if k != "token_ids"}) if args.json else
                  f"prefix cache {r['prefix_cache_mb']:g} MiB: worker CPU {r['worker_cpu_ms']} ms, wall "
                  f"{r['wall_ms']} ms, first token after {r['ttft_ms_median']} ms (median), positions copied "
                  f"{r['positions_reused']}")
        print(f"same tokens in every run: {same}", file=sys.stderr)
        if not same:
            raise SystemExit(1)
        return
    if args.seed_check:
        configs = (("auto", 128.0, False), ("auto", 128.0, True), ("auto", 0.0, False), ("off", 128.0, False))
        rows = [seed_check(args.model, args.tokens, kernel, prefix_mb, head, args.seed_mini, args.seed_threads)
                for kernel, prefix_mb, head in configs[:1 if args.default_only else None]]
        if args.json:
            for r in rows:
                print(json.dumps(r))
        if not all(r["identical"] for r in rows):
            raise SystemExit(1)
        return
    texts = prompts()
    rows = []
    for split in (int(s) for s in args.splits.split(",")):
        for max_batch in (args.max_batch, 1):
            rows += run_worker(args.model, max_batch, split, args.tokens, texts, args.prefix_cache_mb)
    reference = {r["split"]: r["token_ids"] for r in rows if r["concurrency"] == 1 and r["max_batch"] == 1}
    mismatches = [(r["split"], r["max_batch"], r["concurrency"]) for r in rows
                  if r["token_ids"] != reference[r["split"]]]
    for split in sorted(reference):
        one = next(r for r in rows if r["split"] == split and r["max_batch"] == args.max_batch and r["concurrency"] == 1)
        for r in rows:
            if r["split"] == split and r["max_batch"] == args.max_batch and r["concurrency"] > 1:
                print(f"split {split} x{r['concurrency']}: {r['tokens_per_s'] / one['tokens_per_s']:.2f}x the "
                      f"tokens/s of one session, {one['worker_cpu_ms_per_token'] / r['worker_cpu_ms_per_token']:.2f}x "
                      "less worker CPU per token", file=sys.stderr)
    print(f"outputs identical to each prompt alone: {not mismatches}" + (f" (differ: {mismatches})" if mismatches else ""),
          file=sys.stderr)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "token_ids"}))
    if mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
