"""The edgecloud wire protocol: the only module that defines bytes on the wire.

Every message is one ZeroMQ multipart message::

    [header, body_0, body_1, ...]

``header`` is ``MAGIC + bytes([PROTOCOL_VERSION]) + msgpack(map)``; the map
holds ``"t"`` (the :class:`MsgType`) and the message's named fields. Body
frames are raw bytes (tensor data, ciphertext) that the broker forwards
without reading, so large activations are never re-encoded in transit.

Decoding is defensive because the broker faces untrusted peers: msgpack runs
with explicit size limits, no ext types and string map keys only; every field
is checked for presence and type; anything off raises :class:`ProtocolError`
with a stable ``reason`` token and nothing else. Unknown *extra* header keys
are ignored (an older receiver reads a newer sender's messages), but every
field a receiver knows must be there, so adding a field to a message, like
changing the meaning of one, bumps ``PROTOCOL_VERSION``: processes of two
versions then refuse each other with ``bad_version`` rather than half-work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, NewType

import msgpack

from broker.errors import ProtocolError

RequestId = NewType("RequestId", str)
SessionId = NewType("SessionId", str)
WorkerId = NewType("WorkerId", str)

PROTOCOL_VERSION = 5  # 2: heartbeats carry per_layer_ms; 3: batch and cache figures, the broker's period and id;
# 4: WORKER_REPLIES, a forward pass's replies in one message; 5: DISPATCHES, the steps for a worker in one
MAGIC = b"EC"
_PREFIX = MAGIC + bytes([PROTOCOL_VERSION])

# Headers are small maps; 1 MiB leaves room for a STATUS_REPLY listing
# thousands of workers while bounding what an attacker can make us parse.
MAX_HEADER_BYTES = 1 << 20
# A 4096-token fp32 prefill at hidden size 4096 is 64 MiB; one frame may be
# twice that, and a whole message four times, before we call it hostile.
MAX_FRAME_BYTES = 128 << 20
MAX_MESSAGE_BYTES = 256 << 20
# Tensors travel one per frame; a split point needs a handful (hidden state,
# maybe a mask or positions), so 64 is generous.
MAX_BODY_FRAMES = 64
# Identifiers are uuid-like tokens or short human names.
MAX_ID_CHARS = 128
# Error messages, kinds, model ids and similar free text.
MAX_TEXT_CHARS = 4096
# Layer ranges a worker may announce (one per loaded shard).
MAX_LAYER_RANGES = 256
# msgpack container limits: bound allocation before validation sees the data.
MAX_MSGPACK_ARRAY = 65536
MAX_MSGPACK_MAP = 4096
_MAX_UINT = (1 << 63) - 1


class MsgType(IntEnum):
    """Message types; the tens digit says the direction."""

    # client -> broker
    REQUEST = 1
    STATUS = 2
    PING = 3
    # broker -> client
    REPLY = 11
    ERROR = 12
    STATUS_REPLY = 13
    PONG = 14
    # worker -> broker
    REGISTER = 21
    HEARTBEAT = 22
    WORKER_REPLY = 23
    WORKER_ERROR = 24
    DISCONNECT = 25
    WORKER_REPLIES = 26
    # broker -> worker
    DISPATCH = 31
    BROKER_HEARTBEAT = 32
    DROP_SESSION = 33
    REREGISTER = 34
    BROKER_DISCONNECT = 35
    DISPATCHES = 36


CLIENT_TO_BROKER = frozenset({MsgType.REQUEST, MsgType.STATUS, MsgType.PING})


# ---------------------------------------------------------------- field checks
Checker = Callable[[Any], Any]


def _bad(what: str) -> ProtocolError:
    return ProtocolError("bad_field", what)


def _id(v: Any) -> str:
    if type(v) is not str or not 0 < len(v) <= MAX_ID_CHARS:
        raise _bad("expected a non-empty id string")
    return v


def _text(v: Any) -> str:
    if type(v) is not str or len(v) > MAX_TEXT_CHARS:
        raise _bad("expected a string")
    return v


def _uint(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= _MAX_UINT:
        raise _bad("expected a non-negative integer")
    return v


def _pos_int(v: Any) -> int:
    if type(v) is not int or not 0 < v <= _MAX_UINT:
        raise _bad("expected a positive integer")
    return v


def _nonneg_float(v: Any) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        raise _bad("expected a finite non-negative number")
    return float(v)


def _pubkey(v: Any) -> bytes:
    # Empty means "this worker runs without end-to-end encryption".
    if type(v) is not bytes or len(v) not in (0, 32):
        raise _bad("expected 32 key bytes or empty")
    return v


def _ranges(v: Any) -> tuple[tuple[int, int], ...]:
    if type(v) is not list or not 0 < len(v) <= MAX_LAYER_RANGES:
        raise _bad("expected a non-empty list of [lo, hi] ranges")
    out = []
    for r in v:
        if type(r) is not list or len(r) != 2:
            raise _bad("expected [lo, hi]")
        lo, hi = _uint(r[0]), _uint(r[1])
        if lo >= hi:
            raise _bad("layer range needs lo < hi")
        out.append((lo, hi))
    return tuple(out)


def _strmap(v: Any) -> dict[str, Any]:
    if type(v) is not dict or not all(type(k) is str for k in v):
        raise _bad("expected a map with string keys")
    return v


def _heads(item: str, fields: tuple[tuple[str, Checker], ...]) -> Checker:
    """The check of a bundle's heads (``WorkerReplies``, ``Dispatches``): 1 to MAX_BODY_FRAMES lists,
    each the fields of one ``item`` message in turn, then how many of the body frames are its own.
    Every field check must pass its value through unchanged: the values are kept as they came."""
    checks = (*(check for _, check in fields), _uint)
    assert all(c in (_id, _uint, _text, _strmap) for c in checks), "a check that converts its value"
    n = len(checks)
    shape = f"[{', '.join(name for name, _ in fields)}, frames]"

    def check(v: Any) -> tuple[tuple[Any, ...], ...]:
        if type(v) not in (list, tuple) or not 0 < len(v) <= MAX_BODY_FRAMES:
            raise _bad(f"expected 1 to {MAX_BODY_FRAMES} {item}s")
        for head in v:
            if type(head) not in (list, tuple) or len(head) != n:
                raise _bad(f"expected {shape} per {item}")
            for c, x in zip(checks, head, strict=False):  # the lengths were checked above
                # The two commonest checks inlined, as in decode: a pass of 64 steps has 640 fields.
                if c is _id:
                    if type(x) is str and 0 < len(x) <= MAX_ID_CHARS:
                        continue
                elif c is _uint:
                    if type(x) is int and 0 <= x <= _MAX_UINT:
                        continue
                c(x)
        return tuple(map(tuple, v))  # as ``of`` builds them: a message equals itself after a round trip

    return check


# ------------------------------------------------------------------- messages
@dataclass(slots=True)
class Message:
    """Base of all messages; subclasses set TYPE, FIELDS and HAS_BODY.

    Treat messages as immutable values. They are not ``frozen`` only because
    frozen dataclasses construct markedly slower, and the broker builds two
    and parses two per request.
    """

    TYPE: ClassVar[MsgType]
    FIELDS: ClassVar[tuple[tuple[str, Checker], ...]] = ()
    HAS_BODY: ClassVar[bool] = False

    def check(self) -> None:
        """What its fields cannot say alone (raises ProtocolError); encode and decode call it."""


@dataclass(slots=True)
class Bundle(Message):
    """Several messages of one kind (``ITEM``) in one, as one send call and one wake-up of each
    side's I/O thread where each alone took its own: its one field holds each message's header
    fields and how many of the body frames, in turn, are its own. :meth:`of` builds one,
    :meth:`split` gives the messages back."""

    ITEM: ClassVar[type[Message]]

    @classmethod
    def of(cls, items: Sequence[Message]) -> Bundle:
        names = [name for name, _ in cls.ITEM.FIELDS]
        heads = tuple((*(getattr(m, name) for name in names), len(m.frames)) for m in items)  # type: ignore[attr-defined]
        return cls(heads, [f for m in items for f in m.frames])  # type: ignore[attr-defined,call-arg]

    def heads(self) -> tuple[tuple[Any, ...], ...]:
        return getattr(self, self.FIELDS[0][0])

    def check(self) -> None:
        claimed = sum(head[-1] for head in self.heads())
        n = len(self.frames)  # type: ignore[attr-defined]
        if claimed != n:
            raise ProtocolError("bad_body", f"its {self.ITEM.__name__} heads claim {claimed} body frames, the "
                                f"message has {n}", msg_type=int(self.TYPE))  # fmt: skip

    def split(self) -> list[Any]:
        """The messages, each built from its head's fields in turn (an ITEM's FIELDS are its
        dataclass fields in order, before ``frames``: tests/test_broker_protocol.py checks it)."""
        item, frames = self.ITEM, self.frames  # type: ignore[attr-defined]
        out, at = [], 0
        for head in self.heads():
            n = head[-1]
            out.append(item(*head[:-1], frames=list(frames[at:at + n])))  # type: ignore[call-arg]
            at += n
        return out


@dataclass(slots=True)
class Request(Message):
    """Client asks for layers [layer_lo, N) of model_id on a session's next step."""

    request_id: RequestId
    session_id: SessionId
    model_id: str
    layer_lo: int
    deadline_ms: int  # relative budget; 0 means "the broker's default"
    step: int
    kind: str  # opaque to the broker except for its open/close lifecycle
    api_key: str
    extra: dict[str, Any] = field(default_factory=dict)  # passed to the worker unchanged
    frames: Sequence[Any] = ()
    TYPE = MsgType.REQUEST
    HAS_BODY = True
    FIELDS = (
        ("request_id", _id), ("session_id", _id), ("model_id", _id), ("layer_lo", _uint),
        ("deadline_ms", _uint), ("step", _uint), ("kind", _id), ("api_key", _text), ("extra", _strmap),
    )  # fmt: skip


# An optional key in Request.extra, the one the broker reads: the id of the unit of work a request
# carries, the same for every request that retries it (an edge's retries and the replay after a
# failover). The broker counts the workers each task failed on and stops a poison request after
# max_attempts of them. A request without it is its own task.
TASK_KEY = "task"


def task_of(msg: Request) -> str:
    """The request's task id (``extra["task"]`` when it is a valid id, else its request id)."""
    task = msg.extra.get(TASK_KEY)
    if type(task) is str and 0 < len(task) <= MAX_ID_CHARS:
        return task
    return msg.request_id


# An optional key in an opener's Request.extra, also read by the broker: the id of the worker the
# new session would rather go to (the one holding what it continues: a conversation's earlier
# turns in its prefix cache). The broker places it there while that worker serves the session's
# model and split and has a free seat; otherwise by capacity and load, as any session.
NEAR_KEY = "near"


def near_of(msg: Request) -> str | None:
    """The worker id an opener asks to be placed on, when it names a valid one."""
    near = msg.extra.get(NEAR_KEY)
    if type(near) is str and 0 < len(near) <= MAX_ID_CHARS:
        return near
    return None


@dataclass(slots=True)
class Status(Message):
    """Client asks for the broker's status map."""

    request_id: RequestId
    api_key: str = ""
    TYPE = MsgType.STATUS
    FIELDS = (("request_id", _id), ("api_key", _text))


@dataclass(slots=True)
class Ping(Message):
    """Liveness probe; needs no API key."""

    request_id: RequestId
    TYPE = MsgType.PING
    FIELDS = (("request_id", _id),)


@dataclass(slots=True)
class Reply(Message):
    """Broker forwards a worker's result for a request."""

    request_id: RequestId
    session_id: SessionId
    step: int
    worker_id: WorkerId
    attempt: int
    extra: dict[str, Any] = field(default_factory=dict)
    frames: Sequence[Any] = ()
    TYPE = MsgType.REPLY
    HAS_BODY = True
    FIELDS = (
        ("request_id", _id), ("session_id", _id), ("step", _uint), ("worker_id", _id),
        ("attempt", _uint), ("extra", _strmap),
    )  # fmt: skip


@dataclass(slots=True)
class Error(Message):
    """A request failed; ``code`` names an errors.py class. request_id may be empty.
    ``retry_after_ms``: when to try again, for a busy answer that knows (0: no hint)."""

    request_id: str
    code: str
    message: str
    retry_after_ms: int = 0
    TYPE = MsgType.ERROR
    FIELDS = (("request_id", _text), ("code", _id), ("message", _text), ("retry_after_ms", _uint))


@dataclass(slots=True)
class StatusReply(Message):
    """Answer to STATUS."""

    request_id: RequestId
    status: dict[str, Any]
    TYPE = MsgType.STATUS_REPLY
    FIELDS = (("request_id", _id), ("status", _strmap))


@dataclass(slots=True)
class Pong(Message):
    """Answer to PING."""

    request_id: RequestId
    TYPE = MsgType.PONG
    FIELDS = (("request_id", _id),)


@dataclass(slots=True)
class Register(Message):
    """Worker announces what it serves; sent at start and on REREGISTER."""

    worker_id: WorkerId
    model_id: str
    layer_ranges: tuple[tuple[int, int], ...]
    public_key: bytes
    per_layer_ms: float
    pid: int
    max_sessions: int
    max_batch: int = 1  # most sessions' steps it computes in one forward pass
    cache_limit_bytes: int = 0  # what its sessions' KV caches may hold together; 0: no limit
    TYPE = MsgType.REGISTER
    FIELDS = (
        ("worker_id", _id), ("model_id", _id), ("layer_ranges", _ranges), ("public_key", _pubkey),
        ("per_layer_ms", _nonneg_float), ("pid", _uint), ("max_sessions", _pos_int), ("max_batch", _pos_int),
        ("cache_limit_bytes", _uint),
    )  # fmt: skip


@dataclass(slots=True)
class Heartbeat(Message):
    """Worker is alive; carries its own view of its load."""

    worker_id: WorkerId
    active_sessions: int
    queue_depth: int
    per_layer_ms: float  # the worker's current decode cost per layer (register's, updated by real steps)
    # Since the previous heartbeat: steps per forward pass (0: none ran) and tokens produced per
    # second; and the bytes its sessions' KV caches hold now.
    mean_batch: float = 0.0
    tokens_per_s: float = 0.0
    cache_bytes: int = 0
    # Its prefix cache (partition/prefix_cache.py): bytes held, and prompt positions copied
    # from it instead of computed since the worker started.
    prefix_bytes: int = 0
    prefix_reused: int = 0
    TYPE = MsgType.HEARTBEAT
    FIELDS = (("worker_id", _id), ("active_sessions", _uint), ("queue_depth", _uint),
              ("per_layer_ms", _nonneg_float), ("mean_batch", _nonneg_float), ("tokens_per_s", _nonneg_float),
              ("cache_bytes", _uint), ("prefix_bytes", _uint), ("prefix_reused", _uint))


@dataclass(slots=True)
class WorkerReply(Message):
    """Worker's result for one attempt of a request."""

    request_id: RequestId
    session_id: SessionId
    step: int
    attempt: int
    extra: dict[str, Any] = field(default_factory=dict)
    frames: Sequence[Any] = ()
    TYPE = MsgType.WORKER_REPLY
    HAS_BODY = True
    FIELDS = (
        ("request_id", _id), ("session_id", _id), ("step", _uint), ("attempt", _uint), ("extra", _strmap),
    )  # fmt: skip


@dataclass(slots=True)
class WorkerReplies(Bundle):
    """Worker's results for several requests at once (the steps of one forward pass)."""

    replies: tuple[tuple[Any, ...], ...]  # request_id, session_id, step, attempt, extra, frames
    frames: Sequence[Any] = ()
    ITEM = WorkerReply
    TYPE = MsgType.WORKER_REPLIES
    HAS_BODY = True
    FIELDS = (("replies", _heads("reply", WorkerReply.FIELDS)),)


@dataclass(slots=True)
class WorkerError(Message):
    """Worker failed one attempt of a request."""

    request_id: RequestId
    attempt: int
    code: str
    message: str
    TYPE = MsgType.WORKER_ERROR
    FIELDS = (("request_id", _id), ("attempt", _uint), ("code", _id), ("message", _text))


@dataclass(slots=True)
class Disconnect(Message):
    """Worker leaves cleanly; its sessions are lost."""

    worker_id: WorkerId
    TYPE = MsgType.DISCONNECT
    FIELDS = (("worker_id", _id),)


@dataclass(slots=True)
class Dispatch(Message):
    """Broker hands one attempt of a request to a worker."""

    request_id: RequestId
    session_id: SessionId
    model_id: str
    step: int
    attempt: int
    kind: str
    deadline_ms: int  # remaining budget when sent
    layer_lo: int
    extra: dict[str, Any] = field(default_factory=dict)
    frames: Sequence[Any] = ()
    TYPE = MsgType.DISPATCH
    HAS_BODY = True
    FIELDS = (
        ("request_id", _id), ("session_id", _id), ("model_id", _id), ("step", _uint), ("attempt", _uint),
        ("kind", _id), ("deadline_ms", _uint), ("layer_lo", _uint), ("extra", _strmap),
    )  # fmt: skip


@dataclass(slots=True)
class Dispatches(Bundle):
    """Several attempts for one worker at once: what the broker routed to it while reading its
    socket once (the steps of many sessions' next pass)."""

    dispatches: tuple[tuple[Any, ...], ...]  # Dispatch's fields in turn, then its frames
    frames: Sequence[Any] = ()
    ITEM = Dispatch
    TYPE = MsgType.DISPATCHES
    HAS_BODY = True
    FIELDS = (("dispatches", _heads("dispatch", Dispatch.FIELDS)),)


@dataclass(slots=True)
class BrokerHeartbeat(Message):
    """Broker is alive; ``interval_ms`` is its heartbeat period (0: not said). The broker expires a
    worker silent for a few of its periods, so a worker heartbeats at least this often.
    ``broker_id`` names this broker process ("": not said): a broker keeps no sessions across a
    restart, so a worker that hears a new one frees every session opened through the old one."""

    interval_ms: int = 0
    broker_id: str = ""
    TYPE = MsgType.BROKER_HEARTBEAT
    FIELDS = (("interval_ms", _uint), ("broker_id", _text))


@dataclass(slots=True)
class DropSession(Message):
    """Worker may free this session's cache: it expired or moved."""

    session_id: SessionId
    reason: str = ""
    TYPE = MsgType.DROP_SESSION
    FIELDS = (("session_id", _id), ("reason", _text))


@dataclass(slots=True)
class Reregister(Message):
    """Broker does not know this worker (it restarted or expired it): send REGISTER."""

    reason: str = ""
    TYPE = MsgType.REREGISTER
    FIELDS = (("reason", _text),)


@dataclass(slots=True)
class BrokerDisconnect(Message):
    """Broker is shutting down; workers should reconnect later."""

    reason: str = ""
    TYPE = MsgType.BROKER_DISCONNECT
    FIELDS = (("reason", _text),)


MESSAGE_CLASSES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Request, Status, Ping, Reply, Error, StatusReply, Pong, Register, Heartbeat, WorkerReply,
        WorkerError, Disconnect, WorkerReplies, Dispatch, Dispatches, BrokerHeartbeat, DropSession,
        Reregister, BrokerDisconnect,
    )
}  # fmt: skip


# ------------------------------------------------------------ encode / decode
def frame_nbytes(frame: Any) -> int:
    """Byte length of a frame given as bytes, memoryview, bytearray or zmq.Frame."""
    if isinstance(frame, memoryview):
        return frame.nbytes
    return len(frame)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("ext_type", f"msgpack ext type {code} is not allowed")


def encode(msg: Message, validate: bool = True) -> list[Any]:
    """Serialize ``msg`` to a frame list for ``send_multipart``.

    Body frames are passed through as given (zero-copy for buffers). Fields
    are checked like the peer will check them, so that we never send what it
    would reject; ``validate=False`` skips that for messages built purely
    from already-validated fields (the broker's forwarding hot path). Raises
    ProtocolError if the result would exceed the limits the peer enforces.
    """
    cls = type(msg)
    header: dict[str, Any] = {"t": int(cls.TYPE)}
    for name, check in cls.FIELDS:
        value = getattr(msg, name)
        if name == "layer_ranges":
            value = [list(r) for r in value]
        if validate:
            try:
                check(value)
            except ProtocolError as exc:
                raise ProtocolError(
                    exc.reason, f"{cls.__name__}.{name}: {exc}", msg_type=int(cls.TYPE)
                ) from None
        header[name] = value
    try:
        packed = _PREFIX + msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("unencodable", str(exc), msg_type=int(cls.TYPE)) from exc
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"{len(packed)} bytes", msg_type=int(cls.TYPE))
    frames: list[Any] = [packed]
    if cls.HAS_BODY:
        body = list(msg.frames)  # type: ignore[attr-defined]
        _check_body(body, int(cls.TYPE), None)
        frames.extend(body)
    if validate:
        msg.check()
    return frames


def _check_body(body: Sequence[Any], msg_type: int | None, request_id: str | None) -> None:
    if len(body) > MAX_BODY_FRAMES:
        raise ProtocolError("too_many_frames", f"{len(body)} body frames", msg_type=msg_type,
                            request_id=request_id)  # fmt: skip
    total = 0
    for f in body:
        n = f.nbytes if type(f) is memoryview else len(f)
        if n > MAX_FRAME_BYTES:
            raise ProtocolError("frame_too_large", f"{n} bytes", msg_type=msg_type, request_id=request_id)
        total += n
    if total > MAX_MESSAGE_BYTES:
        raise ProtocolError("message_too_large", f"{total} bytes", msg_type=msg_type,
                            request_id=request_id)  # fmt: skip


def _header_bytes(frame: Any) -> bytes:
    if isinstance(frame, bytes):
        return frame
    if hasattr(frame, "bytes"):  # zmq.Frame
        return frame.bytes
    return bytes(frame)


def decode(frames: Sequence[Any]) -> Message:
    """Parse a received frame list (without any ROUTER identity) into a message.

    Raises only :class:`ProtocolError`. Body frames are returned as the
    objects received (bytes or zmq.Frame), never copied or inspected.
    """
    if not frames:
        raise ProtocolError("empty", "no frames")
    first = frames[0]
    try:
        head_len = frame_nbytes(first)
    except TypeError as exc:
        raise ProtocolError("bad_frame", "frame is not a buffer") from exc
    if head_len > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"{head_len} bytes")
    head = _header_bytes(first)
    if head[:2] != MAGIC:
        raise ProtocolError("bad_magic", "not an edgecloud frame")
    if len(head) < 3 or head[2] != PROTOCOL_VERSION:
        got = head[2] if len(head) >= 3 else None
        raise ProtocolError("bad_version", f"protocol version {got}, expected {PROTOCOL_VERSION}: the two sides run "
                            "different edgecloud versions; run the same one on broker, workers and edges")
    try:
        obj = msgpack.unpackb(
            head[3:],
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=MAX_HEADER_BYTES,
            max_array_len=MAX_MSGPACK_ARRAY,
            max_map_len=MAX_MSGPACK_MAP,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types (ValueError, StackError, ...)
        raise ProtocolError("bad_msgpack", type(exc).__name__) from exc
    if type(obj) is not dict:
        raise ProtocolError("bad_header", "header is not a map")
    t = obj.get("t")
    if type(t) is not int:
        raise ProtocolError("bad_header", "missing message type")
    cls = MESSAGE_CLASSES.get(t)
    if cls is None:
        raise ProtocolError("unknown_type", f"message type {t}", msg_type=t)
    rid = obj.get("request_id")
    rid = rid if type(rid) is str and len(rid) <= MAX_ID_CHARS else None
    body = frames[1:]
    if body and not cls.HAS_BODY:
        raise ProtocolError(
            "unexpected_frames", f"{cls.__name__} carries no body", msg_type=t, request_id=rid
        )
    _check_body(body, t, rid)
    kwargs: dict[str, Any] = {}
    for name, check in cls.FIELDS:
        try:
            v = obj[name]
        except KeyError:
            raise ProtocolError(
                "missing_field", f"{cls.__name__}.{name}", msg_type=t, request_id=rid
            ) from None
        # The two commonest checks inlined: this loop runs for every message the broker sees.
        if check is _id:
            if type(v) is str and 0 < len(v) <= MAX_ID_CHARS:
                kwargs[name] = v
                continue
        elif check is _uint:
            if type(v) is int and 0 <= v <= _MAX_UINT:
                kwargs[name] = v
                continue
        try:
            kwargs[name] = check(v)
        except ProtocolError as exc:
            raise ProtocolError(
                exc.reason, f"{cls.__name__}.{name}: {exc}", msg_type=t, request_id=rid
            ) from None
    if cls.HAS_BODY:
        kwargs["frames"] = list(body)
    msg = cls(**kwargs)
    msg.check()
    return msg
