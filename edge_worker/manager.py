"""``EdgeCloudManager``: the original design's entry point.

It measures the device and the link, prices every split with the cost model
(``partition/planner.py``), runs the chosen split and returns token ids like ``generate()``::

    manager = EdgeCloudManager(model=main_model, device_monitor=DeviceMonitor(background_monitoring=True),
                               cloud_client=CloudClient(api_key="..."), energy_weight=0.3,
                               latency_weight=0.4, memory_weight=0.3)
    output_ids = manager.process_hybrid(input_ids)  # (1, T + new) like generate(): prompt, then new tokens

Defaults: ``max_new_tokens`` from the keyword, else ``$EDGECLOUD_MAX_NEW_TOKENS``, else 64; the
broker address and keys from the CloudClient (``$EDGECLOUD_BROKER``, ``$EDGECLOUD_KEYS``).
When the cloud cannot be reached the manager runs locally (it holds the model) and says so in
the log and in ``last_result``. Every decision is logged with the measurements behind it and kept
in ``decisions``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from broker.errors import EdgeCloudError
from edge_worker.cloud_client import CloudClient
from edge_worker.config import DEFAULT_TOKENS
from edge_worker.device_monitor import changed_beyond, to_conditions
from edge_worker.generation import EdgeGenerator, GenerationResult, mode_for
from edge_worker.mini_llm import MiniLLMHandler
from edge_worker.privacy import PrivacyProtection
from partition.models import source_of
from partition.planner import WIFI, Conditions, Plan, PowerModel, Weights, plan
from partition.profile import compute_probe_ms, load_or_measure_profile
from partition.sampling import SamplingParams
from partition.segment import ModelSegment
from partition.tokens import eos_token_ids

log = logging.getLogger(__name__)

FORCE_MODES = ("local-only", "cloud-only")
# A ping slower than this means the cloud is as good as unreachable for interactive use.
PING_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Decision:
    """One split decision and the measurements behind it."""

    k: int
    reason: str  # "forced", "planned", "cloud unreachable"
    rtt_ms: float | None
    conditions: Conditions | None
    plan: Plan | None
    at: float  # time.time()
    at_step: int = 0  # the generation step it took effect at (0: before the first token)

    def to_dict(self) -> dict[str, Any]:
        """For the ``--json`` object: the choice, the measurements behind it, and what the planner
        predicted for it (so a run can be checked against its own forecast)."""
        d: dict[str, Any] = {"k": self.k, "reason": self.reason, "rtt_ms": self.rtt_ms, "at_step": self.at_step}
        c = self.conditions
        if c is not None:
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
        return d

    def summary(self) -> str:
        c = self.conditions
        cond = (f"rtt {c.rtt_ms:.1f} ms, uplink {c.bandwidth_mbps:.1f} Mbit/s, cpu load {c.edge_cpu_load:.2f}"
                if c else "no measurements")
        return f"split {self.k} ({self.reason}; {cond})"


def _round_trips_ms(trace: list[dict]) -> list[float]:
    """Transport times of the steps that were one request and its reply, not retried (the first
    step also opens the session, a move's first step replays every position): round trips."""
    return [s["transport_ms"] for s in trace if s["round_trips"] == 1 and not s["retries"]]


def cloud_backend(client: CloudClient, privacy: PrivacyProtection, source, k: int, edge: ModelSegment | None):
    """A cloud session for layers [k, N) (None at k = N), with the projection the privacy settings
    ask for (calibrated for this split on first use, from ``edge`` when given)."""
    if k == source.n_layers:
        return None
    reduction = privacy.reduction_for(source, k, edge)  # None unless reduce_dims
    return client.session(source.model_id, k, source.hidden_size, reduction)


class EdgeCloudManager:
    def __init__(
        self,
        model: Any = "smollm2-135m",
        device_monitor: Any = None,
        cloud_client: CloudClient | None = None,
        mini_llm: MiniLLMHandler | None = None,
        privacy_protection: PrivacyProtection | None = None,
        energy_weight: float = 0.3,
        latency_weight: float = 0.4,
        memory_weight: float = 0.3,
        force_mode: str | None = None,
        split: int | None = None,
        max_new_tokens: int | None = None,
        tokenizer: Any = None,
        power: PowerModel = WIFI,
        base_conditions: Conditions | None = None,
        dynamic: bool = True,
        replan_every: int = 8,
        replan_margin: float = 0.1,
        min_split: int = 0,
    ) -> None:
        if force_mode is not None and force_mode not in FORCE_MODES:
            raise ValueError(f"force_mode must be one of {FORCE_MODES} or None, got {force_mode!r}")
        self.source = source_of(model)
        self.tokenizer = tokenizer or self.source.load_tokenizer()
        self.eos = eos_token_ids(self.source, self.tokenizer)
        self.device_monitor = device_monitor
        self.privacy = privacy_protection or PrivacyProtection()
        self.cloud_client = cloud_client or CloudClient()
        # The privacy settings decide how activations leave the device.
        self.cloud_client.encryption = self.privacy.encryption_enabled
        self.cloud_client.wire_dtype = self.privacy.wire_dtype
        self.mini_llm = mini_llm
        if mini_llm is not None:
            mini_llm.check_tokenizer(self.tokenizer)
        self.weights = Weights(energy=energy_weight, latency=latency_weight, memory=memory_weight)
        self.force_mode = force_mode
        self.split = split
        # A privacy floor the planner never goes below (partition/planner.py: plan); a forced split
        # under it is refused here, not silently raised.
        forced = 0 if force_mode == "cloud-only" else split
        if not 0 <= min_split <= self.source.n_layers:
            raise ValueError(f"min_split {min_split} is outside [0, {self.source.n_layers}]")
        if forced is not None and forced < min_split:
            raise ValueError(f"the forced split {forced} is below min_split {min_split}")
        self.min_split = min_split
        env_tokens = os.environ.get("EDGECLOUD_MAX_NEW_TOKENS")
        self.max_new_tokens = max_new_tokens or (int(env_tokens) if env_tokens else DEFAULT_TOKENS)
        self.power = power
        self.base_conditions = base_conditions or Conditions()
        self.decisions: list[Decision] = []
        self.last_result: GenerationResult | None = None
        # Dynamic partitioning: during a planned generation, every ``replan_every`` tokens the
        # measurements are compared with those the current plan came from (hysteresis in
        # ``changed_beyond``); when they moved, the split is re-planned and moved if the new
        # choice scores at least ``replan_margin`` better than staying.
        self.dynamic = dynamic
        self.replan_every = replan_every
        self.replan_margin = replan_margin
        self._plan_snapshot: Any = None
        self._checked_at = 0
        self._trace_fed = 0
        self._prompt_tokens = 0
        self._new_tokens = 0
        self._segments: dict[tuple[int, bool], ModelSegment] = {}

    # --- deciding ------------------------------------------------------------------------------
    def measure_conditions(self) -> tuple[Conditions, float | None]:
        """Conditions for the planner from the device monitor and a ping through the broker."""
        conditions = self.base_conditions
        if self.device_monitor is not None and hasattr(self.device_monitor, "snapshot"):
            conditions = to_conditions(self.device_monitor.snapshot(), conditions)
        # Ping on this thread even when the monitor pings too: it is the freshest reading of the
        # link this generation will use, and it proves the broker answers before we commit to it.
        try:
            rtt_ms = self.cloud_client.ping(PING_TIMEOUT_S) * 1e3
        except EdgeCloudError as exc:
            log.warning("cloud unreachable (%s)", exc)
            return conditions, None
        # The ping is the freshest reading of the link this generation will use.
        return self._with_measured_compute(replace(conditions, rtt_ms=rtt_ms)), rtt_ms

    def _with_measured_compute(self, conditions: Conditions) -> Conditions:
        """``conditions`` with both sides' compute speed as measured now: the workers' reported
        per-layer time (rather than an assumed speed-up) and this device's probe."""
        layer_ms = self._worker_layer_ms()
        if layer_ms is not None:
            conditions = replace(conditions, cloud_layer_ms=(layer_ms,) * self.source.n_layers)
        return replace(conditions, edge_slowdown_measured=self._edge_slowdown())

    @functools.cached_property
    def profile(self):
        """This model's per-layer profile on this machine (measured once, then read from its cache;
        kept here so that a plan does not read the file for each of its parts)."""
        return load_or_measure_profile(self.source)

    def _edge_slowdown(self) -> float | None:
        """This device's compute speed now against when its profile was measured (a few ms)."""
        baseline = self.profile.probe_ms
        return compute_probe_ms() / baseline if baseline > 0 else None

    def _worker_layer_ms(self) -> float | None:
        """The median per-layer decode time the registered workers of this model reported."""
        try:
            workers = self.cloud_client.status(PING_TIMEOUT_S).get("workers", [])
        except EdgeCloudError as exc:
            log.debug("no worker timings from the broker: %s", exc)
            return None
        times = sorted(float(w["per_layer_ms"]) for w in workers
                       if w.get("model_id") == self.source.model_id and float(w.get("per_layer_ms") or 0) > 0)
        return times[len(times) // 2] if times else None

    def choose_split(self, prompt_tokens: int, new_tokens: int) -> Decision:
        n = self.source.n_layers
        if self.force_mode == "local-only":
            return Decision(n, "forced", None, None, None, time.time())
        if self.force_mode == "cloud-only":
            return Decision(0, "forced", None, None, None, time.time())
        if self.split is not None:
            return Decision(self.split, "forced", None, None, None, time.time())
        conditions, rtt_ms = self.measure_conditions()
        if rtt_ms is None:
            return Decision(n, "cloud unreachable", None, conditions, None, time.time())
        if self.device_monitor is not None and hasattr(self.device_monitor, "record_rtt"):
            self.device_monitor.record_rtt(rtt_ms / 1e3)
            self._plan_snapshot = self.device_monitor.snapshot()
        profile = self.profile
        chosen = plan(profile, conditions, self.weights, power=self.power, prompt_tokens=prompt_tokens,
                      new_tokens=new_tokens, wire_dtype=self.privacy.wire_dtype, min_split=self.min_split,
                      reduce_dims=self.privacy.reduce_dims)
        return Decision(chosen.k, "planned", rtt_ms, conditions, chosen, time.time())

    # --- running -------------------------------------------------------------------------------
    def _edge_segment(self, k: int, head: bool = False) -> ModelSegment:
        head = head or k == self.source.n_layers
        if (k, head) not in self._segments:  # hold one split's weights only
            self._segments = {(k, head): ModelSegment.load(self.source, 0, k, head=head)}
        return self._segments[(k, head)]

    def process_hybrid(self, input_ids: Any, max_new_tokens: int | None = None,
                       sampling: SamplingParams | None = None) -> torch.Tensor:
        """Generate from ``input_ids`` ((1, T) tensor or a list of ids); returns (1, T + new) ids."""
        ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
        if ids and isinstance(ids[0], list):
            if len(ids) != 1:
                raise ValueError(f"process_hybrid takes one sequence (batch size 1), got {len(ids)}")
            ids = ids[0]
        new_tokens = max_new_tokens or self.max_new_tokens
        decision = self.choose_split(len(ids), new_tokens)
        self.decisions.append(decision)
        log.info("decision: %s", decision.summary())
        k = decision.k
        n = self.source.n_layers
        mover = None
        self._trace_fed = 0
        if self.dynamic and decision.reason == "planned" and self._plan_snapshot is not None:
            mover = self
            self.prepare(len(ids), new_tokens)
        mini = None
        if self.mini_llm is not None and k < n:
            edge = self._edge_segment(k, head=self.mini_llm.needs_edge_head)
            mini = self.mini_llm.settings(self.source, edge, self.tokenizer)
        else:
            edge = self._edge_segment(k)
        backend = cloud_backend(self.cloud_client, self.privacy, self.source, k, edge)
        generator = EdgeGenerator(edge, backend, self.tokenizer, self.eos, mode=mode_for(k, n), mini=mini,
                                  mover=mover)
        result = generator.generate(ids, new_tokens, sampling)
        self.last_result = result
        self._feed_monitor(result)
        return torch.tensor([ids + result.token_ids], dtype=torch.long)

    # --- SplitMover: re-planning during a generation ---------------------------------------------
    def prepare(self, prompt_tokens: int, new_tokens: int) -> None:
        """Start watching a new generation (the planned decision's snapshot is the reference)."""
        self._checked_at, self._trace_fed = 0, 0
        self._prompt_tokens, self._new_tokens = prompt_tokens, new_tokens

    def replan(self, step: int, result: GenerationResult) -> int | None:
        monitor = self.device_monitor
        if step - self._checked_at < self.replan_every or monitor is None:
            return None
        self._checked_at = step
        self._record_round_trips(result)  # this generation's round trips, as they come
        snap = monitor.snapshot()
        changed = changed_beyond(self._plan_snapshot, snap)
        if not changed or not snap.cloud_reachable:
            return None
        conditions = self._with_measured_compute(to_conditions(snap, self.base_conditions))
        current = result.splits_used[-1]
        new = plan(self.profile, conditions, self.weights, power=self.power,
                   prompt_tokens=self._prompt_tokens + step, new_tokens=max(1, self._new_tokens - step),
                   wire_dtype=self.privacy.wire_dtype, min_split=self.min_split,
                   reduce_dims=self.privacy.reduce_dims)
        self._plan_snapshot = snap  # the reference moves with every re-plan: drift accumulates
        stay, best = new.table[current], new.chosen
        if best.k == current or (stay.feasible and stay.score is not None
                                 and best.score > stay.score * (1 - self.replan_margin)):
            log.info("re-planned at step %d (%s changed; rtt %.1f ms): staying at split %d (score %.3f; best "
                     "split %d scores %.3f)", step, ", ".join(changed), conditions.rtt_ms, current,
                     stay.score or 0.0, best.k, best.score or 0.0)
            return None
        decision = Decision(best.k, "replanned: " + ", ".join(changed), conditions.rtt_ms, conditions, new,
                            time.time(), at_step=step)
        self.decisions.append(decision)
        log.info("step %d: %s", step, decision.summary())
        return best.k

    def edge_segment(self, k: int) -> ModelSegment:
        return self._edge_segment(k, head=bool(self.mini_llm and self.mini_llm.needs_edge_head))

    def backend_for(self, k: int):
        edge = self.edge_segment(k) if k < self.source.n_layers else None  # loaded already: a cache hit
        return cloud_backend(self.cloud_client, self.privacy, self.source, k, edge)

    def mini_for(self, k: int, edge: ModelSegment):
        if self.mini_llm is None or k == self.source.n_layers:
            return None
        return self.mini_llm.settings(self.source, edge, self.tokenizer)

    def _record_round_trips(self, result: GenerationResult) -> None:
        """Feed the monitor the round trips of the trace entries it has not seen yet (``replan``
        feeds them during a generation, ``_feed_monitor`` the rest after it)."""
        for rtt_ms in _round_trips_ms(result.trace[self._trace_fed:]):
            self.device_monitor.record_rtt(rtt_ms / 1e3)
        self._trace_fed = len(result.trace)

    def _feed_monitor(self, result: GenerationResult) -> None:
        """Real steps are the best link measurements: decode steps carry ~1 KB, so their transport
        time is a round trip; the prefill's extra time over that round trip is its upload."""
        monitor = self.device_monitor
        if monitor is None or not hasattr(monitor, "record_rtt"):
            return
        self._record_round_trips(result)
        rtts = _round_trips_ms(result.trace)
        if rtts and result.trace and result.trace[0]["round_trips"]:
            first = result.trace[0]
            rtt_ms = sorted(rtts)[len(rtts) // 2]
            upload_s = (first["transport_ms"] - rtt_ms) / 1e3
            if upload_s > 0:
                monitor.record_transfer(first["bytes_sent"], upload_s, "up")

    def close(self) -> None:
        self.cloud_client.close()
        if self.device_monitor is not None and hasattr(self.device_monitor, "stop"):
            self.device_monitor.stop()
