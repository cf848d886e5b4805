"""What an edge does when the cloud goes away mid-generation: how long the token stream stalls
(with a local fallback), or how long until the edge reports the failure (with --no-fallback),
against its step deadline. Real processes on loopback: a broker and one tiny-llama worker; the edge
runs in this process and the fault comes after 50 tokens.

    .venv/bin/python bench/bench_cloud_loss.py [--deadline 20] [--faults broker,worker]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402,F401  the OpenMP defaults before torch loads
from broker.errors import EdgeCloudError  # noqa: E402
from broker.wire.crypto import load_api_keys  # noqa: E402
from cli.cluster import LocalCluster  # noqa: E402
from edge_worker.config import EdgeConfig  # noqa: E402
from edge_worker.engine import EdgeEngine  # noqa: E402

FAULT_AFTER_TOKENS = 50


def run(fault: str, fallback: bool, deadline_s: float) -> str:
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=1.0) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=60)
        key = sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]
        settings = EdgeConfig(model="tiny-llama", split=1, broker=cluster.endpoint, keys_dir=cluster.keys_dir,
                              api_key=key, max_new_tokens=400, step_deadline_s=deadline_s,
                              fallback_local=fallback, dynamic=False)
        stamps: list[float] = []
        t_fault: list[float] = []

        def inject() -> None:
            while len(stamps) < FAULT_AFTER_TOKENS:
                time.sleep(0.005)
            t_fault.append(time.monotonic())
            cluster.kill(cluster.broker if fault == "broker" else cluster.workers[0])

        with EdgeEngine("tiny-llama", settings) as engine:
            injector = threading.Thread(target=inject)
            injector.start()
            try:
                engine.generate([5, 6, 7, 8], engine.params(ignore_eos=True),
                                on_text=lambda _: stamps.append(time.monotonic()))
                after = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True) if b >= t_fault[0]]
                outcome = f"went local; the stream stalled {max(after):.2f} s"
            except EdgeCloudError as exc:
                outcome = f"failed {time.monotonic() - t_fault[0]:.2f} s after the fault ({type(exc).__name__})"
            injector.join()
    return outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deadline", type=float, default=20.0, help="the edge's --deadline, seconds")
    ap.add_argument("--faults", default="broker,worker", help="what is killed (-9): broker, worker")
    args = ap.parse_args()
    print(f"| killed | edge | outcome (--deadline {args.deadline:g}) |")
    print("|---|---|---|")
    for fault in args.faults.split(","):
        for fallback in (True, False):
            outcome = run(fault, fallback, args.deadline)
            print(f"| {fault} | {'fallback' if fallback else '--no-fallback'} | {outcome} |", flush=True)


if __name__ == "__main__":
    main()
