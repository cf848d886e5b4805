"""The worker side of the broker protocol: a connection that keeps itself alive.

A background I/O thread owns the DEALER socket (ZeroMQ sockets are not
thread-safe). It registers, answers the broker's heartbeats with its own
every interval even while the compute thread is busy with a long prefill,
and rebuilds the socket and registers again when the broker goes silent for
the liveness window or says REREGISTER (Majordomo-style reconnect).

The compute thread talks to it through two queues: :meth:`get` takes the
next :class:`Job`, :meth:`reply` / :meth:`fail` hand results back (the I/O
thread is woken through a self-pipe and sends them).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from broker import protocol as p
from broker.errors import EdgeCloudError, ProtocolError, RemoteError
from broker.protocol import RequestId, SessionId, WorkerId
from broker.sockets import CLOSE_LINGER_MS, Waker, close_socket, make_socket, poll_timeout_ms, send_or_false

logger = logging.getLogger(__name__)

# Messages handled per wake-up before heartbeats are checked again.
RECV_BATCH = 256
# How long close() waits for the I/O thread (it wakes within one poll).
JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WorkerConfig:
    """Connection timing; must agree with the broker's heartbeat settings."""

    heartbeat_interval_s: float = 1.0  # how often we tell the broker we are alive
    broker_liveness: int = 3  # silent broker heartbeat periods before we reconnect
    reconnect_initial_s: float = 0.25  # first pause before rebuilding the socket
    reconnect_max_s: float = 8.0  # backoff ceiling while the broker stays away


@dataclass(frozen=True)
class WorkerInfo:
    """What REGISTER announces about this worker."""

    worker_id: WorkerId
    model_id: str
    layer_ranges: tuple[tuple[int, int], ...]
    public_key: bytes = b""  # static X25519 key; empty when running without encryption
    per_layer_ms: float = 0.0  # measured compute cost, for placement and status
    max_sessions: int = 64  # KV caches this worker is willing to hold
    pid: int = field(default_factory=os.getpid)


@dataclass(frozen=True)
class Job:
    """One dispatched attempt of a request, as the compute thread sees it."""

    request_id: RequestId
    session_id: SessionId
    model_id: str
    step: int
    attempt: int
    kind: str
    layer_lo: int
    deadline_ms: int
    extra: dict[str, Any]  # the client's opaque header fields
    frames: list[memoryview]  # body frames (read-only buffers)
    received_at: float  # time.monotonic() at arrival

    @property
    def deadline(self) -> float:
        """Monotonic time after which the broker no longer waits for this job."""
        return self.received_at + self.deadline_ms / 1000

    def expired(self, now: float | None = None) -> bool:
        """True once computing this job is pointless (its reply would be discarded)."""
        return (time.monotonic() if now is None else now) >= self.deadline


class WorkerConnection:
    """Worker-side broker connection; starts its I/O thread on construction.

    ``get``, ``reply``, ``fail``, ``dropped_sessions`` and ``close`` may be
    called from any thread.
    """

    def __init__(
        self,
        endpoint: str,
        info: WorkerInfo,
        context: zmq.Context | None = None,
        config: WorkerConfig | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.info = info
        self.config = config or WorkerConfig()
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._outbox: queue.Queue[list[Any]] = queue.Queue()
        self._waker = Waker()
        self._lock = threading.Lock()
        self._dropped: list[SessionId] = []
        self._active_sessions = 0
        self._closing = threading.Event()
        self._graceful = True
        self.registrations = 0  # REGISTERs sent; tests and logs read it
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name=f"worker-io-{info.worker_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------- compute thread API
    def get(self, timeout_s: float) -> Job | None:
        """The next job, or None if none arrives within ``timeout_s``."""
        try:
            return self._jobs.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def reply(self, job: Job, header_extra: dict[str, Any] | None = None, frames: Sequence[Any] = ()) -> None:
        """Send the result of ``job``; ``frames`` are sent zero-copy (keep them unmodified)."""
        msg = p.WorkerReply(request_id=job.request_id, session_id=job.session_id, step=job.step, attempt=job.attempt,
                            extra=dict(header_extra or {}), frames=list(frames))  # fmt: skip
        self._post(p.encode(msg))

    def fail(self, job: Job, error: BaseException) -> None:
        """Report that ``job`` failed; non-edgecloud exceptions travel as RemoteError."""
        err = error if isinstance(error, EdgeCloudError) else RemoteError.from_exception(error)
        message = str(err)[: p.MAX_TEXT_CHARS]
        self._post(p.encode(p.WorkerError(request_id=job.request_id, attempt=job.attempt, code=err.code,
                                          message=message)))  # fmt: skip

    def dropped_sessions(self) -> list[SessionId]:
        """Session ids the broker told us to free since the last call."""
        with self._lock:
            out, self._dropped = self._dropped, []
        return out

    def set_active_sessions(self, count: int) -> None:
        """Tell heartbeats how many KV caches we hold (for the broker's status)."""
        self._active_sessions = max(0, int(count))

    def close(self, graceful: bool = True) -> None:
        """Stop the I/O thread; ``graceful`` sends DISCONNECT so the broker fails over at once.

        ``graceful=False`` just drops the connection, as a crash would.
        """
        self._graceful = graceful
        self._closing.set()
        self._waker.wake()
        self._thread.join(JOIN_TIMEOUT_S)
        if self._thread.is_alive():
            logger.error("worker I/O thread did not stop within %.1fs", JOIN_TIMEOUT_S)
            return
        self._waker.close()
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> WorkerConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, frames: list[Any]) -> None:
        self._outbox.put(frames)
        self._waker.wake()

    # --------------------------------------------------------------- I/O thread
    def _register_msg(self) -> list[Any]:
        i = self.info
        return p.encode(p.Register(worker_id=i.worker_id, model_id=i.model_id, layer_ranges=i.layer_ranges,
                                   public_key=i.public_key, per_layer_ms=i.per_layer_ms, pid=i.pid,
                                   max_sessions=i.max_sessions))  # fmt: skip

    def _connect(self) -> zmq.Socket:
        sock = make_socket(self._ctx, zmq.DEALER)
        sock.connect(self.endpoint)
        send_or_false(sock, self._register_msg())
        self.registrations += 1
        return sock

    def _run(self) -> None:
        cfg = self.config
        sock = self._connect()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._waker.fileno(), zmq.POLLIN)
        now = time.monotonic()
        last_heard = now
        next_heartbeat = now + cfg.heartbeat_interval_s
        backoff_s = cfg.reconnect_initial_s
        try:
            while not self._closing.is_set():
                now = time.monotonic()
                silent_until = last_heard + cfg.heartbeat_interval_s * cfg.broker_liveness
                events = dict(poller.poll(poll_timeout_ms(min(next_heartbeat, silent_until), now)))
                if self._waker.fileno() in events:
                    self._waker.drain()
                self._flush_outbox(sock)
                if sock in events:
                    if self._drain(sock):
                        last_heard = time.monotonic()
                        backoff_s = cfg.reconnect_initial_s
                now = time.monotonic()
                if now >= next_heartbeat:
                    next_heartbeat = now + cfg.heartbeat_interval_s
                    hb = p.Heartbeat(worker_id=self.info.worker_id, active_sessions=self._active_sessions,
                                     queue_depth=self._jobs.qsize())  # fmt: skip
                    send_or_false(sock, p.encode(hb))
                if now - last_heard > cfg.heartbeat_interval_s * cfg.broker_liveness:
                    logger.warning("broker at %s silent for %.1fs; reconnecting in %.2fs", self.endpoint,
                                   now - last_heard, backoff_s)  # fmt: skip
                    poller.unregister(sock)
                    close_socket(sock)
                    if self._closing.wait(backoff_s):
                        return
                    backoff_s = min(backoff_s * 2, cfg.reconnect_max_s)
                    self._discard_stale_jobs()
                    self.reconnects += 1
                    sock = self._connect()
                    poller.register(sock, zmq.POLLIN)
                    last_heard = time.monotonic()
        finally:
            if not sock.closed:
                self._flush_outbox(sock)
                if self._graceful:
                    send_or_false(sock, p.encode(p.Disconnect(worker_id=self.info.worker_id)))
                close_socket(sock, CLOSE_LINGER_MS if self._graceful else 0)

    def _flush_outbox(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            if not send_or_false(sock, frames):
                logger.warning("could not send a reply to the broker (queue full); it will time out")

    def _discard_stale_jobs(self) -> None:
        """Jobs from the old connection: the broker has failed them already."""
        dropped = 0
        while True:
            try:
                self._jobs.get_nowait()
                dropped += 1
            except queue.Empty:
                break
        if dropped:
            logger.warning("discarded %d jobs received before reconnecting", dropped)

    def _drain(self, sock: zmq.Socket) -> bool:
        """Handle pending broker messages; True if any came."""
        heard = False
        for _ in range(RECV_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            heard = True
            try:
                msg = p.decode(frames)
            except ProtocolError as exc:
                logger.warning("malformed message from broker: %s", exc)
                continue
            self._handle(sock, msg)
        return heard

    def _handle(self, sock: zmq.Socket, msg: p.Message) -> None:
        if isinstance(msg, p.Dispatch):
            self._jobs.put(Job(request_id=msg.request_id, session_id=msg.session_id, model_id=msg.model_id,
                               step=msg.step, attempt=msg.attempt, kind=msg.kind, layer_lo=msg.layer_lo,
                               deadline_ms=msg.deadline_ms, extra=msg.extra,
                               frames=[f.buffer if isinstance(f, zmq.Frame) else memoryview(f) for f in msg.frames],
                               received_at=time.monotonic()))  # fmt: skip
        elif isinstance(msg, p.DropSession):
            with self._lock:
                self._dropped.append(msg.session_id)
        elif isinstance(msg, p.Reregister):
            logger.info("broker asked %s to register again (%s)", self.info.worker_id, msg.reason)
            send_or_false(sock, self._register_msg())
            self.registrations += 1
        elif isinstance(msg, p.BrokerDisconnect):
            logger.warning("broker is going away (%s); will reconnect when it returns", msg.reason)
        elif not isinstance(msg, p.BrokerHeartbeat):
            logger.warning("unexpected %s from broker ignored", type(msg).__name__)
