"""The broker's bookkeeping records: workers, sessions, pending requests.

Kept apart from the event loop so that the loop reads as policy, and so that
these plain records can be inspected in tests and STATUS without a socket.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from broker import protocol
from broker.protocol import RequestId, SessionId, WorkerId

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkerState:
    """One registered worker connection."""

    worker_id: WorkerId
    identity: bytes  # ZeroMQ routing id of its DEALER socket
    model_id: str
    layer_ranges: tuple[tuple[int, int], ...]
    public_key: bytes
    per_layer_ms: float
    pid: int
    max_sessions: int
    registered_at: float
    last_seen: float
    sessions: set[SessionId] = field(default_factory=set)
    # request id -> None; a dict keeps dispatch order for fair failover
    in_flight: dict[RequestId, int] = field(default_factory=dict)  # request id -> its body bytes
    # timed-out attempts the worker may still be computing: request id -> forget-at time
    abandoned: dict[RequestId, float] = field(default_factory=dict)
    reported_sessions: int = 0
    reported_queue_depth: int = 0
    max_batch: int = 1
    mean_batch: float = 0.0  # steps per forward pass over the last heartbeat interval
    tokens_per_s: float = 0.0
    cache_bytes: int = 0
    cache_limit_bytes: int = 0  # 0: no limit
    prefix_bytes: int = 0  # its prefix cache (partition/prefix_cache.py)
    prefix_reused: int = 0  # prompt positions it copied from there instead of computing

    @classmethod
    def from_register(cls, msg: protocol.Register, identity: bytes, now: float) -> WorkerState:
        """Build the record for a REGISTER just received."""
        return cls(
            worker_id=msg.worker_id,
            identity=identity,
            model_id=msg.model_id,
            layer_ranges=msg.layer_ranges,
            public_key=msg.public_key,
            per_layer_ms=msg.per_layer_ms,
            pid=msg.pid,
            max_sessions=msg.max_sessions,
            max_batch=msg.max_batch,
            cache_limit_bytes=msg.cache_limit_bytes,
            registered_at=now,
            last_seen=now,
        )

    def serves(self, model_id: str, layer_lo: int) -> bool:
        """True if this worker can run layers from ``layer_lo`` on of ``model_id``."""
        return model_id == self.model_id and any(lo <= layer_lo < hi for lo, hi in self.layer_ranges)

    def busy_slots(self) -> int:
        """Attempts this worker is (probably) computing right now."""
        return len(self.in_flight) + len(self.abandoned)

    def load(self) -> int:
        """Pinned sessions plus work in hand: placement's tie-break."""
        return len(self.sessions) + self.busy_slots()

    def free_capacity(self) -> float:
        """How many more sessions this worker takes before it is full, by the least of: its
        session slots; its batch (a session past ``max_batch`` waits for a seat in each pass, so
        this goes negative there, and less negative is less crowded); and its KV-cache memory
        (sessions of the size its held ones average that fit under its limit, less the sessions
        placed since its last heartbeat)."""
        held = len(self.sessions)
        room: float = min(self.max_sessions - held, self.max_batch - held)
        if self.cache_limit_bytes and self.reported_sessions and self.cache_bytes:
            per_session = self.cache_bytes / self.reported_sessions
            unreported = max(0, held - self.reported_sessions)
            room = min(room, (self.cache_limit_bytes - self.cache_bytes) / per_session - unreported)
        return room

    def status(self, now: float) -> dict[str, object]:
        """The STATUS view of this worker."""
        return {
            "worker_id": self.worker_id,
            "pid": self.pid,
            "model_id": self.model_id,
            "layer_ranges": [list(r) for r in self.layer_ranges],
            "public_key": self.public_key.hex(),
            "per_layer_ms": self.per_layer_ms,
            "max_sessions": self.max_sessions,
            "sessions": len(self.sessions),
            "in_flight": len(self.in_flight),
            "abandoned": len(self.abandoned),
            "reported_sessions": self.reported_sessions,
            "reported_queue_depth": self.reported_queue_depth,
            "max_batch": self.max_batch,
            "mean_batch": round(self.mean_batch, 2),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "cache_bytes": self.cache_bytes,
            "cache_limit_bytes": self.cache_limit_bytes,
            "prefix_bytes": self.prefix_bytes,
            "prefix_reused": self.prefix_reused,
            "free_capacity": round(self.free_capacity(), 1),
            "last_seen_s_ago": round(now - self.last_seen, 3),
        }


@dataclass(eq=False)
class SessionState:
    """A session's placement: pinned to a worker once its opener is routed."""

    session_id: SessionId
    model_id: str
    worker_id: WorkerId | None  # None while the opener waits for a worker
    last_used: float
    outstanding: int = 0  # requests of this session queued or in flight
    queued: int = 0  # of which still waiting in the broker queue
    owner: str | None = None  # the client that opened it ("key:..." or "api:..."); None: no identity
    # A worker declared lost while opening it, back before its opener was run again: it may hold a
    # copy, freed (DropSession) once the opener lands elsewhere or the session ends unplaced.
    stale_on: WorkerId | None = None


@dataclass(eq=False)
class PendingRequest:
    """A client request from arrival until it is answered (once)."""

    request: protocol.Request
    client: bytes  # routing id to answer
    received_at: float
    deadline: float
    attempt: int = 0  # dispatches so far; replies must echo the latest
    worker_id: WorkerId | None = None  # set while an attempt is in flight
    queued: bool = False
    nbytes: int = 0  # body bytes held until answered (counted against max_pending_bytes)
    owner: str | None = None  # the sender's identity, as sessions are bound to it (Broker._owner)
    client_key: str = ""  # whose share of max_client_bytes the body counts against

    @property
    def request_id(self) -> RequestId:
        """Shortcut for the client's request id."""
        return self.request.request_id

    @property
    def session_id(self) -> SessionId:
        """Shortcut for the request's session id."""
        return self.request.session_id


class RateLimitedWarnings:
    """Log a warning per reason at most once per interval, counting what was suppressed.

    A peer spraying garbage must not turn the broker's log into the bottleneck.
    """

    def __init__(self, log: logging.Logger, interval_s: float) -> None:
        self._log = log
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, reason: str, fmt: str, *args: object) -> None:
        """Warn about ``reason`` unless one was logged within the interval."""
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self._interval_s:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last[reason] = now
        skipped = self._suppressed.pop(reason, 0)
        suffix = f" ({skipped} similar suppressed)" if skipped else ""
        self._log.warning(fmt + suffix, *args)


class PoisonLedger:
    """Which workers each *task* (``protocol.task_of``) failed on: died, hung or missed its
    deadline while holding it. A task that failed on ``max_attempts`` distinct workers is poison.

    Distinct workers only: an edge retrying a slow step on the same worker, or the broker's own
    timeouts there, say nothing about the request (the worker may simply be loaded). The oldest
    tasks are forgotten beyond ``remembered``.
    """

    def __init__(self, max_attempts: int, remembered: int) -> None:
        self.max_attempts = max_attempts
        self.remembered = remembered
        self._failed_on: OrderedDict[str, list[WorkerId]] = OrderedDict()

    def failed_on(self, r: protocol.Request) -> tuple[WorkerId, ...]:
        """The workers ``r``'s task failed on so far."""
        return tuple(self._failed_on.get(protocol.task_of(r), ()))

    def is_poison(self, r: protocol.Request) -> bool:
        return len(self.failed_on(r)) >= self.max_attempts

    def record(self, r: protocol.Request, worker_id: WorkerId) -> bool:
        """Note that ``r``'s task failed on ``worker_id``; True once it is poison."""
        task = protocol.task_of(r)
        workers = self._failed_on.get(task)
        if workers is None:
            workers = self._failed_on[task] = []
            while len(self._failed_on) > self.remembered:
                self._failed_on.popitem(last=False)
        self._failed_on.move_to_end(task)
        if worker_id not in workers:
            workers.append(worker_id)
        return len(workers) >= self.max_attempts


# Answered requests leave their timers behind until they fire; at thousands of requests per
# second and long deadlines that would grow without bound. The heap is rebuilt from live
# requests when it holds this many times more entries than there are (plus slack, so small
# heaps are left alone).
TIMER_COMPACT_FACTOR = 4
TIMER_COMPACT_SLACK = 4096


class RequestTimers:
    """Per-request timers ("deadline", "grace") in one heap, fired in time order."""

    def __init__(self, live: Callable[[RequestId], bool], live_count: Callable[[], int]) -> None:
        self._live = live
        self._live_count = live_count
        self._heap: list[tuple[float, int, str, RequestId]] = []
        self._seq = itertools.count()  # ties fire in the order they were set

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, when: float, kind: str, request_id: RequestId) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), kind, request_id))
        if len(self._heap) > TIMER_COMPACT_FACTOR * (self._live_count() + TIMER_COMPACT_SLACK):
            self._heap = [t for t in self._heap if self._live(t[3])]
            heapq.heapify(self._heap)

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> Iterator[tuple[str, RequestId]]:
        """Pop and yield (kind, request id) of every timer due by ``now``, earliest first; timers
        set while iterating are seen if they are due too."""
        while self._heap and self._heap[0][0] <= now:
            _, _, kind, rid = heapq.heappop(self._heap)
            yield kind, rid
