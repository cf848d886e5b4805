"""The edge's adaptive step timeout (edge_worker/timeouts.py): plain numbers in, waits out."""

from __future__ import annotations

import pytest

from edge_worker.timeouts import MAX_COPIES, StepTimer


def test_no_adaptive_wait_until_enough_samples():
    t = StepTimer(min_samples=3)
    assert t.timeout_s(2.0) is None
    t.observe(0.04)
    t.observe(0.04)
    assert t.timeout_s(2.0) is None and t.copy_wait_s(1, 2.0) is None
    t.observe(0.04)
    assert t.timeout_s(2.0) is not None


def test_steady_round_trips_give_a_wait_near_the_mean_but_not_below_the_floor():
    t = StepTimer(min_timeout_s=0.01)
    for _ in range(50):
        t.observe(0.040)
    assert t.timeout_s(2.0) == pytest.approx(0.040, abs=0.005)  # the deviation has decayed to ~0
    floor = StepTimer(min_timeout_s=0.05)
    for _ in range(50):
        floor.observe(0.010)
    assert floor.timeout_s(2.0) == 0.05


def test_jitter_widens_the_wait_and_the_budget_caps_it():
    calm, noisy = StepTimer(min_timeout_s=0.0), StepTimer(min_timeout_s=0.0)
    for i in range(40):
        calm.observe(0.05)
        noisy.observe(0.02 if i % 2 else 0.08)  # the same mean, large deviation
    assert noisy.timeout_s(9.0) > calm.timeout_s(9.0) + 0.05
    assert noisy.timeout_s(0.03) == 0.03


def test_a_slow_spell_moves_the_mean_by_one_eighth_per_sample():
    t = StepTimer(min_timeout_s=0.0)
    for _ in range(3):
        t.observe(0.1)
    before = t.mean_s
    t.observe(0.9)
    assert t.mean_s == pytest.approx(before + (0.9 - before) / 8)


def test_copies_back_off_exponentially_and_stop_at_the_cap():
    t = StepTimer(min_timeout_s=0.05)
    for _ in range(10):
        t.observe(0.01)
    waits = [t.copy_wait_s(n, 100.0) for n in range(1, MAX_COPIES + 1)]
    assert waits[:3] == [0.05, 0.1, 0.2]
    assert waits[-1] is None  # no copy beyond MAX_COPIES
    assert t.copy_wait_s(4, 0.3) == 0.3
