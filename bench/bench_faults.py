"""Generations under injected faults: how many finish with identical output, and what it costs.

For each fault, the edge CLI generates in hybrid mode while the fault is injected once decoding
is under way; its output is compared with local-only output of the same prompt, and its total
time with fault-free hybrid runs of the same run. Faults: kill -9 of the session's worker,
SIGSTOP of it (a hang), kill -9 and restart of the broker, kill -9 of the only worker (the edge
finishes locally), and a lossy, duplicating link (through ``edgecloud netem``), with the edge's
adaptive step timeout and with ``--fixed-timeout`` (the ratio of their tokens/s is printed).

    .venv/bin/python bench/bench_faults.py [--model smollm2-135m] [--tokens 160] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROMPTS  # noqa: E402

from cli.cluster import LocalCluster, cli_command, free_port  # noqa: E402

HEARTBEAT_S = 0.5  # workers are declared dead after 3 missed beats: 1.5 s of detection
REQUEST_TIMEOUT_S = "2"
ALL_FAULTS = ("none", "worker-kill", "worker-stop", "none-1w", "broker-restart", "only-worker-kill", "lossy-link",
              "lossy-link-fixed")


def run_fault(fault: str, model: str, tokens: int, prompt: str, expected: list[int]) -> dict:
    workers = 1 if fault in ("broker-restart", "only-worker-kill", "none-1w") else 2
    with LocalCluster(model=model, heartbeat_s=HEARTBEAT_S) as cluster:
        cluster.start_broker()
        for _ in range(workers):
            cluster.add_worker()
        cluster.wait_for_workers(workers)
        args = ["--split", "15" if model.startswith("smollm2") else "2", "--tokens", str(tokens), "--json",
                "--prompt", prompt, "--timeout", REQUEST_TIMEOUT_S, "--deadline", "30"]
        netem = None
        if fault.startswith("lossy-link"):
            port = free_port()
            netem = subprocess.Popen(
                cli_command("netem", "--listen", f"tcp://127.0.0.1:{port}", "--upstream", cluster.endpoint,
                            "--drop", "0.02", "--duplicate", "0.02", "--seed", "1"),
                env=cluster.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            args += ["--broker", f"tcp://127.0.0.1:{port}"]
        if fault != "only-worker-kill":
            args.append("--no-fallback")
        if fault == "lossy-link-fixed":  # the same link, every lost message waiting out --timeout
            args.append("--fixed-timeout")
        try:
            edge = cluster.start_edge(*args)
            if fault not in ("none", "none-1w", "lossy-link", "lossy-link-fixed"):
                victim = cluster.wait_for_decoding(edge, served=20)
                if fault == "worker-kill":
                    cluster.kill(cluster.worker_named(victim))
                elif fault == "worker-stop":
                    cluster.kill(cluster.worker_named(victim), signal.SIGSTOP)
                elif fault == "only-worker-kill":
                    cluster.kill(cluster.workers[0])
                elif fault == "broker-restart":
                    cluster.kill(cluster.broker)
                    cluster.broker.popen.wait(10)
                    cluster.start_broker()
            out, err = edge.communicate(timeout=600)
        finally:
            if netem is not None:
                netem.terminate()
                netem.wait(10)
    if edge.returncode != 0:
        return {"fault": fault, "ok": False, "identical": False, "error": err.strip().splitlines()[-1:]}
    r = json.loads(out)
    return {"fault": fault, "ok": True, "identical": r["token_ids"] == expected, "total_ms": r["total_ms"],
            "tokens_per_s": len(r["token_ids"]) / r["total_ms"] * 1e3,
            "retries": r["retries"], "fallback_at_step": r["fallback_at_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--faults", default=",".join(ALL_FAULTS), help="comma-separated subset to run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(ALL_FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {ALL_FAULTS}")
    rows: list[dict] = []
    with LocalCluster(model=args.model) as cluster:
        expected = {}
        for prompt in PROMPTS[: args.runs]:
            out = cluster.edge("--force-local", "--tokens", str(args.tokens), "--json", "--prompt", prompt)
            expected[prompt] = json.loads(out.stdout)["token_ids"]
    for fault in faults:
        for prompt in PROMPTS[: args.runs]:
            rows.append(run_fault(fault, args.model, args.tokens, prompt, expected[prompt]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    summary = {}
    for fault in faults:
        mine = [r for r in rows if r["fault"] == fault]
        times = [r["total_ms"] for r in mine if r["ok"]]
        rates = [r["tokens_per_s"] for r in mine if r["ok"]]
        summary[fault] = {"attempted": len(mine), "identical": sum(r["identical"] for r in mine),
                          "median_total_ms": statistics.median(times) if times else None,
                          "median_tokens_per_s": statistics.median(rates) if rates else None}
    for fault, base in (("worker-kill", "none"), ("worker-stop", "none"), ("broker-restart", "none-1w"),
                        ("only-worker-kill", "none-1w"), ("lossy-link", "none"), ("lossy-link-fixed", "none")):
        if fault not in summary or base not in summary:
            continue
        a, b = summary[fault]["median_total_ms"], summary[base]["median_total_ms"]
        summary[fault]["extra_ms_vs_fault_free"] = None if a is None or b is None else a - b
    ratio = None
    if "lossy-link" in summary and "lossy-link-fixed" in summary:
        a, b = summary["lossy-link"]["median_tokens_per_s"], summary["lossy-link-fixed"]["median_tokens_per_s"]
        ratio = None if a is None or b is None else a / b
    if args.json:
        print(json.dumps({"model": args.model, "tokens": args.tokens, "summary": summary, "runs": rows,
                          "lossy_link_tokens_per_s_adaptive_over_fixed": ratio}))
        return
    print(f"model {args.model}, {args.tokens} tokens, {args.runs} prompts per fault, heartbeat {HEARTBEAT_S} s")
    print(f"{'fault':18} {'identical/attempted':>20} {'median total ms':>16} {'extra ms':>9}")
    for fault, s in summary.items():
        extra = s.get("extra_ms_vs_fault_free")
        total = s["median_total_ms"]
        print(f"{fault:18} {s['identical']:>9}/{s['attempted']:<10} {total if total is None else round(total):>16} "
              f"{'' if extra is None else round(extra):>9}")
    if ratio is not None:
        print(f"lossy link, tokens/s with adaptive timeouts / with --fixed-timeout: {ratio:.2f}")


if __name__ == "__main__":
    main()
