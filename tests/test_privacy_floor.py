"""The privacy floor: ``--min-split`` and the floor derived from measured leakage, as pure functions,
plus the edge CLI refusing a split below the floor."""

from __future__ import annotations

import pytest

from edge_worker.config import EdgeConfig
from edge_worker.engine import resolve_split
from partition.errors import InvalidSplitError
from partition.planner import Conditions, Weights, min_split_for_leakage, plan
from partition.profile import LayerProfile

N = 30
# Shaped like the measured SmolLM2 fp16 table: falls with depth, with a bump at 15.
LEAKAGE = {0: 1.0, 1: 0.98, 2: 0.97, 5: 0.9, 10: 0.8, 15: 0.82, 20: 0.7, 25: 0.6}


def test_the_floor_is_the_shallowest_split_from_which_every_deeper_measurement_passes():
    assert min_split_for_leakage(LEAKAGE, 0.75, N) == 20
    assert min_split_for_leakage(LEAKAGE, 0.6, N) == 25
    # 10 leaks 0.80 but 15 leaks 0.82: a floor of 10 would let the planner pick 15.
    assert min_split_for_leakage(LEAKAGE, 0.81, N) == 20
    assert min_split_for_leakage(LEAKAGE, 0.85, N) == 10
    assert min_split_for_leakage(LEAKAGE, 1.0, N) == 0


def test_no_passing_split_keeps_everything_on_the_device():
    assert min_split_for_leakage(LEAKAGE, 0.5, N) == N
    assert min_split_for_leakage({}, 0.5, N) == N


def test_bad_leakage_inputs_are_refused():
    with pytest.raises(ValueError, match="max_fraction"):
        min_split_for_leakage(LEAKAGE, 1.5, N)
    with pytest.raises(ValueError, match="outside"):
        min_split_for_leakage({30: 0.1}, 0.5, N)


def test_the_planner_never_goes_below_a_floor_derived_from_leakage():
    n = 6
    profile = LayerProfile(
        model_id="m", machine="test", n_layers=n, hidden_size=64, embed_ms=0.1, head_ms=1.0,
        layer_decode_ms=(2.0,) * n, layer_prefill_ms_per_token=(0.5,) * n,
        embed_weight_bytes=1 << 20, layer_weight_bytes=(1 << 20,) * n, head_weight_bytes=1 << 20,
        kv_bytes_per_token_per_layer=1024,
    )
    # A free network and a loaded edge: unconstrained, the planner sends everything to the cloud.
    fast_cloud = Conditions(rtt_ms=0, bandwidth_mbps=10_000, downlink_mbps=10_000, edge_cpu_load=0.9,
                            cloud_speedup=20)
    free = plan(profile, fast_cloud, Weights(0, 1, 0))
    floor = min_split_for_leakage({0: 1.0, 2: 0.9, 4: 0.4}, 0.5, n)
    assert free.k < floor == 4
    floored = plan(profile, fast_cloud, Weights(0, 1, 0), min_split=floor)
    assert floored.k >= 4 and not any(r.feasible for r in floored.table[:4])


def test_a_fixed_split_below_the_floor_is_refused_not_raised():
    assert resolve_split(EdgeConfig(min_split=5), N) is None  # the planner chooses, at or above 5
    assert resolve_split(EdgeConfig(split=5, min_split=5), N) == 5
    assert resolve_split(EdgeConfig(force_local=True, min_split=30), N) == N
    with pytest.raises(InvalidSplitError, match="below --min-split 5"):
        resolve_split(EdgeConfig(split=4, min_split=5), N)
    with pytest.raises(InvalidSplitError, match="below --min-split 1"):
        resolve_split(EdgeConfig(force_cloud=True, min_split=1), N)
    with pytest.raises(InvalidSplitError, match="above this model"):
        resolve_split(EdgeConfig(min_split=31), N)
    with pytest.raises(ValueError, match="min split"):
        EdgeConfig(min_split=-1)


@pytest.mark.integration
def test_the_edge_cli_refuses_a_split_below_the_floor_clearly():
    import subprocess

    from cli.cluster import ROOT, child_env, cli_command

    out = subprocess.run(cli_command("edge", "--model", "tiny-llama", "--split", "1", "--min-split", "3",
                                     "--tokens", "2"),
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=child_env())
    assert out.returncode != 0
    assert "below --min-split 3" in out.stderr and "Traceback" not in out.stderr


def _write_table(directory, model_id="llama-test@abc"):
    import json

    cells = [{"split": k, "protection": "fp16", "recovered": v} for k, v in LEAKAGE.items()]
    cells.append({"split": 25, "protection": "fp16+d32", "recovered": 0.1})
    (directory / "leakage-test.json").write_text(json.dumps({"model": model_id, "cells": cells}))


def test_measured_leakage_reads_the_table_of_this_model_and_protection(tmp_path):
    from partition.leakage import LeakageInputError, measured_leakage, protection_name

    _write_table(tmp_path)
    assert measured_leakage("llama-test@abc", "fp16", tmp_path) == LEAKAGE
    assert measured_leakage("llama-test@abc", protection_name("fp16", 32), tmp_path) == {25: 0.1}
    with pytest.raises(LeakageInputError, match="no measurements for 'int8'"):
        measured_leakage("llama-test@abc", "int8", tmp_path)
    with pytest.raises(LeakageInputError, match="no leakage measurements for model other"):
        measured_leakage("other", "fp16", tmp_path)


def test_a_leakage_budget_raises_the_floor_and_never_lowers_it(tmp_path):
    from types import SimpleNamespace

    from edge_worker.engine import apply_leakage_budget

    _write_table(tmp_path)
    source = SimpleNamespace(model_id="llama-test@abc", n_layers=N)

    def floor(**kw) -> int:
        return apply_leakage_budget(EdgeConfig(**kw), source, tmp_path).min_split

    assert floor(max_leakage=0.75) == 20
    assert floor(max_leakage=0.75, min_split=25) == 25
    assert floor(max_leakage=0.5) == N  # only keeping everything here passes
    assert floor(max_leakage=0.5, reduce_dims=32) == 25
    assert floor(min_split=3) == 3
    with pytest.raises(ValueError, match="max leakage"):
        EdgeConfig(max_leakage=2.0)


def test_the_shipped_smollm2_measurements_give_a_floor_for_every_protection_they_list():
    import json

    from partition.leakage import DATA_DIR, measured_leakage

    table = json.loads((DATA_DIR / "leakage-smollm2-135m.json").read_text())
    for protection in {c["protection"] for c in table["cells"]}:
        leakage = measured_leakage(table["model"], protection)
        assert leakage and all(0.0 <= v <= 1.0 for v in leakage.values())
        assert 0 <= min_split_for_leakage(leakage, 0.5, N) <= N


@pytest.mark.integration
def test_a_leakage_budget_without_measurements_for_the_model_is_refused_clearly():
    import subprocess

    from cli.cluster import ROOT, child_env, cli_command

    out = subprocess.run(cli_command("edge", "--model", "tiny-llama", "--max-leakage", "0.5", "--tokens", "2"),
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=child_env())
    assert out.returncode != 0
    assert "no leakage measurements for model" in out.stderr and "Traceback" not in out.stderr
