"""Moving the split in the middle of a generation: the output must not change."""

from __future__ import annotations

import pytest

from edge_worker.backends import LocalBackend
from edge_worker.generation import EdgeGenerator
from edge_worker.mini_llm import MiniLLMHandler
from partition.segment import ModelSegment
from partition.tokens import eos_token_ids


class ScriptedMover:
    """Moves to the given split at the given steps; loads what the generator asks for."""

    def __init__(self, source, script: dict[int, int], mini: MiniLLMHandler | None = None) -> None:
        self.source, self.script, self.mini = source, dict(script), mini
        self.asked: list[int] = []

    def replan(self, step, result):
        self.asked.append(step)
        return self.script.pop(step, None)

    def edge_segment(self, k):
        head = k == self.source.n_layers or bool(self.mini and self.mini.needs_edge_head)
        return ModelSegment.load(self.source, 0, k, head=head)

    def backend_for(self, k):
        n = self.source.n_layers
        return None if k == n else LocalBackend(ModelSegment.load(self.source, k, n, embed=False))

    def mini_for(self, k, edge):
        return self.mini.settings(self.source, edge, self.source.load_tokenizer()) if self.mini else None


def run(source, k, ids, n, mover=None, mini=None):
    tokenizer = source.load_tokenizer()
    head = k == source.n_layers or bool(mini and mini.needs_edge_head)
    edge = ModelSegment.load(source, 0, k, head=head)
    backend = None if k == source.n_layers else LocalBackend(ModelSegment.load(source, k, source.n_layers,
                                                                                embed=False))
    settings = mini.settings(source, edge, tokenizer) if (mini and backend) else None
    gen = EdgeGenerator(edge, backend, tokenizer, eos_token_ids(source, tokenizer), "hybrid", mini=settings,
                        mover=mover)
    return gen.generate(ids, n)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
def test_moving_the_split_mid_generation_keeps_greedy_output(model_fixture, request):
    source = request.getfixturevalue(model_fixture)
    n = source.n_layers
    ids = source.load_tokenizer()("Moving layers between edge and cloud")["input_ids"]
    expected = run(source, n, ids, 30).token_ids
    script = {4: 1, 9: 3, 15: n, 21: 0, 26: 2}  # deeper, shallower, all local, cloud only, back
    mover = ScriptedMover(source, script)
    moved = run(source, 2, ids, 30, mover)
    assert moved.token_ids == expected
    assert moved.splits_used == [2, 1, 3, n, 0, 2]
    assert [m["to"] for m in moved.moves] == [1, 3, n, 0, 2]
    assert all(m["positions"] == len(ids) + m["step"] - 1 for m in moved.moves)


def test_moving_the_split_with_a_drafter_keeps_greedy_output(tiny_llama):
    ids = tiny_llama.load_tokenizer()("abcabcabcabc abcabc")["input_ids"]
    expected = run(tiny_llama, tiny_llama.n_layers, ids, 30).token_ids
    mini = MiniLLMHandler(model="self", threshold=0.0, max_draft=3, adaptive=False)
    mover = ScriptedMover(tiny_llama, {}, mini)
    mover.script = {s: k for s, k in zip(range(3, 30), [1, 3, 2, 3, 1] * 6, strict=False)}
    moved = run(tiny_llama, 2, ids, 30, mover, mini)
    assert moved.token_ids == expected
    assert len(moved.moves) >= 3 and moved.tokens_drafted > 0


def test_a_replan_whose_status_request_is_refused_waits_instead_of_failing_the_generation():
    """The worker list a re-plan reads raises a refused key (a plan before a generation must not
    read it as "no worker serves this model"); mid-generation the steps report that themselves,
    so the re-plan only gives up this turn."""
    import dataclasses
    from types import SimpleNamespace

    from broker.errors import AuthError
    from edge_worker.conditions import DeviceSnapshot
    from edge_worker.planning import ReplanWatch

    before = DeviceSnapshot(taken_at=0.0, cpu_load=0.1, process_cpu_load=0.05, mem_available_bytes=2**30,
                            mem_total_bytes=2**31, battery_percent=None, on_battery=None, gpu_utilization=None,
                            gpu_mem_free_bytes=None, rtt_ms=5.0, uplink_mbps=100.0, downlink_mbps=100.0,
                            cloud_reachable=True)
    after = dataclasses.replace(before, rtt_ms=80.0)  # far beyond the hysteresis: a re-plan is due

    def refused():
        raise AuthError("invalid API key for STATUS")

    planner = SimpleNamespace(monitor=SimpleNamespace(snapshot=lambda: after), feed=lambda trace: None,
                              _workers=refused)
    watch = ReplanWatch(planner, before, prompt_tokens=8, new_tokens=32, every=4)
    assert watch.replan(step=4, trace=[], current=2) is None
