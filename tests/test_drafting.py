"""Drafting and lossless verification, in one process (LocalBackend stands in for the cloud)."""

from __future__ import annotations

import pytest
import torch

from edge_worker.backends import LocalBackend
from edge_worker.drafting import DraftController, LookupDrafter, MiniSettings
from edge_worker.generation import EdgeGenerator
from edge_worker.mini_llm import MiniLLMHandler
from partition.sampling import SamplingParams
from partition.segment import ModelSegment
from partition.speculative import verify_drafts
from partition.tokens import eos_token_ids

PROMPTS = ["The quick brown fox jumps over the lazy dog. The quick brown", "abcabcabcabc", "Edge and cloud"]


def generator(source, k: int, mini: MiniLLMHandler | None = None):
    tokenizer = source.load_tokenizer()
    edge = ModelSegment.load(source, 0, k, head=(k == source.n_layers or bool(mini and mini.needs_edge_head)))
    backend = LocalBackend(ModelSegment.load(source, k, source.n_layers, embed=False))
    settings = mini.settings(source, edge, tokenizer) if mini else None
    return EdgeGenerator(edge, backend, tokenizer, eos_token_ids(source, tokenizer), "hybrid", mini=settings)


def ids_of(source, text: str) -> list[int]:
    return source.load_tokenizer()(text)["input_ids"]


# --- the verification rule ------------------------------------------------------------------------


def test_greedy_verification_keeps_the_agreeing_prefix_and_corrects():
    logits = torch.full((4, 10), -5.0)
    for i, best in enumerate([3, 4, 7, 1]):
        logits[i, best] = 5.0
    greedy = SamplingParams()
    assert verify_drafts(logits, [3, 4, 7], greedy, 0) == (3, 1)  # all kept, bonus token
    assert verify_drafts(logits, [3, 5, 7], greedy, 0) == (1, 4)  # second rejected, corrected
    assert verify_drafts(logits[:1], [], greedy, 0) == (0, 3)  # no drafts: an ordinary step
    with pytest.raises(ValueError):
        verify_drafts(logits, [3], greedy, 0)


def test_sampled_verification_reproduces_the_main_distribution():
    """With a point-mass drafter, every emitted token must be distributed as p, whatever was drafted."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(p).expand(2, 4).clone()
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(4000)]
    for draft in (1, 3):
        counts = torch.zeros(4)
        for sp in params:
            accepted, token = verify_drafts(logits, [draft], sp, 0)
            counts[draft if accepted else token] += 1
        freq = counts / counts.sum()
        assert torch.allclose(freq, p, atol=0.03), (draft, freq)
    # The same seed gives the same verdict: a retried verification draws the same token.
    assert verify_drafts(logits, [3], params[5], 9) == verify_drafts(logits, [3], params[5], 9)


# --- drafters -------------------------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_last_match():
    d = LookupDrafter()
    assert [t for t, _ in d.propose([1, 2, 3, 4, 9, 1, 2, 3], 3, 0.0)] == [4, 9, 1]
    assert [t for t, _ in d.propose([5, 6, 7], 3, 0.0)] == []
    assert [t for t, _ in d.propose([1, 2, 1, 2], 4, 0.0)] == [1, 2]  # most recent earlier match


def test_controller_drafts_when_round_trips_are_slow_and_stops_when_they_are_free():
    slow = DraftController(max_tokens=8)
    fast = DraftController(max_tokens=8)
    # 15 ms per draft on the edge, 19 ms of cloud compute; the drafter is kept 3 of 4 times on the
    # slow link, and is poor on the free one (1 in 8), where a draft costs more than it saves.
    for c, rtt, kept in ((slow, 100.0, 3), (fast, 0.5, 0)):
        c.record(0, 0, edge_base_ms=15, edge_draft_ms=0, round_trip_ms=rtt, cloud_ms=19)
        for _ in range(10):
            c.record(4, kept, edge_base_ms=15, edge_draft_ms=60, round_trip_ms=rtt, cloud_ms=22)
    assert slow.best_length() >= 3
    assert fast.best_length() == 0
    assert fast.acceptance < 0.2 < 0.6 < slow.acceptance
    # Switched off, it still probes now and then, so drafting returns when the link slows...
    for _ in range(fast.probe_every):
        assert fast.best_length() == 0
        fast.record(0, 0, edge_base_ms=15, edge_draft_ms=0, round_trip_ms=0.5, cloud_ms=19)
    assert fast.best_length() == 1
    fast.record(1, 0, edge_base_ms=15, edge_draft_ms=15, round_trip_ms=0.5, cloud_ms=22)
    assert fast.best_length() == 0
    # ... and at once when the round trip it measures on plain rounds grows.
    for _ in range(3):
        fast.record(0, 0, edge_base_ms=15, edge_draft_ms=0, round_trip_ms=60, cloud_ms=19)
    assert fast.best_length() >= 1


def test_trust_mode_refuses_a_drafter_without_confidence():
    with pytest.raises(ValueError, match="trust"):
        MiniSettings(LookupDrafter(), mode="trust")


# --- lossless generation --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["self", "lookup", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_output_with_every_drafter_equals_plain_output(tiny_llama, kind, k):
    # Threshold 0 and a fixed length: draft at every chance, so rejections and cache rollback
    # happen constantly (adaptively, a backend with no round trip would switch drafting off).
    mini = MiniLLMHandler(model=kind, threshold=0.0, max_draft=4, adaptive=False)
    for prompt in PROMPTS:
        ids = ids_of(tiny_llama, prompt)
        plain = generator(tiny_llama, k).generate(ids, 24)
        drafted = generator(tiny_llama, k, mini).generate(ids, 24)
        assert drafted.token_ids == plain.token_ids, (kind, k, prompt)
        assert drafted.tokens_drafted > 0 and drafted.mini == (kind if kind in ("self", "lookup") else kind)
    # The drafter that is the main model itself is always right: every round keeps every draft.
    if kind == "tiny-llama":
        assert drafted.acceptance_rate == 1.0
        assert len(drafted.trace) < len(drafted.token_ids) // 2  # rounds, i.e. backend steps


def test_sampling_with_drafts_is_reproducible(tiny_llama):
    ids = ids_of(tiny_llama, PROMPTS[0])
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
    mini = MiniLLMHandler(model="tiny-llama", threshold=0.0, max_draft=3, adaptive=False)
    first = generator(tiny_llama, 2, mini).generate(ids, 20, sampling)
    again = generator(tiny_llama, 2, mini).generate(ids, 20, sampling)
    assert first.token_ids == again.token_ids and first.tokens_from_mini > 0


def test_trust_mode_emits_confident_drafts_without_verification(tiny_llama):
    ids = ids_of(tiny_llama, PROMPTS[1])
    mini = MiniLLMHandler(model="tiny-llama", threshold=0.0, mode="trust", max_draft=3)
    result = generator(tiny_llama, 2, mini).generate(ids, 20)
    plain = generator(tiny_llama, 2).generate(ids, 20)
    # The drafter is the main model, so trusting it changes nothing, with a quarter of the trips.
    assert result.token_ids == plain.token_ids
    assert result.tokens_from_mini == result.tokens_drafted > 0
    assert len(result.trace) <= len(result.token_ids) // 3 + 1


def test_cloud_only_the_self_drafter_drafts_by_lookup_unless_it_has_an_adapter(tiny_llama, tmp_path, monkeypatch):
    """At split 0 the edge has no layer to exit early from: the head over the embedding is no
    guess worth its pass, so the seed's MiniLLMHandler(model=None) drafts by prompt lookup there,
    and stays the self-drafter at a split with edge layers, or at 0 with an adapter of its own."""
    from edge_worker.drafting import DrafterError

    monkeypatch.setenv("EDGECLOUD_CACHE", str(tmp_path))  # no calibrated adapter in reach
    mini = MiniLLMHandler(model=None, threshold=0.0, max_draft=3, adaptive=False)
    cloud_only = generator(tiny_llama, 0, mini)
    assert cloud_only.mini.drafter.name == "lookup"
    ids = ids_of(tiny_llama, PROMPTS[0])
    assert cloud_only.generate(ids, 16).token_ids == generator(tiny_llama, 0).generate(ids, 16).token_ids
    assert generator(tiny_llama, 2, mini).mini.drafter.name == "self"
    with pytest.raises(DrafterError, match="no drafter adapter at"):  # a named adapter is still required
        generator(tiny_llama, 0, MiniLLMHandler(model="self", adapter=tmp_path / "nope.pt"))


def test_a_missing_adapter_file_is_a_clear_error(tiny_llama, tmp_path):
    from edge_worker.drafting import DrafterError

    mini = MiniLLMHandler(model="self", adapter=tmp_path / "nope.pt")
    with pytest.raises(DrafterError, match="calibrate"):
        generator(tiny_llama, 2, mini)


def test_a_calibrated_adapter_is_found_and_keeps_output_unchanged(tiny_llama, tmp_path, monkeypatch):
    from edge_worker.drafter_calibration import calibrate_drafter
    from edge_worker.drafting import DrafterError, load_adapter

    monkeypatch.setenv("EDGECLOUD_CACHE", str(tmp_path))
    from edge_worker.mini_llm import default_adapters_dir

    path, metrics = calibrate_drafter(tiny_llama, 2, None, default_adapters_dir(), new_tokens=6, prompts=8,
                                      epochs=2)
    assert path.exists() and metrics["train_positions"] > 0
    assert 0.0 <= metrics["heldout_agreement_after"] <= 1.0
    with pytest.raises(DrafterError, match="calibrated for"):
        load_adapter(path, tiny_llama.model_id, 3, tiny_llama.hidden_size)
    mini = MiniLLMHandler(model="self", threshold=0.0, max_draft=3, adaptive=False)
    gen = generator(tiny_llama, 2, mini)
    assert gen.mini.drafter.adapter is not None  # found in the cache by model and split
    ids = ids_of(tiny_llama, PROMPTS[0])
    assert gen.generate(ids, 16).token_ids == generator(tiny_llama, 2).generate(ids, 16).token_ids
    assert metrics["vocabulary"] == len(gen.mini.drafter.vocab)


def test_calibration_prompts_are_the_shipped_ones_plus_distinct_drawn_ones():
    from edge_worker.drafter_calibration import calibration_prompts

    shipped = calibration_prompts()
    drawn = calibration_prompts(50)
    assert drawn[:len(shipped)] == shipped and len(drawn) == len(shipped) + 50
    assert len(set(drawn)) == len(drawn) and calibration_prompts(50) == drawn  # distinct, repeatable
    assert calibration_prompts(50, seed=1) != drawn
    assert not any("{" in p for p in drawn)


def test_an_adapter_vocabulary_restricts_the_guesses_and_survives_saving(tiny_llama, tmp_path):
    from edge_worker.drafting import DrafterAdapter, DrafterError, SelfDrafter, load_adapter, save_adapter

    edge = ModelSegment.load(tiny_llama, 0, 2, head=True)
    adapter = DrafterAdapter(tiny_llama.hidden_size)
    adapter.vocab = torch.tensor([5, 17, 99])
    path = tmp_path / "a.pt"
    save_adapter(adapter, path, tiny_llama.model_id, 2, {})
    loaded = load_adapter(path, tiny_llama.model_id, 2, tiny_llama.hidden_size)
    assert loaded.vocab.tolist() == [5, 17, 99]
    drafter = SelfDrafter(edge.norm, edge.lm_head, loaded)
    for seed in range(20):
        token, conf = drafter.next_from_hidden(torch.randn(tiny_llama.hidden_size, generator=torch.Generator().manual_seed(seed)))
        assert token in (5, 17, 99) and 1 / 3 <= conf <= 1.0
    # An adapter saved before vocabularies existed still loads (whole vocabulary).
    blob = torch.load(path, weights_only=True)
    del blob["vocab"]
    torch.save(blob, path)
    assert load_adapter(path, tiny_llama.model_id, 2, tiny_llama.hidden_size).vocab is None
    blob["vocab"] = torch.tensor([[1, 2]])
    torch.save(blob, path)
    with pytest.raises(DrafterError, match="damaged"):
        load_adapter(path, tiny_llama.model_id, 2, tiny_llama.hidden_size)
    adapter.vocab = torch.tensor([10 ** 6])
    with pytest.raises(DrafterError, match="vocabulary"):
        SelfDrafter(edge.norm, edge.lm_head, adapter)


def test_a_file_that_is_not_an_adapter_is_a_clear_error(tiny_llama, tmp_path):
    from edge_worker.drafting import DrafterError, load_adapter

    garbage, tensor = tmp_path / "garbage.pt", tmp_path / "tensor.pt"
    garbage.write_bytes(b"not a torch file at all")
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(DrafterError, match="not a file that `edgecloud calibrate --drafter` wrote") as info:
        load_adapter(garbage, tiny_llama.model_id, 2, tiny_llama.hidden_size)
    assert "weights_only" not in str(info.value)
    with pytest.raises(DrafterError, match="is not a drafter adapter"):
        load_adapter(tensor, tiny_llama.model_id, 2, tiny_llama.hidden_size)
