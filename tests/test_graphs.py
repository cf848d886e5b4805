"""Decode passes as pieces between attentions (``partition/graphs.py``), run uncaptured on this
CPU: the pieces must compute, bit for bit, what the eager pass computes, for any batch in any
bucket, and leave every other kind of pass to the eager path. Capturing them as CUDA graphs needs
a GPU: ``bench/bench_gpu.py`` compares both there."""

from __future__ import annotations

import pytest
import torch

from partition.graphs import BUCKETS
from partition.segment import ModelSegment, StepInput


def _segments(source, dtype, **kw):
    eager = ModelSegment.load(source, 0, source.n_layers, dtype=dtype, **kw)
    pieces = ModelSegment.load(source, 0, source.n_layers, dtype=dtype, **kw)
    pieces.use_graphs(capture=False)
    return eager, pieces


def _decode(seg, prompts, steps, start_layer=None):
    """Greedy decode of every prompt at once (prefills together, then one-token steps): each
    session's tokens, and the last step's logits and hidden states."""
    caches = [seg.new_cache() for _ in prompts]
    outs = seg.forward_many([StepInput(p, c, start_layer) for p, c in zip(prompts, caches, strict=True)])
    tokens = [[int(o.logits[0, -1].argmax())] for o in outs]
    for _ in range(steps):
        outs = seg.forward_many([StepInput(torch.tensor([[t[-1]]]), c, start_layer)
                                 for t, c in zip(tokens, caches, strict=True)])
        for t, o in zip(tokens, outs, strict=True):
            t.append(int(o.logits[0, -1].argmax()))
    return tokens, [o.logits for o in outs], [o.hidden for o in outs]


def _prompts(source, n):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, source.config.vocab_size, (1, 3 + i), generator=gen) for i in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pieces_compute_what_the_eager_pass_computes_in_every_bucket(tiny_llama, dtype, monkeypatch):
    # float32 on this CPU would take the row kernel, which the pieces leave alone: MKL's tiles.
    monkeypatch.setattr("partition.batching.fused_weights", lambda layer: None)
    monkeypatch.setattr("partition.graphs.fused_weights", lambda layer: None)
    monkeypatch.setattr("partition.rowkernel.usable", lambda x, w: False)
    monkeypatch.setattr("partition.rowkernel.usable_attend", lambda q: False)
    eager, pieces = _segments(tiny_llama, dtype)
    prompts = _prompts(tiny_llama, 11)
    for n in (1, 2, 3, 5, 11):  # buckets 1, 2, 4, 8, 16; all but the first padded
        before = pieces.graphs.passes
        tokens, logits, hidden = _decode(pieces, prompts[:n], 5)
        assert pieces.graphs.passes == before + 5, "every one-token pass ran as pieces"
        ref_tokens, ref_logits, ref_hidden = _decode(eager, prompts[:n], 5)
        assert tokens == ref_tokens
        assert all(torch.equal(a, b) for a, b in zip(logits, ref_logits, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(hidden, ref_hidden, strict=True))
    assert sorted(pieces.graphs.buckets) == [1, 2, 4, 8, 16]


def test_a_session_gets_its_numbers_alone_whatever_shares_its_bucket(tiny_llama):
    _, pieces = _segments(tiny_llama, torch.bfloat16)
    prompts = _prompts(tiny_llama, 6)
    _, together, _ = _decode(pieces, prompts, 4)  # bucket 8, two rows left over from nothing
    for i, prompt in enumerate(prompts):
        _, alone, _ = _decode(pieces, [prompt], 4)
        assert torch.equal(alone[0], together[i])
    # Rows left in a bucket by a bigger pass before (stale numbers) change nothing either.
    _, again, _ = _decode(pieces, prompts[:5], 4)
    assert all(torch.equal(a, b) for a, b in zip(again, together[:5], strict=True))


def test_a_split_edge_and_worker_run_their_pieces_and_give_the_whole_models_tokens(tiny_llama):
    """The edge's segment (embedding, no head: no logits) and a worker's (every layer, sessions
    starting at the split) each run their decode passes as pieces."""
    dtype = torch.bfloat16
    whole = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers, dtype=dtype)
    edge = ModelSegment.load(tiny_llama, 0, 2, dtype=dtype)
    worker = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers, embed=False, dtype=dtype)
    edge.use_graphs(capture=False)
    worker.use_graphs(capture=False)
    prompts = _prompts(tiny_llama, 3)
    expected, _, _ = _decode(whole, prompts, 6)
    e_caches = [edge.new_cache() for _ in prompts]
    w_caches = [worker.new_cache() for _ in prompts]
    inputs = list(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    for _ in range(7):
        hidden = edge.forward_many([StepInput(x, c, logits="none") for x, c in zip(inputs, e_caches, strict=True)])
        outs = worker.forward_many([StepInput(h.hidden, c, 2) for h, c in zip(hidden, w_caches, strict=True)])
        for t, o in zip(tokens, outs, strict=True):
            t.append(int(o.logits[0, -1].argmax()))
        inputs = [torch.tensor([[t[-1]]]) for t in tokens]
    assert tokens == expected
    assert edge.graphs.passes == 6 and worker.graphs.passes == 6  # the prefills ran eagerly


def test_everything_but_one_token_steps_takes_the_eager_path(tiny_llama):
    _, seg = _segments(tiny_llama, torch.bfloat16, embed=False)
    hidden = tiny_llama.hidden_size
    a, b = seg.new_cache(), seg.new_cache()
    seg.forward_many([StepInput(torch.randn(1, 4, hidden), a), StepInput(torch.randn(1, 4, hidden), b)])
    assert seg.graphs.passes == 0  # prefills
    seg.forward_many([StepInput(torch.randn(1, 3, hidden), a, logits=3)])
    assert seg.graphs.passes == 0  # drafts to verify
    seg.forward_many([StepInput(torch.randn(1, 1, hidden), a, 0), StepInput(torch.randn(1, 1, hidden), b, 1)])
    assert seg.graphs.passes == 0  # sessions starting at different layers
    seg.forward_many([StepInput(torch.randn(1, 1, hidden), a, logits="none"), StepInput(torch.randn(1, 1, hidden), b)])
    assert seg.graphs.passes == 0  # some want logits, some not
    many = [seg.new_cache() for _ in range(BUCKETS[-1] + 1)]
    seg.forward_many([StepInput(torch.randn(1, 1, hidden), c) for c in many])
    assert seg.graphs.passes == 0  # more sessions than the largest bucket
    seg.forward_many([StepInput(torch.randn(1, 1, hidden), a), StepInput(torch.randn(1, 1, hidden), b)])
    assert seg.graphs.passes == 1


def test_the_cpu_row_kernel_keeps_its_own_path(tiny_llama):
    from partition import rowkernel

    if rowkernel.kernel() is None:
        pytest.skip(f"no row kernel here: {rowkernel.reason()}")
    seg = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers, embed=False)  # float32
    seg.use_graphs(capture=False)
    cache = seg.new_cache()
    seg(torch.randn(1, 3, tiny_llama.hidden_size), cache)
    seg(torch.randn(1, 1, tiny_llama.hidden_size), cache)
    assert seg.graphs.passes == 0


def test_capturing_needs_a_cuda_device_and_the_pieces_a_llama(tiny_llama, tiny_gpt2):
    seg = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers)
    with pytest.raises(ValueError, match=r"CUDA graphs \(--cuda-graphs\) need a segment on a CUDA device"):
        seg.use_graphs(capture=True)
    with pytest.raises(ValueError, match="Llama architecture"):
        ModelSegment.load(tiny_gpt2, 0, 2).use_graphs(capture=False)


def test_asking_for_cuda_graphs_without_a_gpu_is_a_clear_error(tiny_llama):
    from cloud_worker.config import CloudWorkerConfig
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    with pytest.raises(ValueError, match="--cuda-graphs needs the edge's layers on a GPU"):
        EdgeConfig(model="tiny-llama", force_local=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="--cuda-graphs needs the worker on a GPU"):
        CloudWorkerConfig(model="tiny-llama", device="cpu", cuda_graphs=True)
    if torch.cuda.is_available():
        pytest.skip("auto picks the GPU here")
    settings = EdgeConfig(model="tiny-llama", force_local=True, device="auto", cuda_graphs=True, max_new_tokens=2)
    with EdgeEngine("tiny-llama", settings) as engine, pytest.raises(ValueError, match="--cuda-graphs.*is on cpu"):
        engine.generate([5, 6, 7], engine.params())
    from cloud_worker.worker import CloudWorker

    with pytest.raises(ValueError, match="--cuda-graphs.*is on cpu"):
        CloudWorker(CloudWorkerConfig(model="tiny-llama", device="auto", cuda_graphs=True, encryption=False))


def test_generations_on_several_threads_share_a_segment_and_its_buckets(tiny_llama):
    """An engine's generations run on their own threads over shared segments: passes of one
    bucket must not interleave in its buffers."""
    from concurrent.futures import ThreadPoolExecutor

    eager, pieces = _segments(tiny_llama, torch.bfloat16)
    prompts = _prompts(tiny_llama, 6)
    expected = [_decode(eager, [p], 12)[0] for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: _decode(pieces, [p], 12)[0], prompts))
    assert got == expected
    assert pieces.graphs.passes == 12 * len(prompts)
