"""Choosing the split on the device and moving it during a generation.

``SplitPlanner`` is shared by every generation of one engine: it measures the device (a
``DeviceMonitor``) and the link (a ping through the broker), reads the workers' reported
per-layer times and layer ranges from the broker's status, and prices every split with the cost
model (``partition/planner.py``). A split no registered worker serves is never chosen.

``ReplanWatch`` is one generation's view: every ``replan_every`` tokens it compares the
measurements with those its current plan came from (hysteresis in ``changed_beyond``) and
proposes a new split when the new choice scores at least ``replan_margin`` better than staying.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from broker.errors import EdgeCloudError, NoWorkerAvailable, is_unavailable
from edge_worker.conditions import changed_beyond, to_conditions, unmeasured
from partition.models import ModelSource
from partition.planner import WIFI, Conditions, Plan, PowerModel, Weights, plan
from partition.profile import compute_probe_ms, load_or_measure_profile

log = logging.getLogger(__name__)

# A ping slower than this means the cloud is as good as unreachable for interactive use.
PING_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Decision:
    """One split decision and the measurements behind it."""

    k: int
    reason: str  # "forced", "planned", "cloud unreachable", "no worker serves this model", "replanned: ..."
    rtt_ms: float | None
    conditions: Conditions | None
    plan: Plan | None
    at: float  # time.time()
    at_step: int = 0  # the generation step it took effect at (0: before the first token)
    # Conditions fields the plan took from defaults, not measurements ("bandwidth_mbps" until a
    # transfer was timed, "cloud_layer_ms" when no worker reported its speed).
    assumed: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """For the ``--json`` object: the choice, the measurements behind it, and what the planner
        predicted for it (so a run can be checked against its own forecast)."""
        d: dict[str, Any] = {"k": self.k, "reason": self.reason, "rtt_ms": self.rtt_ms, "at_step": self.at_step}
        c = self.conditions
        if c is not None:
            d["assumed"] = list(self.assumed)
            cloud = (round(sum(c.cloud_layer_ms) / len(c.cloud_layer_ms), 4) if c.cloud_layer_ms
                     else None)
            d["measured"] = {"rtt_ms": round(c.rtt_ms, 3), "bandwidth_mbps": round(c.bandwidth_mbps, 3),
                             "edge_cpu_load": round(c.edge_cpu_load, 3),
                             "edge_slowdown": round(c.edge_slowdown, 3), "cloud_layer_ms": cloud,
                             "cloud_speedup": None if cloud is not None else c.cloud_speedup}
        if self.plan is not None:
            row = self.plan.chosen
            d["predicted"] = {"latency_ms": round(row.latency_ms, 1), "decode_ms_per_token":
                              round(row.decode_ms_per_token, 3), "energy_j": round(row.energy_j, 4),
                              "memory_bytes": row.memory_bytes}
            w = self.plan.weights  # as given, normalised to sum 1 (the battery may shift what priced the split)
            d["weights"] = {"energy": round(w.energy, 4), "latency": round(w.latency, 4), "memory": round(w.memory, 4)}
        return d

    def summary(self) -> str:
        c = self.conditions
        if c is None:
            return f"split {self.k} ({self.reason}; no measurements)"

        def mark(field: str) -> str:
            return " (assumed)" if field in self.assumed else ""

        cond = (f"rtt {c.rtt_ms:.1f} ms, uplink {c.bandwidth_mbps:.1f} Mbit/s{mark('bandwidth_mbps')}, "
                f"cpu load {c.edge_cpu_load:.2f}{mark('edge_cpu_load')}")
        if "cloud_layer_ms" in self.assumed:
            cond += f", cloud {c.cloud_speedup:g}x this device (assumed)"
        return f"split {self.k} ({self.reason}; {cond})"


def servable_splits(workers: list[dict], model_id: str, n_layers: int) -> set[int]:
    """The splits ``k < n_layers`` that some registered worker of ``model_id`` can serve (a worker
    holding layers ``[lo, hi)`` serves every ``lo <= k < hi``). Pure: the broker's status rows."""
    splits: set[int] = set()
    for w in workers:
        if w.get("model_id") != model_id:
            continue
        for lo, hi in w.get("layer_ranges") or [(0, n_layers)]:
            splits.update(range(max(0, int(lo)), min(int(hi), n_layers)))
    return splits


def _round_trips_ms(trace: list[dict]) -> list[float]:
    """Transport times of the steps that were one request and its reply, not retried (the first
    step also opens the session, a move's first step replays every position): round trips."""
    return [s["transport_ms"] for s in trace if s["round_trips"] == 1 and not s["retries"]]


class SplitPlanner:
    """Measures, then prices every split for one model and one set of privacy settings."""

    def __init__(self, source: ModelSource, client, weights: Weights, *, monitor: Any = None,
                 wire_dtype: str = "fp16", reduce_dims: int | None = None, min_split: int = 0,
                 power: PowerModel = WIFI, base_conditions: Conditions | None = None,
                 drafter_bytes: Callable[[int], int] | None = None) -> None:
        self.source = source
        self.client = client
        self.weights = weights
        self.monitor = monitor
        self.wire_dtype = wire_dtype
        self.reduce_dims = reduce_dims
        self.min_split = min_split
        self.power = power
        self.base_conditions = base_conditions or Conditions()
        self.drafter_bytes = drafter_bytes  # the edge's drafting memory at a split (an int8 copy)
        self._lock = threading.Lock()  # the monitor's snapshot and the profile's first measurement

    @functools.cached_property
    def profile(self):
        """This model's per-layer profile on this machine (measured once, then read from its cache;
        kept here so that a plan does not read the file for each of its parts)."""
        return load_or_measure_profile(self.source)

    def _workers(self) -> list[dict] | None:
        """The broker's worker rows, or None when it does not answer. A refused key or a protocol
        error is raised: a plan must not read it as "no worker serves this model" and run locally."""
        try:
            return list(self.client.status(PING_TIMEOUT_S).get("workers", []))
        except EdgeCloudError as exc:
            if not is_unavailable(exc):
                raise
            log.debug("no worker list from the broker: %s", exc)
            return None

    def _layer_ms(self, workers: list[dict] | None) -> float | None:
        """The median per-layer decode time the registered workers of this model reported."""
        times = sorted(float(w["per_layer_ms"]) for w in workers or ()
                       if w.get("model_id") == self.source.model_id and float(w.get("per_layer_ms") or 0) > 0)
        return times[len(times) // 2] if times else None

    def _edge_slowdown(self) -> float | None:
        """This device's compute speed now against when its profile was measured (a few ms)."""
        baseline = self.profile.probe_ms
        return compute_probe_ms() / baseline if baseline > 0 else None

    def with_measured_compute(self, conditions: Conditions, workers: list[dict] | None) -> Conditions:
        """``conditions`` with both sides' compute speed as measured now: the workers' reported
        per-layer time (rather than an assumed speed-up) and this device's probe."""
        layer_ms = self._layer_ms(workers)
        if layer_ms is not None:
            conditions = replace(conditions, cloud_layer_ms=(layer_ms,) * self.source.n_layers)
        return replace(conditions, edge_slowdown_measured=self._edge_slowdown())

    @staticmethod
    def assumed(snapshot: Any, conditions: Conditions) -> tuple[str, ...]:
        """What a plan on ``conditions`` (made from ``snapshot``, None without a monitor) assumes."""
        return unmeasured(snapshot) + (() if conditions.cloud_layer_ms else ("cloud_layer_ms",))

    def measure_conditions(self) -> tuple[Conditions, float | None]:
        """Conditions for the planner from the device monitor and a ping through the broker."""
        conditions, rtt_ms, _workers, _snapshot = self._measure()
        return conditions, rtt_ms

    def _measure(self, unreachable_ok: bool = True) -> tuple[Conditions, float | None, list[dict] | None, Any]:
        """(conditions, rtt_ms or None when the broker did not answer, the workers' status rows,
        the monitor's snapshot or None). A broker that does not answer is raised unless
        ``unreachable_ok``; a refused key or a protocol error always is."""
        conditions = self.base_conditions
        snapshot = None
        if self.monitor is not None and hasattr(self.monitor, "snapshot"):
            snapshot = self.monitor.snapshot()
            conditions = to_conditions(snapshot, conditions)
        # Ping on this thread even when the monitor pings too: it is the freshest reading of the
        # link this generation will use, and it proves the broker answers before we commit to it.
        try:
            rtt_ms = self.client.ping(PING_TIMEOUT_S) * 1e3
        except EdgeCloudError as exc:
            if not (unreachable_ok and is_unavailable(exc)):
                raise  # a refused key or a protocol error is never papered over by a local run
            log.warning("cloud unreachable (%s)", exc)
            return conditions, None, None, snapshot
        workers = self._workers()
        return self.with_measured_compute(replace(conditions, rtt_ms=rtt_ms), workers), rtt_ms, workers, snapshot

    def choose(self, prompt_tokens: int, new_tokens: int, fallback: bool = True) -> tuple[Decision, Any]:
        """A planned decision and the monitor snapshot it came from (the re-plan reference).
        Without ``fallback`` a cloud that does not answer, or serves none of this model's splits,
        is raised (``BrokerUnavailable``, ``NoWorkerAvailable``) rather than planned around by
        running every layer here."""
        n = self.source.n_layers
        conditions, rtt_ms, workers, measured_from = self._measure(unreachable_ok=fallback)
        assumed = self.assumed(measured_from, conditions)
        if rtt_ms is None:
            return Decision(n, "cloud unreachable", None, conditions, None, time.time(), assumed=assumed), None
        allowed = servable_splits(workers or [], self.source.model_id, n)
        if not allowed:
            others = sorted({str(w.get("model_id")) for w in workers or []})
            if not fallback:
                raise NoWorkerAvailable(f"no registered worker serves {self.source.model_id} (the workers serve: "
                                        f"{', '.join(others) or 'nothing'}), and the fallback to running every "
                                        "layer here is off")
            log.warning("no registered worker serves %s (workers serve: %s); running every layer here",
                        self.source.model_id, ", ".join(others) or "nothing")
            return Decision(n, "no worker serves this model", rtt_ms, conditions, None, time.time(),
                            assumed=assumed), None
        snapshot = None
        if self.monitor is not None and hasattr(self.monitor, "record_rtt"):
            with self._lock:
                self.monitor.record_rtt(rtt_ms / 1e3)
                snapshot = self.monitor.snapshot()
        chosen = self._plan(conditions, prompt_tokens, new_tokens, allowed)
        return Decision(chosen.k, "planned", rtt_ms, conditions, chosen, time.time(), assumed=assumed), snapshot

    def _plan(self, conditions: Conditions, prompt_tokens: int, new_tokens: int, allowed: set[int]) -> Plan:
        return plan(self.profile, conditions, self.weights, power=self.power, prompt_tokens=prompt_tokens,
                    new_tokens=new_tokens, wire_dtype=self.wire_dtype, min_split=self.min_split,
                    allowed_splits=allowed | {self.source.n_layers}, reduce_dims=self.reduce_dims,
                    drafter_bytes=self.drafter_bytes)

    def feed(self, trace: list[dict]) -> None:
        """Real steps are the best link measurements: decode steps carry ~1 KB, so their transport
        time is a round trip."""
        if self.monitor is None or not hasattr(self.monitor, "record_rtt"):
            return
        for rtt_ms in _round_trips_ms(trace):
            self.monitor.record_rtt(rtt_ms / 1e3)

    def feed_upload(self, trace: list[dict]) -> None:
        """The prefill's extra time over the median round trip is its upload."""
        rtts = _round_trips_ms(trace)
        if self.monitor is None or not rtts or not trace[0]["round_trips"]:
            return
        first = trace[0]
        upload_s = (first["transport_ms"] - sorted(rtts)[len(rtts) // 2]) / 1e3
        if upload_s > 0 and hasattr(self.monitor, "record_transfer"):
            self.monitor.record_transfer(first["bytes_sent"], upload_s, "up")


class ReplanWatch:
    """One planned generation's re-planning state (the SplitMover's ``replan``)."""

    def __init__(self, planner: SplitPlanner, snapshot: Any, prompt_tokens: int, new_tokens: int,
                 every: int = 8, margin: float = 0.1) -> None:
        self.planner = planner
        self.snapshot = snapshot  # what the current plan came from; moves with every re-plan
        self.prompt_tokens = prompt_tokens
        self.new_tokens = new_tokens
        self.every = every
        self.margin = margin
        self.checked_at = 0
        self.trace_fed = 0

    def feed(self, trace: list[dict]) -> None:
        """Give the monitor the round trips of the trace entries it has not seen yet."""
        self.planner.feed(trace[self.trace_fed:])
        self.trace_fed = len(trace)

    def replan(self, step: int, trace: list[dict], current: int) -> Decision | None:
        planner = self.planner
        monitor = planner.monitor
        if step - self.checked_at < self.every or monitor is None or self.snapshot is None:
            return None
        self.checked_at = step
        self.feed(trace)
        snap = monitor.snapshot()
        changed = changed_beyond(self.snapshot, snap)
        if not changed or not snap.cloud_reachable:
            return None
        try:
            workers = planner._workers()
        except EdgeCloudError as exc:  # the generation's own steps hear of it; a re-plan only waits
            log.warning("no re-plan at step %d: %s", step, exc)
            return None
        if workers is None:  # the broker did not answer: nothing to plan on
            return None
        conditions = planner.with_measured_compute(to_conditions(snap, planner.base_conditions), workers)
        allowed = servable_splits(workers or [], planner.source.model_id, planner.source.n_layers)
        new = planner._plan(conditions, self.prompt_tokens + step, max(1, self.new_tokens - step), allowed)
        self.snapshot = snap  # the reference moves with every re-plan: drift accumulates
        stay, best = new.table[current], new.chosen
        if best.k == current or (stay.feasible and stay.score is not None
                                 and best.score > stay.score * (1 - self.margin)):
            log.info("re-planned at step %d (%s changed; rtt %.1f ms): staying at split %d (score %.3f; best "
                     "split %d scores %.3f)", step, ", ".join(changed), conditions.rtt_ms, current,
                     stay.score or 0.0, best.k, best.score or 0.0)
            return None
        decision = Decision(best.k, "replanned: " + ", ".join(changed), conditions.rtt_ms, conditions, new,
                            time.time(), at_step=step, assumed=planner.assumed(snap, conditions))
        log.info("step %d: %s", step, decision.summary())
        return decision
