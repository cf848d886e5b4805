"""WorkerConnection threading paths, and the broker process staying free of torch."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time

import pytest
from brokerutil import MODEL, client, running_broker, wait_until

from broker.protocol import WorkerId
from broker.worker_api import WorkerConfig, WorkerConnection, WorkerInfo

pytestmark = pytest.mark.timeout(30)
# Slow heartbeats: a get() poll then lasts up to 2 s, so a prompt answer proves the wake-up path.
SLOW_HEARTBEAT_S = 2.0
SLOW_WORKER = WorkerConfig(heartbeat_interval_s=SLOW_HEARTBEAT_S, broker_liveness=3)


def test_reply_from_another_thread_while_get_blocks() -> None:
    with running_broker(heartbeat_interval_s=SLOW_HEARTBEAT_S) as b, client(b.endpoint) as c:
        conn = WorkerConnection(b.endpoint, WorkerInfo(WorkerId("w1"), MODEL, ((0, 32),)), config=SLOW_WORKER)
        handoff: queue.Queue = queue.Queue()
        stop = threading.Event()

        def compute() -> None:  # keeps sitting in get(), holding the socket
            while not stop.is_set():
                job = conn.get(0.5)
                if job is not None:
                    handoff.put(job)

        def replier() -> None:
            while not stop.is_set():
                try:
                    job = handoff.get(timeout=0.05)
                except queue.Empty:
                    continue
                conn.reply(job, {"by": "replier"}, job.frames)

        threads = [threading.Thread(target=compute), threading.Thread(target=replier)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: c.status()["workers"], what="registration")
            c.request("s1", "open", MODEL, 1, 0, timeout_s=5.0)
            start = time.monotonic()
            for step in range(1, 6):
                assert c.request("s1", "decode", MODEL, 1, step, [b"x"], timeout_s=5.0).header == {
                    "by": "replier"
                }
            assert (time.monotonic() - start) / 5 < SLOW_HEARTBEAT_S / 4
        finally:
            stop.set()
            for t in threads:
                t.join(5.0)
            conn.close()


def test_get_times_out_and_close_wakes_it() -> None:
    with running_broker() as b:
        conn = WorkerConnection(b.endpoint, WorkerInfo(WorkerId("w1"), MODEL, ((0, 32),)), config=SLOW_WORKER)
        start = time.monotonic()
        assert conn.get(0.1) is None
        assert 0.09 <= time.monotonic() - start < 1.0
        got: list = []
        t = threading.Thread(target=lambda: got.append(conn.get(20.0)))
        t.start()
        time.sleep(0.05)  # let it block (not synchronisation: the assertion holds either way)
        start = time.monotonic()
        conn.close()
        t.join(5.0)
        assert got == [None] and time.monotonic() - start < 2.0
        assert conn.get(0.01) is None  # after close: no hang, no error


@pytest.mark.integration
def test_broker_side_modules_do_not_import_torch() -> None:
    code = (
        "import sys, broker.broker, broker.worker_api, broker.client_api, broker.wire.crypto, broker.protocol;"
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
