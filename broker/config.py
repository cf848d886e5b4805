"""The broker's settings: one frozen dataclass, every duration in seconds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BrokerConfig:
    """Broker settings; every duration is in seconds."""

    endpoint: str = "tcp://127.0.0.1:5555"  # "tcp://127.0.0.1:*" binds a free port (see Broker.endpoint)
    heartbeat_interval_s: float = 1.0  # broker<->worker heartbeat period
    worker_liveness: int = 3  # missed heartbeat periods before a worker is declared dead
    max_queue: int = 1024  # requests waiting for a worker slot; beyond it -> Busy
    # Body bytes of all requests held (queued or in flight); beyond it -> Busy. max_queue alone
    # would let 1024 maximal messages (256 MiB each) through; 512 MiB holds 8 of those, or
    # thousands of decode steps.
    max_pending_bytes: int = 512 << 20
    # Body bytes of one request; beyond it -> ProtocolError "too_large" (edges send long prompts in
    # frames of --max-frame-mb, 8 MiB by default). A bound on what one message can hold up: libzmq
    # encrypts, copies and forwards a message whole, and a worker's heartbeats wait behind it.
    max_request_bytes: int = 32 << 20
    # Body bytes one client may have held at once (0: no limit); beyond it -> Busy with a retry hint,
    # so one client sending large frames fills its own share, not the broker's.
    max_client_bytes: int = 128 << 20
    # Attempts outstanding per worker (at least its max_batch); more would hide load from placement.
    worker_max_in_flight: int = 8
    # Body bytes dispatched to one worker and not yet answered (one request always goes): what its
    # heartbeats from the broker can queue behind, 0.2-0.3 s of CURVE (bench_frames.py). The rest waits here.
    worker_max_in_flight_bytes: int = 64 << 20
    default_deadline_s: float = 30.0  # budget of a request that names none (deadline_ms == 0)
    max_deadline_s: float = 600.0  # cap on a client's budget: a long CPU prefill fits, a leak does not
    no_worker_grace_s: float = 2.0  # how long an opener waits for some worker of its model to register
    # Workers one task may fail on (die, hang or miss the deadline while holding it) before it is
    # answered PoisonRequest and refused; also bounds the re-dispatches of a restartable opener.
    # 3: one worker killed by an operator mid-step, or one hang, must not mark a request poison.
    max_attempts: int = 3
    api_keys: frozenset[str] = frozenset()  # empty -> authentication off
    # An untouched session is dropped and its worker told to free it. Workers keep theirs a little
    # longer (cloud_worker's session_idle_ttl_s), so the broker's record is the one that ends first.
    session_idle_s: float = 300.0
    # Sessions one client may hold at once (0: no limit); past it an opener is answered Busy. A
    # client is its CURVE key, else its API key; without either there is no identity to count by.
    max_sessions_per_client: int = 32
    abandoned_grace_s: float = 30.0  # a timed-out attempt counts toward its worker's load this long
    open_kinds: frozenset[str] = frozenset({"open"})  # kinds that may create (pin) a session
    close_kinds: frozenset[str] = frozenset({"close"})  # kinds whose success unpins the session
    restartable_kinds: frozenset[str] = frozenset({"open"})  # safe to re-run on another worker
    warn_interval_s: float = 5.0  # at most one malformed-input warning per reason per interval
    # Recently ended sessions (lost with a worker, closed, expired), kept to explain WorkerLost and
    # to refuse an opener for the same id again.
    lost_sessions_remembered: int = 10_000
    # Answered request ids kept so that a copy arriving later (a link that duplicates, a client
    # retry of the same id) is dropped instead of being run a second time.
    done_requests_remembered: int = 10_000
    # A worker that failed (missed heartbeats, became unroutable) and registers again is given new
    # sessions only when no other worker has room, for this long: a flapping worker (a hang that
    # resumes, an overloaded host) should not keep attracting sessions it may lose again.
    failed_worker_avoid_s: float = 60.0
    # CURVE on every connection: the broker's keypair and the client/worker allowlists come from this
    # directory (see broker/transport.py); the lists are re-read when they change. None: plaintext.
    curve_keys_dir: str | None = None
    tasks_remembered: int = 10_000  # tasks with failures kept for poison detection (oldest forgotten)

    @property
    def worker_expiry_s(self) -> float:
        """Silence after which a worker is considered dead."""
        return self.heartbeat_interval_s * self.worker_liveness
