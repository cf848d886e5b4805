"""The device and link as measured (``DeviceSnapshot``) and what the planner makes of it: pure
functions of plain data, tested without psutil, sockets or threads. ``DeviceMonitor``
(``device_monitor.py``) takes the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from partition.planner import Conditions

__all__ = ["DeviceSnapshot", "changed_beyond", "clamp01", "to_conditions", "unmeasured"]


# --- the record ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSnapshot:
    """The device and link as last measured; ``None`` means not measured (yet) or not present.

    ``taken_at`` is when the device figures were read (``time.time()``); the network figures are
    the smoothed estimates as of the ``snapshot()`` call.
    """

    taken_at: float
    cpu_load: float  # 0..1, all cores, everything running on the device
    process_cpu_load: float  # 0..1 of all cores, this process alone
    mem_available_bytes: int
    mem_total_bytes: int
    battery_percent: float | None  # 0..100; None: no battery
    on_battery: bool | None  # True: discharging; None: no battery or unknown
    gpu_utilization: float | None  # 0..1; None: no CUDA device, or no NVML to ask
    gpu_mem_free_bytes: int | None
    rtt_ms: float | None  # smoothed round trip to the broker
    uplink_mbps: float | None  # smoothed edge -> cloud throughput, Mbit/s
    downlink_mbps: float | None  # smoothed cloud -> edge throughput, Mbit/s
    cloud_reachable: bool | None  # None: never pinged nor heard from
    rtt_last_ms: float | None = None  # the latest raw round trip, unsmoothed

    @property
    def other_cpu_load(self) -> float:
        """Load from everything but this process, 0..1: what the planner calls edge load.

        The edge's own decoding shows up in ``cpu_load``; counting it as competition would make the
        planner push work to the cloud merely because the edge is busy doing that work.
        """
        return clamp01(self.cpu_load - self.process_cpu_load)


def clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


# --- planner glue ----------------------------------------------------------------------------------


def unmeasured(snapshot: DeviceSnapshot | None) -> tuple[str, ...]:
    """The link and device fields of ``Conditions`` that ``to_conditions(snapshot, ...)`` leaves at
    their defaults: what a plan made from it assumes rather than knows."""
    if snapshot is None:
        return ("edge_cpu_load", "bandwidth_mbps", "downlink_mbps", "battery_fraction")
    measured = _measured(snapshot)
    missing = [field for field in ("bandwidth_mbps", "downlink_mbps") if field not in measured]
    if snapshot.on_battery is True and "battery_fraction" not in measured:  # without a battery it is moot
        missing.append("battery_fraction")
    return tuple(missing)


def to_conditions(snapshot: DeviceSnapshot, defaults: Conditions) -> Conditions:
    """``defaults`` with every field the snapshot measured replaced by the measurement.

    * ``rtt_ms``, ``bandwidth_mbps`` (uplink), ``downlink_mbps``: the smoothed estimates; a
      throughput of 0 (impossible for the planner) keeps the default.
    * ``edge_cpu_load``: the load of everything but this process (``other_cpu_load``).
    * ``edge_mem_available_bytes``: the memory available now. It replaces a budget in
      ``defaults``, so chaining ``to_conditions(s, previous_conditions)`` never ratchets it down.
    * ``battery_fraction``: the charge on battery; 1.0 when plugged in, because energy drawn from
      the mains does not drain the battery, so it should not raise the energy weight.

    Cloud-side fields (queueing, speedup, per-layer times) are not measured here and stay.
    Whether the cloud is reachable at all is not a ``Conditions`` field: check
    ``snapshot.cloud_reachable`` before planning a split that needs it.
    """
    return replace(defaults, **_measured(snapshot))


def _measured(snapshot: DeviceSnapshot) -> dict[str, Any]:
    """The ``Conditions`` fields ``snapshot`` measured, with their values."""
    updates: dict[str, Any] = {
        "edge_cpu_load": snapshot.other_cpu_load,
        "edge_mem_available_bytes": max(0, int(snapshot.mem_available_bytes)),
    }
    if snapshot.rtt_ms is not None and math.isfinite(snapshot.rtt_ms) and snapshot.rtt_ms >= 0:
        updates["rtt_ms"] = snapshot.rtt_ms
    for field, value in (("bandwidth_mbps", snapshot.uplink_mbps), ("downlink_mbps", snapshot.downlink_mbps)):
        if value is not None and math.isfinite(value) and value > 0:
            updates[field] = value
    if snapshot.on_battery is False:
        updates["battery_fraction"] = 1.0
    elif snapshot.on_battery is True and snapshot.battery_percent is not None:
        updates["battery_fraction"] = clamp01(snapshot.battery_percent / 100.0)
    return updates


def _moved_rel(old: float | None, new: float | None, rel: float) -> bool:
    """Relative change beyond ``rel``; appearing or disappearing counts as a change."""
    if old is None or new is None:
        return (old is None) != (new is None)
    if old == 0:
        return new != 0
    return abs(new - old) / abs(old) > rel


def changed_beyond(
    old: DeviceSnapshot,
    new: DeviceSnapshot,
    rtt_rel: float = 0.3,
    bw_rel: float = 0.3,
    cpu_abs: float = 0.25,
) -> list[str]:
    """Which conditions moved enough since ``old`` to be worth re-planning, in a fixed order.

    Hysteresis: the caller keeps ``old`` = the snapshot its current plan came from, so noise
    around a value never triggers a re-plan, while a slow drift accumulates until it crosses the
    threshold. Names: ``"rtt"`` (relative change > ``rtt_rel``), ``"bandwidth"`` (uplink or
    downlink, relative > ``bw_rel``), ``"cpu"`` (``other_cpu_load``, absolute > ``cpu_abs``, the
    quantity the planner uses), ``"cloud"`` (reachability flipped). A figure that goes from
    unmeasured to measured counts as changed: the plan was made from a default.
    """
    for name, value in (("rtt_rel", rtt_rel), ("bw_rel", bw_rel), ("cpu_abs", cpu_abs)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    changed: list[str] = []
    if _moved_rel(old.rtt_ms, new.rtt_ms, rtt_rel):
        changed.append("rtt")
    if _moved_rel(old.uplink_mbps, new.uplink_mbps, bw_rel) or _moved_rel(
        old.downlink_mbps, new.downlink_mbps, bw_rel
    ):
        changed.append("bandwidth")
    if abs(new.other_cpu_load - old.other_cpu_load) > cpu_abs:
        changed.append("cpu")
    if old.cloud_reachable != new.cloud_reachable:
        changed.append("cloud")
    return changed
