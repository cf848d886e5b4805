"""Weight-only int8 copies of a segment's layers: the edge's approximate copy of the cloud's.

Every matrix of a Llama-shaped segment (the stacked q/k/v and gate/up products, o_proj, down_proj
and the LM head) is stored as int8 with one float32 scale per output row (symmetric, absmax / 127);
activations, norms, rotary positions and attention stay float32. Measured on SmolLM2-135M with
layers 15-29 replaced by such a copy and 0-14 exact, the copy's greedy token was the exact
model's at 98.4% of 492 generated positions (4-bit in groups of 32: 75.6%; torch's dynamic int8,
which quantizes the activations too: 63.4%), at a quarter of the bytes.

Products run on the row kernel's int8 twin (``partition/rowkernel.py``), which widens each weight
as it streams: measured on this project's 2-core CPU, the products of SmolLM2's layers 15-29 and
head took 3.1 ms for one row against 11.8 ms in float32, and up to 256 rows (a prompt's chunk) no
more than widening each matrix once and using torch's float32 product, which is what runs where
the kernel cannot (correct, slower).

A quantized segment is for drafting only: its numbers are close to the model's, not equal, so
the main model checks what it proposes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from partition import rowkernel
from partition.batching import Fused, packable
from partition.errors import InvalidSplitError


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (N, K), float32 scales (N,)) with ``q * scale[:, None]`` close to ``weight`` (N, K)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale.contiguous()


class Int8Linear(nn.Module):
    """A linear map without bias whose weight is int8 with a scale per output row. ``sizes`` and
    ``split`` stand in for a ``Fused`` product's (several layers stacked in one matrix)."""

    def __init__(self, weight: torch.Tensor, sizes: list[int] | None = None) -> None:
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.sizes = sizes or [q.shape[0]]
        self.bias = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(out.split(self.sizes, dim=-1))

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if rowkernel.usable_i8(flat, self.qweight):
            out = rowkernel.linear_i8(flat, self.qweight, self.scale)
        else:
            out = F.linear(flat.float(), self.dequantized())
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"in={self.qweight.shape[1]}, out={self.qweight.shape[0]}, int8 per output row"


def unsupported(config) -> str | None:
    """Why a model with this config cannot have an int8 copy (None: it can)."""
    if not packable(config):
        return (f"int8 copies need a Llama-shaped model (model_type llama, SiLU, no biases); this one is "
                f"{getattr(config, 'model_type', '?')}")
    return None


def copy_bytes(config, k: int) -> int:
    """Bytes an int8 copy of layers ``[k, N)`` and the head of a Llama-shaped model holds: a byte
    per matrix weight, four per row scale and per norm weight."""
    h, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    rows_in = heads * head_dim + 2 * kv + 2 * inter  # q, k, v, gate, up: h wide each
    layer = rows_in * h + h * heads * head_dim + h * inter  # + o_proj, down_proj
    scales = rows_in + 2 * h
    per_layer = layer + 4 * scales + 4 * 2 * h  # and the two norms
    return (config.num_hidden_layers - k) * per_layer + config.vocab_size * (h + 4) + 4 * h


def quantize_segment(segment: nn.Module) -> nn.Module:
    """Replace, in place, every matrix of a packable float32 ``ModelSegment`` by its int8 copy
    (the float32 weights are released) and return it. The segment must run its frames packed
    (``forward_packed``): transformers' own layers would look for the float32 weights."""
    reason = unsupported(segment.source.config)
    if reason is not None:
        raise InvalidSplitError(f"{segment.source.name}: {reason}")
    if segment.dtype != torch.float32:
        raise InvalidSplitError(f"int8 copies are made from float32 segments, not {segment.dtype}")
    for layer in segment.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name, fused in (("packed_qkv", layer.packed_qkv), ("packed_gate_up", layer.packed_gate_up)):
            assert isinstance(fused, Fused)
            setattr(layer, name, Int8Linear(fused.weight, fused.sizes))
        for owner, name in ((attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (mlp, "gate_proj"),
                            (mlp, "up_proj")):
            setattr(owner, name, None)  # views of the stacked float32 matrix: gone with it
        attn.o_proj = Int8Linear(attn.o_proj.weight)
        mlp.down_proj = Int8Linear(mlp.down_proj.weight)
        layer.__dict__.pop("_fused_weights", None)  # what the fused layer kernel found of the float32 weights
    if segment.lm_head is not None:
        segment.lm_head = Int8Linear(segment.lm_head.weight)
    segment.quantized = "int8"
    return segment


def segment_bytes(segment: nn.Module) -> int:
    """Bytes of the segment's parameters and buffers (what it holds in memory)."""
    tensors = list(segment.parameters()) + list(segment.buffers())
    for layer in getattr(segment, "layers", []):
        for name in ("packed_qkv", "packed_gate_up"):
            part = getattr(layer, name, None)
            if isinstance(part, Fused):
                tensors.append(part.weight)
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
