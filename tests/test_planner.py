"""The split planner on plain data: no model, no torch, every case a few microseconds."""

from __future__ import annotations

import dataclasses

import pytest

from partition.planner import (
    LTE,
    WIFI,
    Conditions,
    NoFeasibleSplitError,
    PowerModel,
    Weights,
    effective_weights,
    estimate,
    plan,
    step_uplink_bytes,
)
from partition.profile import STEP_OVERHEAD_BYTES, LayerProfile

N = 30
MIB = 2**20


def smollm_like(n: int = N, decode_ms: float = 1.1, prefill_ms_per_token: float = 0.1) -> LayerProfile:
    """Roughly SmolLM2-135M on 2 idle cores: 30 uniform layers, a 113 MiB tied embedding."""
    return LayerProfile(
        model_id="llama-test", machine="test", n_layers=n, hidden_size=576, embed_ms=0.15,
        layer_decode_ms=(decode_ms,) * n, layer_prefill_ms_per_token=(prefill_ms_per_token,) * n,
        head_ms=3.0, layer_weight_bytes=(14_160_384,) * n, embed_weight_bytes=113_246_208,
        head_weight_bytes=2304, kv_bytes_per_token_per_layer=1536,
    )


PROFILE = smollm_like()
LATENCY_ONLY = Weights(energy=0, latency=1, memory=0)
ENERGY_ONLY = Weights(energy=1, latency=0, memory=0)
MEMORY_ONLY = Weights(energy=0, latency=0, memory=1)


# --- choices ---------------------------------------------------------------------------------------


def test_high_rtt_chooses_local_under_latency_weight():
    p = plan(PROFILE, Conditions(rtt_ms=200), LATENCY_ONLY)
    assert p.k == N


def test_free_network_and_slow_edge_choose_cloud_only():
    free = Conditions(rtt_ms=0, bandwidth_mbps=10_000, downlink_mbps=10_000, edge_cpu_load=0.9, cloud_speedup=20)
    assert plan(PROFILE, free, LATENCY_ONLY).k == 0


def test_energy_weight_with_expensive_radio_chooses_local():
    p = plan(PROFILE, Conditions(rtt_ms=40, bandwidth_mbps=5), ENERGY_ONLY, power=LTE)
    assert p.k == N
    local, cloud = p.table[N], p.table[0]
    assert local.energy_j < cloud.energy_j
    # The LTE tail alone (~12 J) outweighs 64 tokens of local compute.
    assert cloud.energy_j > LTE.radio_tail_w * LTE.radio_tail_s


def test_cheap_radio_and_fast_cloud_save_energy_by_offloading():
    radio_free = PowerModel(radio_tx_w=0, radio_rx_w=0, radio_tail_w=0, cpu_idle_w=0)
    p = plan(PROFILE, Conditions(rtt_ms=5, bandwidth_mbps=100), ENERGY_ONLY, power=radio_free)
    assert p.k == 0


def test_memory_weight_chooses_small_k():
    p = plan(PROFILE, Conditions(), MEMORY_ONLY)
    assert p.k == 0
    memories = [row.memory_bytes for row in p.table]
    assert memories[:N] == sorted(memories[:N])  # grows with every layer kept


def test_ties_go_to_the_larger_split():
    flat = smollm_like(decode_ms=0.0, prefill_ms_per_token=0.0)
    flat = dataclasses.replace(flat, layer_weight_bytes=(0,) * N, kv_bytes_per_token_per_layer=0)
    p = plan(flat, Conditions(), MEMORY_ONLY)
    assert p.k == N - 1  # every k < N holds only the embedding; N adds the head's norm


# --- monotonicity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rtt", [0, 20, 100, 1000])
def test_local_latency_does_not_depend_on_the_network(rtt):
    base = estimate(N, PROFILE, Conditions(rtt_ms=0))
    other = estimate(N, PROFILE, Conditions(rtt_ms=rtt, bandwidth_mbps=0.1, cloud_queue_ms=50))
    assert other.latency_ms == base.latency_ms
    assert other.energy_j == base.energy_j
    assert other.uplink_bytes == 0 and other.network_ms_per_token == 0


def test_cloud_latency_grows_with_rtt_and_falls_with_bandwidth():
    by_rtt = [estimate(0, PROFILE, Conditions(rtt_ms=r)).latency_ms for r in (0, 10, 50, 200)]
    assert by_rtt == sorted(by_rtt) and by_rtt[0] < by_rtt[-1]
    by_bw = [estimate(0, PROFILE, Conditions(bandwidth_mbps=b)).latency_ms for b in (1, 10, 100)]
    assert by_bw == sorted(by_bw, reverse=True) and by_bw[0] > by_bw[-1]


def test_each_round_trip_costs_one_rtt_per_step():
    a = estimate(10, PROFILE, Conditions(rtt_ms=0), new_tokens=64)
    b = estimate(10, PROFILE, Conditions(rtt_ms=10), new_tokens=64)
    # open + prompt step + 63 decode steps
    assert b.latency_ms - a.latency_ms == pytest.approx(10 * (1 + 1 + 63))
    assert b.decode_ms_per_token - a.decode_ms_per_token == pytest.approx(10)


def test_edge_load_slows_only_edge_compute():
    idle = estimate(N, PROFILE, Conditions(edge_cpu_load=0))
    busy = estimate(N, PROFILE, Conditions(edge_cpu_load=0.5))
    assert busy.latency_ms == pytest.approx(2 * idle.latency_ms)
    saturated = estimate(N, PROFILE, Conditions(edge_cpu_load=1.0))
    assert saturated.latency_ms == pytest.approx(10 * idle.latency_ms)  # capped, not infinite
    cloud_idle = estimate(0, PROFILE, Conditions(edge_cpu_load=0))
    cloud_busy = estimate(0, PROFILE, Conditions(edge_cpu_load=0.5))
    assert cloud_busy.cloud_ms_per_token == cloud_idle.cloud_ms_per_token


def test_a_measured_edge_slowdown_replaces_the_load_formula():
    idle = estimate(N, PROFILE, Conditions(edge_cpu_load=0))
    # A probe said 4x slower while the load reads 0.5 (the formula would say 2x): the probe wins.
    probed = estimate(N, PROFILE, Conditions(edge_cpu_load=0.5, edge_slowdown_measured=4.0))
    assert probed.latency_ms == pytest.approx(4 * idle.latency_ms)
    # A probe a little faster than the profile (noise) does not make the edge faster than profiled.
    quick = estimate(N, PROFILE, Conditions(edge_cpu_load=0.5, edge_slowdown_measured=0.8))
    assert quick.latency_ms == pytest.approx(idle.latency_ms)
    assert Conditions(edge_slowdown_measured=50.0).edge_slowdown == 10.0  # capped like the formula


def test_wire_dtype_fp32_doubles_activation_bytes():
    fp16 = estimate(5, PROFILE, Conditions(), wire_dtype="fp16")
    fp32 = estimate(5, PROFILE, Conditions(), wire_dtype="fp32")
    assert fp32.uplink_bytes > fp16.uplink_bytes and fp32.latency_ms > fp16.latency_ms
    assert step_uplink_bytes(576, 1, "fp16") == 576 * 2 + STEP_OVERHEAD_BYTES
    assert step_uplink_bytes(576, 64, "fp32") == 576 * 64 * 4 + STEP_OVERHEAD_BYTES
    with pytest.raises(ValueError, match="wire dtype"):
        step_uplink_bytes(576, 1, "int3")


def test_lte_tail_is_paid_once_per_request_not_per_token():
    short = estimate(0, PROFILE, Conditions(), power=LTE, new_tokens=2)
    long = estimate(0, PROFILE, Conditions(), power=LTE, new_tokens=65)
    tail_j = LTE.radio_tail_w * LTE.radio_tail_s
    per_step = (long.energy_j - short.energy_j) / 63
    assert per_step < tail_j / 10  # steps 40 ms apart share the radio's high-power state


def test_memory_counts_weights_and_kv_cache():
    k = 7
    row = estimate(k, PROFILE, Conditions(), prompt_tokens=100, new_tokens=28)
    expected = 113_246_208 + k * 14_160_384 + 1536 * k * 128
    assert row.memory_bytes == expected
    assert estimate(N, PROFILE, Conditions()).memory_bytes == (
        113_246_208 + N * 14_160_384 + 2304 + 1536 * N * 128
    )


def test_cloud_layer_times_from_workers_replace_the_speedup():
    measured = Conditions(cloud_layer_ms=(0.1,) * N, cloud_speedup=1.0)
    assumed = Conditions(cloud_speedup=1.0)
    assert estimate(0, PROFILE, measured).cloud_ms_per_token < estimate(0, PROFILE, assumed).cloud_ms_per_token
    with pytest.raises(ValueError, match="entries"):
        estimate(0, PROFILE, Conditions(cloud_layer_ms=(0.1,) * 3))


# --- the table, feasibility, inputs ------------------------------------------------------------------


def test_table_has_a_row_per_split_and_normalised_components():
    p = plan(PROFILE, Conditions(), Weights())
    assert [row.k for row in p.table] == list(range(N + 1))
    for name in ("latency_norm", "energy_norm", "memory_norm"):
        values = [getattr(row, name) for row in p.table]
        assert values[N] == pytest.approx(1.0) and min(values) > 0  # relative to local-only
    w = p.effective_weights
    for row in p.table:
        assert row.score == pytest.approx(w.latency * row.latency_norm + w.energy * row.energy_norm
                                          + w.memory * row.memory_norm)
    assert p.chosen.score == min(row.score for row in p.table)
    assert p.to_dict()["table"][p.k]["k"] == p.k


def test_splits_over_the_memory_budget_are_never_chosen():
    budget = estimate(10, PROFILE, Conditions()).memory_bytes
    slow_cloud = Conditions(rtt_ms=50, cloud_speedup=0.5, edge_mem_available_bytes=budget)
    p = plan(PROFILE, slow_cloud, LATENCY_ONLY)
    assert p.k == 10  # every layer kept here saves time, but only k <= 10 fits
    assert all(not row.feasible and "MiB" in row.reason for row in p.table[11:])
    assert all(row.feasible for row in p.table[:11])


def test_a_drafters_memory_is_priced_at_every_split_that_drafts():
    """An int8 copy of the cloud's layers costs the edge memory at k < N (none at N, where
    nothing is drafted): with it a budget fits fewer splits, and the memory objective sees it."""
    copy = lambda k: (N - k) * 1_000_000  # noqa: E731 - shrinks as the edge holds more layers itself
    plain = plan(PROFILE, Conditions(), MEMORY_ONLY)
    drafting = plan(PROFILE, Conditions(), MEMORY_ONLY, drafter_bytes=copy)
    for a, b in zip(plain.table, drafting.table, strict=True):
        assert b.memory_bytes == a.memory_bytes + (copy(a.k) if a.k < N else 0)
    budget = estimate(10, PROFILE, Conditions()).memory_bytes
    squeezed = plan(PROFILE, Conditions(edge_mem_available_bytes=budget), LATENCY_ONLY, drafter_bytes=copy)
    assert not squeezed.table[10].feasible  # fits alone, not with its drafter
    assert squeezed.table[N].feasible == (estimate(N, PROFILE, Conditions()).memory_bytes <= budget)


def test_nothing_fits_raises():
    with pytest.raises(NoFeasibleSplitError, match="MiB"):
        plan(PROFILE, Conditions(edge_mem_available_bytes=MIB), Weights())


def test_min_split_is_a_hard_floor():
    free = Conditions(rtt_ms=0, bandwidth_mbps=10_000, edge_cpu_load=0.9, cloud_speedup=20)
    p = plan(PROFILE, free, LATENCY_ONLY, min_split=4)
    assert p.k == 4
    assert all(not row.feasible for row in p.table[:4])
    # If memory rules out everything at or above the floor, plan refuses instead of going lower.
    budget = estimate(3, PROFILE, Conditions()).memory_bytes
    with pytest.raises(NoFeasibleSplitError, match="min_split"):
        plan(PROFILE, Conditions(edge_mem_available_bytes=budget), LATENCY_ONLY, min_split=4)
    with pytest.raises(ValueError):
        plan(PROFILE, Conditions(), LATENCY_ONLY, min_split=N + 1)


def test_allowed_splits_restrict_the_choice():
    p = plan(PROFILE, Conditions(cloud_speedup=0.5), LATENCY_ONLY, allowed_splits=[0, 15])
    assert p.k == 15
    assert [row.k for row in p.table if row.feasible] == [0, 15]
    with pytest.raises(ValueError):
        plan(PROFILE, Conditions(), LATENCY_ONLY, allowed_splits=[N + 1])


def test_weights_are_normalised_and_validated():
    w = Weights(energy=2, latency=1, memory=1)
    assert (w.energy, w.latency, w.memory) == (0.5, 0.25, 0.25)
    for bad in ({"energy": -1}, {"energy": 0, "latency": 0, "memory": 0}, {"latency": float("nan")}):
        with pytest.raises(ValueError):
            Weights(**bad)


def test_low_battery_raises_the_energy_weight():
    w = Weights(energy=1, latency=1, memory=0)
    assert effective_weights(w, Conditions()) == w
    assert effective_weights(w, Conditions(battery_fraction=1.0)) == w
    low = effective_weights(w, Conditions(battery_fraction=0.0))
    assert low.energy == pytest.approx(2 / 3)


@pytest.mark.parametrize("bad", [
    {"rtt_ms": -1}, {"bandwidth_mbps": 0}, {"edge_cpu_load": 1.5}, {"cloud_speedup": 0},
    {"battery_fraction": 2}, {"edge_mem_available_bytes": -1}, {"cloud_layer_ms": (-1.0,)},
    {"edge_slowdown_measured": 0.0}, {"edge_slowdown_measured": float("nan")},
])
def test_conditions_are_validated(bad):
    with pytest.raises(ValueError):
        Conditions(**bad)


def test_power_presets_differ_in_the_tail():
    assert LTE.radio_tail_s > 10 * WIFI.radio_tail_s
    with pytest.raises(ValueError):
        PowerModel(cpu_active_w=-1)
