"""The int8 copy of a segment (partition/quantize.py) and the drafter built on it (CopyDrafter).

The copy's numbers are close to the model's, not equal: these tests bound how close, check that
it runs every frame length without the float32 weights, and that the drafter follows the edge's
positions through rejections; test_mini_pipeline.py checks that the output stays the model's."""

from __future__ import annotations

import pytest
import torch

from edge_worker.backends import LocalBackend
from edge_worker.drafting import CopyDrafter
from edge_worker.generation import EdgeGenerator
from edge_worker.mini_llm import MiniLLMHandler
from partition import rowkernel
from partition.errors import InvalidSplitError
from partition.quantize import Int8Linear, quantize_rows, quantize_segment, segment_bytes
from partition.segment import ModelSegment
from partition.tokens import eos_token_ids


def test_quantize_rows_is_symmetric_per_row_and_close():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen) * torch.linspace(0.01, 3.0, 64)[:, None]  # rows of very different sizes
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert int(q.abs().max(dim=1).values.min()) == 127  # every row uses its whole range
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())  # rounding: at most half a step per row
    zero, zero_scale = quantize_rows(torch.zeros(3, 8))  # an all-zero row quantizes to zeros, not NaN
    assert bool((zero == 0).all()) and bool(torch.isfinite(zero_scale).all())


def test_the_int8_kernel_matches_widened_weights_and_keeps_rows_independent():
    if rowkernel.kernel() is None:
        pytest.skip(f"the row kernel does not run here: {rowkernel.reason()}")
    gen = torch.Generator().manual_seed(1)
    for n, k in ((37, 29), (960, 576), (576, 1536)):
        q, scale = quantize_rows(torch.randn(n, k, generator=gen))
        x = torch.randn(19, k, generator=gen)
        out = rowkernel.linear_i8(x, q, scale)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, q.float() * scale[:, None]),
                                   rtol=1e-4, atol=1e-4)
        for rows in (1, 2, 3, 8, 17):
            assert torch.equal(rowkernel.linear_i8(x[:rows], q, scale), out[:rows]), (n, k, rows)


def test_int8_linear_without_the_kernel_computes_the_same_product(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    layer = Int8Linear(torch.randn(48, 40, generator=gen), sizes=[16, 32])
    x = torch.randn(1, 5, 40, generator=gen)
    with_kernel = layer(x)
    monkeypatch.setattr(rowkernel, "usable_i8", lambda *a: False)
    without = layer(x)
    assert with_kernel.shape == without.shape == (1, 5, 48)
    torch.testing.assert_close(with_kernel, without, rtol=1e-4, atol=1e-4)
    assert [t.shape[-1] for t in layer.split(without)] == [16, 32]


def _positions(source, ids: list[int], k: int):
    """Boundary activations at ``k`` of the prompt and the next ten greedy positions, and the
    exact model's tokens there."""
    edge = ModelSegment.load(source, 0, k)
    rest = ModelSegment.load(source, k, source.n_layers, embed=False)
    ce, cr = edge.new_cache(), rest.new_cache()
    x, hidden, tokens = torch.tensor([ids]), [], []
    for _ in range(10):
        h = edge(x, ce, logits="none").hidden
        token = int(rest(h, cr, logits="last").logits[0, -1].argmax())
        hidden.append(h)
        tokens.append(token)
        x = torch.tensor([[token]])
    return hidden, tokens


def test_a_quantized_segment_is_a_quarter_of_the_memory_and_near_the_model(tiny_llama):
    k, n = 1, tiny_llama.n_layers
    exact = ModelSegment.load(tiny_llama, k, n, embed=False, head=True)
    copy = quantize_segment(ModelSegment.load(tiny_llama, k, n, embed=False, head=True))
    assert copy.quantized == "int8"
    assert segment_bytes(copy) < 0.3 * segment_bytes(exact)
    assert not [name for name, p in copy.named_parameters() if p.dim() == 2]  # no float32 matrix is left
    ids = tiny_llama.load_tokenizer()("The quick brown fox jumps")["input_ids"]
    hidden, _ = _positions(tiny_llama, ids, k)
    ce, cq = exact.new_cache(), copy.new_cache()
    for h in hidden:  # the prompt (a long frame, packed) and then one position at a time
        a = exact(h, ce, logits="last").logits[0, -1]
        b = copy(h, cq, logits="last").logits[0, -1]
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999
    assert cq.length == ce.length


def test_only_llama_shaped_float32_segments_are_quantized(tiny_gpt2, tiny_llama):
    with pytest.raises(InvalidSplitError, match="Llama-shaped"):
        quantize_segment(ModelSegment.load(tiny_gpt2, 1, tiny_gpt2.n_layers))
    with pytest.raises(InvalidSplitError, match="float32"):
        quantize_segment(ModelSegment.load(tiny_llama, 1, tiny_llama.n_layers, dtype=torch.bfloat16))


def test_the_copy_drafter_follows_the_edge_through_rejections(tiny_llama):
    """The drafter's guess after a history equals the copy run on that history from scratch,
    whatever was observed, cropped and observed again before."""
    k = 1
    copy = quantize_segment(ModelSegment.load(tiny_llama, k, tiny_llama.n_layers, embed=False, head=True))
    ids = tiny_llama.load_tokenizer()("abcabcabc abc")["input_ids"]
    hidden, tokens = _positions(tiny_llama, ids, k)

    def fresh_guess(parts: list[torch.Tensor]) -> int:
        """The copy on this history from scratch; the drafter's last logits must be those (its
        frames were cut differently: the sums may differ in the last bits, no more)."""
        out = copy(torch.cat(parts, dim=1), copy.new_cache(), logits="last").logits[0, -1]
        torch.testing.assert_close(drafter.logits, out, rtol=1e-4, atol=1e-4)
        return int(drafter.logits.argmax())

    drafter = CopyDrafter(copy)
    drafter.reset(ids)
    start = 0
    for i, h in enumerate(hidden[:4]):
        drafter.observe(h, start)
        start += h.shape[1]
        token, conf = drafter.next_from_hidden(h[0, -1])
        assert token == fresh_guess(hidden[:i + 1]) and 0.0 < conf <= 1.0
    # A wrong guess was run (two positions of junk), then the edge cropped and ran the right one.
    junk = torch.randn(1, 2, hidden[0].shape[-1])
    drafter.observe(junk, start)
    drafter.next_from_hidden(junk[0, -1])
    drafter.observe(hidden[4], start)  # replaces the junk from its first position on
    context = [0] * (start + 1)
    assert drafter.guess(context, hidden[4][0, -1])[0] == fresh_guess(hidden[:5])
    assert drafter.guess(context + [0], hidden[4][0, -1]) is None  # a position it never saw: no guess
    # Cropped inside rows it has not run yet: the rest of them is dropped.
    drafter.observe(hidden[5], start + 1)
    drafter.observe(torch.cat([hidden[6], junk], dim=1), start + 2)
    drafter.observe(hidden[7], start + 3)
    assert drafter.next_from_hidden(hidden[7][0, -1])[0] == fresh_guess(hidden[:8])
    # A gap (positions never shown) stops it guessing until the next generation.
    drafter.observe(hidden[8], start + 10)
    assert drafter.guess([0] * (start + 11), hidden[8][0, -1]) is None
    drafter.reset(ids)
    drafter.observe(torch.cat(hidden[:3], dim=1), 0)
    assert drafter.next_from_hidden(hidden[2][0, -1])[0] == fresh_guess(hidden[:3])


@pytest.mark.parametrize("pipeline", [False, True])
def test_int8_drafting_leaves_the_output_unchanged_in_process(tiny_llama, pipeline):
    tokenizer = tiny_llama.load_tokenizer()
    eos = eos_token_ids(tiny_llama, tokenizer)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    local = EdgeGenerator(ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers), None, tokenizer, eos,
                          "local").generate(ids, 24)
    mini = MiniLLMHandler(model="int8", max_draft=4, adaptive=False, pipeline=pipeline)
    assert mini.threshold_for("int8") == 0.0 and MiniLLMHandler(model="int8", mode="trust").threshold_for("int8") == 0.5
    edge = ModelSegment.load(tiny_llama, 0, 2)
    backend = LocalBackend(ModelSegment.load(tiny_llama, 2, tiny_llama.n_layers, embed=False), pipelined=pipeline)
    got = EdgeGenerator(edge, backend, tokenizer, eos, "hybrid", mini=mini.settings(tiny_llama, edge, tokenizer)
                        ).generate(ids, 24)
    assert got.token_ids == local.token_ids
    assert got.mini == "int8" and got.tokens_drafted > 0
    # The copy is the model within int8 rounding: nearly every guess is kept, even on random weights.
    assert got.acceptance_rate >= 0.8, got.acceptance_rate


def test_auto_drafts_with_the_int8_copy_where_the_model_allows_it_and_memory_suffices(tiny_llama, tiny_gpt2,
                                                                                     monkeypatch):
    from edge_worker import mini_llm

    auto = MiniLLMHandler(model="auto")
    assert auto.resolve(tiny_llama, 1) == "int8" and not auto.needs_edge_head
    edge = ModelSegment.load(tiny_llama, 0, 1)
    settings = auto.settings(tiny_llama, edge, tiny_llama.load_tokenizer())
    assert isinstance(settings.drafter, CopyDrafter) and settings.threshold == 0.0
    assert auto.edge_bytes(tiny_llama, 1) == segment_bytes(settings.drafter.segment)  # what the planner prices
    assert auto.edge_bytes(tiny_llama, tiny_llama.n_layers) == 0
    assert auto.resolve(tiny_llama, 0) is None and MiniLLMHandler(model="int8").resolve(tiny_llama, 0) == "int8"
    assert MiniLLMHandler(model="auto").resolve(tiny_gpt2, 1) is None  # not Llama-shaped: no drafter
    gpt2_edge = ModelSegment.load(tiny_gpt2, 0, 1)
    assert MiniLLMHandler(model="auto").settings(tiny_gpt2, gpt2_edge, tiny_gpt2.load_tokenizer()) is None
    monkeypatch.setattr(mini_llm, "AUTO_MEMORY_SHARE", 1e-9)  # a device with (almost) no memory to spare
    assert MiniLLMHandler(model="auto").resolve(tiny_llama, 1) is None
    assert MiniLLMHandler(model="int8").resolve(tiny_llama, 1) == "int8"  # asked for by name: it is built


def test_int8_asked_for_by_name_on_another_architecture_is_a_drafter_error(tiny_gpt2):
    from edge_worker.drafting import DrafterError

    edge = ModelSegment.load(tiny_gpt2, 0, 1)
    with pytest.raises(DrafterError, match="Llama-shaped"):
        MiniLLMHandler(model="int8").settings(tiny_gpt2, edge, tiny_gpt2.load_tokenizer())
