"""A model segment: decoder layers ``[lo, hi)`` of one model, with only their own weights.

The edge holds ``[0, k)`` plus the token embedding; a cloud worker holds ``[k, N)`` plus the
final norm and LM head. Composing the two reproduces the whole model's forward pass exactly
(``tests/test_partition_exact.py``). Each session has its own ``SegmentKVCache``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from partition.arch import LayerRunner, attention_mask, meta_skeleton, sliding_window_of
from partition.errors import InvalidSplitError
from partition.kv_cache import SegmentKVCache
from partition.models import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentSpec:
    lo: int
    hi: int
    embed: bool  # holds the token (and, for GPT-2, position) embedding
    head: bool  # holds the final norm and the LM head


@dataclass
class SegmentOutput:
    hidden: torch.Tensor  # (1, T, H): the boundary activations after the last layer run
    logits: torch.Tensor | None  # (1, T', V) where the segment has the head, else None


class ModelSegment(nn.Module):
    """Layers ``[lo, hi)`` of a causal LM; optionally the embedding in front and the head behind."""

    def __init__(self, source: ModelSource, spec: SegmentSpec, dtype: torch.dtype, device: torch.device):
        super().__init__()
        n = source.n_layers
        if not 0 <= spec.lo <= spec.hi <= n:
            raise InvalidSplitError(f"layer range [{spec.lo}, {spec.hi}) is outside [0, {n}]")
        self.source = source
        self.spec = spec
        self.n_layers = n
        self.dtype = dtype
        self.device = torch.device(device)
        family = source.family
        skeleton = meta_skeleton(source.config)
        self.runner = LayerRunner(family, source.config, skeleton)

        wanted: dict[str, nn.Module] = {}  # checkpoint prefix -> module to fill from it
        if spec.embed:
            for prefix in family.embed_prefixes:
                wanted[prefix] = skeleton.get_submodule(prefix.rstrip("."))
        self.layers = nn.ModuleList()
        for i in range(spec.lo, spec.hi):
            layer = skeleton.get_submodule(family.layer_module_name(i))
            self.layers.append(layer)
            wanted[family.layer_prefix.format(i=i)] = layer
        self.norm: nn.Module | None = None
        self.lm_head: nn.Module | None = None
        if spec.head:
            self.norm = skeleton.get_submodule(family.norm_prefix.rstrip("."))
            wanted[family.norm_prefix] = self.norm
            self.lm_head = skeleton.get_submodule("lm_head")
        self.embeddings = nn.ModuleList(wanted[p] for p in family.embed_prefixes) if spec.embed else None
        self._load(wanted)
        self.windows = [sliding_window_of(layer) for layer in self.layers]
        if self.runner.rotary is not None:
            self.runner.rotary.to(self.device)
        self.eval()
        del skeleton

    @classmethod
    def load(
        cls,
        source: ModelSource,
        lo: int,
        hi: int,
        *,
        embed: bool | None = None,
        head: bool | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> ModelSegment:
        """Segment ``[lo, hi)``; by default it embeds iff ``lo == 0`` and has the head iff ``hi == N``,
        and computes in the source's dtype (a model object's own, else float32)."""
        dtype = source.dtype if dtype is None else dtype
        embed = (lo == 0) if embed is None else embed
        head = (hi == source.n_layers) if head is None else head
        return cls(source, SegmentSpec(lo, hi, embed, head), dtype, torch.device(device))

    def _load(self, wanted: dict[str, nn.Module]) -> None:
        store = self.source.weights
        family = self.source.family
        for prefix, module in wanted.items():
            names = store.with_prefix(prefix)
            tensors = store.load(names, self.dtype)
            state = {name[len(prefix):]: t.to(self.device) for name, t in tensors.items()}
            module.load_state_dict(state, strict=True, assign=True)
        if self.lm_head is not None:
            head_name = family.head_weight if family.head_weight in store else family.tied_head_weight
            if self.embeddings is not None and head_name == family.tied_head_weight:
                weight = self.embeddings[0].weight  # tied: share the one matrix, do not hold it twice
            else:
                weight = store.load([head_name], self.dtype)[head_name].to(self.device)
            self.lm_head.load_state_dict({"weight": weight}, strict=False, assign=True)
            if getattr(self.lm_head, "bias", None) is not None and self.lm_head.bias.is_meta:
                raise InvalidSplitError("LM heads with a bias are not supported")
        leftovers = [n for n, p in self.named_parameters() if p.is_meta]
        if leftovers:
            raise InvalidSplitError(f"parameters not loaded from the checkpoint: {leftovers[:5]}")

    # --- running -----------------------------------------------------------------------------

    def new_cache(self, max_length_tokens: int | None = None) -> SegmentKVCache:
        return SegmentKVCache(max_length_tokens=max_length_tokens)

    @torch.inference_mode()
    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        cache: SegmentKVCache,
        *,
        start_layer: int | None = None,
        logits: str | int = "last",
    ) -> SegmentOutput:
        """Run the segment on new positions ``cache.length .. cache.length + T``.

        ``x`` is token ids (1, T) when the segment embeds, else hidden states (1, T, H).
        ``start_layer`` (a global index in ``[lo, hi]``) skips the first layers: a worker that
        holds ``[lo, N)`` serves a session split at any ``k >= lo``. ``logits`` is ``"last"``
        (next-token only), ``"all"``, ``"none"``, or a count ``n``: the last ``n`` positions
        (speculative verification needs the pending token's and the drafts' logits).
        """
        past = cache.length
        if self.embeddings is not None:
            if x.dtype != torch.long or x.dim() != 2:
                raise ValueError(f"a segment with the embedding takes token ids (1, T), got {tuple(x.shape)}")
            t_new = x.shape[1]
            positions = torch.arange(past, past + t_new, device=self.device).unsqueeze(0)  # (1, T)
            hidden = self.embeddings[0](x.to(self.device))  # (1, T, H)
            if self.source.family.learned_positions:
                hidden = hidden + self.embeddings[1](positions)
        else:
            if x.dim() != 3:
                raise ValueError(f"a segment without the embedding takes hidden states (1, T, H), got {tuple(x.shape)}")
            t_new = x.shape[1]
            positions = torch.arange(past, past + t_new, device=self.device).unsqueeze(0)
            hidden = x.to(self.device, self.dtype)
        first = 0 if start_layer is None else start_layer - self.spec.lo
        if not 0 <= first <= len(self.layers):
            raise InvalidSplitError(
                f"start layer {start_layer} is outside this segment's range [{self.spec.lo}, {self.spec.hi}]"
            )
        if self.layers[first:]:
            shared = self.runner.position_inputs(hidden, positions)
            masks: dict[int | None, torch.Tensor | None] = {}
            for layer, window in zip(self.layers[first:], self.windows[first:], strict=True):
                if window not in masks:
                    masks[window] = attention_mask(t_new, past, hidden.dtype, self.device, window)
                hidden = self.runner.call(layer, hidden, masks[window], cache, shared)
        cache.advance(t_new)
        out_logits = None
        if self.lm_head is not None and logits != "none":
            count = {"all": t_new, "last": 1}.get(logits, logits) if isinstance(logits, str) else logits
            if not isinstance(count, int) or not 1 <= count <= t_new:
                raise ValueError(f"logits must be 'last', 'all', 'none' or 1..{t_new}, got {logits!r}")
            normed = self.norm(hidden[:, t_new - count:, :])
            out_logits = self.lm_head(normed).float()  # (1, T or 1, V)
        return SegmentOutput(hidden=hidden, logits=out_logits)

    def describe(self) -> str:
        parts = [f"layers [{self.spec.lo}, {self.spec.hi}) of {self.n_layers}"]
        if self.spec.embed:
            parts.append("embedding")
        if self.spec.head:
            parts.append("head")
        return ", ".join(parts)
