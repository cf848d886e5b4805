"""The job broker: one ROUTER socket between edge clients and cloud workers.

Clients send REQUESTs for a session; the broker pins each session to one
worker when its opener arrives (the one with the most free capacity among the
workers serving the model and split point: batch seats, session slots and
KV-cache memory, as the workers report them; then the least load) and
forwards every later request of that session to the same worker, because the
worker holds the session's KV cache. Bodies are forwarded untouched; the
broker reads headers only.

Failure policy, in one place:

* a worker that misses ``worker_liveness`` heartbeats (or says DISCONNECT, or
  becomes unroutable) is expired at once: its in-flight *restartable*
  requests (openers: no state yet) are dispatched elsewhere, everything else
  of its sessions is answered ``WorkerLost`` immediately, not at a deadline;
* every request has a deadline; missing it answers ``RequestTimeout`` and a
  later reply for that attempt is discarded (and counted);
* poison: a *task* (``protocol.task_of``: the edge names one per step, shared by
  its retries and its replay after a failover) that was in flight on
  ``max_attempts`` different workers when each of them died, hung or missed the
  deadline is answered ``PoisonRequest`` and refused from then on, so one bad
  request cannot take down the whole pool;
* requests that cannot be dispatched wait in one bounded FIFO (``Busy``
  beyond it); an opener with no worker at all for its model waits at most
  ``no_worker_grace_s`` and then gets ``NoWorkerAvailable``;
* malformed input is counted per reason, logged rate-limited, answered with
  ``ProtocolError`` when it looks like a client message, and never stops the
  loop.

The broker is single-threaded: all state is touched only by
:meth:`Broker.serve_forever`. It never imports torch.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections import Counter, OrderedDict, deque
from typing import Any

import zmq

from broker import protocol as p
from broker.config import BrokerConfig
from broker.errors import (
    AuthError,
    BrokerUnavailable,
    Busy,
    EdgeCloudError,
    NoWorkerAvailable,
    PoisonRequest,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    WorkerLost,
)
from broker.protocol import RequestId, SessionId, WorkerId
from broker.sockets import CLOSE_LINGER_MS, Waker, make_socket, poll_timeout_ms, recv_message, send_or_false
from broker.state import (
    PendingRequest,
    PoisonLedger,
    RateLimitedWarnings,
    RequestTimers,
    SessionState,
    WorkerState,
)
from broker.transport import (
    BROKER_KEY_NAME,
    ROLE_CLIENT,
    ROLE_WORKER,
    AllowlistFiles,
    ZapHandler,
    authorize,
    peer_key,
    register_key_mismatch,
    setup_curve_server,
)
from broker.wire.crypto import load_keys

logger = logging.getLogger(__name__)

# Messages handled per poll wake-up before timers run again: keeps deadlines
# and heartbeats on time under a flood without a syscall per message.
RECV_BATCH = 512
MIB = 1 << 20
# The retry hint of a busy answer about load that comes and goes (a full queue, a client's bytes
# in flight): about one long step's time.
BUSY_RETRY_S = 0.5
# An opener that names a worker (protocol.NEAR_KEY) goes there while its batch holds at most this
# many sessions more than the emptiest worker's.
NEAR_SLACK_SESSIONS = 1
IO_THREADS = 2
# Messages libzmq queues per peer before we read them (see Broker.__init__). 1000 still covers 64
# requests in flight per client many times over.
RECV_HWM = 1000
# Upper bound on one poll wait, so a clock jump or a missed timer self-heals.
MAX_POLL_S = 1.0
# With an external stop_event the loop must notice it without a wake-up.
STOP_EVENT_POLL_S = 0.1
# How many lost workers Broker._orphans keeps the dropped sessions of (the most recent ones).
ORPHAN_WORKERS_REMEMBERED = 256
# Dispatches held while reading the socket before they are sent anyway (see Broker._held).
HOLD_DISPATCHES = 64
# What a client refused for its API key is told: where a valid one comes from.
API_KEY_HINT = "check --api-key / EDGECLOUD_API_KEY (a key in the broker's api_keys.txt)"


class Broker:
    """The broker loop. Binds in ``__init__`` (so ``endpoint`` is known), serves in ``serve_forever``.

    The socket is created here and then used only by the thread that runs
    ``serve_forever`` (thread start is a full memory barrier, so handing it
    over once is safe). ``stop()`` may be called from any thread.
    """

    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self._own_context = context is None
        # Two I/O threads: libzmq spreads connections over them, so one connection busy with a
        # large frame (CURVE moves ~230 MiB/s on a core here) does not hold up every other.
        self._ctx = context or zmq.Context(io_threads=IO_THREADS)
        self._sock = make_socket(self._ctx, zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise: dead peers are noticed
        self._allow: AllowlistFiles | None = None
        self._zap: ZapHandler | None = None
        self._worker_keys: dict[bytes, str] = {}  # identity of a registered worker -> its public key (hex)
        self._sender_key = ""  # the CURVE key of the message being handled
        try:
            if config.curve_keys_dir is not None:
                secret = load_keys(config.curve_keys_dir, "broker", BROKER_KEY_NAME).secret_key
                allow = self._allow = AllowlistFiles(config.curve_keys_dir)
                self._zap = ZapHandler(self._ctx, lambda: allow.current)
                setup_curve_server(self._sock, secret)
            # libzmq reads each peer's TCP stream into a queue ahead of us; SOCKET_HWM (10k messages)
            # let one flooding client park 160 MB of 16 KiB requests in this process
            # (bench/bench_flood.py). Beyond RECV_HWM the peer's TCP window closes instead: it waits.
            self._sock.setsockopt(zmq.RCVHWM, RECV_HWM)
            self._sock.bind(config.endpoint)
        except BaseException:
            self._sock.close()
            if self._zap is not None:
                self._zap.close()
            if self._own_context:
                self._ctx.term()
            raise
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._waker = Waker()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._warn = RateLimitedWarnings(logger, config.warn_interval_s)
        self.broker_id = uuid.uuid4().hex[:16]  # this process, as its heartbeats name it
        # Every heartbeat to a worker says the same: our period and who we are (see BrokerHeartbeat).
        self._heartbeat = p.BrokerHeartbeat(interval_ms=max(1, round(config.heartbeat_interval_s * 1000)),
                                            broker_id=self.broker_id)

        self._workers: dict[WorkerId, WorkerState] = {}
        self._by_identity: dict[bytes, WorkerState] = {}
        self._sessions: dict[SessionId, SessionState] = {}
        self._lost: OrderedDict[SessionId, str] = OrderedDict()
        # Sessions dropped with a worker that was declared lost, by worker: if that worker comes
        # back (it had hung, or its heartbeats were late) it still holds their caches, and is told
        # to free them when it registers again instead of keeping them until they idle out.
        self._orphans: OrderedDict[WorkerId, list[SessionId]] = OrderedDict()
        # Connections refused a worker id that another live process holds, and why: their
        # heartbeats are answered with that reason (the worker logs it) until that one is gone.
        self._refused_ids: OrderedDict[bytes, str] = OrderedDict()
        self._done_ids: OrderedDict[RequestId, None] = OrderedDict()
        self._avoid_until: dict[WorkerId, float] = {}  # failed workers, deprioritised until then
        self._poison = PoisonLedger(config.max_attempts, config.tasks_remembered)
        self._requests: dict[RequestId, PendingRequest] = {}
        self._pending_bytes = 0  # body bytes of self._requests
        self._client_bytes: Counter[str] = Counter()  # the same, per client (PendingRequest.client_key)
        self._queue: deque[PendingRequest] = deque()
        self._timers = RequestTimers(self._requests.__contains__, self._requests.__len__)
        self._to_expire: dict[WorkerId, str] = {}
        # Dispatches routed while reading the socket, by worker identity: sent together (_flush)
        # when the socket is drained, every HOLD_DISPATCHES of them, or before anything else
        # goes to that worker, so they keep their order among its messages.
        self._held: dict[bytes, tuple[WorkerId, list[tuple[p.Dispatch, int]]]] = {}  # (dispatch, body bytes)
        self._n_held = 0
        self._sweep_needed = False
        self.counters: Counter[str] = Counter()
        self.protocol_errors: Counter[str] = Counter()
        self._started = time.monotonic()
        self._next_heartbeat = self._started
        self._next_maintenance = self._started
        logger.info("broker bound at %s", self.endpoint)

    # ------------------------------------------------------------- lifecycle
    def serve_forever(self, stop_event: threading.Event | None = None) -> None:
        """Run until :meth:`stop` (or ``stop_event``); then tell peers and close."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._waker.fileno(), zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                if stop_event is not None and stop_event.is_set():
                    break
                now = time.monotonic()
                try:
                    self._run_timers(now)
                    self._flush()
                except Exception:  # a bug must not end every session with the broker
                    self._internal_error("running timers")
                cap = STOP_EVENT_POLL_S if stop_event is not None else MAX_POLL_S
                events = dict(poller.poll(poll_timeout_ms(self._next_wakeup(), now, cap)))
                if self._waker.fileno() in events:
                    self._waker.drain()
                if self._sock in events:
                    try:
                        self._drain_socket()
                    except Exception:
                        self._internal_error("reading the socket")
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask the loop to finish; returns at once (see :meth:`wait_stopped`)."""
        self._stopping.set()
        self._waker.wake()

    def wait_stopped(self, timeout_s: float) -> bool:
        """Wait for the loop to have closed its socket; False on timeout."""
        return self._stopped.wait(timeout_s)

    def _shutdown(self) -> None:
        self._held.clear()  # their requests fail below
        self._n_held = 0
        try:
            for req in list(self._requests.values()):
                self._fail(req, BrokerUnavailable(self.endpoint, "the broker is shutting down"))
            for w in self._workers.values():
                self._send(w.identity, p.BrokerDisconnect(reason="broker shutting down"))
        finally:
            self._sock.close(linger=CLOSE_LINGER_MS)
            self._waker.close()
            if self._zap is not None:
                self._zap.close()
            if self._own_context:
                self._ctx.term()
            self._stopped.set()
            logger.info("broker at %s stopped", self.endpoint)

    # ----------------------------------------------------------------- input
    def _drain_socket(self) -> None:
        for _ in range(RECV_BATCH):
            # Only the routing id (at most 255 bytes) as bytes: a header is size-checked before copying.
            # The header stays a zmq.Frame: with CURVE its User-Id property names the sender's key.
            frames = recv_message(self._sock, 1)
            if frames is None:
                break
            self._handle(frames)
            if self._to_expire:
                self._expire_pending()
            if self._sweep_needed:
                self._sweep_needed = False
                self._pump(time.monotonic(), sweep=True)
            if self._n_held >= HOLD_DISPATCHES:
                self._flush()
        self._flush()

    def _handle(self, frames: list[Any]) -> None:
        identity = frames[0]
        try:
            msg = p.decode(frames[1:])
        except ProtocolError as exc:
            self._bad_input(identity, exc)
            return
        if self._allow is not None and not self._authorized(identity, frames[1], msg):
            return
        handler = _HANDLERS.get(type(msg))
        if handler is None:
            self._bad_input(
                identity, ProtocolError("wrong_direction", f"{type(msg).__name__} is not for the broker")
            )
            return
        try:
            handler(self, identity, msg)
        except Exception as exc:  # one message's bug must not end every session with the broker
            self._internal_error(f"handling {type(msg).__name__}")
            rid = getattr(msg, "request_id", "")
            if isinstance(msg, p.Request | p.Status | p.Ping) and rid and rid not in self._requests:
                # Not tracked, so nothing else will answer it: the client hears why at once.
                self._reply_error(identity, rid, RemoteError("BrokerInternalError", f"{type(exc).__name__}: {exc}"))

    def _internal_error(self, what: str) -> None:
        """Count and log (with its traceback, rate-limited) an exception the loop survived."""
        self.counters["internal_errors"] += 1
        self._warn.warn(f"internal:{what}", "internal error %s (the broker carries on):\n%s", what,
                        traceback.format_exc())

    def _bad_input(self, identity: bytes, exc: ProtocolError) -> None:
        self.protocol_errors[exc.reason] += 1
        self._warn.warn(exc.reason, "malformed message from peer %s: %s", identity.hex(), exc)
        if exc.msg_type in p.CLIENT_TO_BROKER or exc.reason == "bad_version":
            # A peer of another version cannot read our answer either, but failing to read it says
            # why in its own log, where silence would look like a broker that is down.
            self._send(identity, p.Error(request_id=exc.request_id or "", code=exc.code, message=str(exc)))

    # ------------------------------------------------------------- CURVE auth
    def _authorized(self, identity: bytes, header: Any, msg: p.Message) -> bool:
        """Check ``msg`` against the current allowlist and the key its connection authenticated."""
        assert self._allow is not None, "called with CURVE on only"
        key = peer_key(header)
        self._sender_key = key or ""  # _owner reads it while this message is handled
        why = authorize(self._allow.current.get(key), msg)
        if why is None and isinstance(msg, p.Register):
            why = register_key_mismatch(key or "", msg) or self._claimed_by_another_key(identity, key or "", msg)
        if why is None:
            if isinstance(msg, p.Register):
                self._worker_keys[identity] = key or ""
                # Reconnected workers leave their old identities behind: drop them now and then.
                if len(self._worker_keys) > 2 * len(self._by_identity) + 64:
                    self._worker_keys = {i: k for i, k in self._worker_keys.items() if i in self._by_identity}
            return True
        self.counters["auth_refused_messages"] += 1
        self._warn.warn("auth", "refused %s from key %s...: %s", type(msg).__name__, (key or "?")[:16], why)
        if isinstance(msg, p.Request | p.Status | p.Ping):
            self._reply_error(identity, msg.request_id, AuthError(why))
            return False
        # A refused REGISTER, or a registered worker refused now, is told why (it logs it); anything else
        # is dropped silently, so a worker whose key was revoked hears nothing, reconnects, and then
        # fails the handshake for good.
        w = self._by_identity.get(identity)
        if w is not None:
            self._expire_worker(w, f"refused: {why}")
        if w is not None or isinstance(msg, p.Register):
            self._send(identity, p.BrokerDisconnect(reason=f"refused: {why}"))
        return False

    def _claimed_by_another_key(self, identity: bytes, key: str, msg: p.Register) -> str | None:
        """A registered worker's id belongs to the key it registered with while it is registered:
        another key announcing that id would otherwise make the broker drop the real worker and
        every session on it. The same key on a new connection is the worker reconnecting."""
        w = self._workers.get(msg.worker_id)
        if w is None or w.identity == identity:
            return None
        owner = self._worker_keys.get(w.identity)
        if owner is None or owner == key:
            return None
        return f"worker id {msg.worker_id} is registered by another key"

    def _reload_allowlist(self) -> None:
        """Re-read the allowlist if its files changed; workers whose key lost its right go at once."""
        if self._allow is None or not self._allow.reload_if_changed():
            return
        allow = self._allow.current
        for identity, key in list(self._worker_keys.items()):
            w = self._by_identity.get(identity)
            if w is None:
                del self._worker_keys[identity]
                continue
            entry = allow.get(key)
            if entry is None or not entry.may_serve(w.model_id):
                self.counters["workers_revoked"] += 1
                del self._worker_keys[identity]
                self._expire_worker(w, "its key was revoked")
                self._send(identity, p.BrokerDisconnect(reason="refused: this worker's key was revoked"))

    # --------------------------------------------------------- client side
    def _on_request(self, identity: bytes, msg: p.Request) -> None:
        now = time.monotonic()
        self.counters["requests_received"] += 1
        cfg = self.config
        if cfg.api_keys and msg.api_key not in cfg.api_keys:
            self.counters["auth_failures"] += 1
            self._reply_error(
                identity, msg.request_id, AuthError(f"invalid API key; {API_KEY_HINT}")
            )
            return
        if msg.request_id in self._requests or msg.request_id in self._done_ids:
            # A copy of a request in flight or already answered: its original gets (or got) the
            # one answer. Answering the copy with an error would reach the client first and be
            # taken as the result; running it again would apply a step twice.
            self.counters["duplicate_requests_dropped"] += 1
            return
        if self._poison.is_poison(msg):
            self.counters["poison_refused"] += 1
            self._reply_error(identity, msg.request_id, self._poison_error(msg))
            return
        budget_s = msg.deadline_ms / 1000 if msg.deadline_ms else cfg.default_deadline_s
        nbytes = sum(p.frame_nbytes(f) for f in msg.frames)
        if nbytes > cfg.max_request_bytes:
            self.counters["too_large_refused"] += 1
            self._reply_error(identity, msg.request_id, ProtocolError("too_large", (
                f"a request of {nbytes / MIB:.1f} MiB is over this broker's limit of "
                f"{cfg.max_request_bytes / MIB:.1f} MiB (--max-request-mb); send long prompts in smaller "
                "frames (edge --max-frame-mb)")))  # fmt: skip
            return
        owner = self._owner(msg)
        client_key = owner if owner is not None else f"conn:{identity.hex()}"
        if self._pending_bytes + nbytes > cfg.max_pending_bytes:
            self.counters["busy"] += 1
            self._reply_error(identity, msg.request_id, Busy(
                f"the broker holds {self._pending_bytes / MIB:.1f} MiB of requests (limit "
                f"{cfg.max_pending_bytes / MIB:.1f} MiB); retry later", BUSY_RETRY_S))  # fmt: skip
            return
        held = self._client_bytes.get(client_key, 0)
        if cfg.max_client_bytes and held + nbytes > cfg.max_client_bytes:
            self.counters["busy"] += 1
            self.counters["client_bytes_refused"] += 1
            self._reply_error(identity, msg.request_id, Busy(
                f"this client has {held / MIB:.1f} MiB of requests in flight, its limit at this broker is "
                f"{cfg.max_client_bytes / MIB:.1f} MiB (--max-client-mb); retry when some are answered",
                BUSY_RETRY_S))  # fmt: skip
            return
        req = PendingRequest(msg, identity, now, now + min(budget_s, cfg.max_deadline_s), nbytes=nbytes,
                             owner=owner, client_key=client_key)
        session = self._sessions.get(msg.session_id)
        if session is None:
            if msg.kind not in cfg.open_kinds:
                why = self._lost.get(msg.session_id, "it was never opened, was closed, or expired")
                self.counters["worker_lost"] += 1
                self._reply_error(identity, msg.request_id, WorkerLost(
                    f"session {msg.session_id} is not held by any worker ({why}); reopen it"))  # fmt: skip
                return
            if msg.session_id in self._lost:
                # An id is opened once (edges open every attempt and every failover under a new
                # one): an opener for an ended session is a replay, refused before any worker.
                self.counters["reopen_refused"] += 1
                self._reply_error(identity, msg.request_id, ProtocolError("session_reused", (
                    f"session {msg.session_id} was opened before ({self._lost[msg.session_id]}); "
                    "open a new session id")))  # fmt: skip
                return
            if owner is not None and cfg.max_sessions_per_client:
                mine = [s for s in self._sessions.values() if s.owner == owner]
                if len(mine) >= cfg.max_sessions_per_client:
                    # The hint: when its first idle session expires (or, all busy, a full idle period).
                    idle = [s.last_used + cfg.session_idle_s - now for s in mine if s.outstanding <= 0]
                    retry_s = max(BUSY_RETRY_S, min(idle, default=cfg.session_idle_s))
                    self.counters["busy"] += 1
                    self.counters["client_quota_refused"] += 1
                    self._reply_error(identity, msg.request_id, Busy(
                        f"this client holds {len(mine)} sessions, its limit at this broker "
                        f"(--max-sessions-per-client); close finished ones, or retry in {retry_s:.0f} s when "
                        "an idle one expires", retry_s))  # fmt: skip
                    return
            session = SessionState(msg.session_id, msg.model_id, None, now, owner=owner)
        elif session.owner is not None and owner != session.owner:
            # Only the client that opened a session may use it: its id alone proves nothing.
            self.counters["auth_refused_sessions"] += 1
            self._reply_error(identity, msg.request_id, AuthError(
                f"session {msg.session_id} belongs to another client"))  # fmt: skip
            return
        elif msg.kind in cfg.open_kinds:
            # Its own opener made the record; a second one is a replay (edges open every attempt
            # under a new id). Refused here, so that its failure cannot take the session along.
            self.counters["reopen_refused"] += 1
            self._reply_error(identity, msg.request_id, ProtocolError("session_reused", (
                f"session {msg.session_id} is already open (or opening); open a new session id")))  # fmt: skip
            return
        elif session.model_id != msg.model_id:
            self._reply_error(identity, msg.request_id, ProtocolError(
                "session_model_mismatch", f"session {msg.session_id} belongs to model {session.model_id}"))  # fmt: skip
            return
        self._requests[msg.request_id] = req
        self._pending_bytes += nbytes
        self._client_bytes[client_key] += nbytes
        self._sessions[msg.session_id] = session
        session.outstanding += 1
        session.last_used = now
        self._timers.push(req.deadline, "deadline", msg.request_id)
        self._route(req, session, now)

    def _owner(self, msg: p.Request) -> str | None:
        """Who sends ``msg``, as sessions are bound to it: the CURVE key its connection
        authenticated, else its API key; None when the broker checks neither."""
        if self._allow is not None:
            return f"key:{self._sender_key}"
        if self.config.api_keys:
            return f"api:{msg.api_key}"
        return None

    def _on_status(self, identity: bytes, msg: p.Status) -> None:
        if self.config.api_keys and msg.api_key not in self.config.api_keys:
            self.counters["auth_failures"] += 1
            self._reply_error(identity, msg.request_id, AuthError(f"invalid API key for STATUS; {API_KEY_HINT}"))
            return
        self._send(identity, p.StatusReply(request_id=msg.request_id, status=self.status()))

    def _on_ping(self, identity: bytes, msg: p.Ping) -> None:
        self._send(identity, p.Pong(request_id=msg.request_id))

    # --------------------------------------------------------- worker side
    def _on_register(self, identity: bytes, msg: p.Register) -> None:
        now = time.monotonic()
        old = self._workers.get(msg.worker_id)
        if (old is not None and old.identity != identity and old.pid != msg.pid
                and now - old.last_seen <= self.config.worker_expiry_s):
            # Another process, while the holder still beats: two workers given one --worker-id.
            # Taking it would expire the holder, whose next heartbeat would take it back, and so on
            # every second; the holder keeps it, the newcomer is refused until the holder is gone
            # (a worker restarted under its old id waits out the old one's missed heartbeats).
            self.counters["duplicate_worker_ids_refused"] += 1
            self._refused_ids[identity] = (
                f"worker id {msg.worker_id} is held by another live worker (pid {old.pid}) at this broker; "
                "give each worker its own --worker-id (this one is refused while that one runs)")
            while len(self._refused_ids) > 1024:
                self._refused_ids.popitem(last=False)
            self._warn.warn(f"duplicate_worker_id:{msg.worker_id}", "refused a second worker with id %s (pid %d): "
                            "pid %d holds it", msg.worker_id, msg.pid, old.pid)  # fmt: skip
            return
        self._refused_ids.pop(identity, None)
        if old is not None and old.identity != identity:
            # Same worker on a new connection: whatever was in flight on the
            # old socket is gone, and we cannot know which caches survived.
            self._expire_worker(old, "re-registered from a new connection")
        prev = self._by_identity.get(identity)
        if prev is not None and prev.worker_id != msg.worker_id:
            self._expire_worker(prev, f"connection re-registered as {msg.worker_id}")
        if prev is not None and prev.worker_id == msg.worker_id:
            w = prev  # a repeated REGISTER on the same connection: refresh what it serves
            w.model_id, w.layer_ranges, w.public_key = msg.model_id, msg.layer_ranges, msg.public_key
            w.per_layer_ms, w.pid, w.max_sessions, w.max_batch, w.cache_limit_bytes, w.last_seen = (
                msg.per_layer_ms,
                msg.pid,
                msg.max_sessions,
                msg.max_batch,
                msg.cache_limit_bytes,
                now,
            )
        else:
            w = WorkerState.from_register(msg, identity, now)
            self._workers[w.worker_id] = w
            self._by_identity[identity] = w
            self.counters["workers_registered"] += 1
            logger.info("worker %s (pid %d) registered: model %s layers %s", w.worker_id, w.pid, w.model_id,
                        list(w.layer_ranges))  # fmt: skip
        self._send(identity, self._heartbeat)
        # Whatever this worker held when it was declared lost is gone for its edges (they reopen):
        # it frees them now. A session whose opener is being run again stays until that opener
        # has landed on another worker, as it may come back here.
        for sid in self._orphans.pop(msg.worker_id, []):
            session = self._sessions.get(sid)
            if session is not None and session.worker_id is None:
                session.stale_on = msg.worker_id  # freed here once it lands elsewhere (_pin)
                continue
            if session is None or session.worker_id != msg.worker_id:
                self._drop_orphan(identity, sid)
        self._pump(now)

    def _known_worker(self, identity: bytes) -> WorkerState | None:
        w = self._by_identity.get(identity)
        if w is None:
            self.counters["messages_from_unknown_workers"] += 1
            self._send(identity, p.Reregister(reason=self._refused_ids.get(identity, "unknown worker; register again")))
            return None
        w.last_seen = time.monotonic()
        return w

    def _on_heartbeat(self, identity: bytes, msg: p.Heartbeat) -> None:
        w = self._known_worker(identity)
        if w is not None:
            w.reported_sessions, w.reported_queue_depth = msg.active_sessions, msg.queue_depth
            w.per_layer_ms = msg.per_layer_ms
            w.mean_batch, w.tokens_per_s, w.cache_bytes = msg.mean_batch, msg.tokens_per_s, msg.cache_bytes
            w.prefix_bytes, w.prefix_reused = msg.prefix_bytes, msg.prefix_reused

    def _on_disconnect(self, identity: bytes, msg: p.Disconnect) -> None:
        w = self._by_identity.get(identity)
        if w is not None:
            self._expire_worker(w, "disconnected")

    def _take_attempt(self, w: WorkerState, request_id: RequestId, attempt: int) -> PendingRequest | None:
        """The pending request this reply answers, or None (late or foreign reply: discarded)."""
        req = self._requests.get(request_id)
        if req is None or req.worker_id != w.worker_id or req.attempt != attempt:
            w.abandoned.pop(request_id, None)
            self.counters["late_replies_discarded"] += 1
            return None
        w.in_flight.pop(request_id, None)
        return req

    def _on_worker_reply(self, identity: bytes, msg: p.WorkerReply, pump: bool = True) -> None:
        w = self._known_worker(identity)
        if w is None:
            self.counters["late_replies_discarded"] += 1
            return
        req = self._take_attempt(w, msg.request_id, msg.attempt)
        if req is None:
            return
        r = req.request
        self._send(req.client, p.Reply(request_id=r.request_id, session_id=r.session_id, step=msg.step,
                                       worker_id=w.worker_id, attempt=req.attempt, extra=msg.extra,
                                       frames=msg.frames), validate=False)  # fmt: skip
        self.counters["requests_served"] += 1
        if r.kind in self.config.close_kinds:
            self._remember_ended(r.session_id, "closed by its client")
        self._finish(req, drop_session=r.kind in self.config.close_kinds)
        if pump:
            self._pump(time.monotonic())

    def _on_worker_replies(self, identity: bytes, msg: p.WorkerReplies) -> None:
        """Each reply as if it came alone (one that fails does not keep the others from their
        clients), then one pass over the queue for the slots they freed."""
        if self._known_worker(identity) is None:  # told to register again, once
            self.counters["late_replies_discarded"] += len(msg.replies)
            return
        for reply in msg.split():
            try:
                self._on_worker_reply(identity, reply, pump=False)
            except Exception:  # noqa: BLE001 - counted and logged; the next reply goes on
                self._internal_error("handling a WorkerReply of a WorkerReplies")
        self._pump(time.monotonic())

    def _on_worker_error(self, identity: bytes, msg: p.WorkerError) -> None:
        w = self._known_worker(identity)
        if w is None:
            self.counters["late_replies_discarded"] += 1
            return
        req = self._take_attempt(w, msg.request_id, msg.attempt)
        if req is None:
            return
        self.counters["worker_errors"] += 1
        self._send(req.client, p.Error(request_id=req.request_id, code=msg.code, message=msg.message))
        # A failed opener leaves no session behind on the worker.
        self._finish(req, drop_session=req.request.kind in self.config.open_kinds)
        self._pump(time.monotonic())

    # -------------------------------------------------------------- routing
    def _eligible(self, model_id: str, layer_lo: int) -> list[WorkerState]:
        return [w for w in self._workers.values() if w.serves(model_id, layer_lo)]

    def _route(self, req: PendingRequest, session: SessionState, now: float, front: bool = False) -> None:
        """Dispatch ``req`` now if its worker has a free slot and nothing of its session waits; else queue it."""
        if session.worker_id is None and req.request.kind in self.config.open_kinds:
            if not self._pin(req, session, now):
                return
        w = self._workers.get(session.worker_id) if session.worker_id else None
        if w is not None and self._has_room(w, req) and session.queued == 0:
            self._dispatch(req, w, now)
            return
        if len(self._queue) >= self.config.max_queue:
            self.counters["busy"] += 1
            self._fail(req, Busy(f"broker queue full ({self.config.max_queue} requests); retry later", BUSY_RETRY_S))
            return
        req.queued = True
        session.queued += 1
        if front:
            self._queue.appendleft(req)
        else:
            self._queue.append(req)
        if session.worker_id is None:
            self._timers.push(min(now + self.config.no_worker_grace_s, req.deadline), "grace", req.request_id)

    def _slots(self, w: WorkerState) -> int:
        """Attempts ``w`` may hold at once: enough to fill the batch it computes together."""
        return max(self.config.worker_max_in_flight, w.max_batch)

    def _has_room(self, w: WorkerState, req: PendingRequest) -> bool:
        """Whether ``req`` may go to ``w`` now: a slot is free, and the bodies on their way to it
        stay under ``worker_max_in_flight_bytes`` (one request always may go), so the broker's
        heartbeats to ``w`` never queue behind more than that."""
        if w.busy_slots() >= self._slots(w):
            return False
        return not w.in_flight or sum(w.in_flight.values()) + req.nbytes <= self.config.worker_max_in_flight_bytes

    def _pin(self, req: PendingRequest, session: SessionState, now: float) -> bool:
        """Choose a worker for a new session; False if ``req`` was answered instead of pinned.

        With no worker at all for the model the session stays unpinned and
        the request waits (``no_worker_grace_s``); True is returned then too.
        """
        r = req.request
        eligible = self._eligible(r.model_id, r.layer_lo)
        if not eligible:
            return True
        roomy = [w for w in eligible if len(w.sessions) < w.max_sessions]
        if not roomy:
            self.counters["busy"] += 1
            self._fail(req, Busy(f"all {len(eligible)} workers for {r.model_id} hold their maximum sessions",
                                 BUSY_RETRY_S))
            return False
        now = time.monotonic()
        # The most free capacity (batch seats, session slots, cache memory), then the least load.
        w = min(roomy, key=lambda c: (self._avoid_until.get(c.worker_id, 0.0) > now, -c.free_capacity(), c.load()))
        near = self._workers.get(p.near_of(r) or "")
        if (near is not None and near in roomy and self._avoid_until.get(near.worker_id, 0.0) <= now
                and near.free_capacity() > 0 and near.free_capacity() >= w.free_capacity() - NEAR_SLACK_SESSIONS):
            # It holds what this session continues: a seat there beats a prefill elsewhere, while
            # its batch is at most one session fuller (a fuller batch slows every token after).
            w = near
            self.counters["placed_near"] += 1
        session.worker_id = w.worker_id
        w.sessions.add(session.session_id)
        self._lost.pop(session.session_id, None)
        self._free_stale_copy(session)
        return True

    def _free_stale_copy(self, session: SessionState) -> None:
        """The worker that hung opening ``session`` and came back before its opener ran again frees
        its copy, now that the session is pinned elsewhere or gone (on that worker: kept)."""
        stale, session.stale_on = session.stale_on, None
        w = self._workers.get(stale) if stale is not None and stale != session.worker_id else None
        if w is not None:
            self._drop_orphan(w.identity, session.session_id)

    def _drop_orphan(self, identity: bytes, session_id: SessionId) -> None:
        self.counters["orphans_dropped"] += 1
        self._send(identity, p.DropSession(session_id=session_id, reason="worker was declared lost; session lost"))

    def _unqueue(self, req: PendingRequest, remove: bool) -> None:
        """Account for ``req`` leaving the queue (``remove``: it is still in the deque)."""
        if not req.queued:
            return
        req.queued = False
        session = self._sessions.get(req.session_id)
        if session is not None:
            session.queued -= 1
        if remove:
            try:
                self._queue.remove(req)
            except ValueError:
                pass

    def _dispatch(self, req: PendingRequest, w: WorkerState, now: float) -> None:
        self._unqueue(req, remove=False)
        req.attempt += 1
        req.worker_id = w.worker_id
        w.in_flight[req.request_id] = req.nbytes
        r = req.request
        msg = p.Dispatch(request_id=r.request_id, session_id=r.session_id, model_id=r.model_id, step=r.step,
                         attempt=req.attempt, kind=r.kind, deadline_ms=max(0, int((req.deadline - now) * 1000)),
                         layer_lo=r.layer_lo, extra=r.extra, frames=r.frames)  # fmt: skip
        held = self._held.get(w.identity)
        if held is None:
            held = self._held[w.identity] = (w.worker_id, [])
        held[1].append((msg, req.nbytes))
        self._n_held += 1
        if req.attempt > 1:
            self.counters["redispatched"] += 1

    def _flush(self) -> None:
        """Send the held dispatches; a worker that cannot be reached is expired, and what that
        routes elsewhere is sent too."""
        while self._held:
            for identity in list(self._held):
                self._flush_to(identity)
            if self._to_expire:
                self._expire_pending()

    def _flush_to(self, identity: bytes) -> None:
        """Send one worker's held dispatches: one DISPATCH, else DISPATCHES of at most
        MAX_BODY_FRAMES steps and frames, and MAX_MESSAGE_BYTES, each."""
        worker_id, held = self._held.pop(identity)
        self._n_held -= len(held)
        group: list[p.Dispatch] = []
        n_frames = n_bytes = 0
        for msg, nbytes in held:
            if group and (len(group) == p.MAX_BODY_FRAMES or n_frames + len(msg.frames) > p.MAX_BODY_FRAMES
                          or n_bytes + nbytes > p.MAX_MESSAGE_BYTES):
                if not self._send_dispatches(identity, group):
                    break
                group, n_frames, n_bytes = [], 0, 0
            group.append(msg)
            n_frames += len(msg.frames)
            n_bytes += nbytes
        else:
            if self._send_dispatches(identity, group):
                return
        self.counters["unroutable_sends"] += 1
        self._to_expire.setdefault(worker_id, "unreachable")

    def _send_dispatches(self, identity: bytes, group: list[p.Dispatch]) -> bool:
        if len(group) == 1:
            return send_or_false(self._sock, [identity, *p.encode(group[0], validate=False)])
        try:
            frames = p.encode(p.Dispatches.of(group), validate=False)  # every field was validated on arrival
        except ProtocolError:  # their headers together are too large: one by one
            return all(send_or_false(self._sock, [identity, *p.encode(m, validate=False)]) for m in group)
        return send_or_false(self._sock, [identity, *frames])

    def _pump(self, now: float, sweep: bool = False) -> None:
        """Dispatch queued requests, oldest first, wherever a slot is free.

        Stops as soon as no worker has a free slot, so a long queue behind
        busy workers costs nothing per reply. ``sweep`` walks the whole queue
        regardless, to answer requests whose session was lost meanwhile.
        """
        if not self._queue:
            return
        free = sum(max(0, self._slots(w) - w.busy_slots()) for w in self._workers.values())
        if free == 0 and not sweep:
            return
        blocked: set[SessionId] = set()
        keep: deque[PendingRequest] = deque()
        while self._queue and (free > 0 or sweep):
            req = self._queue.popleft()
            sid = req.session_id
            session = self._sessions.get(sid)
            if session is None:
                req.queued = False
                self.counters["worker_lost"] += 1
                why = self._lost.get(sid, "its worker is gone")
                self._fail(req, WorkerLost(f"session {sid} was lost ({why}); reopen it"))
                continue
            if (
                sid not in blocked
                and session.worker_id is None
                and req.request.kind in self.config.open_kinds
            ):
                if not self._pin(req, session, now):
                    continue
            w = self._workers.get(session.worker_id) if session.worker_id else None
            if sid in blocked or w is None or not self._has_room(w, req):
                blocked.add(sid)
                keep.append(req)
                continue
            self._dispatch(req, w, now)
            free -= 1
        keep.extend(self._queue)
        self._queue = keep

    # ------------------------------------------------------- completion
    def _finish(self, req: PendingRequest, drop_session: bool = False) -> None:
        """Forget an answered request; ``drop_session`` also unpins its session (close, failed open)."""
        if self._requests.pop(req.request_id, None) is not None:
            self._pending_bytes -= req.nbytes
            left = self._client_bytes[req.client_key] - req.nbytes
            if left > 0:
                self._client_bytes[req.client_key] = left
            else:
                del self._client_bytes[req.client_key]
        self._done_ids[req.request_id] = None
        if len(self._done_ids) > self.config.done_requests_remembered:
            self._done_ids.popitem(last=False)
        self._unqueue(req, remove=True)
        session = self._sessions.get(req.session_id)
        if session is None:
            return
        session.outstanding -= 1
        if drop_session or (session.worker_id is None and session.outstanding <= 0):
            self._drop_session(session, notify=False)

    def _remember_ended(self, session_id: SessionId, why: str) -> None:
        """Keep why a session ended: later requests for it hear it, and its id is not opened again."""
        self._lost[session_id] = why
        self._lost.move_to_end(session_id)
        while len(self._lost) > self.config.lost_sessions_remembered:
            self._lost.popitem(last=False)

    def _drop_session(self, session: SessionState, notify: bool, reason: str = "") -> None:
        self._sessions.pop(session.session_id, None)
        if session.worker_id is None:
            self._free_stale_copy(session)
        w = self._workers.get(session.worker_id) if session.worker_id else None
        if w is not None:
            w.sessions.discard(session.session_id)
            if notify:
                self._send(w.identity, p.DropSession(session_id=session.session_id, reason=reason))

    def _fail(self, req: PendingRequest, err: EdgeCloudError) -> None:
        """Answer ``req`` with ``err`` and forget it.

        An attempt still in flight becomes *abandoned* (it keeps loading its
        worker until its late reply arrives or ``abandoned_grace_s`` passes).
        A failed opener takes its session with it, and the worker is told to
        free whatever the opener may still create.
        """
        w = self._workers.get(req.worker_id) if req.worker_id is not None else None
        if w is not None and req.request_id in w.in_flight:
            del w.in_flight[req.request_id]
            w.abandoned[req.request_id] = time.monotonic() + self.config.abandoned_grace_s
        self._reply_error(req.client, req.request_id, err)
        is_open = req.request.kind in self.config.open_kinds
        session = self._sessions.get(req.session_id)
        self._finish(req)
        if is_open and session is not None and session.session_id in self._sessions:
            self._drop_session(session, notify=True, reason=f"opener failed: {err.code}")
            if session.queued > 0:
                self._sweep_needed = True  # its queued followers must be answered too

    # --------------------------------------------------------- worker loss
    def _expire_pending(self) -> None:
        while self._to_expire:
            wid, reason = self._to_expire.popitem()
            w = self._workers.get(wid)
            if w is not None:
                self._expire_worker(w, reason)
                self._avoid_until[wid] = time.monotonic() + self.config.failed_worker_avoid_s
        if len(self._avoid_until) > self.config.lost_sessions_remembered:
            now = time.monotonic()
            self._avoid_until = {k: t for k, t in self._avoid_until.items() if t > now}

    def _expire_worker(self, w: WorkerState, reason: str) -> None:
        """Remove ``w``; re-run its restartable attempts elsewhere, fail the rest with WorkerLost."""
        now = time.monotonic()
        self._workers.pop(w.worker_id, None)
        self._by_identity.pop(w.identity, None)
        held = self._held.pop(w.identity, None)  # re-run or failed below, with the rest in flight
        if held is not None:
            self._n_held -= len(held[1])
        self.counters["workers_expired"] += 1
        logger.warning("worker %s (pid %d) lost: %s; %d sessions, %d in flight", w.worker_id, w.pid, reason,
                       len(w.sessions), len(w.in_flight))  # fmt: skip
        why = f"worker {w.worker_id} {reason}"
        cfg = self.config
        restart, lost = [], []
        for rid in w.in_flight:
            req = self._requests.get(rid)
            if req is None:
                continue
            req.worker_id = None
            poisoned = self._poison.record(req.request, w.worker_id)
            ok = (
                req.request.kind in cfg.restartable_kinds
                and req.attempt < cfg.max_attempts
                and now < req.deadline
                and not poisoned
            )
            (restart if ok else lost).append(req)
        w.in_flight.clear()
        restart_sids = {req.session_id for req in restart}
        for sid in w.sessions:
            session = self._sessions.get(sid)
            if session is not None and sid in restart_sids:
                session.worker_id = None  # its opener runs again elsewhere; keep its counts
                self._orphans.setdefault(w.worker_id, []).append(sid)  # freed here if it lands elsewhere
                continue
            self._sessions.pop(sid, None)
            self._remember_ended(sid, why)
            self._orphans.setdefault(w.worker_id, []).append(sid)
        # Sessions it may hold a copy of from before an earlier loss (an opener rerun still unplaced).
        stale = [sid for sid, s in self._sessions.items() if s.stale_on == w.worker_id]
        if stale:
            self._orphans.setdefault(w.worker_id, []).extend(stale)
        while len(self._orphans) > ORPHAN_WORKERS_REMEMBERED:
            self._orphans.popitem(last=False)
        for req in lost:
            r = req.request
            if self._poison.is_poison(r):
                self.counters["poison_requests"] += 1
                self._fail(req, self._poison_error(r))
                continue
            self.counters["worker_lost"] += 1
            self._fail(req, WorkerLost(f"{why} while computing {r.kind} {r.step} of session "
                                       f"{r.session_id}; its cache is gone, reopen the session"))  # fmt: skip
        for req in reversed(restart):  # appendleft in reverse keeps their order at the queue head
            session = self._sessions.get(req.session_id)
            if session is None:
                session = self._sessions[req.session_id] = SessionState(
                    req.session_id, req.request.model_id, None, now, outstanding=1, owner=req.owner)  # fmt: skip
            self._route(req, session, now, front=True)
        self._pump(now, sweep=True)

    # ---------------------------------------------------------------- poison
    def _poison_error(self, r: p.Request) -> PoisonRequest:
        failed_on = self._poison.failed_on(r)
        return PoisonRequest(
            f"{r.kind} step {r.step} of session {r.session_id} (task {p.task_of(r)}) was refused: that work "
            f"already failed on {len(failed_on)} workers ({', '.join(failed_on)}), each dying, hanging or "
            f"missing the deadline while holding it (limit: --max-attempts {self.config.max_attempts}); "
            "it is likely what makes them fail, so it is not run again")

    # ---------------------------------------------------------------- timers
    def _next_wakeup(self) -> float:
        nxt = min(self._next_heartbeat, self._next_maintenance)
        due = self._timers.next_due()
        if due is not None:
            nxt = min(nxt, due)
        return nxt

    def _unserved(self, req: PendingRequest) -> bool:
        """``req`` waits in the queue for a session that no worker was found for."""
        session = self._sessions.get(req.session_id)
        return req.queued and session is not None and session.worker_id is None

    def _fail_unserved(self, req: PendingRequest, now: float) -> None:
        self.counters["no_worker"] += 1
        r = req.request
        self._fail(req, NoWorkerAvailable(f"no worker serves model {r.model_id} from layer {r.layer_lo} "
                                          f"(waited {now - req.received_at:.1f}s)"))

    def _run_timers(self, now: float) -> None:
        for kind, rid in self._timers.due(now):
            req = self._requests.get(rid)
            if req is None:
                continue
            if kind == "deadline" and req.deadline <= now:
                if req.worker_id is not None and self._poison.record(req.request, req.worker_id):
                    self.counters["poison_requests"] += 1
                    self._fail(req, self._poison_error(req.request))
                    continue
                if self._unserved(req):
                    # Its deadline came before the grace: the reason is still that no worker
                    # serves it, which the edge must see (a timeout reads as a slow worker).
                    self._fail_unserved(req, now)
                    continue
                self.counters["timeouts"] += 1
                where = f"dispatched to worker {req.worker_id}" if req.worker_id else "queued"
                self._fail(req, RequestTimeout(f"request {rid} ({req.request.kind}) missed its "
                                               f"{req.deadline - req.received_at:.3f}s deadline ({where})"))  # fmt: skip
            elif kind == "grace" and self._unserved(req):
                self._fail_unserved(req, now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            for w in list(self._workers.values()):
                if now - w.last_seen > self.config.worker_expiry_s:
                    self._to_expire.setdefault(w.worker_id, f"missed heartbeats for {now - w.last_seen:.2f}s")
                elif not self._send(w.identity, self._heartbeat):
                    self._to_expire.setdefault(w.worker_id, "unreachable")
            self._expire_pending()
        if self._to_expire:
            self._expire_pending()
        if self._sweep_needed:
            self._sweep_needed = False
            self._pump(now, sweep=True)
        if now >= self._next_maintenance:
            self._next_maintenance = now + self.config.heartbeat_interval_s
            self._maintenance(now)

    def _maintenance(self, now: float) -> None:
        self._reload_allowlist()
        for w in self._workers.values():
            for rid in [rid for rid, until in w.abandoned.items() if until <= now]:
                del w.abandoned[rid]
        idle = [s for s in self._sessions.values()
                if s.outstanding <= 0 and now - s.last_used > self.config.session_idle_s]  # fmt: skip
        for s in idle:
            self.counters["sessions_expired"] += 1
            self._remember_ended(s.session_id, "expired after being idle")
            self._drop_session(s, notify=True, reason="idle session expired")
        if idle:
            self._pump(now)

    # ---------------------------------------------------------------- output
    def _send(self, identity: bytes, msg: p.Message, validate: bool = True) -> bool:
        if identity in self._held:  # what was routed to a worker before goes before
            self._flush_to(identity)
        ok = send_or_false(self._sock, [identity, *p.encode(msg, validate)])
        if not ok:
            self.counters["unroutable_sends"] += 1
        return ok

    def _reply_error(self, identity: bytes, request_id: str, err: EdgeCloudError) -> None:
        retry_ms = int(getattr(err, "retry_after_s", 0.0) * 1000)
        self._send(identity, p.Error(request_id=request_id, code=err.code, message=str(err), retry_after_ms=retry_ms))

    def status(self) -> dict[str, Any]:
        """The STATUS map (also handy for tests and logs)."""
        now = time.monotonic()
        return {
            "endpoint": self.endpoint,
            "protocol_version": p.PROTOCOL_VERSION,
            "uptime_s": round(now - self._started, 3),
            "workers": [
                {**w.status(now), "avoided_for_s": round(max(0.0, self._avoid_until.get(w.worker_id, 0.0) - now), 1)}
                for w in self._workers.values()
            ],
            "sessions": len(self._sessions),
            "in_flight": sum(len(w.in_flight) for w in self._workers.values()),
            "pending_requests": len(self._requests),
            "pending_bytes": self._pending_bytes,
            "queue_depth": len(self._queue),
            "counters": dict(self.counters),
            "protocol_errors": dict(self.protocol_errors),
            "transport": self._transport_status(),
        }

    def _transport_status(self) -> dict[str, Any]:
        if self._allow is None or self._zap is None:
            return {"curve": False}
        allow = self._allow.current
        return {"curve": True, "allowed_clients": allow.count(ROLE_CLIENT), "allowed_workers": allow.count(ROLE_WORKER),
                "handshakes": dict(self._zap.counts)}  # fmt: skip


_HANDLERS = {
    p.Request: Broker._on_request,
    p.Status: Broker._on_status,
    p.Ping: Broker._on_ping,
    p.Register: Broker._on_register,
    p.Heartbeat: Broker._on_heartbeat,
    p.WorkerReply: Broker._on_worker_reply,
    p.WorkerReplies: Broker._on_worker_replies,
    p.WorkerError: Broker._on_worker_error,
    p.Disconnect: Broker._on_disconnect,
}


def run_broker(config: BrokerConfig, stop_event: threading.Event | None = None) -> None:
    """Bind and serve until ``stop_event`` is set (or forever)."""
    Broker(config).serve_forever(stop_event)
