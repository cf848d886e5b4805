"""Per-session state on a worker, with limits: how many sessions, how long idle, how long."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from broker.errors import Busy, CacheLimitExceeded
from broker.wire.crypto import Cipher
from partition.kv_cache import SegmentKVCache
from partition.reduction import Reduction
from partition.sampling import SamplingParams


@dataclass
class Session:
    session_id: str
    layer_lo: int  # the edge's split: this session starts at layer layer_lo
    cipher: Cipher
    sampling: SamplingParams
    cache: SegmentKVCache
    last_used: float = field(default_factory=time.monotonic)
    opened_at: float = field(default_factory=time.monotonic)  # the oldest session's growth preempts (reserve)
    reduction: Reduction | None = None  # steps arrive (1, T, D) and are reconstructed to (1, T, H)
    last_step: int = -1  # highest step number run: an older one is a late copy, never run again
    epoch: int = 0  # of the last step run; a step of an older epoch is stale, a newer one may rewind
    # The main model's token after the last position the cache holds (what the last step
    # returned): a conditional step runs only if its first token is this one. None: no step yet.
    expected: int | None = None
    close_digest: bytes = b""  # of the key the edge's close must reveal (session_protocol.check_close_key)
    # Chained digests of the rows behind each position the cache holds (partition/prefix_cache.py),
    # so the whole session joins the worker's prefix cache when it ends. None: not followed.
    digests: list[bytes] | None = None
    # What opened it: a digest of its opener's request id and content, and the answer sent. The
    # broker re-runs an opener whose worker it lost under the same request id, and that worker can
    # be this one again (it came back, or it is the only one): the same opener for a session no
    # step has touched yet gets the same answer again (see CloudWorker._open).
    opener: bytes = b""
    open_answer: tuple[dict, list] | None = None
    broker_epoch: int = 0  # of the broker process that opened it (WorkerConnection.broker_epoch)


# Ids of ended sessions remembered per session slot, so that an opener replayed after its
# session closed or expired is refused (past that, a replayed opener gets a session under keys
# none of the captured steps authenticate in: see broker/wire/crypto.py).
ENDED_PER_SLOT = 64


class SessionTable:
    """Sessions by id, least recently used first. Idle sessions expire; a full table, or KV
    caches that would outgrow ``max_cache_bytes`` together, say Busy (the oldest session's growth
    preempts younger ones instead: ``reserve``). The ids of ended sessions are remembered
    (``ended``): an id is opened once."""

    def __init__(self, max_sessions: int, idle_ttl_s: float, max_cache_bytes: int | None = None,
                 on_end: Callable[[Session, str], None] | None = None) -> None:
        self.max_sessions = max_sessions
        self.on_end = on_end  # called with each session that ends here, and how (before its cache is freed)
        self.idle_ttl_s = idle_ttl_s
        self.max_cache_bytes = max_cache_bytes
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> how it ended
        self._ended_limit = max(4096, ENDED_PER_SLOT * max_sessions)

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        """The session, without marking it used: only an authenticated request does (``touch``),
        so traffic anyone can send (a replayed or forged step) never keeps a session alive."""
        return self._sessions.get(session_id)

    def touch(self, session: Session) -> None:
        session.last_used = time.monotonic()
        self._sessions.move_to_end(session.session_id)

    def ended(self, session_id: str) -> str | None:
        """How the session ``session_id`` ended ("closed", "expired", ...), if it did here."""
        return self._ended.get(session_id)

    def add(self, session: Session, now: float | None = None) -> None:
        self.expire(now)
        if session.session_id in self._sessions or session.session_id in self._ended:
            raise ValueError(f"session {session.session_id} was opened here before")
        if len(self._sessions) >= self.max_sessions:
            raise Busy(
                f"this worker holds its maximum of {self.max_sessions} sessions; "
                "retry later or start more workers"
            )
        self._sessions[session.session_id] = session

    def remove(self, session_id: str, why: str = "closed") -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        if self.on_end is not None:
            self.on_end(session, why)
        self._ended[session_id] = why
        while len(self._ended) > self._ended_limit:
            self._ended.popitem(last=False)
        return True

    def expire(self, now: float | None = None) -> list[str]:
        """Drop sessions idle for longer than the TTL; returns their ids."""
        now = time.monotonic() if now is None else now
        gone = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_ttl_s]
        for sid in gone:
            self.remove(sid, "expired")
        return gone

    def cache_bytes(self) -> int:
        """Memory the sessions' KV caches hold (allocated, not just filled)."""
        return sum(s.cache.nbytes() for s in self._sessions.values())

    def reserve(self, nbytes: int, what: str, session: Session | None = None) -> list[str]:
        """Busy unless the caches may take ``nbytes`` more (``what`` would take them: a new
        session, or ``session``'s next step). Returns the ids of the sessions ended to make room.

        Sessions admitted together can each need to grow while the others hold the rest: were
        every one refused, none would finish and free its cache, and each would retry until its
        deadline. So the oldest session held here goes on: the youngest others are ended
        ("preempted", as a serving system preempts the latest request) until its growth fits;
        their edges reopen and replay (the prefix cache may keep what they had computed). What
        does not fit even then is Busy. A session that would not fit into an empty worker (a new
        one, or one grown so long) can never go on here: CacheLimitExceeded, not retried."""
        if self.max_cache_bytes is None or nbytes <= 0:
            return []
        held = self.cache_bytes()
        if held + nbytes <= self.max_cache_bytes:
            return []
        alone = nbytes + (session.cache.nbytes() if session is not None else 0)
        if alone > self.max_cache_bytes:
            raise CacheLimitExceeded(
                f"{what} needs {nbytes / 2**20:.1f} MiB of KV cache, and the session would then hold "
                f"{alone / 2**20:.1f} MiB, more than this worker's whole --max-cache-mb of "
                f"{self.max_cache_bytes / 2**20:g} MiB: it cannot go on here; give the worker a larger "
                "--max-cache-mb, or use another worker")
        if session is not None and session is self.oldest():
            ended = []
            for other in sorted(self._sessions.values(), key=lambda s: s.opened_at, reverse=True):
                if held + nbytes <= self.max_cache_bytes:
                    break
                if other is not session:
                    held -= other.cache.nbytes()
                    self.remove(other.session_id, "preempted")
                    ended.append(other.session_id)
            return ended
        raise Busy(f"{what} needs {nbytes / 2**20:.1f} MiB of KV cache and this worker's caches hold "
                   f"{held / 2**20:.1f} of its {self.max_cache_bytes / 2**20:.0f} MiB (--max-cache-mb); "
                   "retry later or use another worker")

    def oldest(self) -> Session | None:
        """The session opened first of those held here."""
        return min(self._sessions.values(), key=lambda s: s.opened_at, default=None)

    def ids(self) -> list[str]:
        return list(self._sessions)
