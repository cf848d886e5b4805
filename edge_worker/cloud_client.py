"""The edge's side of the cloud: ``CloudClient`` (connection, keys, retries) and ``CloudSession``.

``CloudClient(api_key=...)`` is the original design's constructor; the broker address, the keys
directory and the rest come from keyword arguments, else ``$EDGECLOUD_BROKER``,
``$EDGECLOUD_KEYS`` and ``$EDGECLOUD_API_KEY``, else defaults. Nothing connects until the first
request, so building a client never blocks.

A ``CloudSession`` keeps every boundary activation it has sent (the replay log). When the worker
holding the session is lost, the session reopens on another worker and replays the log in one
step, so generation continues with the same output.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq

from broker.client_api import BrokerClient, Reply
from broker.errors import (
    BrokerUnavailable,
    ConfigError,
    CryptoError,
    EdgeCloudError,
    NoWorkerAvailable,
    RequestTimeout,
    WorkerLost,
    is_unavailable,
)
from broker.linkproxy import LinkConfig, LinkProxy
from broker.protocol import NEAR_KEY, TASK_KEY, RequestId
from broker.transport import client_keys
from broker.wire.codec import row_bytes_bound
from broker.wire.crypto import (
    NullCipher,
    SessionCipher,
    generate_keypair,
    load_trusted_workers,
)
from broker.wire.session_protocol import (
    KIND_CLOSE,
    KIND_OPEN,
    KIND_STEP,
    OpenParams,
    StepReply,
    check_open_proof,
    close_digest,
    new_close_key,
    open_step_reply,
    seal_step,
)
from edge_worker.backends import Backend, FrameLost, PipelinedFrame, StepStats
from edge_worker.config import check_keys_dir, default_broker, default_keys_dir, resolve_api_key
from edge_worker.timeouts import ADAPTIVE_MAX_POSITIONS, DEFAULT_MIN_TIMEOUT_S, StepTimer
from partition.reduction import Reduction
from partition.sampling import SamplingParams
from partition.segment import PREFILL_CHUNK
from partition.tree import DraftTree

log = logging.getLogger(__name__)

TRUSTED_WORKERS_FILE = "trusted_workers.txt"
FAILED_OPENS_BEFORE_FALLBACK = 2
# A worker that lets a step time out this many times in a row, while the broker still hears its
# heartbeats, is hung in its compute: move the session elsewhere, as if it had died. Twice, so a
# single slow step (a loaded host) does not cost a replay.
TIMEOUTS_BEFORE_FAILOVER = 2
# Beyond its budget the client's own reply grace applies (the broker answers every request by its
# deadline, or the connection is reset); this only keeps the final wait from being unbounded.
IDLE_WAIT_S = 60.0
# The largest frame a step sends (CloudClient.max_frame_bytes); the broker takes up to 32 MiB.
DEFAULT_MAX_FRAME_BYTES = 8 << 20
# How long the end of a generation waits for its closes to be answered; the broker keeps them for
# CLOSE_DEADLINE_S (a worker busy with others' prefills still gets to them).
CLOSE_WAIT_S = 0.5
CLOSE_DEADLINE_S = 5.0


def backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: initial, 2x, 4x ... capped. Pure, so retry timing is testable."""
    return min(max_s, initial_s * (2 ** max(0, attempt - 1)))


class CloudClient:
    """Connection settings and the broker socket shared by the sessions of one edge."""

    def __init__(
        self,
        api_key: str | None = None,
        broker: str | None = None,
        keys_dir: str | Path | None = None,
        encryption: bool = True,
        wire_dtype: str = "fp16",
        request_timeout_s: float = 30.0,
        max_retries: int = 20,
        step_deadline_s: float = 60.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
        link: LinkConfig | None = None,
        curve: bool = True,
        key_name: str = "default",
        adaptive_timeout: bool = True,
        min_attempt_timeout_s: float = DEFAULT_MIN_TIMEOUT_S,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.broker = broker or default_broker()
        self.keys_dir = check_keys_dir(Path(keys_dir) if keys_dir is not None else default_keys_dir())
        # CURVE to the broker with client-KEY_NAME.key when the keys directory has it (and the
        # broker's public key); curve=False (--no-curve) connects in the clear.
        self.curve = curve
        self.key_name = key_name
        self.api_key = resolve_api_key(api_key, self.keys_dir)
        self.encryption = encryption
        self.wire_dtype = wire_dtype
        self.request_timeout_s = request_timeout_s  # one request, queueing included
        self.max_retries = max_retries
        # One step, retries and failovers included: long enough for a restarted broker to see its
        # workers re-register (their liveness window is a few seconds), short enough not to hang.
        self.step_deadline_s = step_deadline_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.link = link  # emulate a slower link: every frame crosses an in-process LinkProxy
        # Decode steps unanswered after about one expected round trip get a copy sent (timeouts.py);
        # off, every lost message costs the whole request_timeout_s.
        self.adaptive_timeout = adaptive_timeout
        self.step_timer = StepTimer(min_timeout_s=min_attempt_timeout_s)
        # A step's activations go out in frames of at most this many bytes (a long prompt as several
        # steps): a message is encrypted, copied and forwarded whole, so one huge frame would hold up
        # everything else on the connections it crosses (a worker's heartbeats included).
        self.max_frame_bytes = max_frame_bytes
        self._local = threading.local()  # this thread's _Connection
        self._connections: list[_Connection] = []  # every thread's, for close()
        self._lock = threading.Lock()
        self._trusted: frozenset[bytes] | None = None

    def trusted_workers(self) -> frozenset[bytes]:
        if self._trusted is None:
            path = self.keys_dir / TRUSTED_WORKERS_FILE
            if not path.exists():
                raise ConfigError(
                    f"encryption is on but {path} does not exist: run `edgecloud keys generate {self.keys_dir}` "
                    "(and give workers the same directory), or pass --no-encryption"
                )
            self._trusted = load_trusted_workers(path)
        return self._trusted

    @property
    def connection(self) -> BrokerClient:
        """This thread's connection to the broker. A ZeroMQ socket must not be shared between
        threads, so each thread that uses the client (several generations of one engine at once)
        gets its own socket, and with an emulated link its own proxy."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._lock:
                self._connections.append(conn)
        return conn.client

    @property
    def _proxy(self) -> LinkProxy | None:
        """This thread's emulated link (tests change its delay during a generation)."""
        conn = getattr(self._local, "conn", None)
        return conn.proxy if conn is not None else None

    def _connect(self) -> _Connection:
        curve = client_keys(self.keys_dir, "client", self.key_name) if self.curve else None
        if self.link is None:
            return _Connection(BrokerClient(self.broker, self.api_key, curve=curve))
        # The real frames are delayed in transit, so anything timing them (the trace,
        # DeviceMonitor) measures the emulated link, not a counter added afterwards. The proxy
        # is in this process (inproc: no port another local user could reach) and speaks
        # CURVE upstream with our key.
        ctx = zmq.Context()
        proxy = LinkProxy(f"inproc://edgecloud-link-{uuid.uuid4().hex}", self.broker, self.link,
                          context=ctx, upstream_curve=curve)  # fmt: skip
        proxy.start()
        return _Connection(BrokerClient(proxy.endpoint, self.api_key, context=ctx), proxy, ctx)

    def ping(self, timeout_s: float = 5.0) -> float:
        return self.connection.ping(timeout_s)

    def status(self, timeout_s: float = 5.0) -> dict:
        return self.connection.status(timeout_s)

    def session(self, model_id: str, split: int, hidden_size: int, reduction: Reduction | None = None) -> CloudSession:
        return CloudSession(self, model_id, split, hidden_size, reduction)

    def close(self) -> None:
        """Close every thread's connection (call it once no generation uses the client)."""
        with self._lock:
            connections, self._connections = self._connections, []
            self._local = threading.local()
        for conn in connections:
            conn.close()


@dataclass
class _Connection:
    """One thread's socket to the broker, behind an in-process link proxy when one is emulated."""

    client: BrokerClient
    proxy: LinkProxy | None = None
    ctx: zmq.Context | None = None

    def close(self) -> None:
        self.client.close()
        if self.proxy is not None:
            self.proxy.stop()
        if self.ctx is not None:
            self.ctx.term()


class CloudSession:
    """One generation's state on the cloud side; implements the generation loop's Backend."""

    def __init__(self, client: CloudClient, model_id: str, split: int, hidden_size: int,
                 reduction: Reduction | None = None) -> None:
        self.client = client
        # Activations are projected to reduction.dims before they leave (the replay log keeps them
        # full width, so the local fallback runs on the exact activations).
        self.reduction = reduction
        self.model_id = model_id
        self.split = split
        self.hidden_size = hidden_size
        self.session_id = uuid.uuid4().hex
        self.task_base = uuid.uuid4().hex
        self.sampling = SamplingParams()
        self.cipher = None
        self.pos = 0  # positions the worker's cache holds
        self.replay: list[torch.Tensor] = []  # (1, T_i, H) activations sent so far, in order
        # Builds a LocalBackend for layers [split, N) when the cloud is gone for good; None: fail.
        self.fallback: Callable[[], Backend] | None = None
        self.local: Backend | None = None
        # Raised when the edge gives up on pipelined frames in flight and resends from its oldest
        # unanswered position: the worker lets a step of a newer epoch rewind its cache.
        self.epoch = 0
        self._path: list[int] = []  # a tree step's kept rows after the root, from the worker's reply
        self._close_key = b""  # what frees the open session (its opener carried the digest)
        # (session id, close key) of openers sent but not answered (in flight, or interrupted):
        # each may have made a session on a worker, which close() frees too.
        self._unanswered: list[tuple[str, bytes]] = []
        self._opened = ""  # the id the last opener went out under: a new attempt takes a new id
        # The worker this generation's openers ask the broker for (it holds what the prompt
        # continues: partition.prefix_cache.Continuations); None: placement by capacity.
        self.near: str | None = None

    # --- Backend --------------------------------------------------------------------------------
    def start(self, sampling: SamplingParams) -> None:
        self.sampling = sampling
        self.session_id = uuid.uuid4().hex
        self.task_base = uuid.uuid4().hex  # step s is task "<base>-s" through retries and failovers
        self.cipher = None
        self.pos = 0
        self.replay = []
        self.local = None
        self.epoch = 0
        self._close_key = b""

    def step(self, hidden: torch.Tensor, step: int, draft: list[int] | tuple[int, ...] = (),
             seen: Sequence[int] = (), started: float | None = None, tree: DraftTree | None = None
             ) -> tuple[list[int], StepStats]:
        """hidden: (1, T, H) activations for the positions after ``self.pos``; the last
        ``len(draft)`` of them hold drafted tokens for the worker to verify.

        Transient errors are retried with backoff, and a lost worker is replaced by reopening
        the session elsewhere and replaying the log, until ``step_deadline_s`` has passed. Then,
        if a local fallback was given, the rest of the model runs here from the replay log;
        otherwise the last error is raised. ``started`` (``time.monotonic()``): when the step
        began, if before this call (a pipelined frame's resend counts from its first sending).
        ``tree``: the last ``tree.rows`` positions are a token tree's rows (``Backend.step``).
        """
        if tree is not None:
            draft = tree.tokens
        if self.local is not None:
            return self._local_step(hidden, step, StepStats(), draft=draft, seen=seen, tree=tree)
        stats = StepStats()
        pending = hidden  # what must reach the worker; grows to the whole log after a failover
        base = self.pos  # the position pending starts at (frames of it the worker has are not resent)
        attempt = 0
        failed_opens = 0  # openers that found no worker (no answer in time, or none registered)
        timeouts = 0  # of this step on the session's current worker
        deadline = (time.monotonic() if started is None else started) + self.client.step_deadline_s
        last: EdgeCloudError | None = None
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    if last is not None and not isinstance(last, RequestTimeout):
                        raise last  # what kept failing says more than "no path" (a busy worker, say)
                    raise RequestTimeout(f"step {step} found no working path to the cloud within "
                                         f"{self.client.step_deadline_s:.0f} s")
                # The client waits a grace past a request's own deadline for the broker's answer:
                # the request ends early enough that the wait, grace and all, ends by the deadline.
                grace = self.client.connection.config.reply_grace_s
                timeout_s = min(self.client.request_timeout_s, max(0.05, remaining - grace))
                if self.cipher is None:
                    self._open(step, stats, timeout_s)
                    if self.pos == 0 and self.replay:
                        pending = torch.cat([*self.replay, hidden], dim=1)
                    base = self.pos
                accepted, token = self._send_frames(pending, base, step, stats, timeout_s, deadline - grace,
                                                    draft, seen, tree)
                break
            except EdgeCloudError as exc:
                last = exc
                attempt += 1
                failed_opens += self.cipher is None and is_unavailable(exc)
                # With a local fallback at hand, the cloud known gone (the broker closed the
                # connection or refuses connections, no worker serves the model) or a couple of
                # openers that found no worker are enough: waiting out the whole deadline only
                # delays what the edge can compute.
                give_up_on_cloud = self.fallback is not None and (
                    cloud_gone(exc) or failed_opens >= FAILED_OPENS_BEFORE_FALLBACK)
                if (not _recoverable(exc) or give_up_on_cloud or attempt > self.client.max_retries
                        or time.monotonic() >= deadline):
                    if self.fallback is not None and is_unavailable(exc):
                        log.warning("cloud unavailable (%s): running layers [%d, N) on the edge from now on",
                                    exc, self.split)
                        self.local = self.fallback()
                        self.local.start(self.sampling)
                        stats.retries += 1
                        return self._local_step(hidden, step, stats, replay=True, draft=draft, seen=seen,
                                                tree=tree)
                    raise
                stats.retries += 1
                timeouts = timeouts + 1 if isinstance(exc, RequestTimeout) and self.cipher is not None else 0
                if timeouts >= TIMEOUTS_BEFORE_FAILOVER:
                    log.warning("session %s: step %d timed out %d times on its worker, which still beats; "
                                "treating it as hung", self.session_id[:8], step, timeouts)
                    exc = WorkerLost(f"step {step} timed out {timeouts} times")
                    timeouts = 0
                if isinstance(exc, WorkerLost):
                    log.warning("session %s lost its worker (%s); reopening and replaying %d positions",
                                self.session_id[:8], exc, self.pos + hidden.shape[1])
                    self.cipher = None
                    self.pos = 0
                    self.session_id = uuid.uuid4().hex  # the old id stays pinned to the dead worker
                    pending = hidden
                    continue
                # A busy answer may say when to come back; never past the deadline.
                pause = min(max(backoff_s(attempt, self.client.backoff_initial_s, self.client.backoff_max_s),
                                getattr(exc, "retry_after_s", 0.0)),
                            max(0.0, deadline - time.monotonic()))
                log.info("step %d: %s; retry %d in %.2f s", step, exc, attempt, pause)
                time.sleep(pause)
                stats.waiting_ms += pause * 1e3
        if tree is not None:
            rows = [0, *self._path]
            self._log(hidden, 0, tree, rows)
            return [*tree.path_tokens(rows), token], stats
        self._log(hidden, len(draft) - accepted)
        return [*draft[:accepted], token], stats

    def prime(self, hidden: torch.Tensor) -> None:
        """Positions the next opener replays before the pending token (after the split moved)."""
        self.replay = [hidden.detach().to(torch.float32).cpu()]
        self.pos = 0
        self.cipher = None

    def _log(self, hidden: torch.Tensor, rejected: int, tree: DraftTree | None = None,
             rows: Sequence[int] = ()) -> None:
        """Keep what the worker's cache now holds: the step's positions minus rejected drafts
        (of a tree: the positions before it and its kept ``rows``)."""
        if tree is not None:
            before = hidden.shape[1] - tree.rows
            kept = torch.cat([hidden[:, :before], hidden[:, [before + r for r in rows]]], dim=1)
        else:
            kept = hidden[:, :hidden.shape[1] - rejected] if rejected else hidden
        self.replay.append(kept.detach().to(torch.float32).cpu())

    def _local_step(self, hidden: torch.Tensor, step: int, stats: StepStats, replay: bool = False,
                    draft: list[int] | tuple[int, ...] = (), seen: Sequence[int] = (),
                    tree: DraftTree | None = None) -> tuple[list[int], StepStats]:
        """The fallback: the remaining layers in this process, rebuilt from the replay log once."""
        assert self.local is not None, "only called once a local fallback exists"
        x = torch.cat([*self.replay, hidden], dim=1) if replay and self.replay else hidden
        tokens, local_stats = self.local.step(x, step, draft, seen, tree=tree)
        stats.cloud_compute_ms += local_stats.cloud_compute_ms
        stats.fell_back = True
        if tree is not None:
            self._log(hidden, 0, tree, tree.rows_of(list(tokens[:-1])))
        else:
            self._log(hidden, len(draft) - (len(tokens) - 1))
        return tokens, stats

    def close(self) -> None:
        # An opener that was sent but never answered (interrupted) may still have made a session
        # on a worker: close that too, or it waits there for the idle timeout.
        targets, self._unanswered = self._unanswered, []
        if self.cipher is not None and self._close_key:
            targets.append((self.session_id, self._close_key))
        self.cipher = None
        self._close_key = b""
        if not targets:
            return
        conn = self.client.connection
        if conn.broker_gone:  # nobody to tell; the worker frees them after its idle TTL
            return
        # Sent at once and waited for briefly: a close must not hold up the end of a generation
        # (a failed one least of all), and the worker frees the session after its TTL anyway.
        sent = []
        for session_id, key in targets:
            try:
                sent.append(conn.submit(session_id, KIND_CLOSE, self.model_id, self.split, 0,
                                        timeout_s=CLOSE_DEADLINE_S, extra={"close_key": key}))
            except EdgeCloudError as exc:
                log.debug("closing session %s: %s", session_id[:8], exc)
        end = time.monotonic() + CLOSE_WAIT_S
        for rid in sent:
            if conn.wait_any([rid], max(0.0, end - time.monotonic())) is None:
                conn.forget(rid)
                continue
            try:
                conn.result(rid)
            except EdgeCloudError as exc:
                log.debug("closing a session: %s", exc)

    # --- pipelined frames (edge_worker/generation.py, EdgeGenerator._pipeline_cycle) --------------
    pipelines = True

    def can_pipeline(self) -> bool:
        """Pipelined frames need an open session on a worker (the first step, a reopen after a
        lost worker and the local fallback all go through ``step``)."""
        return self.cipher is not None and self.local is None

    def submit(self, hidden: torch.Tensor, step: int, pos: int, first: int | None,
               seen: Sequence[int] = (), draft: Sequence[int] = ()) -> PipelinedFrame:
        """Send one frame without waiting and without copies: positions ``pos ..`` of ``hidden``
        (1, T, H); ``first`` makes it conditional on the main model choosing that token at ``pos``
        (session_protocol.py), ``draft`` are the tokens its last positions hold, to verify. A frame that cannot be sent (the broker is gone, say) comes back
        marked ``failed``: collecting it raises FrameLost, so its resend takes the ordinary step's
        way (retries, failover, local fallback); any other error is raised at once."""
        wire = self.reduction.project(hidden) if self.reduction else hidden
        frames = seal_step(self.cipher, self.session_id, step, pos, wire, self.client.wire_dtype, draft=list(draft),
                           first=first, epoch=self.epoch, seen=self._seen(seen))
        nbytes = sum(len(memoryview(f)) for f in frames)
        frame = PipelinedFrame(hidden=hidden, step=step, pos=pos, first=first, seen=tuple(seen), draft=tuple(draft),
                               sent_at=time.perf_counter(), bytes_sent=nbytes)
        try:
            frame.handle = self.client.connection.submit(
                self.session_id, KIND_STEP, self.model_id, self.split, step, frames,
                timeout_s=self.client.request_timeout_s, extra={TASK_KEY: f"{self.task_base}-{step}"})
        except EdgeCloudError as exc:
            if not (_recoverable(exc) or is_unavailable(exc)):
                raise
            frame.failed = exc
        return frame

    def ready(self, frame: PipelinedFrame) -> bool:
        """Whether the frame's answer (or error) has arrived; never blocks."""
        if frame.failed is not None:
            return True
        try:
            return self.client.connection.wait_any([frame.handle], 0.0) is not None
        except EdgeCloudError:
            return True  # collect() raises it

    def collect(self, frame: PipelinedFrame) -> tuple[list[int] | None, StepStats]:
        """The oldest frame's answer: the drafts it carried that the main model kept and the main
        model's token after them, or None when the worker skipped it (its condition failed). Waits at most about one expected round trip (the
        adaptive copy wait) from when the frame was sent. A timeout or an error ``step`` would
        retry (or fall back on) raises FrameLost; any other error (security, protocol, poison)
        is raised as it is. Only frames that ran enter the replay log."""
        if frame.failed is not None:
            raise FrameLost(f"not sent: {type(frame.failed).__name__}: {frame.failed}") from frame.failed
        try:
            return self._collect(frame)
        except EdgeCloudError as exc:
            if _recoverable(exc) or is_unavailable(exc):
                raise FrameLost(f"{type(exc).__name__}: {exc}") from exc
            raise

    def _collect(self, frame: PipelinedFrame) -> tuple[list[int] | None, StepStats]:
        conn = self.client.connection
        timer = self.client.step_timer
        stats = StepStats(bytes_sent=frame.bytes_sent, round_trips=1)
        budget = self.client.request_timeout_s
        if self.client.adaptive_timeout:
            budget = timer.timeout_s(budget) or budget
        t_wait = time.perf_counter()
        waited = conn.wait_any([frame.handle], 0.0) is None
        if waited:
            stats.waited = True
            remaining = frame.sent_at + budget - t_wait
            if conn.wait_any([frame.handle], max(0.0, remaining)) is None:
                conn.forget(frame.handle)
                raise RequestTimeout(f"pipelined step {frame.step} got no answer within {budget * 1e3:.0f} ms")
        reply: Reply = conn.result(frame.handle)
        now = time.perf_counter()
        stats.bytes_received = sum(len(f) for f in reply.frames)
        result = open_step_reply(self.cipher, self.session_id, frame.step, reply.frames)
        if result.skipped:
            return None, stats
        rejected = len(frame.draft) - result.accepted
        expected = frame.pos + frame.hidden.shape[1] - rejected
        if not 0 <= result.accepted <= len(frame.draft) or result.pos != expected:
            raise WorkerLost(f"worker cache holds {result.pos} positions after pipelined step {frame.step}, "
                             f"expected {expected}")
        if waited and self.client.adaptive_timeout:
            timer.observe(now - frame.sent_at)  # only then is the arrival time known
        self.pos = expected
        self._log(frame.hidden, rejected)
        _account(stats, reply, result, (now - frame.sent_at) * 1e3)
        return [*frame.draft[:result.accepted], result.token], stats

    def discard(self, frames: list[PipelinedFrame]) -> None:
        """Stop waiting for frames the edge gave up on: the worker skips them (their condition
        fails) and their answers are dropped as stale."""
        conn = self.client.connection
        for frame in frames:
            if frame.failed is None:
                conn.forget(frame.handle)

    def resend(self, frame: PipelinedFrame) -> tuple[list[int], StepStats]:
        """The frame got no usable answer: give up on everything in flight (a new epoch, so the
        worker may rewind to this frame's position even if it ran later frames) and send it
        again through ``step``, with its copies, failover, replay and local fallback."""
        self.epoch += 1
        # The step's deadline counts from when the frame first went out, not from now.
        started = time.monotonic() - (time.perf_counter() - frame.sent_at)
        return self.step(frame.hidden, frame.step, frame.draft, seen=frame.seen, started=started)

    # --- wire -----------------------------------------------------------------------------------
    def _open(self, step: int, stats: StepStats, timeout_s: float) -> None:
        if self.client.encryption:
            self.client.trusted_workers()  # fail before any traffic if there is no trust list
        if self._opened == self.session_id:
            # An opener went out under this id already: a worker accepts one per id, ever (a
            # second is what a replay looks like), so every attempt opens a new session.
            self.session_id = uuid.uuid4().hex
        self._opened = self.session_id
        keypair = generate_keypair() if self.client.encryption else None
        close_key = new_close_key()
        params = OpenParams(
            edge_pk=keypair.public_key if keypair else b"",
            sampling=self.sampling.to_wire(), wire_dtype=self.client.wire_dtype,
            close_digest=close_digest(close_key), reduction=self.reduction.sha256 if self.reduction else "",
        )
        t0 = time.perf_counter()
        # Listed while the opener is in flight; an interruption (Ctrl-C, SIGTERM) leaves it there,
        # so close() frees what the worker may have made. An error from the cloud takes it off:
        # the retry or the fallback takes over, and a close to a dead broker would only cost time.
        opener = (self.session_id, close_key)
        self._unanswered.append(opener)
        try:
            reply = self.client.connection.request(
                self.session_id, KIND_OPEN, self.model_id, self.split, step, timeout_s=timeout_s,
                extra={**params.to_extra(), TASK_KEY: f"{self.task_base}-{step}-open",
                       **({NEAR_KEY: self.near} if self.near else {})},
            )
        except EdgeCloudError:
            self._unanswered.remove(opener)
            raise
        stats.round_trips += 1
        stats.transport_ms += (time.perf_counter() - t0) * 1e3
        if keypair is None:
            cipher = NullCipher()
        else:
            worker_pk, nonce = reply.header.get("worker_pk", b""), reply.header.get("nonce", b"")
            if not worker_pk:
                raise CryptoError("the worker has no keys, so it cannot encrypt; start it with --keys DIR "
                                  "or run the edge with --no-encryption")
            cipher = SessionCipher.for_edge(keypair.secret_key, bytes(worker_pk), self.session_id,
                                            bytes(nonce), trusted=self.client.trusted_workers())
        check_open_proof(cipher, self.session_id, step, reply.frames)
        self._unanswered.remove(opener)
        self.cipher, self._close_key = cipher, close_key

    def _seen(self, seen: Sequence[int]) -> Sequence[int] | None:
        """What a step carries for the session's repetition penalty (None: it has none)."""
        return seen if self.sampling.uses_history else None

    def _send_frames(self, pending: torch.Tensor, base: int, step: int, stats: StepStats, timeout_s: float,
                     until: float, draft: list[int] | tuple[int, ...] = (), seen: Sequence[int] = (),
                     tree: DraftTree | None = None) -> tuple[int, int]:
        """Send what of ``pending`` (positions ``base`` on) the worker does not hold yet: in one
        frame, or, past ``max_frame_bytes``, in frames of whole 64-position chunks, each answered
        before the next goes (the worker computes the same chunks either way: its prefill runs
        64 positions at a time). The last frame carries the drafts; its answer is the step's.
        After a failure the retry resumes at the first frame not answered. Each frame's wait
        ends by ``until``."""
        rest = pending[:, self.pos - base:]
        width = rest.shape[2] if self.reduction is None else self.reduction.dims
        per_frame = self.client.max_frame_bytes // row_bytes_bound(width, self.client.wire_dtype)
        chunk = max(PREFILL_CHUNK, per_frame // PREFILL_CHUNK * PREFILL_CHUNK)
        # The last frame holds at least the drafts and the position before them (a tree: exactly
        # its rows, so what comes before them, a replay, goes first in frames of its own).
        tail = len(draft) + 1
        while rest.shape[1] - chunk >= tail or (tree is not None and rest.shape[1] > tail):
            size = chunk if rest.shape[1] - chunk >= tail else rest.shape[1] - tail
            wait = min(timeout_s, max(0.05, until - time.monotonic()))
            self._send_step(rest[:, :size], step, stats, wait, seen=seen)
            rest = rest[:, size:]
        wait = min(timeout_s, max(0.05, until - time.monotonic()))
        return self._send_step(rest, step, stats, wait, draft, seen, tree)

    def _send_step(self, hidden: torch.Tensor, step: int, stats: StepStats, timeout_s: float,
                   draft: list[int] | tuple[int, ...] = (), seen: Sequence[int] = (),
                   tree: DraftTree | None = None) -> tuple[int, int]:
        """Returns (drafts accepted, the token after them).

        While unanswered after the adaptive wait (timeouts.py), copies are sent; the first answer wins.
        """
        conn = self.client.connection
        timer = self.client.step_timer
        adaptive = self.client.adaptive_timeout and hidden.shape[1] <= ADAPTIVE_MAX_POSITIONS
        t_first = time.perf_counter()
        end = t_first + timeout_s  # every copy shares the first one's budget
        sent: dict[RequestId, float] = {}
        winner: RequestId | None = None
        wire = self.reduction.project(hidden) if self.reduction else hidden  # (1, T, D or H)
        carried = self._seen(seen)
        try:
            while winner is None:
                frames = seal_step(self.cipher, self.session_id, step, self.pos, wire, self.client.wire_dtype,
                                   draft, epoch=self.epoch, seen=carried,
                                   tree=None if tree is None else tree.parents)
                stats.bytes_sent += sum(len(memoryview(f)) for f in frames)
                now = time.perf_counter()
                rid = conn.submit(self.session_id, KIND_STEP, self.model_id, self.split, step, frames,
                                  timeout_s=max(0.001, end - now), extra={TASK_KEY: f"{self.task_base}-{step}"})
                sent[rid] = now
                wait = timer.copy_wait_s(len(sent), end - now) if adaptive and end > now else None
                if wait is None:  # no more copies: wait for an answer, or a deadline that resets the link
                    winner = conn.wait_any(list(sent), max(0.0, end - now) + IDLE_WAIT_S)
                    continue
                winner = conn.wait_any(list(sent), wait)
                if winner is None:
                    stats.retries += 1
                    log.debug("step %d: no reply after %.0f ms; sending copy %d", step, wait * 1e3, len(sent) + 1)
            reply: Reply = conn.result(winner)
        finally:
            for rid in sent:
                if rid != winner:
                    conn.forget(rid)
        t0 = sent[winner]
        if adaptive:
            timer.observe(time.perf_counter() - t0)
        stats.waiting_ms += (t0 - t_first) * 1e3  # time lost to copies that got no answer
        stats.bytes_received += sum(len(f) for f in reply.frames)
        result = open_step_reply(self.cipher, self.session_id, step, reply.frames)
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        if not 0 <= result.accepted <= len(draft):
            raise WorkerLost(f"the worker accepted {result.accepted} of {len(draft)} drafts")
        if tree is not None:
            path = result.path or ()
            if len(path) != result.accepted:
                raise WorkerLost(f"the worker kept {result.accepted} tree nodes but named {len(path)}")
            _check_path(tree, path)
            self._path = list(path)
            expected = self.pos + 1 + result.accepted
        else:
            expected = self.pos + hidden.shape[1] - (len(draft) - result.accepted)
        if result.pos != expected:
            raise WorkerLost(f"worker cache holds {result.pos} positions, expected {expected}")
        self.pos = expected
        stats.round_trips += 1
        _account(stats, reply, result, elapsed_ms)
        return result.accepted, result.token


def _check_path(tree: DraftTree, path: Sequence[int]) -> None:
    """A worker's path must go down the tree from the root, one child at a time."""
    parent = 0
    for row in path:
        if not 0 < row < tree.rows or tree.parents[row - 1] + 1 != parent:
            raise WorkerLost(f"the worker's path {list(path)} does not go down the tree sent")
        parent = row


def _account(stats: StepStats, reply: Reply, result: StepReply, elapsed_ms: float) -> None:
    """Split a reply's ``elapsed_ms`` (send to receipt) into the worker's compute, its overhead
    around the compute, and the rest: serialisation, encryption and the wire."""
    stats.worker_id = str(reply.worker_id)
    stats.cloud_compute_ms += result.compute_ms
    stats.worker_overhead_ms += max(0.0, result.worker_ms - result.compute_ms)
    stats.transport_ms += max(0.0, elapsed_ms - result.worker_ms)


def _recoverable(exc: EdgeCloudError) -> bool:
    return isinstance(exc, WorkerLost) or bool(getattr(exc, "retryable", False))


def cloud_gone(exc: EdgeCloudError) -> bool:
    """Errors that say the cloud is gone, not slow: no need to wait before running locally."""
    return (isinstance(exc, BrokerUnavailable) and getattr(exc, "gone", False)) or isinstance(exc, NoWorkerAvailable)
