"""Bounded everything: a flood with a frozen worker keeps the broker's memory flat and says "busy"."""

from __future__ import annotations

import time

import psutil
import pytest
import zmq
from brokerutil import MODEL, EchoWorker, client, wait_until

from broker import protocol as p
from cli.cluster import LocalCluster

pytestmark = pytest.mark.timeout(120)
MAX_QUEUE = 64
BODY = bytes(16 * 1024)
REQUESTS = 10_000  # 160 MiB offered; the broker may hold 64 queued + its per-peer receive queue (16 MiB)
RSS_BOUND_MIB = 48


@pytest.mark.integration
def test_a_flood_against_a_frozen_worker_gets_busy_answers_and_leaves_broker_memory_flat():
    with LocalCluster(model="tiny-llama", curve=False) as cluster:  # raw plaintext sockets flood it
        cluster.start_broker("--no-auth", "--heartbeat", "0.2", "--max-queue", str(MAX_QUEUE))
        worker = EchoWorker(cluster.endpoint, "frozen")
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            with client(cluster.endpoint) as c:
                wait_until(lambda: c.status()["workers"], what="the worker to register")
                c.request("s", "open", MODEL, 2, 0)
                worker.gate.clear()  # it takes jobs and never finishes them: a frozen consumer
                broker = psutil.Process(cluster.broker.popen.pid)
                before = broker.memory_info().rss
                sock.connect(cluster.endpoint)
                answers: dict[str, int] = {}

                def drain(timeout_ms: int) -> None:
                    while sock.poll(timeout_ms):
                        msg = p.decode(sock.recv_multipart())
                        key = "reply" if isinstance(msg, p.Reply) else msg.code
                        answers[key] = answers.get(key, 0) + 1
                        timeout_ms = 0

                peak = before
                for i in range(REQUESTS):
                    frames = p.encode(p.Request(request_id=f"r{i}", session_id="s", model_id=MODEL, layer_lo=2,
                                                deadline_ms=60_000, step=1, kind="step", api_key="", frames=[BODY]))
                    while True:
                        try:
                            sock.send_multipart(frames, flags=zmq.NOBLOCK)
                            break
                        except zmq.Again:
                            drain(5)
                    drain(0)
                    if i % 1000 == 999:
                        peak = max(peak, broker.memory_info().rss)
                        assert c.status()["queue_depth"] <= MAX_QUEUE
                wait_until(lambda: drain(50) or sum(answers.values()) >= REQUESTS - MAX_QUEUE - 8, timeout_s=30,
                           what="busy answers for everything beyond the bounds")
                assert answers.get("busy", 0) >= REQUESTS - MAX_QUEUE - 8, answers
                assert (peak - before) / (1 << 20) < RSS_BOUND_MIB, (before >> 20, peak >> 20)
                # Thawed, the worker answers everything it was holding: nothing was silently dropped.
                worker.gate.set()
                deadline = time.monotonic() + 30
                while sum(answers.values()) < REQUESTS and time.monotonic() < deadline:
                    drain(100)
                assert sum(answers.values()) == REQUESTS and answers.get("reply", 0) >= 1, answers
        finally:
            sock.close()
            worker.close()


def test_requests_beyond_the_byte_bound_get_busy_naming_the_limit():
    from brokerutil import running_broker

    from broker.errors import Busy

    with running_broker(max_pending_bytes=100_000) as b, client(b.endpoint) as c:
        worker = EchoWorker(b.endpoint, "frozen")
        try:
            wait_until(lambda: c.status()["workers"], what="the worker to register")
            c.request("s", "open", MODEL, 2, 0)
            worker.gate.clear()
            rids = [c.submit("s", "step", MODEL, 2, i, [BODY], timeout_s=10) for i in range(10)]  # 160 KiB
            wait_until(lambda: c.status()["pending_bytes"] >= 6 * len(BODY), what="requests to be held")
            with pytest.raises(Busy, match=r"limit 0.1 MiB"):
                c.result(rids[-1])
            assert c.status()["pending_bytes"] <= 100_000
            worker.gate.set()
            assert c.result(rids[0]).frames
        finally:
            worker.close()
