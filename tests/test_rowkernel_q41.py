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
    for rows in (1, 2, 3, 6, 8, 16):  # every block shape of the kernel, and each row alone
        assert torch.equal(rowkernel.linear_q41(x[:rows], blocks), together[:rows])
    torch.testing.assert_close(together, x @ weights.T, rtol=1e-4, atol=1e-4)


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
