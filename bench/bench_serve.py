"""The HTTP server's overhead and its throughput with concurrent clients.

1. Overhead: the same prompts, greedy (so the same tokens), at most ``--tokens`` new tokens, run by
   ``edgecloud edge --json`` and streamed from an ``edgecloud serve`` process with the same
   settings, alternating, ``--reps`` times. Time to first token and ms per token after it: the
   edge's own figures from its JSON; over HTTP what the client sees (first content chunk, then
   the last chunk's arrival over the tokens after the first). This process never loads torch: a
   client that computes, or whose threads are bound to the server's cores (the CLI sets
   ``OMP_PROC_BIND``), slowed the server's decoding by 1.7x in a first version of this script.
2. Throughput: 1, 4 and 8 clients at once, each sending ``--requests`` completions of
   ``--tokens`` tokens; aggregate generated tokens per second of wall time.

Both run on the same machine; while one side computes the other waits, so the comparison is
side by side. Local mode by default (no broker); ``--split K --broker ADDR --keys DIR`` measures
a split server against a running cluster instead, and ``--split K --workers N`` starts one (a
broker and N workers on loopback, cli.cluster.LocalCluster).

    .venv/bin/python bench/bench_serve.py [--model smollm2-135m] [--tokens 48] [--reps 3] [--json]
    .venv/bin/python bench/bench_serve.py --split 15 --workers 1
    .venv/bin/python bench/bench_serve.py --first-only     # start-up and the first request alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import PROMPTS  # noqa: E402


def start_server(model: str, port: int, edge_args: list[str], max_concurrent: int) -> subprocess.Popen:
    from cli.cluster import ROOT, child_env, cli_command

    proc = subprocess.Popen(cli_command("serve", "--model", model, "--port", str(port), "--max-concurrent",
                                        str(max_concurrent), *edge_args),
                            env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not come up within 300 s")


def stream_once(http, url: str, model: str, prompt: str, tokens: int) -> tuple[float, float, int, float]:
    """(ttft_ms, ms_per_token, tokens) as the client sees them, and the engine's own time to
    first token inside the server for the same request (its final chunk's "edgecloud" figures)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    engine_ttft = float("nan")
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            if chunk.get("edgecloud"):
                engine_ttft = chunk["edgecloud"]["ttft_ms"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    assert first is not None and n > 1, (first, n)
    return (first - t0) * 1e3, (last - first) * 1e3 / (n - 1), n, engine_ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the throughput runs")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--split", type=int, default=None)
    parser.add_argument("--broker", default=None)
    parser.add_argument("--keys", default=None)
    parser.add_argument("--workers", type=int, default=0, help="with --split: start a broker and this many workers")
    parser.add_argument("--first-only", action="store_true",
                        help="only the server's start and its first two requests' time to first token")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import httpx

    from cli.cluster import ROOT, child_env, cli_command, free_port

    stack = contextlib.ExitStack()
    if args.split is not None and args.workers:
        from cli.cluster import LocalCluster

        cluster = stack.enter_context(LocalCluster(model=args.model))
        cluster.start_broker()
        for _ in range(args.workers):
            cluster.add_worker()
        cluster.wait_for_workers(args.workers, timeout_s=600)
        args.broker, args.keys = cluster.endpoint, str(cluster.keys_dir)
    if args.split is None:
        edge_args = ["--force-local"]
    else:
        edge_args = ["--split", str(args.split), *(["--broker", args.broker] if args.broker else []),
                     *(["--keys", args.keys] if args.keys else [])]

    def edge_once(prompt: str) -> dict:
        out = subprocess.run(cli_command("edge", "--model", args.model, "--json", "--prompt", prompt, "--tokens",
                                         str(args.tokens), *edge_args),
                             env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"edgecloud edge failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)

    levels = [int(c) for c in args.concurrency.split(",")]
    port = free_port()
    t0 = time.perf_counter()
    server = start_server(args.model, port, edge_args, max(levels))
    url = f"http://127.0.0.1:{port}"
    if args.first_only:  # what the server's first user waits, next to the second
        start_s = time.perf_counter() - t0
        try:
            name = json.loads(urllib.request.urlopen(f"{url}/v1/models").read())["data"][0]["id"]
            with httpx.Client(timeout=600) as http:
                first, second = (stream_once(http, url, name, PROMPTS[0], 4)[0] for _ in range(2))
        finally:
            server.terminate()
            server.wait(10)
            stack.close()
        row = {"start_s": round(start_s, 2), "first_ttft_ms": round(first, 1), "second_ttft_ms": round(second, 1)}
        print(json.dumps(row) if args.json else f"server up after {row['start_s']} s; time to first token: first "
              f"request {row['first_ttft_ms']} ms, second {row['second_ttft_ms']} ms")
        return
    try:
        name = json.loads(urllib.request.urlopen(f"{url}/v1/models").read())["data"][0]["id"]
        direct: dict[str, list[float]] = {"ttft_ms": [], "ms_per_token": []}
        served: dict[str, list[float]] = {"ttft_ms": [], "ms_per_token": []}
        http_ms: list[float] = []  # client's time to first token minus the engine's, same request
        with httpx.Client(timeout=600) as http:
            stream_once(http, url, name, PROMPTS[0], 4)  # warm-up (each edge run is a fresh process)
            for _ in range(args.reps):
                for prompt in PROMPTS:
                    r = edge_once(prompt)
                    direct["ttft_ms"].append(r["ttft_ms"])
                    direct["ms_per_token"].append(r["ms_per_token"])
                    ttft, tpot, n, engine_ttft = stream_once(http, url, name, prompt, args.tokens)
                    http_ms.append(ttft - engine_ttft)
                    assert n == len(r["token_ids"]), f"greedy runs differ in length: {n} vs {len(r['token_ids'])}"
                    served["ttft_ms"].append(ttft)
                    served["ms_per_token"].append(tpot)
        throughput = {}
        for c in levels:
            totals: list[int] = []

            def client(i: int, totals: list[int] = totals) -> None:
                with httpx.Client(timeout=600) as http:
                    for j in range(args.requests):
                        body = {"model": name, "prompt": PROMPTS[(i + j) % len(PROMPTS)], "max_tokens": args.tokens,
                                "ignore_eos": True}
                        r = http.post(url + "/v1/completions", json=body)
                        r.raise_for_status()
                        totals.append(r.json()["usage"]["completion_tokens"])

            threads = [threading.Thread(target=client, args=(i,)) for i in range(c)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            throughput[c] = {"tokens": sum(totals), "wall_s": round(wall, 2), "tokens_per_s": round(sum(totals) / wall, 1)}
    finally:
        server.terminate()
        server.wait(10)
        stack.close()

    med = {side: {k: statistics.median(v) for k, v in d.items()} for side, d in (("direct", direct), ("server", served))}
    report = {
        "model": args.model, "tokens": args.tokens,
        "mode": "local" if args.split is None else f"split {args.split}, {args.workers or 'external'} worker(s)",
        "samples": len(direct["ttft_ms"]), "median": med,
        "ratio_server_over_direct": {k: round(med["server"][k] / med["direct"][k], 3) for k in med["direct"]},
        # What the HTTP layer adds to one request's first token (parsing, template, the thread
        # hand-off, the chunk's way back), measured inside each request: no run-to-run noise.
        "http_overhead_ms": round(statistics.median(http_ms), 2),
        "http_overhead_ms_range": [round(min(http_ms), 2), round(max(http_ms), 2)],
        "throughput": throughput,
        "throughput_vs_one_client": {c: round(v["tokens_per_s"] / throughput[levels[0]]["tokens_per_s"], 2)
                                     for c, v in throughput.items()},
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['mode']}, {args.model}, {args.tokens} tokens, {report['samples']} pairs (medians)")
    for k in ("ttft_ms", "ms_per_token"):
        print(f"  {k:13s} direct {med['direct'][k]:8.1f}  server {med['server'][k]:8.1f}  "
              f"ratio {report['ratio_server_over_direct'][k]:.3f}")
    print(f"  HTTP layer's share of the first token: {report['http_overhead_ms']:.2f} ms median "
          f"(range {report['http_overhead_ms_range']})")
    for c, v in throughput.items():
        print(f"  {c} client(s): {v['tokens_per_s']:7.1f} tokens/s ({v['tokens']} tokens in {v['wall_s']} s), "
              f"{report['throughput_vs_one_client'][c]}x one client")


if __name__ == "__main__":
    main()
