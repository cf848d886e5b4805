"""Split generation must reproduce transformers' generate() token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from partition.segment import ModelSegment
from partition.tokens import encode_prompt

PROMPTS = ["Hello edge world", "The quick brown fox"]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def split_greedy(source, k: int, ids: list[int], n: int) -> list[int]:
    edge = ModelSegment.load(source, 0, k)
    cloud = ModelSegment.load(source, k, source.n_layers, embed=False)
    edge_cache, cloud_cache = edge.new_cache(), cloud.new_cache()
    x = torch.tensor([ids])
    tokens: list[int] = []
    for _ in range(n):
        hidden = edge(x, edge_cache).hidden  # (1, T, H) at the boundary
        logits = cloud(hidden, cloud_cache).logits
        tokens.append(int(logits[0, -1].argmax()))
        x = torch.tensor([[tokens[-1]]])
    return tokens


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
def test_every_split_of_tiny_models_matches_generate(model_fixture, request):
    source = request.getfixturevalue(model_fixture)
    reference = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32).eval()
    tokenizer = source.load_tokenizer()
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        expected = hf_greedy(reference, ids, 24)
        assert len(set(expected)) > 3, "the tiny model should not be degenerate, or this test proves little"
        for k in range(source.n_layers + 1):
            assert split_greedy(source, k, ids, 24) == expected, f"split {k} diverged on {prompt!r}"


@pytest.mark.real_model
@pytest.mark.parametrize("k", [0, 1, 15, 29, 30])
def test_smollm2_splits_match_generate(smollm2, smollm2_hf, k):
    tokenizer = smollm2.load_tokenizer()
    ids = encode_prompt(tokenizer, "Name three colours of the rainbow.")
    expected = hf_greedy(smollm2_hf, ids, 16)
    assert split_greedy(smollm2, k, ids, 16) == expected


def test_segment_holds_only_its_own_weights(tiny_llama):
    seg = ModelSegment.load(tiny_llama, 1, 3, embed=False, head=False)
    names = {n for n, _ in seg.named_parameters()}
    assert names, "the segment should hold its two layers"
    assert all(n.startswith("layers.") for n in names), names
    assert len(seg.layers) == 2
    edge = ModelSegment.load(tiny_llama, 0, 0)
    assert {n for n, _ in edge.named_parameters()} == {"embeddings.0.weight"}


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
def test_a_segment_of_no_layers_gives_what_the_pass_gives(model_fixture, request):
    """The edge's embedding-only segment (cloud-only mode) skips the pass: the same hidden states
    (learned positions included), the cache advanced alike, a frame longer than a prefill chunk
    and a batch of sessions too."""
    from partition.segment import PREFILL_CHUNK, StepInput

    source = request.getfixturevalue(model_fixture)
    edge = ModelSegment.load(source, 0, 0)
    caches = [edge.new_cache(), edge.new_cache()]
    passed = [edge.new_cache(), edge.new_cache()]
    torch.manual_seed(0)
    frames = [torch.randint(0, 200, (1, PREFILL_CHUNK + 7)), torch.randint(0, 200, (1, 3)),
              torch.randint(0, 200, (1, 1))]
    for x in frames:
        steps = [StepInput(x, caches[0], None, "none", None), StepInput(x[:, :1], caches[1], None, "none", None)]
        fast = edge.forward_many(steps)
        with torch.inference_mode():
            slow = edge._forward_pass([StepInput(x, passed[0], None, "none", None),
                                       StepInput(x[:, :1], passed[1], None, "none", None)])
        for a, b in zip(fast, slow, strict=True):
            assert a.logits is None and b.logits is None
            assert torch.equal(a.hidden, b.hidden)
        assert [c.length for c in caches] == [c.length for c in passed]
    assert caches[0].length == sum(x.shape[1] for x in frames)


def test_tied_head_shares_the_embedding_matrix(tiny_llama):
    whole = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers)
    assert whole.lm_head.weight.data_ptr() == whole.embeddings[0].weight.data_ptr()


def test_invalid_ranges_are_refused(tiny_llama):
    from partition.errors import InvalidSplitError

    with pytest.raises(InvalidSplitError):
        ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers + 1)
    with pytest.raises(InvalidSplitError):
        ModelSegment.load(tiny_llama, 3, 2)


def test_worker_segment_serves_a_later_split_with_start_layer(tiny_llama):
    """A worker holding [0, N) can serve a session split at k by skipping its first layers."""
    n = tiny_llama.n_layers
    tokenizer = tiny_llama.load_tokenizer()
    ids = tokenizer("start layer")["input_ids"]
    edge = ModelSegment.load(tiny_llama, 0, 2)
    exact = ModelSegment.load(tiny_llama, 2, n, embed=False)
    worker = ModelSegment.load(tiny_llama, 0, n, embed=False)
    hidden = edge(torch.tensor([ids]), edge.new_cache()).hidden
    a = exact(hidden, exact.new_cache()).logits
    b = worker(hidden, worker.new_cache(), start_layer=2).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
