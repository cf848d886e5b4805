"""Layer profiles: measured on tiny-llama, weight sizes from the real parameters, the JSON cache."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import torch

import partition.profile as profile_mod
from partition.profile import (
    PROFILE_FORMAT,
    STEP_OVERHEAD_BYTES,
    STEP_REPLY_BYTES,
    LayerProfile,
    load_or_measure_profile,
    machine_description,
    measure_profile,
    profile_cache_path,
)
from partition.segment import ModelSegment


@pytest.fixture(scope="module")
def tiny_profile(tiny_llama):
    return measure_profile(tiny_llama, repeats=2)


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_measured_profile_is_complete_and_positive(tiny_llama, tiny_profile):
    p = tiny_profile
    assert p.model_id == tiny_llama.model_id and p.machine == machine_description()
    assert p.n_layers == tiny_llama.n_layers == 4 and p.hidden_size == 64
    assert len(p.layer_decode_ms) == len(p.layer_prefill_ms_per_token) == len(p.layer_weight_bytes) == 4
    assert p.embed_ms > 0 and p.head_ms > 0 and p.probe_ms > 0
    assert all(t > 0 for t in p.layer_decode_ms + p.layer_prefill_ms_per_token)


def test_weight_bytes_match_the_segments_parameters(tiny_llama, tiny_profile):
    segment = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers)
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in segment.parameters()}
    assert tiny_profile.total_weight_bytes == sum(unique.values())
    assert tiny_profile.layer_weight_bytes == tuple(_bytes(layer) for layer in segment.layers)
    assert tiny_profile.embed_weight_bytes == _bytes(segment.embeddings)
    # tiny-llama ties its head to the embedding: the head adds only the final norm.
    assert segment.lm_head.weight.data_ptr() == segment.embeddings[0].weight.data_ptr()
    assert tiny_profile.head_weight_bytes == _bytes(segment.norm)


def test_kv_bytes_match_the_cache(tiny_llama, tiny_profile):
    segment = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers)
    cache = segment.new_cache()
    positions = 256  # the cache's first allocation, so capacity == length
    segment(torch.zeros((1, positions), dtype=torch.long), cache, logits="none")
    assert cache.nbytes() == tiny_profile.kv_bytes_per_token_per_layer * tiny_llama.n_layers * positions


def test_json_round_trip(tiny_profile):
    again = LayerProfile.from_json(tiny_profile.to_json())
    assert again == tiny_profile
    assert isinstance(again.layer_decode_ms, tuple)


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(format_version=PROFILE_FORMAT + 1),
    lambda d: d.pop("head_ms"),
    lambda d: d.update(layer_decode_ms=[1.0]),
])
def test_from_json_rejects_incomplete_profiles(tiny_profile, mutate):
    data = json.loads(tiny_profile.to_json())
    mutate(data)
    with pytest.raises(ValueError):
        LayerProfile.from_json(json.dumps(data))
    with pytest.raises(ValueError):
        LayerProfile.from_json("[1, 2]")


def test_cache_measures_once_then_reads(tiny_llama, tiny_profile, tmp_path, monkeypatch):
    calls = []

    def fake_measure(source, repeats=5):
        calls.append(source.model_id)
        return tiny_profile

    monkeypatch.setattr(profile_mod, "measure_profile", fake_measure)
    first = load_or_measure_profile(tiny_llama, cache_dir=tmp_path)
    second = load_or_measure_profile(tiny_llama, cache_dir=tmp_path)
    assert first == second == tiny_profile and len(calls) == 1
    path = profile_cache_path(tiny_llama.model_id, machine_description(), tmp_path)
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]

    path.write_text("{ not json")  # unreadable: measured again and rewritten
    assert load_or_measure_profile(tiny_llama, cache_dir=tmp_path) == tiny_profile and len(calls) == 2
    assert LayerProfile.from_json(path.read_text()) == tiny_profile

    load_or_measure_profile(tiny_llama, cache_dir=tmp_path, remeasure=True)
    assert len(calls) == 3


def test_default_cache_lives_under_edgecloud_cache(tiny_llama, tiny_profile, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECLOUD_CACHE", str(tmp_path))
    monkeypatch.setattr(profile_mod, "measure_profile", lambda source, repeats=5: tiny_profile)
    load_or_measure_profile(tiny_llama)
    files = os.listdir(tmp_path / "profiles")
    assert len(files) == 1 and files[0].startswith(tiny_llama.model_id) and files[0].endswith(".json")


def test_overhead_constants_cover_the_real_wire_format():
    """STEP_OVERHEAD_BYTES / STEP_REPLY_BYTES against what broker.protocol really sends."""
    from broker import protocol
    from broker.wire.crypto import SessionCipher
    from broker.wire.session_protocol import seal_step, seal_step_reply

    cipher = SessionCipher(os.urandom(32), os.urandom(32), b"edge", b"worker")
    sid, hidden = uuid.uuid4().hex, torch.zeros(1, 1, 576)
    body = seal_step(cipher, sid, 7, 100, hidden, "fp16")
    request = protocol.Request(uuid.uuid4().hex, sid, "llama-30x576@0123456789ab", 15, 30_000, 7, "step",
                               "k" * 43, {protocol.TASK_KEY: f"{uuid.uuid4().hex}-7"}, body)  # as CloudSession
    sent = sum(protocol.frame_nbytes(f) for f in protocol.encode(request))
    overhead = sent - hidden.numel() * 2
    assert 0.75 * STEP_OVERHEAD_BYTES <= overhead <= STEP_OVERHEAD_BYTES
    reply = protocol.Reply(uuid.uuid4().hex, sid, 7, "worker-1", 0, {},
                           seal_step_reply(cipher, sid, 7, 123, 101, 1.5, 2.5))
    received = sum(protocol.frame_nbytes(f) for f in protocol.encode(reply))
    assert 0.75 * STEP_REPLY_BYTES <= received <= STEP_REPLY_BYTES


# --- edgecloud plan ---------------------------------------------------------------------------------


@pytest.fixture
def plan_cli(tiny_profile, monkeypatch):
    """Run `edgecloud plan` on tiny-llama with the profile above (nothing measured or cached)."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setattr(profile_mod, "load_or_measure_profile", lambda source, remeasure=False: tiny_profile)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["plan", "--model", "tiny-llama", *args])


def test_plan_cli_table_marks_the_choice(plan_cli):
    result = plan_cli("--rtt-ms", "100")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = [line for line in lines if line[:2] in ("* ", "  ", "x ") and line[2:].strip()[:1].isdigit()]
    assert len(rows) == 5  # k = 0..4
    assert "choice: split" in result.output


def test_plan_cli_json_is_one_object(plan_cli):
    result = plan_cli("--json", "--rtt-ms", "0", "--latency-weight", "1", "--energy-weight", "0",
                      "--memory-weight", "0", "--min-split", "2")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["k"] >= 2 and len(out["table"]) == 5 and out["min_split"] == 2
    assert out["profile"]["n_layers"] == 4 and out["conditions"]["rtt_ms"] == 0


@pytest.mark.parametrize("args, message", [
    (["--power-preset", "5g"], "power preset"),
    (["--latency-weight", "-1"], "weights"),
    (["--wire-dtype", "int3"], "wire dtype"),
    (["--min-split", "9"], "min_split"),
    (["--mem-available-mib", "0.01"], "no split"),
])
def test_plan_cli_bad_input_is_one_line_and_exit_2(plan_cli, args, message):
    result = plan_cli(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_plan_cli_plot(plan_cli, tmp_path):
    target = tmp_path / "plan.png"
    result = plan_cli("--plot", str(target))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.exit_code == 2 and "pip install matplotlib" in result.output
        assert not target.exists()
    else:
        assert result.exit_code == 0, result.output
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_workers_decode_timing_is_measured_warm_and_follows_served_steps(tiny_llama, tiny_profile):
    from cloud_worker.worker import LayerCost
    from partition.profile import measure_decode_ms
    from partition.segment import ModelSegment

    segment = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers, embed=False, head=True)
    layer_ms, head_ms = measure_decode_ms(segment, samples=5)
    assert len(layer_ms) == tiny_llama.n_layers and all(t > 0 for t in layer_ms) and head_ms > 0
    assert segment.new_cache().length == 0
    with pytest.raises(ValueError, match="samples"):
        measure_decode_ms(segment, samples=0)

    cost = LayerCost((1.0, 1.0, 1.0, 1.0), head_ms=2.0)
    assert cost.per_layer_ms == 1.0
    cost.observe(compute_ms=100.0, layers=4, positions=64)  # a prefill: not a decode figure
    cost.observe(compute_ms=50.0, layers=4, positions=3)  # verified drafts: neither
    cost.observe(compute_ms=50.0, layers=1, positions=1)  # one layer beside the head: too noisy
    assert cost.per_layer_ms == 1.0 and cost.observed == 0
    for _ in range(LayerCost.WINDOW):  # the worker got 3x slower (load): the reported figure follows
        cost.observe(compute_ms=3 * (2.0 + 4 * 1.0), layers=4, positions=1)
    assert cost.per_layer_ms == pytest.approx(3.0)
    cost.observe(compute_ms=2.0 + 4 * 50.0, layers=4, positions=1)  # one step caught by the scheduler
    assert cost.per_layer_ms == pytest.approx(3.0)
    # A head measured 10x too slow at start-up does not make the layers look faster than they are.
    skewed = LayerCost((1.0, 1.0, 1.0, 1.0), head_ms=20.0)
    for _ in range(LayerCost.WINDOW):
        skewed.observe(compute_ms=2.0 + 4 * 1.0, layers=4, positions=1)  # really: 1 ms/layer, head 2
    assert skewed.per_layer_ms > 0.2
    # Idle long enough after serving, it is measured again (and not while it keeps serving).
    assert not cost.stale(idle_s=1.0) and cost.stale(idle_s=LayerCost.IDLE_REMEASURE_S)
    cost.reset(layer_ms, head_ms)
    assert cost.per_layer_ms == pytest.approx(sum(layer_ms) / len(layer_ms)) and not cost.stale(1e9)
