"""DeviceMonitor: device readings, the background thread's lifecycle, the smoothing arithmetic, the
planner mapping, the re-plan hysteresis, and pings through a real broker (reachable or not)."""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import replace

import psutil
import pytest
from brokerutil import running_broker, wait_until

from edge_worker.cloud_client import CloudClient
from edge_worker.conditions import DeviceSnapshot, changed_beyond, to_conditions, unmeasured
from edge_worker.device_monitor import MIN_TRANSFER_BYTES, DeviceMonitor
from partition.planner import Conditions

FAST_S = 0.02  # sampling and ping period for tests: many rounds within the polling deadlines
PROMPT_STOP_S = 1.5  # stop() is bounded by ping timeout + 1 s; no ping is in flight in these tests
NOBODY = "tcp://127.0.0.1:9"  # the discard port: nothing answers ZeroMQ there


def snap(**fields) -> DeviceSnapshot:
    """A snapshot with plain numbers, everything network-side unmeasured unless given."""
    base = dict(
        taken_at=0.0, cpu_load=0.2, process_cpu_load=0.1, mem_available_bytes=4 << 30,
        mem_total_bytes=8 << 30, battery_percent=None, on_battery=None, gpu_utilization=None,
        gpu_mem_free_bytes=None, rtt_ms=None, uplink_mbps=None, downlink_mbps=None,
        cloud_reachable=None,
    )  # fmt: skip
    base.update(fields)
    return DeviceSnapshot(**base)


def stop_promptly(monitor: DeviceMonitor) -> float:
    t0 = time.monotonic()
    monitor.stop()
    elapsed = time.monotonic() - t0
    assert not monitor.running
    return elapsed


# --- readings --------------------------------------------------------------------------------------


def test_on_demand_snapshot_is_sane_on_this_machine():
    import torch

    monitor = DeviceMonitor()
    assert not monitor.running
    before = time.time()
    s = monitor.snapshot()
    assert before - 1 <= s.taken_at <= time.time() + 1
    assert 0.0 <= s.cpu_load <= 1.0 and 0.0 <= s.process_cpu_load <= 1.0
    assert 0 < s.mem_available_bytes <= s.mem_total_bytes == psutil.virtual_memory().total
    if psutil.sensors_battery() is None:
        assert s.battery_percent is None and s.on_battery is None
    if not torch.cuda.is_available():
        assert s.gpu_utilization is None and s.gpu_mem_free_bytes is None
    assert (s.rtt_ms, s.rtt_last_ms, s.uplink_mbps, s.downlink_mbps, s.cloud_reachable) == (None,) * 5
    assert monitor.samples_taken == 0  # on demand: no thread, no background samples
    monitor.stop()  # harmless without a thread


def test_cpu_load_is_measured_over_a_window():
    monitor = DeviceMonitor()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # keep this process busy for the window
        sum(range(10_000))
    s = monitor.snapshot()
    assert s.process_cpu_load > 0.0
    assert s.cpu_load >= s.process_cpu_load - 0.05  # the system total includes this process
    assert 0.0 <= s.other_cpu_load <= 1.0


def test_the_first_reading_right_after_start_is_a_measurement_not_zero():
    """A reading taken at once used a window of microseconds, which psutil answers with 0.0: the
    first split was planned on an idle machine while this process was busy."""
    stop, spinning = threading.Event(), threading.Event()

    def spin() -> None:
        spinning.set()
        while not stop.is_set():
            sum(range(1000))

    busy = threading.Thread(target=spin, daemon=True)
    busy.start()
    try:
        assert spinning.wait(10)
        s = DeviceMonitor().snapshot()
    finally:
        stop.set()
        busy.join()
    assert s.process_cpu_load > 0.1, s


# --- lifecycle -------------------------------------------------------------------------------------


def test_background_thread_samples_repeatedly_and_stops_promptly():
    monitor = DeviceMonitor(background_monitoring=True, interval_s=FAST_S)
    thread = monitor._loop._thread
    assert monitor.running and thread is not None and thread.daemon
    first = wait_until(lambda: monitor.samples_taken >= 1 and monitor.snapshot(), what="a first sample")
    wait_until(lambda: monitor.samples_taken >= 3, what="more samples")
    assert monitor.snapshot().taken_at > first.taken_at
    assert stop_promptly(monitor) < PROMPT_STOP_S
    assert not thread.is_alive()
    count = monitor.samples_taken
    monitor.stop()  # idempotent
    assert monitor.samples_taken == count
    assert 0.0 <= monitor.snapshot().cpu_load <= 1.0  # on demand again after stop


def test_start_is_idempotent_and_restartable():
    monitor = DeviceMonitor(interval_s=FAST_S)
    monitor.start()
    thread = monitor._loop._thread
    monitor.start()
    assert monitor._loop._thread is thread
    monitor.stop()
    assert not thread.is_alive()
    monitor.start()
    assert monitor.running and monitor._loop._thread is not thread
    monitor.stop()
    assert not monitor.running


def test_context_manager_stops_the_thread():
    with DeviceMonitor(background_monitoring=True, interval_s=FAST_S) as monitor:
        thread = monitor._loop._thread
        wait_until(lambda: monitor.samples_taken >= 2, what="samples")
    assert not monitor.running and not thread.is_alive()


def _dropped_monitor_thread() -> threading.Thread:
    """Start a monitor, let it sample, and return only its thread: the monitor goes out of scope."""
    monitor = DeviceMonitor(background_monitoring=True, interval_s=FAST_S)
    wait_until(lambda: monitor.samples_taken >= 1, what="a sample")
    return monitor._loop._thread


def test_a_dropped_monitor_stops_its_thread():
    thread = _dropped_monitor_thread()
    gc.collect()
    wait_until(lambda: not thread.is_alive(), what="the thread to stop after the monitor was collected")


@pytest.mark.parametrize(
    "kwargs",
    [{"smoothing": 0.0}, {"smoothing": 1.5}, {"interval_s": 0.0}, {"ping_interval_s": -1.0},
     {"ping_timeout_s": float("nan")}],
)  # fmt: skip
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        DeviceMonitor(**kwargs)


# --- smoothing -------------------------------------------------------------------------------------


def test_record_rtt_smooths_and_keeps_the_last_value():
    monitor = DeviceMonitor(smoothing=0.5)
    monitor.record_rtt(0.010)
    s = monitor.snapshot()
    assert s.rtt_ms == pytest.approx(10.0) and s.rtt_last_ms == pytest.approx(10.0)
    assert s.cloud_reachable is True  # an answered round trip
    monitor.record_rtt(0.030)
    s = monitor.snapshot()
    assert s.rtt_ms == pytest.approx(20.0)  # 0.5 * 30 + 0.5 * 10
    assert s.rtt_last_ms == pytest.approx(30.0)
    monitor.record_rtt(0.030)
    assert monitor.snapshot().rtt_ms == pytest.approx(25.0)
    with pytest.raises(ValueError):
        monitor.record_rtt(-0.001)


def test_record_transfer_smooths_per_direction_and_ignores_small_transfers():
    monitor = DeviceMonitor(smoothing=0.25)
    monitor.record_transfer(1_000_000, 1.0, "up")  # 8 Mbit/s
    assert monitor.snapshot().uplink_mbps == pytest.approx(8.0)
    monitor.record_transfer(1_000_000, 0.25, "up")  # 32 Mbit/s
    assert monitor.snapshot().uplink_mbps == pytest.approx(0.25 * 32 + 0.75 * 8)  # 14
    monitor.record_transfer(MIN_TRANSFER_BYTES - 1, 1e-6, "up")  # would claim ~262 Gbit/s
    monitor.record_transfer(10_000_000, 0.0, "up")  # below the clock's resolution
    assert monitor.snapshot().uplink_mbps == pytest.approx(14.0)
    assert monitor.snapshot().downlink_mbps is None
    monitor.record_transfer(MIN_TRANSFER_BYTES, MIN_TRANSFER_BYTES * 8 / 50e6, "down")  # 50 Mbit/s
    s = monitor.snapshot()
    assert s.downlink_mbps == pytest.approx(50.0) and s.uplink_mbps == pytest.approx(14.0)
    with pytest.raises(ValueError):
        monitor.record_transfer(100_000, 1.0, "sideways")
    with pytest.raises(ValueError):
        monitor.record_transfer(-1, 1.0, "up")


def test_recording_is_thread_safe():
    monitor = DeviceMonitor(smoothing=0.1)

    def feed():
        for _ in range(500):
            monitor.record_rtt(0.02)
            monitor.record_transfer(100_000, 0.08, "up")  # 10 Mbit/s

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    s = monitor.snapshot()
    assert s.rtt_ms == pytest.approx(20.0) and s.uplink_mbps == pytest.approx(10.0)


# --- planner mapping -------------------------------------------------------------------------------


def test_to_conditions_fills_what_was_measured():
    defaults = Conditions(rtt_ms=20.0, bandwidth_mbps=10.0, downlink_mbps=50.0, cloud_queue_ms=3.0,
                          cloud_speedup=6.0, edge_mem_available_bytes=123)  # fmt: skip
    s = snap(cpu_load=0.7, process_cpu_load=0.2, mem_available_bytes=2 << 30, rtt_ms=42.0,
             uplink_mbps=3.5, downlink_mbps=80.0, battery_percent=40.0, on_battery=True)  # fmt: skip
    c = to_conditions(s, defaults)
    assert c.rtt_ms == 42.0 and c.bandwidth_mbps == 3.5 and c.downlink_mbps == 80.0
    assert c.edge_cpu_load == pytest.approx(0.5)  # other work only: our own 0.2 is not competition
    assert c.edge_mem_available_bytes == 2 << 30
    assert c.battery_fraction == pytest.approx(0.4)
    assert (c.cloud_queue_ms, c.cloud_speedup) == (3.0, 6.0)  # not measured here


def test_to_conditions_keeps_defaults_for_unmeasured_figures():
    defaults = Conditions(rtt_ms=20.0, bandwidth_mbps=10.0, downlink_mbps=50.0, battery_fraction=0.9)
    c = to_conditions(snap(uplink_mbps=0.0), defaults)
    assert (c.rtt_ms, c.bandwidth_mbps, c.downlink_mbps, c.battery_fraction) == (20.0, 10.0, 50.0, 0.9)
    assert to_conditions(snap(battery_percent=30.0, on_battery=False), defaults).battery_fraction == 1.0
    # own load above the system reading (windows a tick apart) clamps to 0 instead of failing
    assert to_conditions(snap(cpu_load=0.1, process_cpu_load=0.3), defaults).edge_cpu_load == 0.0


def test_the_figures_a_plan_assumes_are_named():
    assert unmeasured(snap(uplink_mbps=None, downlink_mbps=None)) == ("bandwidth_mbps", "downlink_mbps")
    assert unmeasured(snap(uplink_mbps=12.0, downlink_mbps=40.0)) == ()
    assert "edge_cpu_load" in unmeasured(None), "without a monitor nothing about the device is known"


def test_to_conditions_from_a_live_snapshot_is_valid():
    c = to_conditions(DeviceMonitor().snapshot(), Conditions())
    assert 0.0 <= c.edge_cpu_load <= 1.0 and c.edge_mem_available_bytes > 0


# --- hysteresis ------------------------------------------------------------------------------------


def test_changed_beyond():
    base = snap(rtt_ms=20.0, uplink_mbps=10.0, downlink_mbps=50.0, cpu_load=0.3, process_cpu_load=0.1,
                cloud_reachable=True)  # fmt: skip
    assert changed_beyond(base, base) == []
    assert changed_beyond(base, replace(base, rtt_ms=25.0, uplink_mbps=12.0, cpu_load=0.5)) == []
    assert changed_beyond(base, replace(base, rtt_ms=27.0)) == ["rtt"]
    assert changed_beyond(base, replace(base, rtt_ms=13.0)) == ["rtt"]
    assert changed_beyond(base, replace(base, uplink_mbps=6.0)) == ["bandwidth"]
    assert changed_beyond(base, replace(base, downlink_mbps=70.0)) == ["bandwidth"]
    assert changed_beyond(base, replace(base, cpu_load=0.6)) == ["cpu"]
    # our own load rising with the system's is not competition
    assert changed_beyond(base, replace(base, cpu_load=0.9, process_cpu_load=0.7)) == []
    assert changed_beyond(base, replace(base, cloud_reachable=False)) == ["cloud"]
    moved = replace(base, rtt_ms=100.0, uplink_mbps=1.0, cpu_load=1.0, cloud_reachable=False)
    assert changed_beyond(base, moved) == ["rtt", "bandwidth", "cpu", "cloud"]
    # thresholds are parameters; first measurements count as changes
    assert changed_beyond(base, replace(base, rtt_ms=25.0), rtt_rel=0.1) == ["rtt"]
    assert changed_beyond(snap(), snap(rtt_ms=5.0, uplink_mbps=1.0)) == ["rtt", "bandwidth"]
    with pytest.raises(ValueError):
        changed_beyond(base, base, cpu_abs=-0.1)


# --- pings -----------------------------------------------------------------------------------------


def test_pings_through_a_real_broker_on_a_client_of_its_own():
    with running_broker() as broker:
        given = CloudClient(broker=broker.endpoint, encryption=False, api_key="", request_timeout_s=7.0)
        monitor = DeviceMonitor(background_monitoring=True, interval_s=FAST_S, cloud_client=given,
                                ping_interval_s=FAST_S, smoothing=0.5)  # fmt: skip
        try:
            wait_until(lambda: monitor.snapshot().rtt_ms is not None, what="a measured round trip")
            s = monitor.snapshot()
            assert s.cloud_reachable is True
            assert 0 < s.rtt_last_ms < 1000 and 0 < s.rtt_ms < 1000
            own = monitor._pinger._client
            assert own is not None and own is not given
            assert (own.broker, own.encryption, own.request_timeout_s) == (broker.endpoint, False, 7.0)
            assert given._connections == []  # the caller's socket was never touched
            wait_until(lambda: monitor.snapshot().rtt_last_ms != s.rtt_last_ms, what="a second ping")
        finally:
            assert stop_promptly(monitor) < PROMPT_STOP_S
        assert monitor._pinger._client is None  # the own client is closed on stop
        given.close()


def test_unreachable_broker_is_marked_and_the_monitor_keeps_running():
    given = CloudClient(broker=NOBODY, encryption=False, api_key="")
    monitor = DeviceMonitor(background_monitoring=True, interval_s=FAST_S, cloud_client=given,
                            ping_interval_s=FAST_S, ping_timeout_s=0.1)  # fmt: skip
    try:
        wait_until(lambda: monitor.pings_failed >= 2, what="failed pings")
        s = monitor.snapshot()
        assert s.cloud_reachable is False and s.rtt_ms is None
        assert monitor.running
        samples = monitor.samples_taken
        wait_until(lambda: monitor.samples_taken > samples, what="sampling to go on")
        assert monitor.ping_now() is None  # on the caller's thread too, bounded
    finally:
        assert stop_promptly(monitor) < 0.1 + PROMPT_STOP_S
    # the edge can still report what it sees; a round trip that completed means reachable again
    monitor.record_rtt(0.015)
    assert monitor.snapshot().cloud_reachable is True


def test_an_unexpected_ping_error_does_not_kill_the_thread(monkeypatch):
    def broken(self, timeout_s=5.0):
        raise RuntimeError("boom")

    monkeypatch.setattr(CloudClient, "ping", broken)
    given = CloudClient(broker=NOBODY, encryption=False, api_key="")
    with DeviceMonitor(background_monitoring=True, interval_s=FAST_S, cloud_client=given,
                       ping_interval_s=FAST_S) as monitor:  # fmt: skip
        wait_until(lambda: monitor.pings_failed >= 2, what="failed pings")
        assert monitor.running and monitor.snapshot().cloud_reachable is False


def test_ping_now_needs_a_cloud_client():
    with pytest.raises(RuntimeError):
        DeviceMonitor().ping_now()
