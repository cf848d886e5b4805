"""What the edge device and its link to the cloud look like right now: ``DeviceMonitor``.

The planner (``partition/planner.py``) prices every split from a ``Conditions`` record whose
defaults are assumptions. This module measures what it can instead:

* the device, through psutil: CPU load (system-wide and this process), memory, battery, and a
  CUDA GPU when torch sees one;
* the network: round trips to the broker, from pings on a connection of the monitor's own and
  from round trips the edge reports (``record_rtt``), and throughput from real transfers the edge
  reports (``record_transfer``), each exponentially smoothed.

``DeviceMonitor(background_monitoring=True)`` (the original design's call) samples in a daemon
thread; without it, ``snapshot()`` samples on demand. The record it returns, and what the planner
makes of it, are pure functions of plain data in ``edge_worker/conditions.py``.

The background thread never holds a reference to the monitor, so a monitor that is dropped without
``stop()`` is still collected, and ``weakref.finalize`` then stops its thread (also at interpreter
exit). The thread is a daemon besides, so it can never keep the process alive.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import psutil

from broker.errors import EdgeCloudError
from edge_worker.conditions import DeviceSnapshot, clamp01

if TYPE_CHECKING:
    from edge_worker.cloud_client import CloudClient

log = logging.getLogger(__name__)

# A ping unanswered this long marks the cloud unreachable. A split whose round trip alone exceeds
# 2 s cannot beat decoding locally on any device we target (SmolLM2-135M decodes in tens of ms
# per token on two cores), so waiting longer would only delay the verdict and stop().
DEFAULT_PING_TIMEOUT_S = 2.0
# stop() waits for the thread at most ping timeout + this: one sampling pass (a few ms of psutil
# calls) and closing the monitor's own socket (linger 0) fit many times over.
STOP_MARGIN_S = 1.0
# Transfers smaller than this say little about throughput: at the planner's default 10 Mbit/s
# uplink, 32 KiB take ~26 ms on the wire, the order of one round trip, so below it the timing
# is mostly latency and scheduling noise. A decode step (one position, ~1 KiB at H=576 fp16) is
# far below it; a prefill of a few dozen positions is above it.
MIN_TRANSFER_BYTES = 32 * 1024
# CPU load is a difference of cumulative CPU times; over a window shorter than this the kernel's
# 10 ms accounting tick makes it jump between 0 and 1, so on-demand snapshots taken closer
# together than this reuse the previous reading instead of starting a new, shorter window.
MIN_CPU_WINDOW_S = 0.1

Direction = Literal["up", "down"]


# --- the parts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DeviceSample:
    """One reading of the device (psutil and torch), without the network estimates."""

    taken_at: float
    cpu_load: float
    process_cpu_load: float
    mem_available_bytes: int
    mem_total_bytes: int
    battery_percent: float | None
    on_battery: bool | None
    gpu_utilization: float | None
    gpu_mem_free_bytes: int | None


class _Sampler:
    """Reads the device. Serialised by a lock: psutil's CPU percentages are deltas since the
    previous call, so two interleaved callers would each see a torn window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process = psutil.Process()
        self._n_cpus = psutil.cpu_count() or 1
        # The first cpu_percent(interval=None) only starts a window; call it now so the first
        # sample has one.
        psutil.cpu_percent(interval=None)
        self._process.cpu_percent(interval=None)
        self._cpu_window_start = time.monotonic()
        self._cpu: tuple[float, float] | None = None  # (system, process) of the last window
        self._torch: Any = None
        self._gpu_checked = False

    def sample(self) -> _DeviceSample:
        with self._lock:
            cpu, proc = self._cpu_loads()
            mem = psutil.virtual_memory()
            battery_percent, on_battery = _battery()
            gpu_util, gpu_free = self._gpu()
            return _DeviceSample(
                taken_at=time.time(), cpu_load=cpu, process_cpu_load=proc,
                mem_available_bytes=int(mem.available), mem_total_bytes=int(mem.total),
                battery_percent=battery_percent, on_battery=on_battery,
                gpu_utilization=gpu_util, gpu_mem_free_bytes=gpu_free,
            )  # fmt: skip

    def _cpu_loads(self) -> tuple[float, float]:
        now = time.monotonic()
        if now - self._cpu_window_start < MIN_CPU_WINDOW_S:
            if self._cpu is not None:
                return self._cpu
            # The first reading right after the window opened: psutil would answer 0.0 for a
            # window of microseconds, and the first split would be planned on an idle machine
            # that may not be idle. Let the window reach its minimum (at most 0.1 s, once).
            time.sleep(MIN_CPU_WINDOW_S - (now - self._cpu_window_start))
            now = time.monotonic()
        system = clamp01(psutil.cpu_percent(interval=None) / 100.0)
        # Process percent counts one core as 100, so a process using all cores shows n x 100.
        process = clamp01(self._process.cpu_percent(interval=None) / 100.0 / self._n_cpus)
        self._cpu = (system, process)
        self._cpu_window_start = now
        return self._cpu

    def _gpu(self) -> tuple[float | None, int | None]:
        torch = self._cuda_torch()
        if torch is None:
            return None, None
        util: float | None = None
        try:
            free = int(torch.cuda.mem_get_info()[0])
        except Exception as exc:  # a driver error must not stop the monitor; report it once
            log.warning("GPU memory cannot be read (%s); no GPU figures from now on", exc)
            self._torch = None
            return None, None
        try:
            util = clamp01(float(torch.cuda.utilization()) / 100.0)
        except Exception as exc:  # needs pynvml / amdsmi, which torch does not require
            log.debug("GPU utilisation unavailable: %s", exc)
        return util, free

    def _cuda_torch(self) -> Any:
        """torch, if it imports and sees a CUDA device; asked once (the answer does not change)."""
        if not self._gpu_checked:
            self._gpu_checked = True
            try:
                import torch

                if torch.cuda.is_available():
                    self._torch = torch
            except Exception as exc:  # absent, or a broken CUDA install: no GPU figures
                log.debug("no GPU figures: %s", exc)
        return self._torch


def _battery() -> tuple[float | None, bool | None]:
    """(percent, on battery) or (None, None): no battery, or a platform psutil cannot ask."""
    sensors = getattr(psutil, "sensors_battery", None)
    if sensors is None:
        return None, None
    try:
        battery = sensors()
    except Exception as exc:  # some platforms raise instead of returning None
        log.debug("battery unreadable: %s", exc)
        return None, None
    if battery is None:
        return None, None
    plugged = battery.power_plugged
    return float(battery.percent), (None if plugged is None else not plugged)


class _Estimates:
    """The smoothed network figures and the latest device sample, shared across threads."""

    def __init__(self, smoothing: float) -> None:
        self.smoothing = smoothing
        self.lock = threading.Lock()
        self.rtt_ms: float | None = None
        self.rtt_last_ms: float | None = None
        self.mbps: dict[str, float | None] = {"up": None, "down": None}
        self.cloud_reachable: bool | None = None
        self.device: _DeviceSample | None = None
        self.samples = 0
        self.pings_failed = 0

    def _ewma(self, old: float | None, value: float) -> float:
        return value if old is None else self.smoothing * value + (1.0 - self.smoothing) * old

    def add_rtt(self, seconds: float) -> None:
        ms = seconds * 1e3
        with self.lock:
            self.rtt_last_ms = ms
            self.rtt_ms = self._ewma(self.rtt_ms, ms)
            was = self.cloud_reachable
            self.cloud_reachable = True
        if was is False:
            log.info("cloud reachable again (round trip %.1f ms)", ms)

    def add_throughput(self, direction: str, mbps: float) -> None:
        with self.lock:
            self.mbps[direction] = self._ewma(self.mbps[direction], mbps)

    def mark_unreachable(self, reason: str) -> None:
        with self.lock:
            was = self.cloud_reachable
            self.cloud_reachable = False
            self.pings_failed += 1
        if was is not False:
            log.warning("cloud unreachable: %s", reason)
        else:
            log.debug("cloud still unreachable: %s", reason)

    def set_device(self, sample: _DeviceSample) -> None:
        with self.lock:
            self.device = sample
            self.samples += 1


class _Pinger:
    """Pings the broker on a CloudClient of its own.

    ``BrokerClient`` (and so ``CloudClient``) is not thread-safe, and the generation loop uses the
    caller's client at any time; a second client with the same settings has its own socket (and,
    with an emulated link, its own proxy with the same delays), so the pings travel the same path
    without touching the caller's. Every use of it is serialised by ``lock``.
    """

    def __init__(self, template: CloudClient, timeout_s: float) -> None:
        self.template = template
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self._client: CloudClient | None = None

    def _own_client(self) -> CloudClient:
        if self._client is None:
            from edge_worker.cloud_client import CloudClient  # imports torch: only when pinging

            # Copy every constructor argument the template keeps under the same attribute name
            # (broker, api_key, keys_dir, encryption, link, ...), so settings added to CloudClient
            # later are copied too.
            params = inspect.signature(CloudClient.__init__).parameters
            kwargs = {name: getattr(self.template, name) for name in params
                      if name != "self" and hasattr(self.template, name)}  # fmt: skip
            self._client = CloudClient(**kwargs)
        return self._client

    def ping(self, estimates: _Estimates) -> float | None:
        """One ping; the round trip in seconds, or None (and the cloud marked unreachable)."""
        if not self.lock.acquire(timeout=self.timeout_s + STOP_MARGIN_S):
            return None  # another ping holds the socket past its own timeout; skip this one
        try:
            seconds = self._own_client().ping(self.timeout_s)
        except EdgeCloudError as exc:
            estimates.mark_unreachable(f"{type(exc).__name__}: {exc}")
            return None
        except Exception as exc:  # anything else (a zmq error, a bad setting) must not kill the thread
            log.exception("ping failed unexpectedly")
            estimates.mark_unreachable(f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self.lock.release()
        estimates.add_rtt(seconds)
        return seconds

    def close(self) -> None:
        """Close the own client (a later ping makes a fresh one)."""
        if not self.lock.acquire(timeout=self.timeout_s + STOP_MARGIN_S):
            log.warning("monitor ping client still busy; not closed")
            return
        try:
            if self._client is not None:
                self._client.close()
                self._client = None
        finally:
            self.lock.release()


class _Loop:
    """The background thread and everything it touches; deliberately no reference to the monitor,
    so the monitor can be collected (and its finalizer stop this) while the thread runs."""

    def __init__(
        self,
        sampler: _Sampler,
        estimates: _Estimates,
        pinger: _Pinger | None,
        interval_s: float,
        ping_interval_s: float,
    ) -> None:
        self.sampler = sampler
        self.estimates = estimates
        self.pinger = pinger
        self.interval_s = interval_s
        self.ping_interval_s = ping_interval_s
        self.join_timeout_s = (pinger.timeout_s if pinger else 0.0) + STOP_MARGIN_S
        self._guard = threading.RLock()  # start/stop from several threads; the finalizer may re-enter
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        with self._guard:
            if self.alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                            name="device-monitor", daemon=True)  # fmt: skip
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the thread (bounded wait) and close the ping client. Idempotent."""
        with self._guard:
            self._stop.set()
            thread, self._thread = self._thread, None
            if thread is not None and thread is not threading.current_thread():
                thread.join(self.join_timeout_s)
                if thread.is_alive():
                    log.warning("device monitor thread did not stop within %.1f s", self.join_timeout_s)
            if self.pinger is not None:
                self.pinger.close()

    def _run(self, stop: threading.Event) -> None:
        next_sample = next_ping = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_sample:
                next_sample = now + self.interval_s
                try:
                    self.estimates.set_device(self.sampler.sample())
                except Exception:  # psutil can fail transiently (e.g. /proc races); try next time
                    log.exception("device sampling failed")
            if self.pinger is not None and now >= next_ping:
                self.pinger.ping(self.estimates)
                next_ping = time.monotonic() + self.ping_interval_s
            wake = next_sample if self.pinger is None else min(next_sample, next_ping)
            stop.wait(max(0.0, wake - time.monotonic()))


# --- the monitor -----------------------------------------------------------------------------------


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value}")


class DeviceMonitor:
    """Measures the edge device and its link to the cloud; ``snapshot()`` reads the result.

    ``background_monitoring=True`` starts a daemon thread that samples the device every
    ``interval_s`` and, when ``cloud_client`` is given, pings the broker every ``ping_interval_s``
    on a client of its own built from ``cloud_client``'s settings. Otherwise nothing runs until
    ``start()``, and ``snapshot()`` reads the device when called. ``smoothing`` is the weight of a
    new measurement in the exponential averages (1: no smoothing).

    ``record_rtt`` and ``record_transfer`` feed what the edge observes on real steps; they and
    ``snapshot()`` are safe to call from any thread.
    """

    def __init__(
        self,
        background_monitoring: bool = False,
        interval_s: float = 1.0,
        cloud_client: CloudClient | None = None,
        ping_interval_s: float = 5.0,
        smoothing: float = 0.3,
        *,
        ping_timeout_s: float = DEFAULT_PING_TIMEOUT_S,
    ) -> None:
        _check_positive("interval_s", interval_s)
        _check_positive("ping_interval_s", ping_interval_s)
        _check_positive("ping_timeout_s", ping_timeout_s)
        if not (math.isfinite(smoothing) and 0.0 < smoothing <= 1.0):
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.interval_s = interval_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.smoothing = smoothing
        self._estimates = _Estimates(smoothing)
        self._sampler = _Sampler()
        self._pinger = _Pinger(cloud_client, ping_timeout_s) if cloud_client is not None else None
        self._loop = _Loop(self._sampler, self._estimates, self._pinger, interval_s, ping_interval_s)
        # Runs at collection or interpreter exit if stop() was never called; holds only the loop.
        self._finalizer = weakref.finalize(self, self._loop.shutdown)
        if background_monitoring:
            self.start()

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> DeviceMonitor:
        """Start background sampling (and pinging); a no-op when already running."""
        self._loop.start()
        return self

    def stop(self) -> None:
        """Stop the thread (waits at most ping timeout + STOP_MARGIN_S) and close the ping client.
        Idempotent; ``start()`` may be called again afterwards."""
        self._loop.shutdown()

    close = stop

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._loop.alive()

    def __enter__(self) -> DeviceMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- measurements ---------------------------------------------------------------------------
    @property
    def samples_taken(self) -> int:
        """Device samples the background thread has taken so far."""
        with self._estimates.lock:
            return self._estimates.samples

    @property
    def pings_failed(self) -> int:
        """Pings that got no answer (or failed otherwise) so far."""
        with self._estimates.lock:
            return self._estimates.pings_failed

    def snapshot(self) -> DeviceSnapshot:
        """The latest figures. In background mode the device part is the thread's latest sample
        (read on demand until it has one); otherwise the device is read now (psutil, ~1 ms)."""
        with self._estimates.lock:
            device = self._estimates.device if self.running else None
        if device is None:
            device = self._sampler.sample()
        est = self._estimates
        with est.lock:
            return DeviceSnapshot(
                taken_at=device.taken_at, cpu_load=device.cpu_load, process_cpu_load=device.process_cpu_load,
                mem_available_bytes=device.mem_available_bytes, mem_total_bytes=device.mem_total_bytes,
                battery_percent=device.battery_percent, on_battery=device.on_battery,
                gpu_utilization=device.gpu_utilization, gpu_mem_free_bytes=device.gpu_mem_free_bytes,
                rtt_ms=est.rtt_ms, uplink_mbps=est.mbps["up"], downlink_mbps=est.mbps["down"],
                cloud_reachable=est.cloud_reachable, rtt_last_ms=est.rtt_last_ms,
            )  # fmt: skip

    def ping_now(self) -> float | None:
        """Ping the broker once on the caller's thread (serialised with the background thread);
        the round trip in seconds, or None when it failed (the cloud is then marked unreachable).
        Blocks at most about ``ping_timeout_s``; for on-demand use without the thread."""
        if self._pinger is None:
            raise RuntimeError("DeviceMonitor was built without a cloud_client; there is nothing to ping")
        return self._pinger.ping(self._estimates)

    def record_rtt(self, seconds: float) -> None:
        """A round trip the edge observed (e.g. a step's transport time); smoothed with the pings.
        A round trip that completed also means the cloud is reachable."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds}")
        self._estimates.add_rtt(seconds)

    def record_transfer(self, n_bytes: int, seconds: float, direction: Direction) -> None:
        """``n_bytes`` moved in ``seconds`` in ``direction`` ("up": edge -> cloud, "down").

        ``seconds`` should be the time spent moving the bytes; nothing is subtracted here, so a
        caller that only has a whole round trip should subtract the RTT first or accept an
        underestimate. Transfers under MIN_TRANSFER_BYTES, or timed as 0 s (the clock's
        resolution), are ignored: they measure latency, not throughput.
        """
        if direction not in ("up", "down"):
            raise ValueError(f'direction must be "up" or "down", got {direction!r}')
        if n_bytes < 0 or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"need n_bytes >= 0 and finite seconds >= 0, got {n_bytes}, {seconds}")
        if n_bytes < MIN_TRANSFER_BYTES or seconds == 0:
            return
        self._estimates.add_throughput(direction, n_bytes * 8 / seconds / 1e6)
