"""Broker memory under a long flood, with a frozen consumer and then a working one.

A real broker process and a real tiny-llama worker (no encryption, so a session opens without
keys). One session is opened; then a client sends step requests as fast as it can and reads
whatever comes back, in two phases:

1. frozen worker: the worker is SIGSTOPped, so nothing is answered; the broker's queue and
   byte bounds fill and further requests get a "busy" error, until the worker misses its
   heartbeats and is expired (then "worker_lost");
2. working worker: SIGCONT, a new session, and the flood goes on while the worker answers
   (errors: the bodies are not valid steps, which the worker survives);
3. a client that never reads its replies floods too (a frozen consumer of replies).

The broker's RSS (psutil) is sampled ten times per phase. "Flat" means it stops growing once the
bounds are reached: ``rss_growth_second_half_mib`` is the growth from the middle of a phase to its end.

    .venv/bin/python bench/bench_flood.py [--requests 50000] [--body-kib 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import protocol as p  # noqa: E402
from broker.client_api import BrokerClient  # noqa: E402
from broker.wire.crypto import load_api_keys  # noqa: E402
from broker.wire.session_protocol import OpenParams, close_digest, new_close_key  # noqa: E402
from cli.cluster import LocalCluster  # noqa: E402

MIB = 1 << 20
SAMPLES = 10  # RSS samples per phase


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MIB


def flood(endpoint: str, api_key: str, session: str, model_id: str, n: int, body: bytes, broker_pid: int,
          deadline_ms: int, phase: str, read: bool = True) -> dict:
    """Send ``n`` step requests without waiting, reading answers as they come (unless not ``read``:
    a client that never reads its replies); sample the broker's RSS."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.connect(endpoint)
    answers: Counter[str] = Counter()

    def drain(timeout_ms: int) -> None:
        while sock.poll(timeout_ms):
            msg = p.decode(sock.recv_multipart())
            answers["reply" if isinstance(msg, p.Reply) else getattr(msg, "code", type(msg).__name__)] += 1
            timeout_ms = 0

    samples = []
    every = max(1, n // SAMPLES)
    t0 = time.perf_counter()
    try:
        for i in range(n):
            frames = p.encode(p.Request(request_id=f"{phase}-{i}", session_id=session, model_id=model_id,
                                        layer_lo=2, deadline_ms=deadline_ms, step=1, kind="step", api_key=api_key,
                                        frames=[body]))  # fmt: skip
            while True:
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    if not read:  # its own queue is full: this client is stuck, as a frozen one is
                        break
                    drain(5)
            if read:
                drain(0)
            if (i + 1) % every == 0:
                samples.append(round(rss_mib(broker_pid), 1))
        sent_s = time.perf_counter() - t0
        end = time.monotonic() + deadline_ms / 1000 + 5
        while read and sum(answers.values()) < n and time.monotonic() < end:
            drain(200)
    finally:
        sock.close()
        ctx.term()
    return {"requests": n, "body_bytes": len(body), "sent_s": round(sent_s, 2), "answers": dict(answers),
            "unanswered": n - sum(answers.values()), "rss_mib_samples": samples,
            "rss_mib_peak": max(samples, default=None),
            "rss_growth_second_half_mib": round(samples[-1] - samples[len(samples) // 2 - 1], 1) if samples else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000, help="requests per phase")
    parser.add_argument("--body-kib", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    body = bytes(args.body_kib * 1024)
    with LocalCluster(model="tiny-llama", encryption=False, worker_threads=1, curve=False) as cluster:
        cluster.start_broker()
        worker = cluster.add_worker()
        cluster.wait_for_workers(1)
        api_key = sorted(load_api_keys(Path(cluster.keys_dir) / "api_keys.txt"))[0]
        st = cluster.status()
        model_id = st["workers"][0]["model_id"]
        pid = cluster.broker.popen.pid
        with BrokerClient(cluster.endpoint, api_key) as c:
            params = OpenParams(edge_pk=b"", sampling={"temperature": 0.0, "top_p": 1.0, "seed": 0},
                                wire_dtype="fp16", close_digest=close_digest(new_close_key()))
            c.request("flood", "open", model_id, 2, 0, extra=params.to_extra(), timeout_s=30)
        time.sleep(0.5)
        result = {"broker_rss_mib_idle": round(rss_mib(pid), 1)}
        # Frozen: SIGSTOP keeps its TCP connection open, so the broker queues for it until it
        # misses its heartbeats (3 s); then its session is lost and the rest is answered WorkerLost.
        worker.popen.send_signal(signal.SIGSTOP)
        result["frozen_worker"] = flood(cluster.endpoint, api_key, "flood", model_id, args.requests, body, pid,
                                        10_000, "frozen")
        worker.popen.send_signal(signal.SIGCONT)
        cluster.wait_for_workers(1)
        with BrokerClient(cluster.endpoint, api_key) as c:
            c.request("flood2", "open", model_id, 2, 0, extra=params.to_extra(), timeout_s=30)
        result["broker_rss_mib_after_frozen"] = round(rss_mib(pid), 1)
        result["working_worker"] = flood(cluster.endpoint, api_key, "flood2", model_id, args.requests, body, pid,
                                         10_000, "working")
        result["client_not_reading"] = flood(cluster.endpoint, api_key, "flood2", model_id, args.requests, body,
                                             pid, 10_000, "deaf", read=False)
        time.sleep(1.0)
        result["broker_rss_mib_end"] = round(rss_mib(pid), 1)
        result["broker_counters"] = cluster.status()["counters"]
    if args.json:
        print(json.dumps(result))
        return
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
