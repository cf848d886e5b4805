"""The split-point cost model: for every split ``k``, what one request costs the edge device.

Everything here is a pure function of plain data (a ``LayerProfile`` measured once, the current
``Conditions``, a ``PowerModel`` and the user's ``Weights``), so the policy is tested without a
model and a manager can re-plan on every change of conditions in microseconds.

A request is the pipeline the edge really runs (``edge_worker/generation.py``): a session open
(one round trip), a prefill step that sends the prompt's activations ``(1, T, H)`` and gets the
first token back, then ``new_tokens - 1`` decode steps of one position each. At ``k == N`` there is
no network at all; at ``k == 0`` the edge only embeds (it still sends activations, not token ids).

Latency and energy are scored for the whole request, which weights prefill and decode by what the
request actually does; the per-token and prefill parts are kept in each row for display.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from partition.errors import PartitionError
from partition.profile import STEP_OVERHEAD_BYTES, STEP_REPLY_BYTES, LayerProfile

log = logging.getLogger(__name__)

# Slowdown of edge compute at CPU load L is 1 / (1 - L): our work gets the idle share of the
# cores. Capped because at L -> 1 the formula diverges while a real scheduler still gives a
# runnable process a time slice; 10x is a saturated 2-core phone-class device in our measurements
# (a concurrent test run made 2-thread decode ~6x slower, see partition/profile.py).
EDGE_SLOWDOWN_CAP = 10.0
# Round trips before the first step: the session open (edge_worker/cloud_client.py: _open).
SESSION_OPEN_ROUND_TRIPS = 1
# The open request carries a public key and sampling parameters but no activations: about the
# size of an empty step's envelope (partition/profile.py: STEP_OVERHEAD_BYTES).
OPEN_REQUEST_BYTES = STEP_OVERHEAD_BYTES


# --- bytes on the wire ------------------------------------------------------------------------------

# Bytes per element of the fixed-width wire dtypes (broker/wire/codec.py: WIRE_DTYPES).
WIRE_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# broker/wire/codec.py's int8 layout: channels per fp16 scale, and the most fp16 outlier channels a
# frame carries (tests/test_planner_bytes.py checks both against the codec).
INT8_GROUP = 64
INT8_MAX_OUTLIERS = 32
# The codec keeps a channel in fp16 when its absmax over the frame exceeds 6x the median
# channel's, so how many travel that way depends on the activations. SmolLM2 decode steps carried
# 13.6, 18.2 and 5.9 of 576 channels on average at splits 5, 15 and 25 (288 steps each; single
# steps 2-32), and 1-11 on reduced widths of 64-512 (BENCHMARKS.md, "Quality of the wire codecs"):
# 2% of the width is their middle. The mean step comes within 3% of the estimate, a single step
# within 6% (tests/test_planner_bytes.py).
INT8_OUTLIER_FRACTION = 0.02


def expected_int8_outliers(width: int) -> int:
    """The planner's estimate of the fp16 outlier channels in an int8 frame ``width`` wide."""
    return min(INT8_MAX_OUTLIERS, width, round(INT8_OUTLIER_FRACTION * width))


def tensor_wire_bytes(rows: int, width: int, wire_dtype: str = "fp16", outliers: int | None = None) -> int:
    """Bytes of the tensor frame broker/wire/codec.py encodes for ``rows`` positions ``width`` wide.

    int8 (the codec's layout): ``n`` uint16 outlier indices, ``rows x n`` fp16 outlier values,
    ``rows x ceil((width - n) / INT8_GROUP)`` fp16 scales and ``rows x (width - n)`` int8 values;
    ``outliers`` is ``n`` (default: ``expected_int8_outliers``).
    """
    if rows < 0 or width < 1:
        raise ValueError(f"bad activation shape: {rows} positions x {width}")
    if wire_dtype == "int8":
        n = expected_int8_outliers(width) if outliers is None else outliers
        if not 0 <= n <= min(width, INT8_MAX_OUTLIERS):
            raise ValueError(f"an int8 frame {width} wide carries 0..{min(width, INT8_MAX_OUTLIERS)} outliers, not {n}")
        groups = -(-(width - n) // INT8_GROUP)
        return 2 * n + rows * (2 * n + 2 * groups + (width - n))
    try:
        return rows * width * WIRE_ELEMENT_BYTES[wire_dtype]
    except KeyError:
        known = sorted([*WIRE_ELEMENT_BYTES, "int8"])
        raise ValueError(f"unknown wire dtype {wire_dtype!r}; use one of {known}") from None


def wire_width(hidden_size: int, reduce_dims: int | None = None) -> int:
    """Width of what crosses the wire: ``reduce_dims`` under a reduction, else the hidden size."""
    if reduce_dims is None:
        return hidden_size
    if type(reduce_dims) is not int or not 1 <= reduce_dims <= hidden_size:
        raise ValueError(f"reduce_dims must be an integer in [1, {hidden_size}], got {reduce_dims!r}")
    return reduce_dims


def step_uplink_bytes(hidden_size: int, n_tokens: int, wire_dtype: str = "fp16",
                      reduce_dims: int | None = None) -> int:
    """Bytes one step request puts on the uplink: the tensor frame of ``n_tokens`` positions as
    the codec lays it out, at the reduced width if any, plus STEP_OVERHEAD_BYTES (broker envelope,
    sealed step head, AEAD overhead)."""
    return tensor_wire_bytes(n_tokens, wire_width(hidden_size, reduce_dims), wire_dtype) + STEP_OVERHEAD_BYTES


class NoFeasibleSplitError(PartitionError):
    """No split satisfies the memory budget, ``min_split`` and ``allowed_splits`` together."""


def _check_finite_nonneg(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


# --- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditions:
    """The network, the device and the cloud as they are now.

    The defaults are assumptions for a phone on home WiFi talking to a nearby cloud region, not
    measurements: pass measured values (a ``DeviceMonitor`` will).
    """

    rtt_ms: float = 20.0  # edge <-> cloud round trip, broker included
    bandwidth_mbps: float = 10.0  # uplink (edge -> cloud): activations travel this way
    downlink_mbps: float = 50.0  # cloud -> edge: only a token id per step
    edge_cpu_load: float = 0.0  # 0..1, other work on the edge's cores
    edge_mem_available_bytes: int | None = None  # None: no memory budget
    cloud_queue_ms: float = 0.0  # broker and worker queueing per step
    # Cloud time per layer = edge time / cloud_speedup, unless workers report their own per-layer
    # decode times (their registrations) in cloud_layer_ms. 4x: an assumed server core count and
    # clock over a 2-core edge; replace with a measured value.
    cloud_speedup: float = 4.0
    cloud_layer_ms: tuple[float, ...] | None = None
    battery_fraction: float | None = None  # 0..1; below 1 it raises the energy weight (effective_weights)
    # How much slower the edge computes now than when its profile was measured, from a probe timed
    # just before planning (partition/profile.py: compute_probe_ms); None: infer it from the load.
    edge_slowdown_measured: float | None = None

    def __post_init__(self) -> None:
        for name in ("rtt_ms", "cloud_queue_ms"):
            _check_finite_nonneg(name, getattr(self, name))
        for name in ("bandwidth_mbps", "downlink_mbps", "cloud_speedup"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not 0.0 <= self.edge_cpu_load <= 1.0:
            raise ValueError(f"edge_cpu_load must be in [0, 1], got {self.edge_cpu_load}")
        if self.edge_mem_available_bytes is not None and self.edge_mem_available_bytes < 0:
            raise ValueError(f"edge_mem_available_bytes must be >= 0, got {self.edge_mem_available_bytes}")
        if self.edge_slowdown_measured is not None and not (
                math.isfinite(self.edge_slowdown_measured) and self.edge_slowdown_measured > 0):
            raise ValueError(f"edge_slowdown_measured must be a positive number, got {self.edge_slowdown_measured}")
        if self.battery_fraction is not None and not 0.0 <= self.battery_fraction <= 1.0:
            raise ValueError(f"battery_fraction must be in [0, 1], got {self.battery_fraction}")
        if self.cloud_layer_ms is not None:
            layer_ms = tuple(float(x) for x in self.cloud_layer_ms)
            for x in layer_ms:
                _check_finite_nonneg("cloud_layer_ms", x)
            object.__setattr__(self, "cloud_layer_ms", layer_ms)

    @property
    def edge_slowdown(self) -> float:
        """Factor on edge compute time: the measured one (at least 1, at most EDGE_SLOWDOWN_CAP)
        when there is one, else 1 / (1 - load), at most EDGE_SLOWDOWN_CAP."""
        if self.edge_slowdown_measured is not None:
            return min(EDGE_SLOWDOWN_CAP, max(1.0, self.edge_slowdown_measured))
        idle = 1.0 - self.edge_cpu_load
        return EDGE_SLOWDOWN_CAP if idle <= 1.0 / EDGE_SLOWDOWN_CAP else 1.0 / idle


@dataclass(frozen=True)
class PowerModel:
    """Device power draw per state, in watts; the radio's tail in seconds.

    Defaults are WiFi-like; ``LTE`` below is the cellular preset. Sources (all smartphone
    measurements; override any field with your device's numbers):

    * CPU: 2.5 W with the cores busy, the middle of the 2-3 W that sustained multi-core load
      draws on recent phone SoCs (Halpern, Zhu and Reddi, "Mobile CPU's rise to power", HPCA 2016,
      show per-generation mobile CPU power rising to several watts at peak). Idle-but-awake 0.4 W:
      Carroll and Heiser, "An analysis of power consumption in a smartphone", USENIX ATC 2010,
      measure a few hundred mW for an awake, idle phone.
    * Radio: Huang et al., "A close examination of performance and power characteristics of 4G
      LTE networks", MobiSys 2012. Their WiFi tail is short (~0.24 s at ~0.12 W); active WiFi power
      grows with throughput toward ~1 W, so we take 1.0 W transmitting, 0.8 W receiving.
    """

    name: str = "wifi"
    cpu_active_w: float = 2.5
    cpu_idle_w: float = 0.4
    radio_tx_w: float = 1.0
    radio_rx_w: float = 0.8
    # After the last packet the radio stays in its high-power state for radio_tail_s at
    # radio_tail_w before dropping to idle (Huang et al. 2012).
    radio_tail_w: float = 0.12
    radio_tail_s: float = 0.24

    def __post_init__(self) -> None:
        for f in ("cpu_active_w", "cpu_idle_w", "radio_tx_w", "radio_rx_w", "radio_tail_w", "radio_tail_s"):
            _check_finite_nonneg(f, getattr(self, f))


WIFI = PowerModel()
# LTE (Huang et al., MobiSys 2012): active power ~1.3 W base plus a throughput term that is
# larger on the uplink, so 1.5 W transmitting and 1.3 W receiving for our small messages; the
# tail is ~11.6 s at ~1.06 W, which dominates the energy of short requests.
LTE = PowerModel(name="lte", radio_tx_w=1.5, radio_rx_w=1.3, radio_tail_w=1.06, radio_tail_s=11.6)
POWER_PRESETS: dict[str, PowerModel] = {"wifi": WIFI, "lte": LTE}


@dataclass(frozen=True, init=False)
class Weights:
    """How much each objective matters; normalised to sum 1 on construction."""

    energy: float
    latency: float
    memory: float

    def __init__(self, energy: float = 1.0, latency: float = 1.0, memory: float = 1.0) -> None:
        values = (float(energy), float(latency), float(memory))
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(
                f"weights must be finite and >= 0, got energy={energy}, latency={latency}, memory={memory}"
            )
        total = sum(values)
        if total == 0:
            raise ValueError("at least one weight must be positive")
        object.__setattr__(self, "energy", values[0] / total)
        object.__setattr__(self, "latency", values[1] / total)
        object.__setattr__(self, "memory", values[2] / total)


def effective_weights(weights: Weights, conditions: Conditions) -> Weights:
    """The weights after the battery level: the energy weight scales by ``2 - battery`` (x1 when
    full, x2 when empty), then all are renormalised. A linear, documented nudge rather than a
    threshold, so the choice never flips on a 1% battery change; without a battery reading, or
    with a zero energy weight, the user's weights stand."""
    if conditions.battery_fraction is None or weights.energy == 0:
        return weights
    return Weights(weights.energy * (2.0 - conditions.battery_fraction), weights.latency, weights.memory)


# --- one split -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitEstimate:
    """The cost of one request at split ``k``, on the edge device.

    The ``*_norm`` fields and ``score`` are filled in by ``plan`` (None from ``estimate``).
    """

    k: int
    decode_ms_per_token: float  # one decode step, end to end
    prefill_ms: float  # session open + prompt step, to the first token
    latency_ms: float  # prefill + (new_tokens - 1) decode steps: what is scored
    edge_ms_per_token: float  # the decode step's parts
    network_ms_per_token: float  # transfers + round trip
    cloud_ms_per_token: float  # cloud layers + head + queueing
    energy_j: float  # the whole request, radio tail included
    memory_bytes: int  # weights held + KV cache at prompt + new tokens
    uplink_bytes: int  # the whole request
    uplink_bytes_per_token: int = 0  # one decode step's request (0: nothing leaves the device)
    feasible: bool = True
    reason: str = ""  # why not feasible
    latency_norm: float | None = None
    energy_norm: float | None = None
    memory_norm: float | None = None
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _transfer_ms(n_bytes: int, mbps: float) -> float:
    return n_bytes * 8 / (mbps * 1e3)


def _cloud_per_layer(profile: LayerProfile, conditions: Conditions) -> tuple[tuple[float, ...], float]:
    """(per-layer decode ms, speed-up for prefill and head) on the cloud.

    Workers report decode times only; their prefill and head are scaled by the speed-up those
    decode times imply over the edge's, the best single number available.
    """
    n = profile.n_layers
    if conditions.cloud_layer_ms is None:
        return tuple(t / conditions.cloud_speedup for t in profile.layer_decode_ms), conditions.cloud_speedup
    if len(conditions.cloud_layer_ms) != n:
        raise ValueError(f"cloud_layer_ms has {len(conditions.cloud_layer_ms)} entries for {n} layers")
    cloud_total = sum(conditions.cloud_layer_ms)
    edge_total = sum(profile.layer_decode_ms)
    speedup = edge_total / cloud_total if cloud_total > 0 else conditions.cloud_speedup
    return conditions.cloud_layer_ms, speedup


def estimate(
    k: int,
    profile: LayerProfile,
    conditions: Conditions,
    power: PowerModel = WIFI,
    prompt_tokens: int = 64,
    new_tokens: int = 64,
    wire_dtype: str = "fp16",
    reduce_dims: int | None = None,
    drafter_bytes: int = 0,
) -> SplitEstimate:
    """Latency, device energy and device memory of one request at split ``k``.

    ``drafter_bytes``: what the edge holds at this split for drafting besides its own layers (the
    int8 copy of the cloud's layers, ``--mini int8``), priced as device memory where ``k < N``.

    Energy on the device = CPU active power x edge compute time + radio tx/rx power x transfer
    time + CPU idle power x time spent waiting for the cloud + radio tail energy. The tail is
    charged as the radio really spends it: between the messages of one request the radio never
    gets ``radio_tail_s`` of quiet, so each gap (waiting for the reply, computing the next step)
    costs tail power for min(gap, tail); after the last reply one full tail is paid, once per
    request. Steps faster than the tail thus share one tail instead of paying one each.

    Uplink bytes follow the wire format: ``wire_dtype`` as the codec lays it out (int8 with its
    scales and an estimate of its outlier channels), ``reduce_dims`` wide under a reduction. The
    projection's own compute is not charged: H x D multiply-adds per position on each side, under
    a tenth of one SmolLM2 layer's (about 3.5M) even at D = 384.
    """
    n = profile.n_layers
    if not 0 <= k <= n:
        raise ValueError(f"split {k} is outside [0, {n}]")
    if prompt_tokens < 1 or new_tokens < 1:
        raise ValueError(f"prompt_tokens and new_tokens must be >= 1, got {prompt_tokens} and {new_tokens}")
    # Priced (and checked) for every k, also where nothing is sent, so bad settings fail at once.
    up_decode = step_uplink_bytes(profile.hidden_size, 1, wire_dtype, reduce_dims)
    up_prefill = step_uplink_bytes(profile.hidden_size, prompt_tokens, wire_dtype, reduce_dims)
    decode_steps = new_tokens - 1
    slow = conditions.edge_slowdown
    local = k == n

    # Edge compute: the embedding lookup costs about the same for 64 positions as for one (it is
    # a gather), so embed_ms is charged once per step, not per position.
    head_here = profile.head_ms if local else 0.0
    edge_decode = (profile.embed_ms + sum(profile.layer_decode_ms[:k]) + head_here) * slow
    edge_prefill = (
        profile.embed_ms
        + prompt_tokens * sum(profile.layer_prefill_ms_per_token[:k])
        + head_here
    ) * slow

    kv_tokens = prompt_tokens + new_tokens
    memory = (
        profile.embed_weight_bytes
        + sum(profile.layer_weight_bytes[:k])
        + (profile.head_weight_bytes if local else 0)
        + profile.kv_bytes_per_token_per_layer * k * kv_tokens
        + (0 if local else drafter_bytes)
    )

    if local:
        latency = edge_prefill + decode_steps * edge_decode
        energy = power.cpu_active_w * latency / 1e3
        return SplitEstimate(
            k=k, decode_ms_per_token=edge_decode, prefill_ms=edge_prefill, latency_ms=latency,
            edge_ms_per_token=edge_decode, network_ms_per_token=0.0, cloud_ms_per_token=0.0,
            energy_j=energy, memory_bytes=memory, uplink_bytes=0,
        )

    cloud_layers, cloud_speedup = _cloud_per_layer(profile, conditions)
    cloud_head = profile.head_ms / cloud_speedup
    cloud_decode = sum(cloud_layers[k:]) + cloud_head + conditions.cloud_queue_ms
    cloud_prefill = (
        prompt_tokens * sum(profile.layer_prefill_ms_per_token[k:]) / cloud_speedup
        + cloud_head + conditions.cloud_queue_ms
    )

    tx_decode = _transfer_ms(up_decode, conditions.bandwidth_mbps)
    tx_prefill = _transfer_ms(up_prefill, conditions.bandwidth_mbps)
    rx = _transfer_ms(STEP_REPLY_BYTES, conditions.downlink_mbps)
    rtt = conditions.rtt_ms

    # The session open is one small round trip before the prompt step: rtt plus its transfers.
    tx_open = _transfer_ms(OPEN_REQUEST_BYTES, conditions.bandwidth_mbps)
    open_ms = SESSION_OPEN_ROUND_TRIPS * (rtt + tx_open + rx)
    wait_prefill = rtt + cloud_prefill  # radio on, CPU idle, nothing moving
    wait_decode = rtt + cloud_decode
    prefill = edge_prefill + open_ms + tx_prefill + wait_prefill + rx
    decode = edge_decode + tx_decode + wait_decode + rx
    latency = prefill + decode_steps * decode

    tail = power.radio_tail_s * 1e3

    def step_energy_j(edge_ms: float, tx_ms: float, wait_ms: float, gap_before_ms: float) -> float:
        """One step: compute, send, wait, receive. The CPU idles while the radio works and while
        it waits; the radio idles at tail power between messages."""
        return (
            power.cpu_active_w * edge_ms
            + power.radio_tx_w * tx_ms
            + power.radio_rx_w * rx
            + power.cpu_idle_w * (wait_ms + tx_ms + rx)
            + power.radio_tail_w * (min(wait_ms, tail) + min(gap_before_ms, tail))
        ) / 1e3

    energy = (
        # The edge computes the prompt's layers first, then opens the session and sends at once
        # (edge_worker/generation.py), so the radio wakes for the open and has no gap before the
        # prompt step.
        SESSION_OPEN_ROUND_TRIPS * step_energy_j(0.0, tx_open, rtt, 0.0)
        + step_energy_j(edge_prefill, tx_prefill, wait_prefill, 0.0)
        + decode_steps * step_energy_j(edge_decode, tx_decode, wait_decode, edge_decode)
        + power.radio_tail_w * power.radio_tail_s  # after the last reply, once per request
    )
    uplink = OPEN_REQUEST_BYTES * SESSION_OPEN_ROUND_TRIPS + up_prefill + decode_steps * up_decode
    return SplitEstimate(
        k=k, decode_ms_per_token=decode, prefill_ms=prefill, latency_ms=latency,
        edge_ms_per_token=edge_decode, network_ms_per_token=tx_decode + rtt + rx,
        cloud_ms_per_token=cloud_decode, energy_j=energy, memory_bytes=memory, uplink_bytes=uplink,
        uplink_bytes_per_token=up_decode,
    )


# --- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The chosen split, every candidate's row, and the inputs that produced them."""

    k: int
    table: tuple[SplitEstimate, ...]  # one row per k in 0..N, in order
    model_id: str
    n_layers: int
    conditions: Conditions
    weights: Weights  # as given
    effective_weights: Weights  # after the battery level
    power: PowerModel
    prompt_tokens: int
    new_tokens: int
    wire_dtype: str
    min_split: int
    allowed_splits: tuple[int, ...] | None
    reduce_dims: int | None = None

    @property
    def chosen(self) -> SplitEstimate:
        return self.table[self.k]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["table"] = [row.to_dict() for row in self.table]
        return d


def plan(
    profile: LayerProfile,
    conditions: Conditions,
    weights: Weights,
    power: PowerModel = WIFI,
    prompt_tokens: int = 64,
    new_tokens: int = 64,
    wire_dtype: str = "fp16",
    min_split: int = 0,
    allowed_splits: Iterable[int] | None = None,
    reduce_dims: int | None = None,
    drafter_bytes: Callable[[int], int] | None = None,
) -> Plan:
    """Score every split 0..N and choose the cheapest feasible one.

    Normalisation divides each objective by its largest value among the feasible splits, rather
    than min-max scaling. Min-max stretches any spread to [0, 1]: an objective that varies by 1%
    across splits would weigh as much as one that varies 10x, and a near-constant objective
    would decide the choice by noise. Dividing by the maximum keeps ratios, so an objective
    that hardly varies adds almost the same to every row and barely moves the choice, which is
    what its weight should mean. Infeasible rows are normalised by the same maxima (they may
    exceed 1) so the table stays comparable.

    Feasibility: a split is infeasible when its device memory exceeds
    ``edge_mem_available_bytes``, when it is below ``min_split``, or when ``allowed_splits`` is
    given and does not list it (e.g. no worker serves it). ``min_split`` is a privacy floor and
    is never relaxed: if nothing at or above it fits, this raises NoFeasibleSplitError rather
    than quietly sending less-processed activations. Ties go to the larger k (less leaves the
    device).
    """
    n = profile.n_layers
    if not 0 <= min_split <= n:
        raise ValueError(f"min_split {min_split} is outside [0, {n}]")
    allowed = None if allowed_splits is None else tuple(sorted(set(allowed_splits)))
    if allowed is not None and any(not 0 <= k <= n for k in allowed):
        raise ValueError(f"allowed_splits {list(allowed)} has values outside [0, {n}]")
    budget = conditions.edge_mem_available_bytes

    rows = []
    for k in range(n + 1):
        row = estimate(k, profile, conditions, power, prompt_tokens, new_tokens, wire_dtype, reduce_dims,
                       drafter_bytes(k) if drafter_bytes is not None and k < n else 0)
        reasons = []
        if k < min_split:
            reasons.append(f"below min_split {min_split}")
        if allowed is not None and k not in allowed:
            reasons.append("not an allowed split")
        if budget is not None and row.memory_bytes > budget:
            reasons.append(f"needs {row.memory_bytes / 2**20:.1f} MiB of {budget / 2**20:.1f} MiB available")
        if reasons:
            row = replace(row, feasible=False, reason="; ".join(reasons))
        rows.append(row)

    feasible = [r for r in rows if r.feasible]
    if not feasible:
        why = "; ".join(sorted({r.reason for r in rows}))
        raise NoFeasibleSplitError(f"no split of {n} layers is feasible: {why}")
    eff = effective_weights(weights, conditions)
    # Each component relative to running everything on the device (the k = N row): 1.0 means "as
    # costly as local-only", 7.0 "seven times". Not capped, so a link that makes the cloud seven
    # times slower weighs seven times, instead of saturating at the worst candidate's value (a
    # max-normalisation let a small memory saving outvote a 7x slowdown).
    local = rows[n]
    ref_latency = local.latency_ms or max(r.latency_ms for r in rows)
    ref_energy = local.energy_j or max(r.energy_j for r in rows)
    ref_memory = local.memory_bytes or max(r.memory_bytes for r in rows)
    scored = []
    for r in rows:
        lat = _ratio(r.latency_ms, ref_latency)
        en = _ratio(r.energy_j, ref_energy)
        mem = _ratio(r.memory_bytes, ref_memory)
        score = eff.latency * lat + eff.energy * en + eff.memory * mem
        scored.append(replace(r, latency_norm=lat, energy_norm=en, memory_norm=mem, score=score))
    best = min((r for r in scored if r.feasible), key=lambda r: (r.score, -r.k))
    log.debug("plan for %s: k=%d (score %.3f)", profile.model_id, best.k, best.score)
    return Plan(
        k=best.k, table=tuple(scored), model_id=profile.model_id, n_layers=n, conditions=conditions,
        weights=weights, effective_weights=eff, power=power, prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, wire_dtype=wire_dtype, min_split=min_split, allowed_splits=allowed,
        reduce_dims=reduce_dims,
    )


def min_split_for_leakage(leakage: Mapping[int, float], max_fraction: float, n_layers: int) -> int:
    """The privacy floor that keeps measured leakage at or below ``max_fraction``.

    ``leakage`` maps splits to the fraction of input tokens an attacker recovered there
    (``bench/bench_leakage.py``). Returns the smallest measured split ``k`` such that every measured
    split at or above ``k`` leaks at most ``max_fraction``, so that whatever the planner then picks
    above the floor is bracketed by measurements that pass; ``n_layers`` (nothing leaves the
    device) if no measured split qualifies. Only measured splits are candidates: between two
    measurements nothing is known. Use the result as ``plan(min_split=...)``.
    """
    if not (math.isfinite(max_fraction) and 0.0 <= max_fraction <= 1.0):
        raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
    if any(not 0 <= k < n_layers for k in leakage):
        raise ValueError(f"leakage has splits outside [0, {n_layers}): {sorted(leakage)}")
    floor = n_layers
    for k in sorted(leakage, reverse=True):
        if leakage[k] > max_fraction:
            break
        floor = k
    return floor


def _ratio(value: float, maximum: float) -> float:
    return value / maximum if maximum > 0 else 0.0
