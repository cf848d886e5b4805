"""The worker side of the broker protocol: a connection that keeps itself alive.

Design (and why it is not the textbook "I/O thread owns the socket"): one
DEALER socket, guarded by a lock, is driven by whichever thread needs it:

* while the compute thread waits in :meth:`WorkerConnection.get`, it polls
  the socket itself, so a DISPATCH reaches it with no thread hand-off;
* :meth:`reply` / :meth:`fail` send directly when the lock is free (the
  usual case: the compute thread just finished), else they leave the frames
  in an outbox and wake the lock holder, so they never block;
* a keepalive thread takes the lock once per heartbeat period while the
  compute thread is busy (a long prefill): it sends our heartbeat, reads
  broker messages (jobs are queued for the next ``get``), and rebuilds the
  socket and registers again when the broker has been silent for the
  liveness window (Majordomo-style reconnect) or asks us to re-register.

A ZeroMQ socket may be used by several threads if every use is serialised
by a full memory barrier; the lock is that barrier. Measured on the bench
(bench/bench_broker.py), handing each job to a compute thread and each
reply back cost ~75 us per round trip, more than the broker itself.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from broker import protocol as p
from broker.errors import EdgeCloudError, ProtocolError, RemoteError
from broker.protocol import RequestId, SessionId, WorkerId
from broker.sockets import (
    CLOSE_LINGER_MS,
    Waker,
    close_socket,
    make_socket,
    poll_timeout_ms,
    recv_message,
    send_or_false,
)
from broker.state import RateLimitedWarnings
from broker.transport import CurveClientKeys, HandshakeWatch, setup_curve_client

logger = logging.getLogger(__name__)

# Messages handled per wake-up before heartbeats are checked again.
RECV_BATCH = 256
# How long close() waits for the keepalive thread (it wakes within one poll).
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
    max_batch: int = 1  # sessions' steps it computes together (the broker keeps that many in flight)
    cache_limit_bytes: int = 0  # what its sessions' KV caches may hold together; 0: no limit
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
    broker_epoch: int = 0  # WorkerConnection.broker_epoch when it arrived: which broker process sent it

    @property
    def deadline(self) -> float:
        """Monotonic time after which the broker no longer waits for this job."""
        return self.received_at + self.deadline_ms / 1000

    def expired(self, now: float | None = None) -> bool:
        """True once computing this job is pointless (its reply would be discarded)."""
        return (time.monotonic() if now is None else now) >= self.deadline


class LoadCounter:
    """Forward passes, steps and tokens since the last heartbeat: the batch occupancy and the
    throughput the heartbeat reports. Written by the compute thread, read by whichever thread
    sends the heartbeat (plain ints: a read that races a write is off by one batch at most)."""

    def __init__(self) -> None:
        self.passes = self.steps = self.tokens = 0
        self.cache_bytes = 0
        self.prefix_bytes = self.prefix_reused = 0
        self._since = time.monotonic()

    def record(self, steps: int, tokens: int) -> None:
        self.passes += 1
        self.steps += steps
        self.tokens += tokens

    def since_last(self, now: float) -> tuple[float, float]:
        """(steps per forward pass, tokens per second) since the previous call; resets."""
        passes, steps, tokens = self.passes, self.steps, self.tokens
        self.passes = self.steps = self.tokens = 0
        elapsed, self._since = max(1e-6, now - self._since), now
        return (steps / passes if passes else 0.0), tokens / elapsed


class WorkerConnection:
    """Worker-side broker connection; connects and registers on construction.

    All public methods are thread-safe; ``get`` is meant for one compute
    thread (several would simply share the jobs).
    """

    def __init__(
        self,
        endpoint: str,
        info: WorkerInfo,
        context: zmq.Context | None = None,
        config: WorkerConfig | None = None,
        curve: CurveClientKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.info = info
        self.config = config or WorkerConfig()
        self.curve = curve  # None: a plain connection; else CURVE with this keypair (broker/transport.py)
        self._handshake: HandshakeWatch | None = None
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._lock = threading.Lock()  # guards the socket and everything below it
        self._sock: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._waker = Waker()
        self._jobs: deque[Job] = deque()
        self._outbox: deque[list[Any]] = deque()  # appended without the lock, flushed under it
        self._dropped: deque[SessionId] = deque()
        self._active_sessions = 0
        self._per_layer_ms = info.per_layer_ms
        self._load = LoadCounter()
        self._closing = threading.Event()
        self._closed = False
        now = time.monotonic()
        self._last_heard = now
        self._next_heartbeat = now
        # Our heartbeat period: the configured one, or the broker's if it says it is shorter (it
        # expires a worker silent for a few of its own periods, whatever ours is).
        self.heartbeat_s = self.config.heartbeat_interval_s
        self._reconnect_at: float | None = None
        self._backoff_s = self.config.reconnect_initial_s
        self.registrations = 0  # REGISTERs sent; tests and logs read it
        self.heartbeats_sent = 0
        self.reconnects = 0
        # Which broker process we serve: its id (BrokerHeartbeat.broker_id) and how many times it
        # changed (a restarted broker lost every session opened through the one before).
        self.broker_id: str | None = None
        self.broker_epoch = 0
        # A refused registration is asked again every heartbeat: its reason is said once a minute.
        self._reregister_warn = RateLimitedWarnings(logger, 60.0)
        with self._lock:
            self._connect()
        self._keepalive = threading.Thread(target=self._keepalive_loop, name=f"worker-keepalive-{info.worker_id}",
                                           daemon=True)  # fmt: skip
        self._keepalive.start()

    # ------------------------------------------------------- compute thread API
    def get(self, timeout_s: float) -> Job | None:
        """The next job, or None if none arrives within ``timeout_s`` (or the connection closes)."""
        deadline = time.monotonic() + timeout_s
        while not self._closing.is_set():
            now = time.monotonic()
            if not self._lock.acquire(timeout=max(0.0, deadline - now)):
                return None
            sleep_until = None
            try:
                if self._jobs:
                    return self._jobs.popleft()
                if self._reconnect_at is not None and now < self._reconnect_at:
                    sleep_until = min(deadline, self._reconnect_at)  # wait outside the lock
                else:
                    self._service(min(deadline, self._next_heartbeat, self._silent_deadline()))
                    if self._jobs:
                        return self._jobs.popleft()
            finally:
                self._release()
            if sleep_until is not None:
                self._closing.wait(max(0.0, sleep_until - time.monotonic()))
            if time.monotonic() >= deadline:
                return None
        return None

    def take_ready(self, limit: int) -> list[Job]:
        """Up to ``limit`` jobs that have already arrived, without waiting: what the compute
        thread batches with the job ``get`` returned."""
        out: list[Job] = []
        if limit <= 0 or self._closing.is_set():
            return out
        self._lock.acquire()
        try:
            if self._reconnect_at is None or time.monotonic() >= self._reconnect_at:
                self._service(0.0)  # read what reached the socket while the last batch computed
            while self._jobs and len(out) < limit:
                out.append(self._jobs.popleft())
        finally:
            self._release()
        return out

    def reply(self, job: Job, header_extra: dict[str, Any] | None = None, frames: Sequence[Any] = ()) -> None:
        """Send the result of ``job``; ``frames`` are sent zero-copy (keep them unmodified)."""
        self.reply_many([(job, header_extra, frames)])

    def reply_many(self, answers: Sequence[tuple[Job, dict[str, Any] | None, Sequence[Any]]]) -> None:
        """Send the results of several jobs (job, header_extra, frames), in as few messages as the
        protocol's body limit allows: the steps of one forward pass cost the worker and the
        broker one message, where each alone cost a send call and a wake-up of both sides' I/O
        threads."""
        group: list[p.WorkerReply] = []
        frames_in_group = 0
        for job, extra, frames in answers:
            if group and frames_in_group + len(frames) > p.MAX_BODY_FRAMES:
                self._post_replies(group)
                group, frames_in_group = [], 0
            group.append(p.WorkerReply(request_id=job.request_id, session_id=job.session_id, step=job.step,
                                       attempt=job.attempt, extra=dict(extra or {}), frames=list(frames)))
            frames_in_group += len(frames)
        if group:
            self._post_replies(group)

    def _post_replies(self, replies: list[p.WorkerReply]) -> None:
        self._post(p.encode(replies[0] if len(replies) == 1 else p.WorkerReplies.of(replies)))

    def fail(self, job: Job, error: BaseException) -> None:
        """Report that ``job`` failed; non-edgecloud exceptions travel as RemoteError."""
        err = error if isinstance(error, EdgeCloudError) else RemoteError.from_exception(error)
        message = str(err)[: p.MAX_TEXT_CHARS]
        self._post(p.encode(p.WorkerError(request_id=job.request_id, attempt=job.attempt, code=err.code,
                                          message=message)))  # fmt: skip

    def dropped_sessions(self) -> list[SessionId]:
        """Session ids the broker told us to free since the last call."""
        out = []
        while self._dropped:
            out.append(self._dropped.popleft())
        return out

    def set_active_sessions(self, count: int) -> None:
        """Tell heartbeats how many KV caches we hold (for the broker's status)."""
        self._active_sessions = max(0, int(count))

    def record_batch(self, steps: int, tokens: int) -> None:
        """One forward pass over ``steps`` sessions' steps that produced ``tokens`` tokens."""
        self._load.record(steps, tokens)

    def set_cache_bytes(self, nbytes: int) -> None:
        """What the sessions' KV caches hold now (heartbeats report it)."""
        self._load.cache_bytes = max(0, int(nbytes))

    def set_prefix_cache(self, nbytes: int, reused: int) -> None:
        """What the prefix cache holds and the prompt positions it has saved (heartbeats report them)."""
        self._load.prefix_bytes, self._load.prefix_reused = max(0, int(nbytes)), max(0, int(reused))

    def set_per_layer_ms(self, ms: float) -> None:
        """Tell heartbeats the current per-layer decode cost (the planner prices the cloud with it)."""
        if ms >= 0 and ms == ms and ms != float("inf"):
            self._per_layer_ms = float(ms)

    def close(self, graceful: bool = True) -> None:
        """Close the connection; ``graceful`` sends DISCONNECT so the broker fails over at once.

        ``graceful=False`` just drops the connection, as a crash would.
        """
        if self._closed:
            return
        self._closing.set()
        self._waker.wake()
        self._keepalive.join(JOIN_TIMEOUT_S)
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._flush_outbox()
                if graceful:
                    send_or_false(self._sock, p.encode(p.Disconnect(worker_id=self.info.worker_id)))
                self._close_socket(CLOSE_LINGER_MS if graceful else 0)
            self._waker.close()
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> WorkerConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ lock handling
    def _post(self, frames: list[Any]) -> None:
        """Send now if the socket is free, else leave it to the lock holder (never blocks)."""
        self._outbox.append(frames)
        if self._lock.acquire(blocking=False):
            try:
                self._flush_outbox()
            finally:
                self._release()
        elif not self._closed:
            self._waker.wake()

    def _release(self) -> None:
        """Release the lock, then flush whatever was posted while we held it.

        Checking *after* releasing closes the race with a ``_post`` that
        failed to take the lock just before we let go.
        """
        while True:
            self._lock.release()
            if not self._outbox or not self._lock.acquire(blocking=False):
                return
            self._flush_outbox()

    def _keepalive_loop(self) -> None:
        while not self._closing.is_set():
            wake_at = min(self._next_heartbeat, self._silent_deadline())
            if self._reconnect_at is not None:
                wake_at = self._reconnect_at
            if self._closing.wait(max(0.0, wake_at - time.monotonic())):
                return
            if not self._lock.acquire(timeout=self.heartbeat_s):
                continue  # the compute thread is in get() and doing this work itself
            try:
                if self._reconnect_at is None or time.monotonic() >= self._reconnect_at:
                    self._service(0.0)
            finally:
                self._release()

    # ---------------------------------------------------- socket work (locked)
    def _silent_deadline(self) -> float:
        return self._last_heard + self.config.heartbeat_interval_s * self.config.broker_liveness

    def _connect(self) -> None:
        sock = make_socket(self._ctx, zmq.DEALER)
        setup_curve_client(sock, self.curve)
        self._handshake = HandshakeWatch(sock, curve=self.curve is not None)
        sock.connect(self.endpoint)
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._waker.fileno(), zmq.POLLIN)
        self._reconnect_at = None
        self._last_heard = time.monotonic()
        self._send_register()

    def _send_register(self) -> None:
        i = self.info
        assert self._sock is not None
        send_or_false(self._sock, p.encode(p.Register(worker_id=i.worker_id, model_id=i.model_id,
                                                      layer_ranges=i.layer_ranges, public_key=i.public_key,
                                                      per_layer_ms=i.per_layer_ms, pid=i.pid,
                                                      max_sessions=i.max_sessions,
                                                      max_batch=i.max_batch,
                                                      cache_limit_bytes=i.cache_limit_bytes)))  # fmt: skip
        self.registrations += 1

    def _service(self, until: float) -> None:
        """Poll until ``until`` (monotonic; 0 = don't wait), then do all due socket work."""
        if self._closed:
            return
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        self._flush_outbox()
        events = dict(self._poller.poll(poll_timeout_ms(until)))
        if self._waker.fileno() in events:
            self._waker.drain()
        self._flush_outbox()
        if self._sock in events:
            self._drain()
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.heartbeat_s
            mean_batch, tokens_per_s = self._load.since_last(now)
            hb = p.Heartbeat(worker_id=self.info.worker_id, active_sessions=self._active_sessions,
                             queue_depth=len(self._jobs), per_layer_ms=self._per_layer_ms, mean_batch=mean_batch,
                             tokens_per_s=tokens_per_s, cache_bytes=self._load.cache_bytes,
                             prefix_bytes=self._load.prefix_bytes, prefix_reused=self._load.prefix_reused)  # fmt: skip
            send_or_false(self._sock, p.encode(hb))
            self.heartbeats_sent += 1
        if now > self._silent_deadline():
            self._disconnect(now)

    def _disconnect(self, now: float) -> None:
        why = ""
        if self._handshake is not None:
            self._handshake.poll()
            why = f" ({self._handshake.failure})" if self._handshake.failure else ""
        logger.warning("broker at %s silent for %.1fs%s; reconnecting in %.2fs", self.endpoint,
                       now - self._last_heard, why, self._backoff_s)  # fmt: skip
        self._close_socket()
        self._reconnect_at = now + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self.config.reconnect_max_s)
        self.reconnects += 1
        if self._jobs:  # the broker has failed these already
            logger.warning("discarding %d jobs received before reconnecting", len(self._jobs))
            self._jobs.clear()
        self._outbox.clear()

    def _close_socket(self, linger_ms: int = 0) -> None:
        if self._handshake is not None:
            self._handshake.close()
            self._handshake = None
        close_socket(self._sock, linger_ms)
        self._sock = None

    def _flush_outbox(self) -> None:
        while self._outbox:
            frames = self._outbox.popleft()
            if self._sock is None or not send_or_false(self._sock, frames):
                logger.warning(
                    "a reply could not be sent to the broker (disconnected or full); it will time out"
                )

    def _drain(self) -> None:
        assert self._sock is not None
        for _ in range(RECV_BATCH):
            frames = recv_message(self._sock, 1)
            if frames is None:
                return
            self._last_heard = time.monotonic()
            self._backoff_s = self.config.reconnect_initial_s
            try:
                msg = p.decode(frames)
            except ProtocolError as exc:
                logger.warning("malformed message from broker: %s", exc)
                continue
            self._handle(msg)

    def _take(self, msg: p.Dispatch, now: float) -> None:
        self._jobs.append(Job(request_id=msg.request_id, session_id=msg.session_id, model_id=msg.model_id,
                              step=msg.step, attempt=msg.attempt, kind=msg.kind, layer_lo=msg.layer_lo,
                              deadline_ms=msg.deadline_ms, extra=msg.extra,
                              frames=[f.buffer if isinstance(f, zmq.Frame) else memoryview(f) for f in msg.frames],
                              received_at=now, broker_epoch=self.broker_epoch))  # fmt: skip

    def _handle(self, msg: p.Message) -> None:
        if isinstance(msg, p.Dispatch):
            self._take(msg, time.monotonic())
        elif isinstance(msg, p.Dispatches):
            now = time.monotonic()
            for one in msg.split():
                self._take(one, now)
        elif isinstance(msg, p.DropSession):
            self._dropped.append(msg.session_id)
        elif isinstance(msg, p.Reregister):
            self._reregister_warn.warn(msg.reason, "broker asked %s to register again (%s)", self.info.worker_id,
                                       msg.reason)
            self._send_register()
        elif isinstance(msg, p.BrokerDisconnect):
            logger.warning("broker is going away (%s); will reconnect when it returns", msg.reason)
        elif isinstance(msg, p.BrokerHeartbeat):
            if msg.broker_id and msg.broker_id != self.broker_id:
                if self.broker_id is not None:
                    self.broker_epoch += 1
                    logger.warning("the broker was restarted (it was %s, it is %s): sessions opened through the "
                                   "old one are lost and will be freed", self.broker_id, msg.broker_id)
                self.broker_id = msg.broker_id
            broker_s = msg.interval_ms / 1000
            if 0 < broker_s < self.heartbeat_s:
                logger.info("heartbeating every %.3fs, the broker's period", broker_s)
                self.heartbeat_s = broker_s
                self._next_heartbeat = min(self._next_heartbeat, time.monotonic() + broker_s)
        else:
            logger.warning("unexpected %s from broker ignored", type(msg).__name__)
