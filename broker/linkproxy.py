"""A link emulator between edge clients and the broker: delay, bandwidth, loss, duplication, reordering.

``tc netem`` is not available on every machine we test on (it needs a kernel
module and root), so this is a transparent ZeroMQ proxy that imposes the
properties of a WAN link in user space::

    client DEALER ──> [ROUTER front | LinkProxy | one DEALER per client] ──> broker ROUTER

Each client identity seen on the front socket gets its own back DEALER
connected upstream, so the broker sees one peer per client and its replies
come back on the socket that belongs to that client. Workers may connect
through the proxy the same way; nothing here reads the protocol.

The link model, per direction (uplink = towards the broker):

* serialisation: a message of ``n`` bytes occupies the direction's
  serialiser for ``n * 8 / bandwidth`` seconds, FIFO, so a large frame
  delays the messages queued behind it, as on a real link;
* propagation: ``rtt_ms / 2`` plus a uniform jitter in ``±jitter_ms``
  (clamped at zero). Jitter never reorders messages of a direction: a real
  path delivers one TCP stream in order, so a message is never delivered
  before the one admitted ahead of it;
* faults, drawn independently per message after it crossed the link:
  ``drop_rate`` (lost, but it did occupy the link), ``duplicate_rate`` (a
  second copy arrives with it) and ``delay_rate`` (held ``extra_delay_ms``
  longer; later messages overtake it: this is the only source of reordering).

Every decision comes from one seeded RNG per direction, so a given seed and
message sequence reproduces the same faults; with no seed one is drawn and
logged. All timing is one heap of due times driven by a poller whose timeout
is the next due time; the proxy never sleeps.

Bandwidth is shared by all clients of a direction (the proxy emulates one
access link), and only payload frames count (not ZeroMQ's framing or
ROUTER identities). The proxy is single-threaded: all state below is touched
only by the thread :meth:`LinkProxy.start` runs, except the counters, which
:meth:`LinkProxy.stats` reads under a lock. It never imports torch.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import zmq

from broker.sockets import Waker, close_socket, make_socket, poll_timeout_ms, recv_message, send_or_false
from broker.state import RateLimitedWarnings
from broker.transport import CurveClientKeys, setup_curve_client

logger = logging.getLogger(__name__)

# Messages taken from one socket per poll wake-up, so that due deliveries are
# not starved by a flood on one socket.
RECV_BATCH = 256
# Upper bound on one poll wait, so a clock jump or a missed wake-up self-heals.
MAX_POLL_S = 1.0
# ZeroMQ polls in whole milliseconds and rounding the wait up would make every hop up to 1 ms
# late. Waking half a millisecond before a due time and delivering whatever is due within that
# half millisecond centres the rounding error on zero instead (±0.5 ms per hop).
DUE_SLACK_S = 0.0005
# Idle back sockets are looked for at most this often (and at least four times per idle period).
IDLE_CHECK_S = 1.0
# How long stop() waits for the proxy thread (it wakes within one poll).
JOIN_TIMEOUT_S = 5.0
# At most one warning per reason per interval: a misbehaving peer must not flood the log.
WARN_INTERVAL_S = 5.0
BITS_PER_BYTE = 8
BITS_PER_MEGABIT = 1_000_000
MS_PER_S = 1000.0

UPLINK = 0
DOWNLINK = 1


def _check_rate(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def _check_nonneg(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class LinkConfig:
    """The emulated link; rates are per message and direction, durations in ms unless named otherwise."""

    rtt_ms: float = 0.0  # added round-trip time: each direction gets half
    jitter_ms: float = 0.0  # each one-way delay varies uniformly within ±jitter_ms
    uplink_mbps: float | None = None  # client -> broker bandwidth, megabits/s; None: unlimited
    downlink_mbps: float | None = None  # broker -> client bandwidth, megabits/s; None: unlimited
    drop_rate: float = 0.0  # probability a message is lost
    duplicate_rate: float = 0.0  # probability a message arrives twice
    delay_rate: float = 0.0  # probability a message is held back extra_delay_ms (reordering)
    extra_delay_ms: float = 0.0  # how long a held message is held
    seed: int | None = None  # fault and jitter RNG seed; None: drawn at random and logged
    fault_uplink: bool = True  # drop/duplicate/delay apply to client -> broker messages
    fault_downlink: bool = True  # drop/duplicate/delay apply to broker -> client messages
    max_clients: int = 1024  # back sockets kept at once; the least recently active is closed beyond it
    # A back socket silent this long (both ways, nothing queued) is closed. It must exceed the
    # longest request the broker may still be working on (BrokerConfig.max_deadline_s, 600 s),
    # or that request's reply would have no socket to come back on.
    client_idle_s: float = 900.0
    # Bytes admitted to one direction and not yet delivered; beyond it messages are tail-dropped
    # (counted as overflow). A single message larger than this still passes an empty link.
    max_queue_bytes: int = 512 << 20

    def __post_init__(self) -> None:
        for name in ("rtt_ms", "jitter_ms", "extra_delay_ms"):
            _check_nonneg(name, getattr(self, name))
        for name in ("drop_rate", "duplicate_rate", "delay_rate"):
            _check_rate(name, getattr(self, name))
        for name in ("uplink_mbps", "downlink_mbps"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0 (or None for unlimited), got {v}")
        if self.delay_rate > 0 and self.extra_delay_ms <= 0:
            raise ValueError("delay_rate > 0 needs extra_delay_ms > 0, else nothing is held back")
        if self.max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {self.max_clients}")
        if not (math.isfinite(self.client_idle_s) and self.client_idle_s > 0):
            raise ValueError(f"client_idle_s must be > 0, got {self.client_idle_s}")
        if self.max_queue_bytes < 1:
            raise ValueError(f"max_queue_bytes must be >= 1, got {self.max_queue_bytes}")

    def describe(self) -> str:
        """One line for logs."""

        def bw(v: float | None) -> str:
            return "unlimited" if v is None else f"{v:g} Mbit/s"

        return (
            f"rtt {self.rtt_ms:g} ms ±{self.jitter_ms:g} ms, up {bw(self.uplink_mbps)}, "
            f"down {bw(self.downlink_mbps)}, drop {self.drop_rate:g}, duplicate {self.duplicate_rate:g}, "
            f"hold {self.delay_rate:g} for {self.extra_delay_ms:g} ms"
        )


@dataclass(frozen=True)
class DirectionStats:
    """Counters of one direction; ``messages``/``bytes`` count what entered the link."""

    messages: int = 0
    bytes: int = 0
    delivered: int = 0  # messages handed to the far side, duplicates included
    delivered_bytes: int = 0
    dropped: int = 0  # lost by drop_rate
    duplicated: int = 0  # extra copies made by duplicate_rate
    delayed: int = 0  # held back by delay_rate
    overflow: int = 0  # tail-dropped because max_queue_bytes were queued
    undeliverable: int = 0  # the far side was gone or full when the message came due


@dataclass(frozen=True)
class LinkStats:
    """A snapshot of :meth:`LinkProxy.stats`."""

    uplink: DirectionStats
    downlink: DirectionStats
    clients: int  # back sockets open now
    clients_evicted: int  # back sockets closed for idleness or the max_clients cap
    seed: int  # the RNG seed in use (reproduce a run with LinkConfig(seed=...))

    @property
    def dropped(self) -> int:
        """Messages lost by drop_rate, both directions."""
        return self.uplink.dropped + self.downlink.dropped

    @property
    def duplicated(self) -> int:
        """Extra copies made by duplicate_rate, both directions."""
        return self.uplink.duplicated + self.downlink.duplicated

    @property
    def delayed(self) -> int:
        """Messages held back by delay_rate, both directions."""
        return self.uplink.delayed + self.downlink.delayed


@dataclass
class LinkDirection:
    """The timing and fault model of one direction, free of sockets (so it is testable alone).

    ``admit`` is called once per arriving message in arrival order and
    returns the monotonic times at which its copies are to be delivered
    (none if it was lost); ``delivered`` when a copy has left.
    """

    bandwidth_mbps: float | None
    one_way_s: float
    jitter_s: float
    drop_rate: float
    duplicate_rate: float
    delay_rate: float
    extra_delay_s: float
    max_queue_bytes: int
    rng: random.Random
    busy_until: float = 0.0  # when the serialiser has finished everything admitted so far
    fifo_floor: float = 0.0  # due time of the last in-order message: later ones never overtake it
    queued_bytes: int = 0  # admitted copies not yet delivered
    counts: dict[str, int] = field(default_factory=lambda: {f.name: 0 for f in fields(DirectionStats)})

    @classmethod
    def from_config(cls, config: LinkConfig, direction: int, rng: random.Random) -> LinkDirection:
        """The uplink or downlink half of ``config``."""
        faults = config.fault_uplink if direction == UPLINK else config.fault_downlink
        return cls(
            bandwidth_mbps=config.uplink_mbps if direction == UPLINK else config.downlink_mbps,
            one_way_s=config.rtt_ms / 2 / MS_PER_S,
            jitter_s=config.jitter_ms / MS_PER_S,
            drop_rate=config.drop_rate if faults else 0.0,
            duplicate_rate=config.duplicate_rate if faults else 0.0,
            delay_rate=config.delay_rate if faults else 0.0,
            extra_delay_s=config.extra_delay_ms / MS_PER_S,
            max_queue_bytes=config.max_queue_bytes,
            rng=rng,
        )

    def admit(self, now: float, nbytes: int) -> list[float]:
        """Due times of the copies of a message of ``nbytes`` arriving at ``now``."""
        c = self.counts
        c["messages"] += 1
        c["bytes"] += nbytes
        if self.queued_bytes and self.queued_bytes + nbytes > self.max_queue_bytes:
            c["overflow"] += 1
            return []
        start = max(now, self.busy_until)
        if self.bandwidth_mbps is not None:
            self.busy_until = start + nbytes * BITS_PER_BYTE / (self.bandwidth_mbps * BITS_PER_MEGABIT)
        else:
            self.busy_until = start
        delay = self.one_way_s
        if self.jitter_s:
            delay = max(0.0, delay + self.rng.uniform(-self.jitter_s, self.jitter_s))
        due = max(self.busy_until + delay, self.fifo_floor)
        self.fifo_floor = due
        if self.drop_rate and self.rng.random() < self.drop_rate:
            c["dropped"] += 1
            return []
        copies = 1
        if self.duplicate_rate and self.rng.random() < self.duplicate_rate:
            copies = 2
            c["duplicated"] += 1
        if self.delay_rate and self.rng.random() < self.delay_rate:
            due += self.extra_delay_s  # not in fifo_floor: the messages behind it may overtake it
            c["delayed"] += 1
        self.queued_bytes += nbytes * copies
        return [due] * copies

    def delivered(self, nbytes: int, ok: bool) -> None:
        """One copy of an admitted message came due; ``ok`` says whether the far side took it."""
        self.queued_bytes -= nbytes
        if ok:
            self.counts["delivered"] += 1
            self.counts["delivered_bytes"] += nbytes
        else:
            self.counts["undeliverable"] += 1

    def snapshot(self) -> DirectionStats:
        """The counters as a frozen value."""
        return DirectionStats(**self.counts)


@dataclass(eq=False)
class _Client:
    """One front identity and the back socket that speaks for it upstream."""

    identity: bytes
    sock: zmq.Socket
    last_active: float
    pending: int = 0  # uplink copies scheduled for this socket and not yet due
    closed: bool = False


# A scheduled delivery: due time, tie-breaking sequence, direction, client, frames, payload bytes.
_Timer = tuple[float, int, int, _Client, list[Any], int]


def _payload_bytes(frames: list[Any]) -> int:
    return sum(len(f) for f in frames)


class LinkProxy:
    """The proxy. Binds in ``__init__`` (so ``endpoint`` is known); ``start()`` runs it in a thread.

    Use as a context manager, or call ``stop()`` (from any thread) when done:
    it closes every socket, and the context if the proxy made it.
    """

    def __init__(
        self,
        listen_endpoint: str,
        upstream_endpoint: str,
        config: LinkConfig | None = None,
        context: zmq.Context | None = None,
        upstream_curve: CurveClientKeys | None = None,
        front_setup: Callable[[zmq.Socket], None] | None = None,
    ) -> None:
        self.config = config or LinkConfig()
        self.upstream_endpoint = upstream_endpoint
        # With CURVE the proxy connects upstream as one client (these keys) for all its clients, and
        # ``front_setup`` (e.g. transport.setup_curve_server) secures the listening side.
        self.upstream_curve = upstream_curve
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._front = make_socket(self._ctx, zmq.ROUTER)
        self._front.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply for a gone client raises, is counted
        if front_setup is not None:
            front_setup(self._front)
        try:
            self._front.bind(listen_endpoint)
        except zmq.ZMQError:
            close_socket(self._front)
            if self._own_context:
                self._ctx.term()
            raise
        self.endpoint: str = self._front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.seed: int = (
            self.config.seed if self.config.seed is not None else random.SystemRandom().getrandbits(32)
        )
        seeder = random.Random(self.seed)
        # One RNG per direction: uplink decisions depend only on the uplink's message sequence.
        self._dirs = (
            LinkDirection.from_config(self.config, UPLINK, random.Random(seeder.getrandbits(64))),
            LinkDirection.from_config(self.config, DOWNLINK, random.Random(seeder.getrandbits(64))),
        )
        self._clients: OrderedDict[bytes, _Client] = OrderedDict()  # least recently active first
        self._by_socket: dict[zmq.Socket, _Client] = {}
        self._timers: list[_Timer] = []
        self._seq = itertools.count()
        self._evicted = 0
        self._lock = threading.Lock()  # guards the counters against stats() readers
        self._poller = zmq.Poller()
        self._waker = Waker()
        self._stopping = threading.Event()
        self._warn = RateLimitedWarnings(logger, WARN_INTERVAL_S)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._idle_check_s = min(IDLE_CHECK_S, self.config.client_idle_s / 4)
        logger.info("link proxy %s -> %s: %s (seed %d)", self.endpoint, upstream_endpoint,
                    self.config.describe(), self.seed)  # fmt: skip

    def set_rtt(self, rtt_ms: float) -> None:
        """Change the emulated round trip from now on (the link got slower or faster); messages
        already admitted keep their due times."""
        _check_nonneg("rtt_ms", rtt_ms)
        with self._lock:
            for d in self._dirs:
                d.one_way_s = rtt_ms / 2 / MS_PER_S

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Run the proxy in a background thread."""
        if self._thread is not None or self._closed:
            raise RuntimeError("a LinkProxy can be started once")
        self._thread = threading.Thread(target=self._run, name="linkproxy", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Stop forwarding, drop whatever is still queued in the link, close all sockets.

        Raises TimeoutError if the thread does not finish within ``timeout_s``
        (it wakes within one poll, so that would be a bug, not a slow link).
        """
        self._stopping.set()
        self._waker.wake()
        if self._thread is None:
            if not self._closed:
                self._shutdown()
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"link proxy thread did not stop within {timeout_s} s")

    @property
    def running(self) -> bool:
        """True while the proxy thread forwards (False before start, after stop, or if it failed)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def __enter__(self) -> LinkProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> LinkStats:
        """Counters so far (safe from any thread)."""
        with self._lock:
            return LinkStats(
                uplink=self._dirs[UPLINK].snapshot(),
                downlink=self._dirs[DOWNLINK].snapshot(),
                clients=len(self._clients),
                clients_evicted=self._evicted,
                seed=self.seed,
            )

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        self._poller.register(self._front, zmq.POLLIN)
        self._poller.register(self._waker.fileno(), zmq.POLLIN)
        next_idle_check = time.monotonic() + self._idle_check_s
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                with self._lock:
                    self._deliver_due(now + DUE_SLACK_S)
                    if now >= next_idle_check:
                        self._close_idle(now)
                        next_idle_check = now + self._idle_check_s
                wake_at = (
                    min(self._timers[0][0] - DUE_SLACK_S, next_idle_check)
                    if self._timers
                    else next_idle_check
                )
                events = dict(self._poller.poll(poll_timeout_ms(wake_at, now, MAX_POLL_S)))
                if self._waker.fileno() in events:
                    self._waker.drain()
                now = time.monotonic()
                with self._lock:
                    if self._front in events:
                        self._drain_front(now)
                    for sock in events:
                        client = self._by_socket.get(sock)
                        if client is not None and not client.closed:
                            self._drain_back(client, now)
        except Exception:
            logger.exception("link proxy %s failed; it no longer forwards", self.endpoint)
        finally:
            self._shutdown()

    def _drain_front(self, now: float) -> None:
        for _ in range(RECV_BATCH):
            frames = recv_message(self._front, 1)
            if frames is None:
                return
            identity, payload = frames[0], frames[1:]
            if not payload:
                continue
            client = self._client_for(identity, now)
            self._admit(UPLINK, client, payload, now)

    def _drain_back(self, client: _Client, now: float) -> None:
        for _ in range(RECV_BATCH):
            frames = recv_message(client.sock, 0)
            if frames is None:
                return
            self._touch(client, now)
            self._admit(DOWNLINK, client, frames, now)

    def _admit(self, direction: int, client: _Client, frames: list[Any], now: float) -> None:
        nbytes = _payload_bytes(frames)
        dues = self._dirs[direction].admit(now, nbytes)
        for due in dues:
            heapq.heappush(self._timers, (due, next(self._seq), direction, client, frames, nbytes))
        if direction == UPLINK:
            client.pending += len(dues)

    def _deliver_due(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, direction, client, frames, nbytes = heapq.heappop(timers)
            if direction == UPLINK:
                client.pending -= 1
                ok = not client.closed and self._send(client.sock, frames)
            else:
                # The front identity, not the back socket, routes a reply: it still arrives
                # if the back socket was evicted meanwhile.
                ok = self._send(self._front, [client.identity, *frames])
            self._dirs[direction].delivered(nbytes, ok)

    def _send(self, sock: zmq.Socket, frames: list[Any]) -> bool:
        try:
            return send_or_false(sock, frames)
        except zmq.ZMQError as exc:
            self._warn.warn("send", "link proxy %s could not forward a message: %s", self.endpoint, exc)
            return False

    # --------------------------------------------------------------- clients
    def _client_for(self, identity: bytes, now: float) -> _Client:
        client = self._clients.get(identity)
        if client is not None:
            self._touch(client, now)
            return client
        if len(self._clients) >= self.config.max_clients:
            _, oldest = next(iter(self._clients.items()))
            self._warn.warn("max_clients", "link proxy at max_clients=%d: closing the least recently "
                            "active client's socket", self.config.max_clients)  # fmt: skip
            self._close_client(oldest)
        sock = make_socket(self._ctx, zmq.DEALER)
        setup_curve_client(sock, self.upstream_curve)
        sock.connect(self.upstream_endpoint)
        client = _Client(identity, sock, now)
        self._clients[identity] = client
        self._by_socket[sock] = client
        self._poller.register(sock, zmq.POLLIN)
        logger.debug("link proxy: new client %s", identity.hex())
        return client

    def _touch(self, client: _Client, now: float) -> None:
        client.last_active = now
        if not client.closed:
            self._clients.move_to_end(client.identity)

    def _close_idle(self, now: float) -> None:
        cutoff = now - self.config.client_idle_s
        idle = [c for c in self._clients.values() if c.last_active <= cutoff and c.pending == 0]
        for client in idle:
            logger.debug("link proxy: closing idle client %s", client.identity.hex())
            self._close_client(client)

    def _close_client(self, client: _Client) -> None:
        client.closed = True
        self._clients.pop(client.identity, None)
        self._by_socket.pop(client.sock, None)
        self._poller.unregister(client.sock)
        close_socket(client.sock)
        self._evicted += 1

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        queued = 0
        try:
            with self._lock:
                for client in list(self._clients.values()):
                    client.closed = True
                    close_socket(client.sock)
                self._clients.clear()
                self._by_socket.clear()
                queued = len(self._timers)
                self._timers.clear()
            close_socket(self._front)
            self._waker.close()
            if self._own_context:
                self._ctx.term()
        finally:
            logger.info("link proxy %s stopped (%d queued messages discarded)", self.endpoint, queued)
