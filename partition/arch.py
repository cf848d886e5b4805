"""Architecture families: the one module that touches transformers internals.

Each family knows the parameter names of its checkpoint, how to build one decoder layer without
building the whole model, and how to call that layer with our KV cache. Tested with
transformers 5.24 (``pyproject.toml`` pins the range); ``tests/test_partition_exact.py`` fails
if an upgrade changes any of this, by comparing split generation with ``generate()``.

Supported: the Llama family (llama, mistral, qwen2, qwen3: rotary positions, RMSNorm) and the
GPT-2 family (gpt2, distilgpt2: learned positions, LayerNorm, Conv1D projections).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from partition.errors import UnsupportedModelError
from partition.kv_cache import SegmentKVCache

LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2", "qwen3"})
GPT2_LIKE = frozenset({"gpt2"})


@dataclass(frozen=True)
class Family:
    """Names and calling conventions of one architecture family."""

    name: str
    embed_prefixes: tuple[str, ...]  # parameters the first segment needs to embed token ids
    layer_prefix: str  # format string with {i}
    norm_prefix: str
    head_weight: str
    tied_head_weight: str  # the embedding matrix, used when the checkpoint ties the LM head
    learned_positions: bool  # GPT-2 adds a position embedding; Llama rotates q/k instead

    def layer_module_name(self, i: int) -> str:
        return self.layer_prefix.format(i=i).rstrip(".")


LLAMA = Family(
    name="llama",
    embed_prefixes=("model.embed_tokens.",),
    layer_prefix="model.layers.{i}.",
    norm_prefix="model.norm.",
    head_weight="lm_head.weight",
    tied_head_weight="model.embed_tokens.weight",
    learned_positions=False,
)
GPT2 = Family(
    name="gpt2",
    embed_prefixes=("transformer.wte.", "transformer.wpe."),
    layer_prefix="transformer.h.{i}.",
    norm_prefix="transformer.ln_f.",
    head_weight="lm_head.weight",
    tied_head_weight="transformer.wte.weight",
    learned_positions=True,
)


def family_of(config: PretrainedConfig) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_LIKE:
        return LLAMA
    if model_type in GPT2_LIKE:
        return GPT2
    supported = ", ".join(sorted(LLAMA_LIKE | GPT2_LIKE))
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported types: {supported}"
    )


def n_layers_of(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


def hidden_size_of(config: PretrainedConfig) -> int:
    return int(config.hidden_size)


def meta_skeleton(config: PretrainedConfig) -> nn.Module:
    """The whole model on the meta device: module structure without any memory."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


class LayerRunner:
    """Calls a family's decoder layers with position information and our cache."""

    def __init__(self, family: Family, config: PretrainedConfig, skeleton: nn.Module) -> None:
        self.family = family
        self.config = config
        self.rotary: nn.Module | None = None
        if family is LLAMA:
            # Rotary tables are non-persistent buffers computed in __init__: build on the CPU,
            # never from the meta skeleton, or they would hold garbage after to_empty().
            self.rotary = type(skeleton.model.rotary_emb)(config=config)

    def position_inputs(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, Any]:
        """Per-forward arguments shared by every layer (rotary cos/sin for Llama)."""
        if self.rotary is None:
            return {}
        return {
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden, position_ids=position_ids),
        }

    def call(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        cache: SegmentKVCache,
        shared: dict[str, Any],
    ) -> torch.Tensor:
        out = layer(hidden, attention_mask=mask, cache=cache, use_cache=True, **shared)
        # Decoder layers return a tensor in transformers 5.x; older ones returned a tuple.
        return out[0] if isinstance(out, tuple) else out


def sliding_window_of(layer: nn.Module) -> int | None:
    attn = getattr(layer, "self_attn", None)
    window = getattr(attn, "sliding_window", None) if attn is not None else None
    return int(window) if window else None


def attention_mask(
    q_len: int, past_len: int, dtype: torch.dtype, device: torch.device, window: int | None = None
) -> torch.Tensor | None:
    """Additive causal mask (1, 1, q, kv), or None where SDPA's own causal path is exact.

    ``None`` matches what ``generate()`` does for a prefill on an empty cache and for one-token
    decode, which keeps split generation bit-identical to it. A multi-token step on a non-empty
    cache (speculative verification, replay after crop) needs the explicit mask: SDPA's
    ``is_causal`` aligns the triangle to the top-left corner, which is wrong there.
    """
    kv_len = past_len + q_len
    needs_window = window is not None and kv_len > window
    if not needs_window and (past_len == 0 or q_len == 1):
        return None
    q_pos = torch.arange(past_len, kv_len, device=device).unsqueeze(1)  # (q, 1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)  # (1, kv)
    allowed = k_pos <= q_pos
    if needs_window:
        allowed &= (q_pos - k_pos) < window
    mask = torch.zeros((q_len, kv_len), dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.view(1, 1, q_len, kv_len)
