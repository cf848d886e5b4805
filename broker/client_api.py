"""The client (edge) side of the broker protocol.

One DEALER socket, used by one thread. Requests are matched to replies by
request id, so several may be in flight (:meth:`BrokerClient.submit` /
:meth:`BrokerClient.result`); replies for ids we no longer wait for are
stale and dropped. Every wait has a deadline: the broker always answers a
request by its deadline (with ``RequestTimeout`` if need be), so silence
beyond deadline + ``reply_grace_s`` means the broker is unreachable; we then
raise :class:`BrokerUnavailable` and rebuild the socket so that the next
call starts clean instead of inheriting a half-dead connection's queue.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from broker import protocol as p
from broker.errors import AuthError, BrokerUnavailable, EdgeCloudError, ProtocolError, error_from_code
from broker.protocol import RequestId, SessionId, WorkerId
from broker.sockets import close_socket, make_socket, poll_timeout_ms, recv_message, send_frames
from broker.transport import CurveClientKeys, HandshakeWatch, setup_curve_client

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientConfig:
    """Client timing."""

    default_timeout_s: float = 30.0  # request budget when the caller names none
    reply_grace_s: float = 1.0  # wait beyond a request's deadline for the broker's own timeout answer
    # A request sent while the broker is known gone waits this long for a reconnection (a broker
    # restarting) before it fails with BrokerUnavailable(gone=True).
    reconnect_wait_s: float = 0.3


@dataclass(frozen=True)
class Reply:
    """A worker's answer, as delivered by the broker."""

    request_id: RequestId
    session_id: SessionId
    step: int
    worker_id: WorkerId
    attempt: int
    header: dict[str, Any]  # the worker's extra header fields
    frames: list[memoryview]  # body frames, read-only buffers owned by ZeroMQ


Outcome = Reply | EdgeCloudError | dict[str, Any] | None


_id_prefix: tuple[int, str] = (-1, "")  # (pid, 16 random hex digits), fresh in every process
_id_counter = itertools.count()


def new_request_id() -> RequestId:
    """A request id unique across clients (the broker keys on it): 16 random hex digits drawn once
    per process, then a counter; 32 characters, like a uuid4 hex, at a tenth of its cost."""
    global _id_prefix
    pid = os.getpid()
    if _id_prefix[0] != pid:  # first call, or a forked child: never reuse the parent's ids
        _id_prefix = (pid, secrets.token_hex(8))
    return RequestId(f"{_id_prefix[1]}{next(_id_counter):016x}")


class BrokerClient:
    """Talks to the broker for one edge process thread. Not thread-safe."""

    def __init__(
        self,
        endpoint: str,
        api_key: str = "",
        context: zmq.Context | None = None,
        config: ClientConfig | None = None,
        curve: CurveClientKeys | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.log = log or logger  # where its warnings go (a waiting tool may route them elsewhere)
        self.api_key = api_key
        self.config = config or ClientConfig()
        self.curve = curve  # None: a plain connection; else CURVE with this keypair (broker/transport.py)
        self._handshake: HandshakeWatch | None = None
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._waiting: dict[RequestId, float] = {}  # request id -> give-up time
        self._done: dict[RequestId, Outcome] = {}
        self._patient: set[RequestId] = set()  # waiting pings and status queries (see _send)
        self.stale_replies = 0
        self._other_version = ""  # what the broker said, when it speaks another protocol version
        self._connect()

    def _connect(self) -> None:
        self._sock = make_socket(self._ctx, zmq.DEALER)
        setup_curve_client(self._sock, self.curve)
        self._handshake = HandshakeWatch(self._sock, curve=self.curve is not None)
        self._sock.connect(self.endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._handshake.monitor, zmq.POLLIN)

    def _close_socket(self) -> None:
        if self._handshake is not None:
            self._handshake.close()
            self._handshake = None
        close_socket(self._sock)
        self._sock = None

    def _reset(self, reason: str, gone: bool = False, detail: str = "") -> None:
        """Drop the socket and everything in flight on it (and what libzmq still queues for a
        reconnection: its callers hear it failed); reconnect. ``detail`` goes to the log only
        (a request id means nothing in an error a user reads)."""
        if self._other_version:
            reason += f"; {self._other_version}"
        self.log.warning("resetting connection to broker %s: %s%s", self.endpoint, reason,
                         f" ({detail})" if detail else "")
        if self._handshake is not None and not gone:
            self._handshake.poll()
            if self._handshake.failure:
                reason += f"; {self._handshake.failure}"
        for rid in self._waiting:
            self._done[rid] = BrokerUnavailable(self.endpoint, reason, gone=gone)
        self._waiting.clear()
        self._patient.clear()
        self._close_socket()
        self._connect()

    # ----------------------------------------------------------------- API
    def submit(
        self,
        session_id: str,
        kind: str,
        model_id: str,
        layer_lo: int,
        step: int,
        frames: Sequence[Any] = (),
        timeout_s: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> RequestId:
        """Send a REQUEST without waiting; collect it with :meth:`result`."""
        timeout_s = self.config.default_timeout_s if timeout_s is None else timeout_s
        rid = new_request_id()
        msg = p.Request(request_id=rid, session_id=SessionId(session_id), model_id=model_id, layer_lo=layer_lo,
                        deadline_ms=max(1, int(timeout_s * 1000)), step=step, kind=kind, api_key=self.api_key,
                        extra=dict(extra or {}), frames=list(frames))  # fmt: skip
        self._send(rid, p.encode(msg), timeout_s)
        return rid

    def result(self, request_id: RequestId) -> Reply:
        """Wait for ``request_id``'s answer; raise its typed error if it failed."""
        out = self._wait(request_id)
        if isinstance(out, EdgeCloudError):
            raise out
        if not isinstance(out, Reply):
            raise ProtocolError("unexpected_reply", f"{type(out).__name__} answered a REQUEST")
        return out

    def request(
        self,
        session_id: str,
        kind: str,
        model_id: str,
        layer_lo: int,
        step: int,
        frames: Sequence[Any] = (),
        timeout_s: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Reply:
        """Send one request and wait for its reply (typed errors are raised)."""
        return self.result(self.submit(session_id, kind, model_id, layer_lo, step, frames, timeout_s, extra))

    def wait_any(self, request_ids: Sequence[RequestId], timeout_s: float) -> RequestId | None:
        """Wait up to ``timeout_s`` for an answer to any of ``request_ids``; return that id (collect
        it with :meth:`result`), or None. The others stay pending. A request whose own deadline
        passes unanswered resets the connection, as in :meth:`result`."""
        until = time.monotonic() + timeout_s
        looked = False  # whether what already arrived was read (timeout 0: a poll that never blocks)
        while True:
            for rid in request_ids:
                if rid in self._done:
                    return rid
            waiting = [self._waiting[rid] for rid in request_ids if rid in self._waiting]
            if not waiting:
                raise ProtocolError("unknown_request", "none of these requests is pending")
            now = time.monotonic()
            if now >= min(waiting):
                self._reset("no answer to a request within its deadline")
                continue
            if now >= until:
                if looked:
                    return None
                looked = True
                self._receive(0)
                continue
            self._receive(poll_timeout_ms(min(until, min(waiting)), now))

    def forget(self, request_id: RequestId) -> None:
        """Stop waiting for ``request_id``: an answer arriving later is dropped as stale."""
        self._waiting.pop(request_id, None)
        self._done.pop(request_id, None)

    def ping(self, timeout_s: float = 5.0) -> float:
        """Round-trip time to the broker in seconds; BrokerUnavailable if none within ``timeout_s``."""
        rid = new_request_id()
        start = time.perf_counter()
        self._send(rid, p.encode(p.Ping(request_id=rid)), timeout_s, grace=False, patient=True)
        out = self._wait(rid)
        if isinstance(out, EdgeCloudError):
            raise out
        return time.perf_counter() - start

    def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The broker's status map (see Broker.status)."""
        rid = new_request_id()
        self._send(rid, p.encode(p.Status(request_id=rid, api_key=self.api_key)), timeout_s, grace=False,
                   patient=True)
        out = self._wait(rid)
        if isinstance(out, EdgeCloudError):
            raise out
        if not isinstance(out, dict):
            raise ProtocolError("unexpected_reply", "STATUS was not answered with STATUS_REPLY")
        return out

    def pending(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._waiting)

    def close(self) -> None:
        """Close the socket (and the context, if this client made it)."""
        self._close_socket()
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------- internals
    @property
    def broker_gone(self) -> str:
        """Why the broker is known unreachable right now ("" when connected or not known)."""
        if self._handshake is None:
            return "client is closed"
        self._handshake.poll()
        return self._handshake.gone

    def _send(self, rid: RequestId, frames: list[Any], timeout_s: float, grace: bool = True,
              patient: bool = False) -> None:
        """Send a message. When the broker is known gone (it closed the connection, or nothing
        accepts connections) a request waits ``reconnect_wait_s`` for a reconnection and then
        fails with BrokerUnavailable(gone=True); a ``patient`` one (a ping, a status query) waits
        its whole budget for the broker to come up."""
        if self._sock is None:
            raise BrokerUnavailable(self.endpoint, "client is closed", gone=True)
        now = time.monotonic()
        give_up = now + timeout_s + (self.config.reply_grace_s if grace else 0.0)
        if self._handshake is not None and self._handshake.refused:
            # Refused at the last handshake: try a fresh one (the key may be allowed again); if it
            # is refused too, the monitor says so while this request waits.
            self._close_socket()
            self._connect()
        elif not patient:
            gone = self._reconnected(min(give_up, now + self.config.reconnect_wait_s))
            if gone:
                raise BrokerUnavailable(self.endpoint, gone, gone=True)
        try:
            send_frames(self._sock, frames)
        except zmq.Again as exc:
            # The pipe is full: wait for room, unless the socket's monitor says the broker is gone.
            while not self._sock.poll(0, zmq.POLLOUT):
                gone = self.broker_gone
                if (gone and not patient) or time.monotonic() >= give_up:
                    self._reset("could not send")
                    raise BrokerUnavailable(self.endpoint, gone or "could not send the request",
                                            gone=bool(gone)) from exc
                self._receive(poll_timeout_ms(give_up, cap_s=0.05))
            send_frames(self._sock, frames)
        if patient:
            self._patient.add(rid)
        self._waiting[rid] = give_up

    def _wait(self, rid: RequestId) -> Outcome:
        while rid not in self._done:
            give_up = self._waiting.get(rid)
            if give_up is None:
                raise ProtocolError("unknown_request", f"request {rid} was never sent or already collected")
            now = time.monotonic()
            if now >= give_up:
                self._reset("nothing came back within the request's timeout", detail=f"request {rid}")
                break
            self._receive(poll_timeout_ms(give_up, now))
        self._patient.discard(rid)
        return self._done.pop(rid)

    def _receive(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for messages and file every one that arrived."""
        assert self._sock is not None
        events = dict(self._poller.poll(timeout_ms))
        if not events:
            return
        while True:  # first what the broker said (its last words, when it shut down)
            frames = recv_message(self._sock, 1)
            if frames is None:
                break
            try:
                msg = p.decode(frames)
            except ProtocolError as exc:
                self.log.warning("malformed message from broker ignored: %s", exc)
                if exc.reason == "bad_version":
                    self._other_version = str(exc)
                continue
            self._other_version = ""  # it speaks ours (again)
            self._file(msg)
        if self._handshake is not None and self._handshake.monitor in events:
            self._refused_by_broker()
            self._broker_gone()

    def _refused_by_broker(self) -> None:
        """If the broker refused our key at the handshake, fail everything waiting with AuthError now
        (libzmq would retry the handshake silently until every deadline ran out)."""
        assert self._handshake is not None, "called only while a socket is open"
        self._handshake.poll()
        if not self._handshake.refused:
            return
        for rid in self._waiting:
            self._done[rid] = self._refusal()
        self._waiting.clear()

    def _refusal(self) -> AuthError:
        assert self._handshake is not None
        pub = self.curve.keypair.public_key.hex()[:16] if self.curve else "?"
        return AuthError(f"{self._handshake.failure}: client key {pub}... is not in its allowlist "
                         "(trusted_clients.txt)")

    def _reconnected(self, until: float) -> str:
        """While the broker is known gone, wait until ``until`` for libzmq's reconnection (every
        0.1 s) to get through; returns why it is still gone ("" once connected)."""
        gone = self.broker_gone
        while gone and time.monotonic() < until:
            assert self._handshake is not None
            self._handshake.monitor.poll(poll_timeout_ms(until, cap_s=0.05))
            gone = self.broker_gone
        return gone

    def _broker_gone(self) -> None:
        """If the broker closed our connection (it died, or restarted), fail everything waiting
        with BrokerUnavailable now: the answers cannot come, and a restarted broker knows none
        of those requests."""
        gone = self.broker_gone
        if gone and any(rid not in self._patient for rid in self._waiting):
            # A reset also drops what libzmq still queues for a reconnection: a request its caller
            # heard fail must not reach a restarted broker behind its back.
            self._reset(gone, gone=True)

    def _file(self, msg: p.Message) -> None:
        rid = getattr(msg, "request_id", "")
        if isinstance(msg, p.Error) and not rid and len(self._waiting) == 1:
            rid = next(iter(self._waiting))  # a protocol error the broker could not attribute
        if rid not in self._waiting:
            self.stale_replies += 1
            self.log.debug("stale %s for %s dropped", type(msg).__name__, rid)
            return
        del self._waiting[rid]
        outcome: Outcome
        if isinstance(msg, p.Reply):
            outcome = Reply(request_id=msg.request_id, session_id=msg.session_id, step=msg.step,
                            worker_id=msg.worker_id, attempt=msg.attempt, header=msg.extra,
                            frames=[f.buffer if isinstance(f, zmq.Frame) else memoryview(f) for f in msg.frames])  # fmt: skip
        elif isinstance(msg, p.Error):
            outcome = error_from_code(msg.code, msg.message, msg.retry_after_ms)
        elif isinstance(msg, p.StatusReply):
            outcome = msg.status
        elif isinstance(msg, p.Pong):
            outcome = None
        else:
            outcome = ProtocolError("unexpected_reply", f"{type(msg).__name__} from broker")
        self._done[RequestId(rid)] = outcome
