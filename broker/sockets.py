"""Small ZeroMQ helpers shared by the broker, worker and client sides."""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import time
from typing import Any

import zmq

from broker.protocol import MAX_FRAME_BYTES, MAX_HEADER_BYTES

logger = logging.getLogger(__name__)

# libzmq drops (and disconnects) a peer whose single frame exceeds this,
# before Python allocates anything for it.
MAX_WIRE_FRAME_BYTES = max(MAX_FRAME_BYTES, MAX_HEADER_BYTES)
# Queue depth per peer inside libzmq; beyond it sends would block or drop.
# 10k covers 64 in-flight requests per client with ample slack.
SOCKET_HWM = 10_000
# How long close() may keep unsent messages (e.g. a final DISCONNECT).
CLOSE_LINGER_MS = 200


def make_socket(context: zmq.Context, kind: int) -> zmq.Socket:
    """A socket with the limits every edgecloud socket uses."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_WIRE_FRAME_BYTES)
    sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
    sock.setsockopt(zmq.RCVHWM, SOCKET_HWM)
    return sock


def close_socket(sock: zmq.Socket | None, linger_ms: int = 0) -> None:
    """Close ``sock`` (if any) without raising; ``linger_ms`` bounds the flush of queued sends."""
    if sock is None or sock.closed:
        return
    with contextlib.suppress(zmq.ZMQError):
        sock.close(linger=linger_ms)


def poll_timeout_ms(deadline: float, now: float | None = None, cap_s: float = 1.0) -> int:
    """Milliseconds until ``deadline`` (monotonic), rounded up, clamped to [0, cap_s]."""
    now = time.monotonic() if now is None else now
    return max(0, math.ceil(min(deadline - now, cap_s) * 1000))


class Waker:
    """A self-pipe a ``zmq.Poller`` can watch, so another thread can wake a poll loop.

    ``wake()`` is safe to call from any thread, any number of times.
    """

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        """The readable end, for ``Poller.register``."""
        return self._r.fileno()

    def wake(self) -> None:
        """Make the readable end readable; a full pipe already is."""
        with contextlib.suppress(BlockingIOError, OSError):
            self._w.send(b"\0")

    def drain(self) -> None:
        """Consume pending wake-ups."""
        with contextlib.suppress(BlockingIOError, OSError):
            while self._r.recv(4096):
                pass

    def close(self) -> None:
        """Release both ends."""
        self._r.close()
        self._w.close()


# Plain ints: pyzmq's constants are enum members, and every ``flags | SNDMORE`` on them builds a new
# enum value (about 1 us each, several per message on the hot path).
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def recv_message(sock: zmq.Socket, leading_bytes_frames: int) -> list[Any] | None:
    """One waiting multipart message, or None if none is waiting (never blocks).

    The first ``leading_bytes_frames`` frames (routing id, header) come back
    as ``bytes``; the rest (bodies) as ``zmq.Frame`` so that large tensors are
    never copied. Every part is received as a frame, which says itself whether
    more follow: asking the socket (RCVMORE, EVENTS) builds an enum in pyzmq
    each time, and a message cost 9-10 us that way against 4 us this way; an
    empty socket costs one ``zmq.Again`` (5 us), once per read of a socket that
    a poll said was readable.
    """
    try:
        frame = sock.recv(_NOBLOCK, copy=False)
    except zmq.Again:
        return None
    parts: list[Any] = [frame.bytes if leading_bytes_frames > 0 else frame]
    while frame.more:  # later parts of a message are always already here
        frame = sock.recv(_NOBLOCK, copy=False)
        parts.append(frame.bytes if len(parts) < leading_bytes_frames else frame)
    return parts


def send_frames(sock: zmq.Socket, frames: list[Any]) -> None:
    """Non-blocking multipart send (zero-copy for large buffers), as ``send_multipart`` without its
    per-frame type checks and enum arithmetic. Raises ``zmq.Again`` (nothing sent) like it: ZeroMQ
    accepts or refuses a multipart message at its first frame."""
    send = sock.send
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        send(frame, _NOBLOCK_MORE if i < last else _NOBLOCK, copy=False)


def send_or_false(sock: zmq.Socket, frames: list[Any]) -> bool:
    """Non-blocking multipart send; False if the peer is unknown (ROUTER_MANDATORY) or full."""
    try:
        send_frames(sock, frames)
        return True
    except zmq.Again:
        return False
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH:
            return False
        raise
