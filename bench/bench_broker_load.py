"""How many steps one broker routes, and at what CPU per step, for a worker that batches.

A real broker, one worker that computes nothing but answers like a batching cloud worker (it takes
every step that has arrived, then answers them with one ``reply_many``, as ``CloudWorker`` does
after a pass), and client processes holding sessions that each keep one step in flight (an edge
decoding: the next step goes when the last one's answer is back). What is measured is the cost of
the routing itself at the batch sizes a GPU worker runs (the issue asks for 1..64): the broker's
and the worker's CPU microseconds per step, from their own CPU times, and steps per second.
``--pass-ms`` makes the worker sleep that long per pass, as if it computed (the broker's cost per
step then no longer competes with a busy worker for the cores).

    .venv/bin/python bench/bench_broker_load.py [--sessions 8 32 64] [--seconds 3] [--rounds 3]

Each session count runs on a fresh broker and worker; the rounds alternate session counts so that
a change in the machine's load hits each alike. Medians over rounds are printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_broker import _free_port  # noqa: E402
from broker.broker import BrokerConfig, run_broker  # noqa: E402
from broker.client_api import BrokerClient  # noqa: E402
from broker.protocol import WorkerId  # noqa: E402
from broker.worker_api import WorkerConnection, WorkerInfo  # noqa: E402

MODEL = "bench"
READY_TIMEOUT_S = 15.0
CLIENT_PROCS = 2  # the sessions are spread over this many client processes
MAX_BATCH = 256


def _broker_proc(endpoint: str, stop: Any) -> None:
    run_broker(BrokerConfig(endpoint=endpoint, max_queue=8192), stop_event=stop)


def _worker_proc(endpoint: str, pass_ms: float, stop: Any) -> None:
    conn = WorkerConnection(endpoint, WorkerInfo(WorkerId("load-w"), MODEL, ((0, 64),), max_sessions=4096,
                                                 max_batch=MAX_BATCH))  # fmt: skip
    try:
        while not stop.is_set():
            job = conn.get(0.1)
            if job is None:
                continue
            jobs = [job, *conn.take_ready(MAX_BATCH - 1)]
            if pass_ms > 0:
                time.sleep(pass_ms / 1000)
            conn.reply_many([(j, None, j.frames) for j in jobs])
    finally:
        conn.close()


def _client_proc(endpoint: str, n_sessions: int, tag: str, payload_bytes: int, go: Any, stop: Any,
                 out: Any, counter: Any) -> None:
    """Open ``n_sessions`` sessions; when ``go`` is set, keep one step of each in flight until ``stop``."""
    payload = bytes(payload_bytes)
    client = BrokerClient(endpoint)
    sessions = [f"{tag}-{i}" for i in range(n_sessions)]
    for sid in sessions:
        client.request(sid, "open", MODEL, 1, 0, timeout_s=10.0)
    out.put(("ready", tag, 0))
    go.wait()
    steps = 0
    inflight = {client.submit(sid, "decode", MODEL, 1, 1, [payload]): sid for sid in sessions}
    order = list(inflight)
    i = 0
    while not stop.is_set():
        rid = order[i]
        client.result(rid)
        steps += 1
        counter.value = steps
        sid = inflight.pop(rid)
        new = client.submit(sid, "decode", MODEL, 1, 1, [payload])
        inflight[new] = sid
        order[i] = new
        i = (i + 1) % len(order)
    client.close()


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def run_once(n_sessions: int, seconds: float, pass_ms: float, payload_bytes: int) -> dict[str, float]:
    spawn = mp.get_context("spawn")
    stop_servers, stop_clients, go = spawn.Event(), spawn.Event(), spawn.Event()
    out = spawn.Queue()
    ep = f"tcp://127.0.0.1:{_free_port()}"
    servers = [spawn.Process(target=_broker_proc, args=(ep, stop_servers), daemon=True),
               spawn.Process(target=_worker_proc, args=(ep, pass_ms, stop_servers), daemon=True)]
    for s in servers:
        s.start()
    per = [n_sessions // CLIENT_PROCS + (1 if k < n_sessions % CLIENT_PROCS else 0) for k in range(CLIENT_PROCS)]
    counters = [spawn.Value("q", 0, lock=False) for _ in per]
    clients = [spawn.Process(target=_client_proc, args=(ep, n, f"c{k}", payload_bytes, go, stop_clients, out, counters[k]),
                             daemon=True) for k, n in enumerate(per) if n > 0]  # fmt: skip
    try:
        probe = BrokerClient(ep)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not probe.status(READY_TIMEOUT_S)["workers"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the bench worker never registered")
            time.sleep(0.05)
        probe.close()
        for c in clients:
            c.start()
        for _ in clients:
            kind, _tag, _ = out.get(timeout=READY_TIMEOUT_S * 2)
            assert kind == "ready"
        broker, worker = (psutil.Process(s.pid) for s in servers)
        time.sleep(0.5)  # let the clients' first steps settle
        go.set()
        time.sleep(0.5)
        s0, b0, w0, t0 = sum(c.value for c in counters), _cpu_s(broker), _cpu_s(worker), time.perf_counter()
        time.sleep(seconds)
        s1, b1, w1, t1 = sum(c.value for c in counters), _cpu_s(broker), _cpu_s(worker), time.perf_counter()
    finally:
        stop_clients.set()
        for group, stop in ((clients, None), (servers, stop_servers)):  # the clients first: no error at the end
            if stop is not None:
                stop.set()
            for p in group:
                p.join(5.0)
                if p.is_alive():
                    p.terminate()
    steps = s1 - s0
    return {"steps_per_s": steps / (t1 - t0), "broker_us_per_step": (b1 - b0) / steps * 1e6,
            "worker_us_per_step": (w1 - w0) / steps * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pass-ms", type=float, default=0.0, help="the worker sleeps this long per pass")
    ap.add_argument("--size", type=int, default=1200, help="payload bytes per step (SmolLM2's fp16 hidden: 1152)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.sessions}
    for r in range(args.rounds):
        order = args.sessions if r % 2 == 0 else args.sessions[::-1]
        for n in order:
            runs[n].append(run_once(n, args.seconds, args.pass_ms, args.size))
    report = {n: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for n, rs in runs.items()}
    if args.json:
        sys.stdout.write(json.dumps({"pass_ms": args.pass_ms, "seconds": args.seconds, "rounds": args.rounds,
                                     "by_sessions": report, "runs": runs}, indent=2) + "\n")  # fmt: skip
        return
    print(f"{'sessions':>9}{'steps/s':>10}{'broker us/step':>16}{'worker us/step':>16}   (pass {args.pass_ms:g} ms, "
          f"medians of {args.rounds})")
    for n, row in report.items():
        print(f"{n:>9}{row['steps_per_s']:>10.0f}{row['broker_us_per_step']:>16.1f}{row['worker_us_per_step']:>16.1f}")


if __name__ == "__main__":
    main()
