"""Conversations: each turn resends the ones before it, answers included. Time to the first token
of every turn with the prefix caches (the engine's for its own layers, the worker's for the
cloud's) and without, side by side in one run.

A chat client sends the whole conversation each turn: the system prompt, every question and
every answer so far, then the new question. With the caches, a session that ends leaves its
positions (prompt and generated tokens) behind, so the next turn copies everything but the new
question (and the chat template's few tokens between turns) instead of computing it again.

Each mode runs the same conversations (four questions each, answers up to ``--tokens`` tokens,
greedy) twice, with the caches and without (``prefix_cache_mb=0`` on the edge,
``--prefix-cache-mb 0`` on the worker), alternating turn by turn; the two must give the same
tokens at every turn. Modes: ``local`` (every layer in this process), ``cloud`` (split 0: a real
broker and worker as processes, the edge only embeds), ``split`` (layers 0-14 here, the rest on
the worker). Each conversation starts with a question no other asked, so its first turn shares
only the system prompt with what ran before.

    .venv/bin/python bench/bench_conversation.py [--modes local,cloud,split] [--conversations 3] [--tokens 48]

``--placement``: two workers, cloud-only, ``--at-once`` conversations at once (a thread each, the
four above in turn), with
the caches on: the engine telling the broker which worker holds each conversation (the default)
against placement by load alone (the engine's index of where generations ran left empty), one
after the other; time to the first token of turns 1-3 and the positions the workers copied.

With ``--background N``, N more threads send one-off requests (no conversation, answers of 8 to
40 tokens) for as long as the conversations last, so the workers' loads move as a server's do.

    .venv/bin/python bench/bench_conversation.py --placement [--at-once 8] [--background 4] [--tokens 48]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402,F401 - the OpenMP defaults, before torch loads

CONVERSATIONS = [
    ["What is the capital of France? Answer in two sentences.", "And of Italy?", "Which of the two is older?",
     "Thanks. Summarise our conversation in one line."],
    ["Name three planets of the solar system.", "Which of them is the largest?", "How far is it from the Sun?",
     "Thanks. Summarise our conversation in one line."],
    ["Give me a short tip for learning Python.", "And one for learning Rust?", "Which language should I learn first?",
     "Thanks. Summarise our conversation in one line."],
    ["What does a compiler do?", "And an interpreter?", "Is Python compiled or interpreted?",
     "Thanks. Summarise our conversation in one line."],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--modes", default="local,cloud,split")
    parser.add_argument("--split", type=int, default=15, help="the edge's layers in the split mode")
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--at-once", type=int, default=8, help="--placement: conversations at once")
    parser.add_argument("--background", type=int, default=0, help="--placement: threads sending one-off requests")
    parser.add_argument("--placement", action="store_true",
                        help="two workers, four conversations at once: placement near each conversation's worker "
                             "against placement by load")
    args = parser.parse_args()
    if args.placement:
        placement_bench(args)
        return
    modes = args.modes.split(",")
    unknown = set(modes) - {"local", "cloud", "split"}
    if unknown or not 1 <= args.conversations <= len(CONVERSATIONS):
        raise SystemExit(f"modes are local, cloud and split (got {sorted(unknown)}); "
                         f"1 to {len(CONVERSATIONS)} conversations")

    from broker.wire.crypto import load_api_keys
    from cli.cluster import LocalCluster
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine
    from partition.models import resolve_model

    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    results = {}
    with contextlib.ExitStack() as stack:
        clusters = {}
        if set(modes) - {"local"}:
            for name, worker_args in (("cached", ()), ("uncached", ("--prefix-cache-mb", "0"))):
                cluster = stack.enter_context(LocalCluster(model=args.model))
                cluster.start_broker()
                cluster.add_worker(extra_args=worker_args)
                clusters[name] = cluster
            for cluster in clusters.values():
                cluster.wait_for_workers(1, timeout_s=120)
        for mode in modes:
            engines = {}
            for name, mb in (("cached", 64.0), ("uncached", 0.0)):
                placement = {"force_local": True} if mode == "local" else (
                    {"force_cloud": True} if mode == "cloud" else {"split": args.split})
                wire = {}
                if mode != "local":
                    cluster = clusters[name]
                    wire = {"broker": cluster.endpoint, "keys_dir": cluster.keys_dir,
                            "api_key": sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]}
                settings = EdgeConfig(model=args.model, mini="none", dynamic=False, prefix_cache_mb=mb, **placement,
                                      **wire)
                engines[name] = stack.enter_context(EdgeEngine(source, settings, tokenizer=tokenizer))
            reused_before = _worker_reused(clusters.get("cached"))
            ttft: dict[str, dict[int, list[float]]] = {name: {} for name in engines}
            prompt_tokens: dict[int, list[int]] = {}
            same = True
            for questions in CONVERSATIONS[:args.conversations]:
                history = {name: [] for name in engines}
                for turn, question in enumerate(questions):
                    answers = {}
                    for name, engine in engines.items():
                        history[name].append({"role": "user", "content": question})
                        ids = engine.encode_chat(history[name])
                        res = engine.generate(ids, engine.params(max_new_tokens=args.tokens))
                        history[name].append({"role": "assistant", "content": res.text})
                        ttft[name].setdefault(turn, []).append(res.ttft_ms)
                        answers[name] = res.token_ids
                        if name == "cached":
                            prompt_tokens.setdefault(turn, []).append(len(ids))
                    same = same and answers["cached"] == answers["uncached"]
            turns = sorted(prompt_tokens)
            results[mode] = {
                "prompt_tokens": {t: statistics.median(prompt_tokens[t]) for t in turns},
                "ttft_ms": {name: {t: statistics.median(v[t]) for t in turns} for name, v in ttft.items()},
                "later_turns_ms": {name: statistics.median(x for t in turns[1:] for x in v[t])
                                   for name, v in ttft.items()},
                "same_tokens": same,
            }
            later = results[mode]["later_turns_ms"]
            results[mode]["later_turns_ratio"] = later["cached"] / later["uncached"]
            if mode != "local":
                results[mode]["worker_positions_reused"] = _worker_reused(clusters["cached"]) - reused_before
            results[mode]["edge_positions_reused"] = engines["cached"].prefixes.reused_positions
            for engine in engines.values():
                engine.close()
    if args.json:
        print(json.dumps({"model": source.name, "tokens": args.tokens, "conversations": args.conversations,
                          "modes": results}))
    else:
        print(f"model {source.name}, {args.conversations} conversations of 4 turns, answers up to {args.tokens} "
              "tokens (median time to the first token, ms; with the prefix caches / without)")
        for mode, r in results.items():
            cells = ", ".join(f"turn {t} ({r['prompt_tokens'][t]:.0f} tokens) {r['ttft_ms']['cached'][t]:.1f} / "
                              f"{r['ttft_ms']['uncached'][t]:.1f}" for t in r["prompt_tokens"])
            print(f"  {mode:6} {cells}; turns 1-3: {r['later_turns_ratio']:.2f}x; same tokens: {r['same_tokens']}; "
                  f"positions copied: edge {r['edge_positions_reused']}, worker {r.get('worker_positions_reused', 0)}")
    if not all(r["same_tokens"] for r in results.values()):
        raise SystemExit("the caches changed a generation's tokens")


def placement_bench(args) -> None:
    """Four conversations at once against two workers, cloud-only: each turn's session placed near
    the worker holding the conversation's earlier turns, then (the same conversations again, on a
    fresh cluster) by load alone."""
    from concurrent.futures import ThreadPoolExecutor

    from broker.wire.crypto import load_api_keys
    from cli.cluster import LocalCluster
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine
    from partition.models import resolve_model
    from partition.prefix_cache import Continuations

    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    results, answers = {}, {}
    for name in ("by load", "near"):
        with LocalCluster(model=args.model) as cluster:
            cluster.start_broker()
            cluster.add_worker()
            cluster.add_worker()
            cluster.wait_for_workers(2, timeout_s=180)
            settings = EdgeConfig(model=args.model, mini="none", dynamic=False, force_cloud=True,
                                  broker=cluster.endpoint, keys_dir=cluster.keys_dir,
                                  api_key=sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0])
            with EdgeEngine(source, settings, tokenizer=tokenizer) as engine:
                engine.generate(engine.encode_chat([{"role": "user", "content": "Hello."}]),
                                engine.params(max_new_tokens=2))  # warm up the edge
                if name == "by load":
                    engine.continuations = Continuations(limit=0)  # remembers nothing

                def converse(questions: list[str]) -> list[tuple[float, list[int], list[str]]]:
                    history, turns = [], []
                    for question in questions:
                        history.append({"role": "user", "content": question})
                        res = engine.generate(engine.encode_chat(history), engine.params(max_new_tokens=args.tokens))
                        history.append({"role": "assistant", "content": res.text})
                        turns.append((res.ttft_ms, res.token_ids, res.workers_used))
                    return turns

                streams = [CONVERSATIONS[i % len(CONVERSATIONS)] for i in range(args.at_once)]
                finished = threading.Event()

                def one_offs(seed: int, finished: threading.Event = finished) -> int:
                    sent = 0
                    while not finished.is_set():
                        question = f"Write {3 + (seed + sent) % 5} words about the number {seed * 100 + sent}."
                        engine.generate(engine.encode_chat([{"role": "user", "content": question}]),
                                        engine.params(max_new_tokens=8 + 8 * ((seed + sent) % 5)))
                        sent += 1
                    return sent

                with ThreadPoolExecutor(len(streams) + args.background) as pool:
                    background = [pool.submit(one_offs, i) for i in range(args.background)]
                    done = list(pool.map(converse, streams))
                    finished.set()
                    one_off_count = sum(f.result() for f in background)
            reused_total = _worker_reused(cluster, every=True)
            counters = cluster.status()["counters"]
        later = [t[0] for conv in done for t in conv[1:]]
        moved = sum(conv[i][2][-1:] != conv[i - 1][2][-1:] for conv in done for i in range(1, len(conv)))
        results[name] = {"later_turns_ttft_ms": statistics.median(later), "positions_reused": reused_total,
                         "one_off_requests": one_off_count,
                         "turns_moved_to_another_worker": moved, "placed_near": counters.get("placed_near", 0)}
        answers[name] = [[t[1] for t in conv] for conv in done]
    same = answers["near"] == answers["by load"]
    if args.json:
        print(json.dumps({"model": source.name, "tokens": args.tokens, "placement": results, "same_tokens": same}))
    else:
        print(f"model {source.name}, two workers, {args.at_once} conversations of 4 turns at once, answers up "
              f"to {args.tokens} tokens, cloud-only, prefix caches on")
        for name, r in results.items():
            print(f"  {name:8} turns 1-3 time to first token (median) {r['later_turns_ttft_ms']:.1f} ms; positions "
                  f"copied {r['positions_reused']}; turns on another worker than the turn before "
                  f"{r['turns_moved_to_another_worker']} of {3 * args.at_once}; placed near {r['placed_near']}; "
                  f"one-off requests beside them {r['one_off_requests']}")
        print(f"  same tokens: {same}")
    if not same:
        raise SystemExit("placement changed a generation's tokens")


def _worker_reused(cluster, every: bool = False) -> int:
    """The positions the cluster's worker (``every``: all its workers together) has copied from
    its prefix cache so far (heartbeats carry the count: wait for the next ones)."""
    if cluster is None:
        return 0
    time.sleep(3 * cluster.heartbeat_s)
    workers = cluster.status()["workers"]
    if every:
        return sum(w.get("prefix_reused", 0) for w in workers)
    return workers[0].get("prefix_reused", 0) if workers else 0


if __name__ == "__main__":
    main()
