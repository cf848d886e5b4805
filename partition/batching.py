"""Running several sessions' new positions through the same layers at once, with each row's
result independent of what else is in the batch.

Continuous batching (Orca) pays off because a decoder step is dominated by streaming weights:
eight sessions' rows multiplied by a matrix at once cost far less than eight multiplications of
one row. But a matrix product's result for one row can depend on how many rows are in the call.
BLAS libraries pick a kernel by shape, and kernels sum in different orders. Measured with this
project's torch (MKL, CPU): one row takes a matrix-vector kernel, 2..15 rows a small-matrix
kernel, 16 and more a blocked one, and the boundaries move with the thread count (two threads
put 576x576 products with 4 rows already on the blocked kernel). Three kernels, three answers
for the same row, differing in the last bits: enough to change a greedy token now and then.

The first choice is a kernel of our own that sums every row in one fixed order whatever the
call's size (``partition/rowkernel.py``: faster than MKL batched, as fast alone). Where it cannot
run, rows are never multiplied in a call whose size would change their kernel. For each weight (its
shape, dtype, device, and the thread count) ``row_range`` finds, once, the range of row counts
``lo..hi`` in which every call gives each row the bit-identical results of a two-row call: the
range of the kernel two rows get. Packed products then run in tiles of ``lo..hi`` rows (a lone
decode row is padded to two, which costs what one costs), so a row's result is the same whether
its session runs alone or beside fifteen others, on any split. Where every layer runs as one call
of the row kernel, frames of any length (prefills too) are packed the same way; elsewhere frames
longer than ``PACK_MAX_ROWS`` (prefills) do not mix with others: they run by themselves, their
products shaped by their own length only. The edge runs its local layers through the same code, so a split run and a local
run compute the same numbers.

Attention mixes no sessions: each attends over its own cache. With the row kernel one call
computes every session's rows, each row on its own (``rowkernel.attend``): a row of a speculative
verification frame or a token tree then gets exactly the bits it gets as a one-token step, which
SDPA's blocked kernels do not give (they differ in the last bits with the frame's shape).
Row-wise operations (RMSNorm, rotary positions, SiLU, residual adds) do not mix rows.

Supported: the Llama architecture (``model_type`` llama). Other families run each session's
frame by itself through transformers' own layer (correct, without the batching gain).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from partition import rowkernel

# Frames with more rows than this run by themselves (a prefill), the rest are packed.
PACK_MAX_ROWS = 16
# The kernel a product of this many rows gets is the one packed products use, for every row count
# of its range. Two: a lone decode row padded to two costs what one costs, and the kernel of two
# rows reaches 3 to 15 rows here. Eight (one call for a typical batch) put MKL's 576-wide products
# on its blocked kernel, which starts at 4 rows with two threads: the same time at batch 8, 12%
# slower alone (SmolLM2, 2-core CPU).
_TARGET_ROWS = 2
# The largest tile the probe tries, and the random rows it compares.
_PROBE_MAX_ROWS = 16
_PROBE_ROWS = 66

_ranges: dict[tuple, tuple[int, int]] = {}
_ranges_lock = threading.Lock()


def row_range(weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[int, int]:
    """``(lo, hi)``: products with ``weight`` of any ``lo..hi`` rows give every row the same
    numbers as a product of ``_TARGET_ROWS`` rows does (the same kernel)."""
    key = (tuple(weight.shape), weight.dtype, weight.device, bias is not None, torch.get_num_threads())
    found = _ranges.get(key)  # every packed product asks: no lock once the shape is known
    if found is None:
        with _ranges_lock:
            found = _ranges.get(key)
            if found is None:
                found = _ranges[key] = _probe(weight, bias)
    return found


@torch.inference_mode()
def _probe(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    # The kernel is chosen by shape, never by values: random rows show which sizes share one.
    # Two kernels' sums differ in the last bits of float32, which rounding to bfloat16 hides on
    # most rows: MKL's matrix-vector kernel (one row) gave 1 to 5 of 18 random rows of
    # SmolLM2's down product other bfloat16 numbers than its two-row kernel (8% of rows on
    # average over its 30 layers). So every row of _PROBE_ROWS is compared in each size tried,
    # not two: 66 rows miss a kernel that differs on 8% of them about once in 250 probes.
    gen = torch.Generator().manual_seed(0)
    n = _PROBE_ROWS
    x = torch.randn(n, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
    # Every row as the target product gives it, in calls of the target's size from row 0 and
    # again from row 1: each row then sits at another place in its call, which must not matter.
    def calls(m: int, first: int) -> torch.Tensor:
        return torch.cat([F.linear(x[s:s + m], weight, bias) for s in range(first, n - m + 1, m)])

    target = calls(_TARGET_ROWS, 0)
    if not torch.equal(calls(_TARGET_ROWS, 1), target[1:1 + (n - 1) // _TARGET_ROWS * _TARGET_ROWS]):
        return _TARGET_ROWS, _TARGET_ROWS  # only calls of the target's size are alike

    def same(m: int) -> bool:
        # Every row in calls of m rows, from row 0 and (m > 1) from row 1, as in the target
        # product (a kernel may treat a call's rows in blocks, and its tail otherwise).
        return all(torch.equal(out, target[first:first + out.shape[0]])
                   for first in ((0,) if m == 1 else (0, 1)) for out in (calls(m, first),))

    lo = _TARGET_ROWS
    while lo > 1 and same(lo - 1):
        lo -= 1
    hi = _TARGET_ROWS
    while hi < _PROBE_MAX_ROWS and same(hi + 1):
        hi += 1
    return lo, hi


def packed_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` for ``x`` (R, K) such that each row's result does not depend on R: with the
    row kernel (``partition/rowkernel.py``) where it runs, else in tiles of ``row_range`` rows
    (fewer rows are padded with zeros). An int8 copy (``partition/quantize.py``) computes its own."""
    if getattr(layer, "qweight", None) is not None:
        return layer(x)
    blocks = getattr(layer, "q80", None)  # the GGUF file's head (partition/gguf_blocks.py)
    if blocks is not None and rowkernel.usable_blocks(x, blocks):
        return rowkernel.linear_q80(x, blocks)
    if rowkernel.usable(x, layer.weight):
        return rowkernel.linear(x, layer.weight, layer.bias)
    rows = x.shape[0]
    lo, hi = row_range(layer.weight, layer.bias)
    if lo <= rows <= hi:
        return F.linear(x, layer.weight, layer.bias)
    if rows < lo:
        padded = torch.cat([x, x.new_zeros(lo - rows, x.shape[1])])
        return F.linear(padded, layer.weight, layer.bias)[:rows]
    tiles = -(-rows // hi)
    size = -(-rows // tiles)  # near-equal tiles; a short last one is padded
    return torch.cat([packed_linear(x[i:i + size], layer) for i in range(0, rows, size)])


@dataclass
class Part:
    """One session's new positions in a packed forward."""

    cache: Any  # SegmentKVCache
    rows: int  # new positions
    first_layer: int  # index into the segment's layers where this session starts
    shared: dict[str, Any]  # rotary cos/sin for its positions
    masks: dict[int | None, torch.Tensor | None]  # its attention mask per sliding window


def packable(config: Any) -> bool:
    """Whether ``run_packed_layer`` implements this architecture exactly."""
    return (getattr(config, "model_type", None) == "llama" and not getattr(config, "mlp_bias", False)
            and not getattr(config, "attention_bias", False) and getattr(config, "hidden_act", None) == "silu")


class Fused:
    """Several linear layers over the same input as one product: their weights stacked in one
    matrix, and each layer's weight replaced by its rows of it (a view: no second copy). One call
    instead of three (q, k, v) or two (gate, up), each with the per-call cost of a small product.
    Not a module: the layers' own parameters remain the model's parameters (counted once)."""

    def __init__(self, *layers: nn.Linear) -> None:
        stacked = torch.cat([layer.weight.detach() for layer in layers])
        self.weight = stacked
        self.bias = None
        self.sizes = [layer.weight.shape[0] for layer in layers]
        start = 0
        for layer, size in zip(layers, self.sizes, strict=True):
            layer.weight = nn.Parameter(stacked[start:start + size], requires_grad=False)
            start += size

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(out.split(self.sizes, dim=-1))


def fuse_layer(layer: nn.Module) -> None:
    """Give a Llama decoder layer the stacked q/k/v and gate/up products ``run_packed_layer`` uses."""
    attn, mlp = layer.self_attn, layer.mlp
    layer.packed_qkv = Fused(attn.q_proj, attn.k_proj, attn.v_proj)
    layer.packed_gate_up = Fused(mlp.gate_proj, mlp.up_proj)


def rotary_rows(parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary cos and sin of every row of ``parts`` in turn, (R, 1, head_dim) each: applied to
    all rows at once, as each row's own positions give them."""
    cos = [part.shared["position_embeddings"][0][0] for part in parts]  # (T_i, head_dim) each
    sin = [part.shared["position_embeddings"][1][0] for part in parts]
    if len(parts) == 1:
        return cos[0].unsqueeze(1), sin[0].unsqueeze(1)
    return torch.cat(cos).unsqueeze(1), torch.cat(sin).unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # transformers' Llama rotary, (x * cos) + (rotate_half(x) * sin), over (R, heads, head_dim).
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def run_packed_layer(layer: nn.Module, hidden: torch.Tensor, parts: list[Part], window: int | None,
                     attention: Any, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One Llama decoder layer over the rows of several sessions: ``hidden`` (R, H) holds each
    part's rows in turn, ``rope`` their rotary cos and sin (``rotary_rows``). The same
    operations as transformers' ``LlamaDecoderLayer`` (its norms, activation, rotary formula and
    attention function), with the products packed and everything row-wise done once for all
    rows; only attention, over each session's own cache, runs per session."""
    attn = layer.self_attn
    fused = fused_weights(layer)
    if fused is not None and rowkernel.usable_attend(hidden):  # the whole layer in one call of the row kernel
        runs = _kernel_parts(parts, attn.layer_idx, window, _new_kv_shapes(hidden, fused[1], parts))
        return rowkernel.decode_layer(hidden, fused[0], fused[1], rope, runs)
    q, k, v = attention_inputs(layer, hidden, rope)
    return finish_layer(layer, hidden, attend_parts(attn, q, k, v, parts, window, attention))


def attention_inputs(layer: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Llama layer's work on rows ``hidden`` (R, H) before attention: its norm, the q/k/v
    product and the rotary positions; ``(q, k, v)``, (R, heads, head_dim) each. Row-wise, no cache."""
    head_dim = layer.self_attn.head_dim
    rows = hidden.shape[0]
    x = layer.input_layernorm(hidden)
    q, k, v = layer.packed_qkv.split(packed_linear(x, layer.packed_qkv))
    cos, sin = rope
    q = _rotate(q.view(rows, -1, head_dim), cos, sin)  # (R, heads, head_dim)
    k = _rotate(k.view(rows, -1, head_dim), cos, sin)
    return q, k, v.view(rows, -1, head_dim)


def finish_layer(layer: nn.Module, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of a Llama layer after attention: ``hidden`` (R, H) its input rows, ``attended``
    (R, heads * head_dim) their attention output; the layer's output rows. Row-wise, no cache."""
    hidden = hidden + packed_linear(attended, layer.self_attn.o_proj)
    x = layer.post_attention_layernorm(hidden)
    mlp = layer.mlp
    gate, up = layer.packed_gate_up.split(packed_linear(x, layer.packed_gate_up))
    return hidden + packed_linear(mlp.act_fn(gate) * up, mlp.down_proj)


def fused_weights(layer: nn.Module) -> tuple | None:
    """What ``rowkernel.decode_layer`` needs of a packable layer (its weights, float32, int8 or
    Q4_1 blocks, and its sizes), found once per layer; None where the row kernel cannot run it (a
    GPU, bfloat16)."""
    found = layer.__dict__.get("_fused_weights", False)
    if found is not False:
        return found
    found = None
    attn, mlp = layer.self_attn, layer.mlp
    products = [layer.packed_qkv, attn.o_proj, layer.packed_gate_up, mlp.down_proj]
    weights: list[torch.Tensor | None] = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
    for p in products:
        if getattr(p, "qweight", None) is not None:
            weights += [p.qweight, p.scale]
        elif getattr(p, "q41", None) is not None:  # the GGUF file's blocks (partition/gguf_blocks.py)
            weights += [p.q41, None]
        else:
            weights += [p.weight, None]
    tensors = [t for t in weights if t is not None]
    if (rowkernel.kernel() is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and all(t.dtype in (torch.float32, torch.int8, torch.uint8) for t in tensors)
            and layer.input_layernorm.weight.dtype == torch.float32):
        head_dim = attn.head_dim
        q_rows, k_rows, _ = layer.packed_qkv.sizes
        found = (tuple(weights), (q_rows // head_dim, k_rows // head_dim, head_dim, layer.packed_gate_up.sizes[0],
                                  float(layer.input_layernorm.variance_epsilon), float(attn.scaling)))
    layer.__dict__["_fused_weights"] = found
    return found


class KernelLayers:
    """A segment's layers as one ``rowkernel.LayersPlan`` (their weights laid out once for
    ``decode_layers``), built again when a layer's fused weights change (an int8 copy)."""

    def __init__(self) -> None:
        # The fused weights the plan was built from, and the plan: one attribute, so that the
        # generations sharing a segment on several threads never pair one with the other's.
        self._built: tuple[list, rowkernel.LayersPlan | None] | None = None

    def plan(self, layers: Any) -> rowkernel.LayersPlan | None:
        """The plan of ``layers``, or None unless every one runs as one call of the row kernel
        with the same sizes."""
        fused = [fused_weights(layer) for layer in layers]
        built = self._built
        if built is not None and len(built[0]) == len(fused) and all(a is b for a, b in zip(built[0], fused, strict=True)):
            return built[1]
        plan = None
        if fused and all(f is not None for f in fused) and len({f[1] for f in fused}) == 1:
            plan = rowkernel.LayersPlan([f[0] for f in fused], fused[0][1])
        self._built = (fused, plan)
        return plan


def run_kernel_layers(layers: Any, plan: rowkernel.LayersPlan, lo: int, hi: int, hidden: torch.Tensor,
                      parts: list[Part], window: int | None, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Layers ``[lo, hi)`` over the rows of ``parts`` in one call of the row kernel: what
    ``run_packed_layer`` computes one layer at a time, bit for bit, without Python between them."""
    new_kv = _new_kv_shapes(hidden, plan.dims, parts)
    runs = [_kernel_parts(parts, layers[i].self_attn.layer_idx, window, new_kv) for i in range(lo, hi)]
    return rowkernel.decode_layers(hidden, plan, lo, hi, rope, runs)


def _new_kv_shapes(hidden: torch.Tensor, dims: tuple, parts: list[Part]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stand-ins of each part's new keys and values, (1, kv heads, rows, head dim), for
    ``_kernel_parts``: the kernel writes them into the caches itself, so only their shape counts."""
    one = hidden.new_empty(1, 1, 1, 1)
    return [(like, like) for like in (one.expand(1, dims[1], part.rows, dims[2]) for part in parts)]


def all_on_kernel(layers: Any) -> bool:
    """Whether every one of ``layers`` (at least one) runs as one call of the row kernel."""
    return len(layers) > 0 and all(fused_weights(layer) is not None for layer in layers)


def _kernel_parts(parts: list[Part], layer_idx: int, window: int | None,
                  new_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple]:
    """Each part's room in its cache for its new keys and values (``SegmentKVCache.reserve``:
    the kernel writes them) and its mask, as ``rowkernel.attend`` and ``decode_layer`` take them."""
    runs = []
    for part, (new_k, new_v) in zip(parts, new_kv, strict=True):
        store, first = part.cache.reserve(layer_idx, new_k, new_v)
        mask = part.masks[window]
        runs.append((store.keys, store.values, first, part.rows, None if mask is None else mask.view(part.rows, -1)))
    return runs


def attend_parts(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: list[Part],
            window: int | None, attention: Any) -> torch.Tensor:
    """Every part's rows attending over its own cache, ``(R, heads * head_dim)``; the new keys and
    values join the caches. With the row kernel's attention (float32 on a CPU) one call does it
    for all parts, each row as it would be alone (a verification frame's or a token tree's rows
    then get the bits of one-token steps); elsewhere transformers' attention function, per part."""
    spans = []
    start = 0
    for part in parts:
        spans.append((start, start + part.rows))
        start += part.rows
    kv = [(k[a:b].transpose(0, 1).unsqueeze(0), v[a:b].transpose(0, 1).unsqueeze(0)) for a, b in spans]
    if rowkernel.usable_attend(q):  # a packed part's cache holds one row in the segment's dtype, as q
        return rowkernel.attend(q, k, v, _kernel_parts(parts, attn.layer_idx, window, kv), attn.scaling
                                ).view(q.shape[0], -1)
    outs = []
    for part, (new_k, new_v), (a, b) in zip(parts, kv, spans, strict=True):
        kp, vp = part.cache.update(new_k, new_v, attn.layer_idx)
        out, _ = attention(attn, q[a:b].transpose(0, 1).unsqueeze(0), kp, vp, part.masks[window],
                           dropout=0.0, scaling=attn.scaling)
        outs.append(out.reshape(part.rows, -1))
    return torch.cat(outs) if len(outs) > 1 else outs[0].contiguous()


def attention_function(config: Any) -> Any:
    """transformers' attention implementation for ``config`` (sdpa, eager, ...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
