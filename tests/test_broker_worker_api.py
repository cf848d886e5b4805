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


def test_reply_many_sends_a_pass_in_as_few_messages_as_the_body_limit_allows() -> None:
    from broker import protocol as p

    n = p.MAX_BODY_FRAMES + 6  # one frame each: two messages
    with running_broker() as b, client(b.endpoint) as c:
        conn = WorkerConnection(b.endpoint, WorkerInfo(WorkerId("w1"), MODEL, ((0, 32),), max_sessions=n,
                                                       max_batch=n))
        posted: list[int] = []
        post = conn._post
        conn._post = lambda frames: (posted.append(p.decode(frames).TYPE), post(frames))  # type: ignore[method-assign]
        try:
            wait_until(lambda: c.status()["workers"], what="registration")
            rids = {c.submit(f"s{i}", "open", MODEL, 1, 0, [str(i).encode()], timeout_s=10.0): i for i in range(n)}
            jobs: list = []
            deadline = time.monotonic() + 10.0
            while len(jobs) < n and time.monotonic() < deadline:
                job = conn.get(0.5)
                if job is not None:
                    jobs += [job, *conn.take_ready(n)]
            assert len(jobs) == n
            conn.reply_many([(job, {"i": int(bytes(job.frames[0]))}, [b"r" + bytes(job.frames[0])]) for job in jobs])
            for rid, i in rids.items():
                reply = c.result(rid)
                assert (reply.header, [bytes(f) for f in reply.frames]) == ({"i": i}, [b"r%d" % i])
            assert posted == [p.MsgType.WORKER_REPLIES, p.MsgType.WORKER_REPLIES]
            conn.reply_many([])  # nothing to send: no message
            assert len(posted) == 2
        finally:
            conn.close()


@pytest.mark.integration
def test_broker_side_modules_do_not_import_torch() -> None:
    code = (
        "import sys, broker.broker, broker.worker_api, broker.client_api, broker.wire.crypto, broker.protocol;"
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_a_restarted_broker_is_told_apart_by_its_id_and_so_are_the_jobs_it_sends() -> None:
    """A broker keeps no sessions across a restart: its heartbeats name the process, and a worker
    counts each new one (broker_epoch) and stamps every job with the count it arrived under."""
    import zmq

    from broker import protocol as p

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    conn = WorkerConnection(f"tcp://127.0.0.1:{port}", WorkerInfo(WorkerId("w1"), MODEL, ((0, 32),)))
    try:
        identity, *frames = router.recv_multipart()
        assert isinstance(p.decode(frames), p.Register)

        def send(msg: p.Message) -> None:
            router.send_multipart([identity, *p.encode(msg)])

        def job(rid: str):
            send(p.Dispatch(request_id=rid, session_id="s1", model_id=MODEL, step=0, attempt=1, kind="open",
                            deadline_ms=5000, layer_lo=1, extra={}, frames=[]))
            got = conn.get(5.0)
            assert got is not None and got.request_id == rid
            return got

        send(p.BrokerHeartbeat(interval_ms=1000, broker_id="first"))
        assert job("r1").broker_epoch == 0 and (conn.broker_id, conn.broker_epoch) == ("first", 0)
        send(p.BrokerHeartbeat(interval_ms=1000, broker_id="first"))
        assert job("r2").broker_epoch == 0
        send(p.BrokerHeartbeat(interval_ms=1000, broker_id="second"))  # the same endpoint, a new process
        assert job("r3").broker_epoch == 1 and (conn.broker_id, conn.broker_epoch) == ("second", 1)
        send(p.BrokerHeartbeat(interval_ms=1000))  # one that does not say changes nothing
        assert job("r4").broker_epoch == 1
    finally:
        conn.close()
        router.close()
        ctx.term()
