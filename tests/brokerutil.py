"""Helpers for broker integration tests: a broker in a thread, echo workers, raw sockets, polling waits."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import zmq

from broker import protocol as p
from broker.broker import Broker, BrokerConfig
from broker.client_api import BrokerClient, ClientConfig
from broker.worker_api import Job, WorkerConfig, WorkerConnection, WorkerInfo
from cli.cluster import LocalCluster

logger = logging.getLogger(__name__)

# Fast heartbeats keep failure tests short; 5 missed beats (0.5 s) leaves
# room for scheduling hiccups on a loaded two-core CI machine.
HEARTBEAT_S = 0.1
LIVENESS = 5
EXPIRY_S = HEARTBEAT_S * LIVENESS
MODEL = "tiny"
FAST_BROKER = BrokerConfig(
    endpoint="tcp://127.0.0.1:*",
    heartbeat_interval_s=HEARTBEAT_S,
    worker_liveness=LIVENESS,
    no_worker_grace_s=0.3,
    default_deadline_s=5.0,
)
FAST_WORKER = WorkerConfig(
    heartbeat_interval_s=HEARTBEAT_S, broker_liveness=LIVENESS, reconnect_initial_s=0.05
)
CLIENT = ClientConfig(default_timeout_s=5.0, reply_grace_s=1.0)
WAIT_S = 5.0  # generous bound for conditions that normally hold within milliseconds


def wait_until(cond: Callable[[], Any], timeout_s: float = WAIT_S, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.005)



def wait_for_status(cluster: LocalCluster, cond: Callable[[dict], bool], what: str, timeout_s: float = 15.0) -> dict:
    """Wait for a ``LocalCluster`` broker's status to satisfy ``cond``; return that status. On a busy
    machine a starved heartbeat can let a live worker expire for a moment (it registers again at its
    next beat), so one reading taken just after a failure is not evidence. On timeout the error
    shows the last status and every process's log."""

    def satisfied() -> dict | None:
        st = cluster.status()
        return st if cond(st) else None

    try:
        return wait_until(satisfied, timeout_s, what)
    except AssertionError as e:
        logs = "".join(f"\n{proc.name} log: {proc.log_tail()}" for proc in [cluster.broker, *cluster.workers])
        raise AssertionError(f"{e}\nstatus: {cluster.status()}{logs}") from None


@contextmanager
def running_broker(**overrides: Any) -> Iterator[Broker]:
    """A broker on a random loopback port, served by a thread, stopped and joined on exit."""
    broker = Broker(replace(FAST_BROKER, **overrides))
    thread = threading.Thread(target=broker.serve_forever, name="test-broker", daemon=True)
    thread.start()
    try:
        yield broker
    finally:
        broker.stop()
        thread.join(5.0)
        assert not thread.is_alive(), "broker thread did not stop"


class InProcessWorker:
    """A real ``CloudWorker`` in this process, its connection to a real broker, serving the jobs a
    test hands it (``send``) and keeping each answer's frames by (session id, step)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.replies: dict[tuple[str, int], list] = {}
        worker._answer_many = lambda answers: self.replies.update(((job.session_id, job.step), frames)
                                                                  for job, _, frames in answers)

    def send(self, session_id: str, kind: str, step: int, layer_lo: int, extra: dict | None = None,
             frames: list | None = None) -> list | None:
        """Serve one request; its answer's frames (None: it failed, see ``worker.failed``)."""
        self.replies.pop((session_id, step), None)
        self.worker.handle_many([Job(request_id=f"{session_id}-{kind}-{step}", session_id=session_id,
                                     model_id=self.worker.source.model_id, step=step, attempt=1, kind=kind,
                                     layer_lo=layer_lo, deadline_ms=5000, extra=extra or {}, frames=frames or [],
                                     received_at=time.monotonic())])
        return self.replies.get((session_id, step))

    @staticmethod
    def opener(close_key: bytes) -> dict:
        """An unencrypted opener's extra (greedy, fp32 on the wire) whose close reveals ``close_key``."""
        from broker.wire.session_protocol import OpenParams, close_digest
        from partition.sampling import SamplingParams

        return OpenParams(b"", SamplingParams().to_wire(), "fp32", close_digest(close_key)).to_extra()


@contextmanager
def in_process_worker(model: str = "tiny-llama") -> Iterator[InProcessWorker]:
    """An ``InProcessWorker`` serving ``model`` (plaintext sessions), its broker in a thread."""
    from cloud_worker.worker import CloudWorker, CloudWorkerConfig

    with running_broker() as broker:
        worker = CloudWorker(CloudWorkerConfig(model=model, broker=broker.endpoint, curve=False))
        worker.conn = WorkerConnection(broker.endpoint, worker.info)
        try:
            yield InProcessWorker(worker)
        finally:
            worker.conn.close()


class EchoWorker:
    """A worker whose compute loop echoes body frames, in its own thread.

    ``gate`` holds jobs while cleared (a long computation), ``delay_s`` adds
    latency, ``fail_with`` makes every job fail; ``jobs`` records what came.
    """

    def __init__(
        self,
        endpoint: str,
        worker_id: str,
        model_id: str = MODEL,
        layer_ranges: tuple[tuple[int, int], ...] = ((0, 32),),
        max_sessions: int = 64,
        delay_s: float = 0.0,
        config: WorkerConfig = FAST_WORKER,
        max_batch: int = 1,
        cache_limit_bytes: int = 0,
    ) -> None:
        self.worker_id = worker_id
        self.delay_s = delay_s
        self.fail_with: BaseException | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.jobs: list[Job] = []
        self.replied = 0
        self._stop = threading.Event()
        info = WorkerInfo(p.WorkerId(worker_id), model_id, layer_ranges, max_sessions=max_sessions,
                          max_batch=max_batch, cache_limit_bytes=cache_limit_bytes)
        self.conn = WorkerConnection(endpoint, info, config=config)
        self._thread = threading.Thread(target=self._compute, name=f"echo-{worker_id}", daemon=True)
        self._thread.start()

    def _compute(self) -> None:
        while not self._stop.is_set():
            job = self.conn.get(0.02)
            if job is None:
                continue
            self.jobs.append(job)
            while not self.gate.wait(0.02):
                if self._stop.is_set():
                    return
            if self._stop.is_set() or (self.delay_s and self._stop.wait(self.delay_s)):
                return  # closing mid-job: the job is never answered, as in a crash
            # Counted before the answer leaves: a test that has received it must see the count (counting
            # after raced with the client, which can get the reply before this thread runs again).
            self.replied += 1
            if self.fail_with is not None:
                self.conn.fail(job, self.fail_with)
            else:
                extra = {"worker": self.worker_id, "kind": job.kind, "step": job.step, **job.extra}
                self.conn.reply(job, extra, [bytes(f) for f in job.frames])

    def sessions_seen(self) -> set[str]:
        """Session ids of all jobs received so far."""
        return {j.session_id for j in list(self.jobs)}

    def close(self, graceful: bool = True) -> None:
        """Stop computing and close the connection (``graceful=False`` imitates a crash)."""
        self._stop.set()
        self.gate.set()
        self._thread.join(5.0)
        self.conn.close(graceful=graceful)


@contextmanager
def echo_workers(endpoint: str, *ids: str, api_key: str = "", **kwargs: Any) -> Iterator[list[EchoWorker]]:
    """Echo workers registered at ``endpoint`` (waits until the broker lists them)."""
    workers = [EchoWorker(endpoint, wid, **kwargs) for wid in ids]
    try:
        with client(endpoint, api_key) as c:
            wait_until(
                lambda: set(ids) <= {w["worker_id"] for w in c.status()["workers"]},
                what="workers to register",
            )
        yield workers
    finally:
        for w in workers:
            w.close()


@contextmanager
def client(endpoint: str, api_key: str = "") -> Iterator[BrokerClient]:
    """A client that is always closed."""
    c = BrokerClient(endpoint, api_key, config=CLIENT)
    try:
        yield c
    finally:
        c.close()


@contextmanager
def raw_dealer(endpoint: str) -> Iterator[zmq.Socket]:
    """A bare DEALER socket (own context) for sending hand-made frames."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


# What a raw socket received as one bundle (the broker's DISPATCHES) and a test has not read yet.
_UNREAD: weakref.WeakKeyDictionary[zmq.Socket, deque[p.Message]] = weakref.WeakKeyDictionary()


def recv_msg(sock: zmq.Socket, timeout_s: float = WAIT_S) -> p.Message:
    """Receive and decode one message on a raw socket, with a deadline. A bundle of messages (the
    broker sends a worker the steps it routed together as one DISPATCHES) comes back one message
    at a time, as a worker's connection takes them."""
    unread = _UNREAD.setdefault(sock, deque())
    if unread:
        return unread.popleft()
    if not sock.poll(int(timeout_s * 1000)):
        raise AssertionError(f"nothing received within {timeout_s}s")
    msg = p.decode(sock.recv_multipart())
    if isinstance(msg, p.Dispatches):
        unread.extend(msg.split())
        return unread.popleft()
    return msg


def recv_until(sock: zmq.Socket, kind: type[p.Message], timeout_s: float = WAIT_S) -> Any:
    """Receive on a raw socket until a message of ``kind`` arrives (others are skipped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        msg = recv_msg(sock, max(0.0, deadline - time.monotonic()))
        if isinstance(msg, kind):
            return msg


def counters(c: BrokerClient) -> dict[str, int]:
    """The broker's counters, fetched over the wire."""
    return c.status()["counters"]
