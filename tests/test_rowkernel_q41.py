"""The row kernel on GGUF's Q4_1 blocks (``partition/rowkernel.py``: ``linear_q41``): bit for bit
what the float32 kernel gives on the same weights dequantized, for any number of rows, from a
fifth of the bytes. SmolLM2's GGUF holds its layers' matrices as Q4_1, and our float32 weights
are those blocks dequantized: the real file is checked too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from partition import rowkernel

pytestmark = pytest.mark.skipif(rowkernel.kernel() is None, reason=f"no row kernel here: {rowkernel.reason()}")


@pytest.mark.parametrize("n,k", [(576, 1536), (1536, 576), (192, 576), (5, 64), (37, 96)])
def test_q41_products_are_the_float32_kernels_on_the_dequantized_weights(n, k):
    gen = torch.Generator().manual_seed(n * k)
    blocks = rowkernel.random_q41(n, k, gen)
    weights = rowkernel.dequantize_q41(blocks, k)
    x = torch.randn(17, k, generator=gen)
    together = rowkernel.linear_q41(x, blocks)
    assert torch.equal(together, rowkernel.linear(x, weights))
    for rows in (1, 2, 3, 5, 6, 7, 8, 15, 16):  # every block shape (and padding) of the kernel, each row alone
        assert torch.equal(rowkernel.linear_q41(x[:rows], blocks), together[:rows])
    torch.testing.assert_close(together, x @ weights.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,k", [(49152, 576), (5, 64), (37, 96)])
def test_q80_products_are_the_float32_kernels_on_the_dequantized_weights(n, k):
    gen = torch.Generator().manual_seed(n + k)
    blocks = rowkernel.random_q80(n, k, gen)
    weights = rowkernel.dequantize_q80(blocks, k)
    x = torch.randn(9, k, generator=gen)
    together = rowkernel.linear_q80(x, blocks)
    assert torch.equal(together, rowkernel.linear(x, weights))
    for rows in (1, 2, 3, 7, 8):
        assert torch.equal(rowkernel.linear_q80(x[:rows], blocks), together[:rows])


def test_rows_that_do_not_hold_whole_blocks_are_refused():
    blocks = rowkernel.random_q41(4, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="do not hold 96 weights"):
        rowkernel.linear_q41(torch.randn(1, 96), blocks)
    with pytest.raises(ValueError, match="do not hold 48 weights"):
        rowkernel.repack_q41(torch.zeros(4, 40, dtype=torch.uint8), 48)


@pytest.mark.real_model
def test_smollm2s_gguf_blocks_are_its_float32_weights(smollm2):
    from gguf import GGUFReader

    from partition.models import smollm2_gguf_path

    tensors = {t.name: t for t in GGUFReader(smollm2_gguf_path()).tensors}
    for gguf_name, name in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                            ("blk.17.ffn_up.weight", "model.layers.17.mlp.up_proj.weight"),
                            ("blk.29.attn_output.weight", "model.layers.29.self_attn.o_proj.weight"),
                            ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight")):
        weight = smollm2.weights.load([name], torch.float32)[name].contiguous()
        n, k = weight.shape
        raw = tensors[gguf_name]
        assert raw.tensor_type.name == "Q4_1"
        blocks = rowkernel.repack_q41(torch.from_numpy(np.asarray(raw.data).reshape(n, -1).copy()), k)
        assert torch.equal(rowkernel.dequantize_q41(blocks, k), weight)
        x = torch.randn(5, k)
        assert torch.equal(rowkernel.linear_q41(x, blocks), rowkernel.linear(x, weight))


def _greedy(seg, ids, steps):
    cache = seg.new_cache()
    out = seg(ids, cache)
    logits = [out.logits]
    for _ in range(steps):
        out = seg(out.logits[0, -1].argmax().view(1, 1), cache)
        logits.append(out.logits)
    return logits


@pytest.mark.real_model
def test_smollm2s_segments_read_the_gguf_blocks_and_compute_the_same_bits(smollm2, monkeypatch):
    from partition.segment import ModelSegment

    ids = torch.tensor([[1, 504, 2365, 28, 253, 1789, 314]])
    monkeypatch.delenv("EDGECLOUD_GGUF_HEAD", raising=False)
    whole = ModelSegment.load(smollm2, 0, smollm2.n_layers)
    edge, cloud = ModelSegment.load(smollm2, 0, 15), ModelSegment.load(smollm2, 15, smollm2.n_layers, embed=False)
    assert (whole.gguf_block_layers, edge.gguf_block_layers, cloud.gguf_block_layers) == (30, 15, 15)
    # The head, tied to the embedding: Q8_0 in the file (the edge's layers have none), read by
    # default; a segment that does not ask for it (a worker without --head-blocks) keeps float32.
    assert whole.lm_head.q80 is not None and cloud.lm_head.q80 is not None and edge.lm_head is None
    layers_only = ModelSegment.load(smollm2, 0, smollm2.n_layers, head_blocks=False)
    assert layers_only.gguf_block_layers == 30 and getattr(layers_only.lm_head, "q80", None) is None
    # EDGECLOUD_GGUF_HEAD overrides what the segment asked, either way.
    monkeypatch.setenv("EDGECLOUD_GGUF_HEAD", "on")
    assert ModelSegment.load(smollm2, 29, smollm2.n_layers, embed=False, head_blocks=False).lm_head.q80 is not None
    monkeypatch.setenv("EDGECLOUD_GGUF_HEAD", "off")
    assert getattr(ModelSegment.load(smollm2, 29, smollm2.n_layers, embed=False).lm_head, "q80", None) is None
    monkeypatch.delenv("EDGECLOUD_GGUF_HEAD")
    monkeypatch.setenv("EDGECLOUD_GGUF_BLOCKS", "off")
    plain = ModelSegment.load(smollm2, 0, smollm2.n_layers)
    assert plain.gguf_block_layers == 0
    expected = _greedy(plain, ids, 6)
    assert all(torch.equal(a, b) for a, b in zip(_greedy(whole, ids, 6), expected, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_greedy(layers_only, ids, 6), expected, strict=True))
    # A split: the edge's layers and the worker's, each on the blocks, give the whole model's bits.
    e_cache, c_cache = edge.new_cache(), cloud.new_cache()
    x = ids
    for ref in expected:
        out = cloud(edge(x, e_cache, logits="none").hidden, c_cache)
        assert torch.equal(out.logits, ref)
        x = out.logits[0, -1].argmax().view(1, 1)


@pytest.mark.real_model
def test_blocks_that_are_not_the_models_weights_are_left_out(smollm2, monkeypatch, caplog):
    from partition import gguf_blocks
    from partition.segment import ModelSegment

    real = gguf_blocks.layer_blocks

    def tampered(path, config, index):
        blocks = real(path, config, index)
        if index == 1:
            blocks["mlp.down_proj"] = rowkernel.random_q41(*blocks["mlp.down_proj"].shape[:1], 1536,
                                                           torch.Generator().manual_seed(0))
        return blocks

    monkeypatch.setattr(gguf_blocks, "layer_blocks", tampered)
    seg = ModelSegment.load(smollm2, 0, 3)
    assert seg.gguf_block_layers == 2
    assert "layer 1: the GGUF file's blocks are not this model's weights" in caplog.text


@pytest.mark.real_model
def test_models_without_a_gguf_file_or_handed_over_in_memory_keep_float32(tiny_llama, smollm2_hf):
    from partition.models import source_of
    from partition.segment import ModelSegment

    tiny = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers)
    assert tiny.gguf_block_layers == 0 and getattr(tiny.lm_head, "q80", None) is None
    # The user's own object: its weights may differ from any file, so they are what runs.
    assert ModelSegment.load(source_of(smollm2_hf), 0, 2).gguf_block_layers == 0


@pytest.mark.real_model
def test_a_worker_reads_the_heads_blocks_only_when_asked(smollm2, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app
    from cloud_worker.config import CloudWorkerConfig
    from cloud_worker.worker import CloudWorker

    monkeypatch.delenv("EDGECLOUD_GGUF_HEAD", raising=False)
    plain = CloudWorker(CloudWorkerConfig(model="smollm2-135m", encryption=False))
    asked = CloudWorker(CloudWorkerConfig(model="smollm2-135m", encryption=False, head_blocks=True))
    assert plain.segment.gguf_block_layers == asked.segment.gguf_block_layers == 30
    assert getattr(plain.segment.lm_head, "q80", None) is None and asked.segment.lm_head.q80 is not None
    assert "--head-blocks" in CliRunner().invoke(app, ["cloud-worker", "--help"], terminal_width=200).output


def test_the_worker_cli_passes_head_blocks_through(monkeypatch):
    from typer.testing import CliRunner

    import cloud_worker.worker
    from cli.main import app

    seen = []

    class Stop(Exception):
        pass

    def record(config):
        seen.append(config.head_blocks)
        raise Stop  # the config is what this test reads; no model is loaded

    monkeypatch.setattr(cloud_worker.worker, "CloudWorker", record)
    for flags in ([], ["--head-blocks"]):
        result = CliRunner().invoke(app, ["cloud-worker", "--model", "tiny-llama", "--no-encryption", *flags])
        assert isinstance(result.exception, Stop), result.output
    assert seen == [False, True]


def test_a_worker_asked_for_head_blocks_it_cannot_read_says_so(tiny_llama, caplog):
    from cloud_worker.config import CloudWorkerConfig
    from cloud_worker.worker import CloudWorker

    with caplog.at_level("WARNING", logger="cloud_worker.worker"):
        worker = CloudWorker(CloudWorkerConfig(model="tiny-llama", encryption=False, head_blocks=True))
    assert getattr(worker.segment.lm_head, "q80", None) is None
    assert any("--head-blocks" in r.getMessage() and "stays as loaded" in r.getMessage() for r in caplog.records)
