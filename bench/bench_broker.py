"""Micro-benchmark: round trips through the edgecloud broker vs. a one-hop ZeroMQ proxy.

Both paths use three processes: this one (the client), a middle process (the
broker, or a minimal Python ROUTER-ROUTER proxy) and an echo process (a
WorkerConnection with an empty compute loop, or a bare DEALER echo). The
difference is what edgecloud adds: header encoding and validation, session
routing and bookkeeping, and the worker's I/O-thread hand-off.

    .venv/bin/python bench/bench_broker.py [--round-trips 2000] [--size 1200] [--json] [--curve]

``--curve`` adds a third path: the same broker and worker with CURVE on (fresh keys), so the cost
of transport security is measured against the plain broker under the same load.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.broker import BrokerConfig, run_broker  # noqa: E402
from broker.client_api import BrokerClient  # noqa: E402
from broker.protocol import WorkerId  # noqa: E402
from broker.transport import ROLE_CLIENT, ROLE_WORKER, allow_key, client_keys  # noqa: E402
from broker.wire.crypto import save_keys  # noqa: E402
from broker.worker_api import WorkerConnection, WorkerInfo  # noqa: E402

logger = logging.getLogger(__name__)

MODEL = "bench"
WARMUP_ROUND_TRIPS = 200  # let TCP, allocators and caches settle before timing
READY_TIMEOUT_S = 10.0
WINDOW_DEEP = 64  # "many in flight", as a pipelining edge or many edges would have


# ----------------------------------------------------------------- processes
def _broker_proc(endpoint: str, keys_dir: str | None, stop: Any) -> None:
    run_broker(BrokerConfig(endpoint=endpoint, max_queue=4096, curve_keys_dir=keys_dir), stop_event=stop)


def _worker_proc(endpoint: str, keys_dir: str | None, stop: Any) -> None:
    conn = WorkerConnection(endpoint, WorkerInfo(WorkerId("bench-w"), MODEL, ((0, 64),), max_sessions=1024),
                            curve=client_keys(keys_dir, "worker"))  # fmt: skip
    try:
        while not stop.is_set():
            job = conn.get(0.1)
            if job is not None:
                conn.reply(job, None, job.frames)
    finally:
        conn.close()


def _proxy_proc(front: str, back: str, stop: Any) -> None:
    ctx = zmq.Context()
    fe, be = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    fe.bind(front)
    be.bind(back)
    poller = zmq.Poller()
    poller.register(fe, zmq.POLLIN)
    poller.register(be, zmq.POLLIN)
    worker: bytes | None = None
    while not stop.is_set():
        for sock, _ in poller.poll(100):
            if sock is be:
                frames = be.recv_multipart()
                if frames[1] == b"READY":
                    worker = frames[0]
                else:
                    fe.send_multipart(frames[1:])  # [client id, payload]
            elif worker is not None:
                be.send_multipart([worker, *fe.recv_multipart()])
    fe.close(0)
    be.close(0)
    ctx.term()


def _echo_proc(back: str, stop: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(back)
    sock.send(b"READY")
    while not stop.is_set():
        if sock.poll(100):
            sock.send_multipart(sock.recv_multipart())
    sock.close(0)
    ctx.term()


# ----------------------------------------------------------------- measuring
class BrokerPath:
    """Client side of the real broker, worker and client stack."""

    def __init__(self, endpoint: str, payload: bytes, keys_dir: str | None = None) -> None:
        self.payload = payload
        self.client = BrokerClient(endpoint, curve=client_keys(keys_dir, "client"))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.client.status(READY_TIMEOUT_S)["workers"]:
            if time.monotonic() > deadline:
                raise RuntimeError("bench worker never registered")
            time.sleep(0.05)
        self.sessions = [f"s{i}" for i in range(WINDOW_DEEP)]
        for sid in self.sessions:
            self.client.request(sid, "open", MODEL, 1, 0, timeout_s=5.0)
        self.step = 0

    def round_trip(self) -> None:
        self.step += 1
        self.client.request("s0", "decode", MODEL, 1, self.step, [self.payload])

    def windowed(self, total: int, depth: int) -> None:
        c, sessions = self.client, self.sessions
        window = [c.submit(sessions[i], "decode", MODEL, 1, 1, [self.payload]) for i in range(depth)]
        for i in range(depth, total + depth):
            c.result(window[i % depth])
            if i < total:
                window[i % depth] = c.submit(sessions[i % depth], "decode", MODEL, 1, 1, [self.payload])

    def close(self) -> None:
        self.client.close()


class ProxyPath:
    """Client side of a bare one-hop ROUTER-ROUTER proxy with a DEALER echo."""

    def __init__(self, front: str, payload: bytes) -> None:
        self.payload = payload
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(front)
        self.round_trip()  # raises if the echo is not up yet
        self.timeout_ms = int(READY_TIMEOUT_S * 1000)

    def round_trip(self) -> None:
        self.sock.send(self.payload)
        if not self.sock.poll(int(READY_TIMEOUT_S * 1000)):
            raise RuntimeError("proxy echo did not answer")
        self.sock.recv()

    def windowed(self, total: int, depth: int) -> None:
        for _ in range(depth):
            self.sock.send(self.payload)
        for i in range(total):
            if not self.sock.poll(self.timeout_ms):
                raise RuntimeError("proxy echo did not answer")
            self.sock.recv()
            if i < total - depth:
                self.sock.send(self.payload)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _cpu_s(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def measure(paths: dict[str, Any], round_trips: int, rounds: int,
            procs: dict[str, list[psutil.Process]] | None = None) -> dict[str, dict[str, float]]:
    """Alternate blocks of round trips between paths so background load hits both alike.

    ``procs``: per path, the processes whose CPU time the path's round trips cost (this one, the
    middle process and the echo); CPU per round trip moves far less with machine load than wall
    time does.
    """
    procs = procs or {}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    lat: dict[str, list[float]] = {name: [] for name in paths}
    rate1: dict[str, list[float]] = {name: [] for name in paths}
    rate_deep: dict[str, list[float]] = {name: [] for name in paths}
    for path in paths.values():
        for _ in range(WARMUP_ROUND_TRIPS):
            path.round_trip()
    per_round = max(1, round_trips // rounds)
    deep_total = max(per_round, 4 * WINDOW_DEEP)
    for r in range(rounds):
        order = list(paths.items()) if r % 2 == 0 else list(paths.items())[::-1]
        for name, path in order:
            block = []
            cpu0 = _cpu_s(procs.get(name, []))
            for _ in range(per_round):
                t0 = time.perf_counter()
                path.round_trip()
                block.append(time.perf_counter() - t0)
            cpu[name].append((_cpu_s(procs.get(name, [])) - cpu0) / per_round)
            lat[name] += block
            rate1[name].append(len(block) / sum(block))
            t0 = time.perf_counter()
            path.windowed(deep_total, WINDOW_DEEP)
            rate_deep[name].append(deep_total / (time.perf_counter() - t0))
    out = {}
    for name in paths:
        ls = sorted(lat[name])
        out[name] = {
            "median_us": statistics.median(ls) * 1e6,
            "p99_us": ls[max(0, int(len(ls) * 0.99) - 1)] * 1e6,
            "round_trips_per_s_1": statistics.median(rate1[name]),
            f"round_trips_per_s_{WINDOW_DEEP}": statistics.median(rate_deep[name]),
        }
        if procs.get(name):
            out[name]["cpu_us_per_round_trip"] = statistics.median(cpu[name]) * 1e6
    return out


def _free_port() -> int:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(0)
    ctx.term()
    return port


def _run_with(procs: list[tuple[Callable[..., None], tuple[Any, ...]]],
              body: Callable[[list[psutil.Process]], dict]) -> dict:
    """Start ``procs`` as processes, run ``body`` with them (in the same order), stop them."""
    spawn = mp.get_context("spawn")
    stop = spawn.Event()
    children = [spawn.Process(target=fn, args=(*args, stop), daemon=True) for fn, args in procs]
    for ch in children:
        ch.start()
    try:
        return body([psutil.Process(ch.pid) for ch in children])
    finally:
        stop.set()
        for ch in children:
            ch.join(5.0)
            if ch.is_alive():
                ch.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--round-trips", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1200, help="payload bytes per request")
    ap.add_argument("--rounds", type=int, default=8, help="alternating measurement blocks per path")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--curve", action="store_true", help="also measure the broker with CURVE on")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    payload = bytes(args.size)

    ep = f"tcp://127.0.0.1:{_free_port()}"
    front, back = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    procs = [
        (_broker_proc, (ep, None)),
        (_worker_proc, (ep, None)),
        (_proxy_proc, (front, back)),
        (_echo_proc, (back,)),
    ]
    keys_dir = None
    if args.curve:
        keys_dir = tempfile.mkdtemp(prefix="bench-keys-")
        save_keys(keys_dir, "broker", "default")
        for role in (ROLE_CLIENT, ROLE_WORKER):
            allow_key(keys_dir, save_keys(keys_dir, role, "default").public_key, role)
        ep_curve = f"tcp://127.0.0.1:{_free_port()}"
        procs += [(_broker_proc, (ep_curve, keys_dir)), (_worker_proc, (ep_curve, keys_dir))]

    def body(children: list[psutil.Process]) -> dict[str, dict[str, float]]:
        paths: dict[str, Any] = {}
        me = psutil.Process()
        procs = {"broker": [me, *children[0:2]], "proxy": [me, *children[2:4]]}
        if keys_dir is not None:
            procs["broker_curve"] = [me, *children[4:6]]
        try:
            paths["broker"] = BrokerPath(ep, payload)
            paths["proxy"] = ProxyPath(front, payload)
            if keys_dir is not None:
                paths["broker_curve"] = BrokerPath(ep_curve, payload, keys_dir)
            return measure(paths, args.round_trips, args.rounds, procs)
        finally:
            for path in paths.values():
                path.close()

    try:
        results = _run_with(procs, body)
    finally:
        if keys_dir is not None:
            shutil.rmtree(keys_dir, ignore_errors=True)
    broker, proxy = results["broker"], results["proxy"]
    ratio = broker["median_us"] / proxy["median_us"]
    report = {"round_trips": args.round_trips, "rounds": args.rounds, "payload_bytes": args.size, "broker": broker, "proxy": proxy,
              "median_ratio": ratio}  # fmt: skip
    if "broker_curve" in results:
        curve = report["broker_curve"] = results["broker_curve"]
        report["curve_median_ratio"] = curve["median_us"] / broker["median_us"]
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    rows = [("median RTT (us)", "median_us", "{:.0f}"), ("p99 RTT (us)", "p99_us", "{:.0f}"),
            ("CPU per round trip, 3 processes (us)", "cpu_us_per_round_trip", "{:.0f}"),
            ("round trips/s, 1 in flight", "round_trips_per_s_1", "{:.0f}"),
            (f"round trips/s, {WINDOW_DEEP} in flight", f"round_trips_per_s_{WINDOW_DEEP}", "{:.0f}")]  # fmt: skip
    lines = [f"{'':38}{'broker':>12}{'1-hop proxy':>14}"]
    for label, key, fmt in rows:
        lines.append(f"{label:38}{fmt.format(broker[key]):>12}{fmt.format(proxy[key]):>14}")
    lines.append(
        f"broker/proxy median RTT ratio: {ratio:.2f}x ({args.round_trips} round trips of {args.size} B)"
    )
    if "broker_curve" in report:
        c = report["broker_curve"]
        lines.append(f"with CURVE: median {c['median_us']:.0f} us, p99 {c['p99_us']:.0f} us, "
                     f"{c[f'round_trips_per_s_{WINDOW_DEEP}']:.0f} round trips/s at {WINDOW_DEEP} in flight; "
                     f"{report['curve_median_ratio']:.2f}x the plain broker's median")  # fmt: skip
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
