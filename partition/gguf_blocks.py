"""A GGUF model's layers read in the file's own Q4_1 blocks by the row kernel.

SmolLM2's GGUF file (the default model) stores its 210 layer matrices as Q4_1: per 32 weights a
scale d, a minimum m and 32 four-bit q, each weight d * q + m. Our float32 weights are exactly
those blocks dequantized (transformers converts the file once, ``models._from_gguf``). A decode
step streams every weight once, so reading the blocks (0.19x the bytes, widened as they stream:
``rowkernel.linear_q41``) instead of the float32 copy makes the layers' products 3x faster at
one row (``bench/bench_q41.py``) and changes no bit of any output.

For each layer, ``layer_blocks`` returns its seven matrices in the rows' order of our float32
weights (GGUF keeps q and k in llama.cpp's rotary order; the conversion permutes them), or None
when the file does not hold them all as Q4_1. ``attach`` gives a segment's layers the stacked
blocks of their fused products, after checking that the blocks dequantize to exactly the
segment's own float32 weights: a file that does not match (or a model the user changed in memory,
which has no file) keeps the float32 path.

The head (SmolLM2's is tied to the token embedding, Q8_0 in the file: per 32 weights a scale d
and 32 int8 q, a weight d * q) is read the same way (``head_blocks``; ``rowkernel.linear_q80``):
a lone decode step then takes 8.5 instead of 11.1 ms. A segment asks for it (``head=True``, the
default of ``ModelSegment.load``); a cloud worker does not unless ``--head-blocks``. With it a
worker's pass costs less CPU per token at every batch size (``bench/bench_q41.py --passes``: 15.7
against 22.5 ms alone, 5.1 against 5.8 with eight sessions), but the lone session gains the most,
so eight sessions at once saved 2.45-3.23x of worker CPU per token over one after another
against 3.09-3.71x without it (four alternated pairs, BENCHMARKS.md), at or under the 3x that
issue 17's check asks of a default worker.
``EDGECLOUD_GGUF_HEAD=on`` or ``off`` overrides both.

``EDGECLOUD_GGUF_BLOCKS=off`` turns it off (to compare: ``bench/bench_openmp.py --settings bound f32``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from partition import gguf_index, rowkernel

log = logging.getLogger(__name__)

SWITCH = "EDGECLOUD_GGUF_BLOCKS"
HEAD_SWITCH = "EDGECLOUD_GGUF_HEAD"  # "on" or "off": the head's Q8_0 blocks whatever the segment asked
# Our (transformers') name of each layer matrix, and GGUF's.
MATRICES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}


def enabled() -> bool:
    return os.environ.get(SWITCH, "").lower() not in ("off", "0", "no")


def head_enabled(asked: bool) -> bool:
    """Whether a segment's head reads the file's blocks: ``asked``, unless ``EDGECLOUD_GGUF_HEAD``
    says on or off."""
    said = os.environ.get(HEAD_SWITCH, "").lower()
    return True if said in ("on", "1", "yes") else False if said in ("off", "0", "no") else asked


def layer_blocks(path: Path, config: Any, index: int) -> dict[str, torch.Tensor] | None:
    """Layer ``index``'s seven matrices from the GGUF file at ``path``, repacked for the kernel
    (``rowkernel.repack_q41``) and in our rows' order; None unless all are Q4_1."""
    tensors = gguf_index.tensors(path)  # memory-mapped: nothing is read yet
    out = {}
    for ours, theirs in MATRICES.items():
        t = tensors.get(f"blk.{index}.{theirs}.weight")
        if t is None or t.type_name != "Q4_1" or len(t.shape) != 2:
            return None
        k, n = (int(d) for d in t.shape)  # GGUF lists the fastest dimension first
        rows = torch.from_numpy(np.asarray(t.data).reshape(n, -1).copy())
        if theirs in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if theirs == "attn_q" else config.num_key_value_heads
            rows = rows.reshape(heads, n // heads // 2, 2, -1).transpose(1, 2).reshape(n, -1)
        out[ours] = rowkernel.repack_q41(rows, k)
    return out


def head_blocks(path: Path, n: int, k: int) -> torch.Tensor | None:
    """The head's matrix (N, K) from the GGUF file, repacked for the kernel: ``output.weight``,
    or the token embedding where the head is tied to it; None unless it is Q8_0."""
    tensors = gguf_index.tensors(path)
    t = tensors.get("output.weight", tensors.get("token_embd.weight"))
    if t is None or t.type_name != "Q8_0" or t.shape != (k, n):
        return None
    return rowkernel.repack_q80(torch.from_numpy(np.asarray(t.data).reshape(n, -1).copy()), k)


def attach(segment: Any, head: bool = True) -> int:
    """Give each of ``segment``'s layers whose blocks match its float32 weights exactly the
    blocks of its fused products (``q41`` on ``packed_qkv``, ``o_proj``, ``packed_gate_up`` and
    ``down_proj``, which ``batching.fused_weights`` then passes to the kernel), and its head its
    blocks where ``head_enabled(head)``. Returns how many layers got them."""
    source = segment.source
    if (not enabled() or source.gguf is None or source.module is not None or not segment.packable
            or segment.device.type != "cpu" or segment.dtype != torch.float32 or rowkernel.kernel() is None):
        return 0
    done = 0
    for offset, layer in enumerate(segment.layers):
        index = segment.spec.lo + offset
        blocks = layer_blocks(Path(source.gguf), source.config, index)
        if blocks is None:
            continue
        attn, mlp = layer.self_attn, layer.mlp
        modules = {name: layer.get_submodule(name) for name in MATRICES}
        if not all(torch.equal(rowkernel.dequantize_q41(blocks[name], m.weight.shape[1]), m.weight)
                   for name, m in modules.items()):
            log.warning("layer %d: the GGUF file's blocks are not this model's weights; it keeps float32", index)
            continue
        layer.packed_qkv.q41 = torch.cat([blocks["self_attn.q_proj"], blocks["self_attn.k_proj"],
                                          blocks["self_attn.v_proj"]])
        attn.o_proj.q41 = blocks["self_attn.o_proj"]
        layer.packed_gate_up.q41 = torch.cat([blocks["mlp.gate_proj"], blocks["mlp.up_proj"]])
        mlp.down_proj.q41 = blocks["mlp.down_proj"]
        done += 1
    lm_head = segment.lm_head
    if lm_head is not None and head_enabled(head):
        n, k = lm_head.weight.shape
        blocks = head_blocks(Path(source.gguf), n, k)
        if blocks is not None and torch.equal(rowkernel.dequantize_q80(blocks, k), lm_head.weight):
            lm_head.q80 = blocks  # batching.packed_linear reads it
        elif blocks is not None:
            log.warning("the GGUF file's head is not this model's; it keeps float32")
    return done
