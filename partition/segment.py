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

from partition import gguf_blocks, rowkernel
from partition.arch import LayerRunner, attention_mask, meta_skeleton, sliding_window_of
from partition.batching import (
    PACK_MAX_ROWS,
    KernelLayers,
    Part,
    all_on_kernel,
    attention_function,
    fuse_layer,
    packable,
    packed_linear,
    rotary_rows,
    run_kernel_layers,
    run_packed_layer,
)
from partition.errors import InvalidSplitError
from partition.graphs import DecodeGraphs
from partition.kv_cache import SegmentKVCache
from partition.models import ModelSource
from partition.tree import DraftTree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentSpec:
    lo: int
    hi: int
    embed: bool  # holds the token (and, for GPT-2, position) embedding
    head: bool  # holds the final norm and the LM head


@dataclass
class StepInput:
    """One session's frame for ``ModelSegment.forward_many``."""

    x: torch.Tensor  # token ids (1, T) for a segment with the embedding, else hidden states (1, T, H)
    cache: SegmentKVCache
    start_layer: int | None = None
    logits: str | int = "last"
    tree: DraftTree | None = None  # x holds a token tree's rows (partition/tree.py)


@dataclass
class SegmentOutput:
    hidden: torch.Tensor  # (1, T, H): the boundary activations after the last layer run
    logits: torch.Tensor | None  # (1, T', V) where the segment has the head, else None


# A frame longer than this (a prefill) runs as chunks of this many positions, from its start: a
# worker computes one chunk per pass beside the other sessions' decode steps, so a long prompt
# slows them for a pass at a time instead of stalling them for its whole prefill; the edge runs
# its frames the same way, so both compute the same numbers. 64 positions of SmolLM2 cost about
# two decode passes of eight sessions on the 2-core CPU.
PREFILL_CHUNK = 64


def chunk_bounds(rows: int) -> list[tuple[int, int]]:
    """The chunks ``[a, b)`` a frame of ``rows`` positions runs as."""
    return [(a, min(a + PREFILL_CHUNK, rows)) for a in range(0, rows, PREFILL_CHUNK)] or [(0, 0)]


def chunk_plan(rows: int, logit_rows: int) -> list[tuple[int, int, int]]:
    """``(a, b, n)`` for each chunk ``[a, b)`` of a frame of ``rows`` positions whose last
    ``logit_rows`` want logits: ``n`` of them fall in that chunk (its last rows)."""
    return [(a, b, max(0, b - max(a, rows - logit_rows))) for a, b in chunk_bounds(rows)]


def join_chunks(pieces: list[SegmentOutput]) -> SegmentOutput:
    """One frame's output from its chunks' outputs, in order."""
    if len(pieces) == 1:
        return pieces[0]
    hidden = torch.cat([p.hidden for p in pieces], dim=1)
    logits = [p.logits for p in pieces if p.logits is not None]
    return SegmentOutput(hidden=hidden, logits=torch.cat(logits, dim=1) if logits else None)


def _mask(tree: DraftTree | None, t_new: int, past: int, dtype: torch.dtype, device: torch.device,
          window: int | None) -> torch.Tensor | None:
    """The attention mask of a frame: causal, or a token tree's."""
    if tree is not None:
        return tree.mask(past, dtype, device, window)
    return attention_mask(t_new, past, dtype, device, window)


class ModelSegment(nn.Module):
    """Layers ``[lo, hi)`` of a causal LM; optionally the embedding in front and the head behind."""

    def __init__(self, source: ModelSource, spec: SegmentSpec, dtype: torch.dtype, device: torch.device,
                 head_blocks: bool = True):
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
        # Whether short frames of several sessions run packed (``partition.batching``).
        self.packable = packable(source.config)
        self.quantized: str | None = None  # "int8": an approximate copy (partition/quantize.py)
        self.graphs: DecodeGraphs | None = None  # decode passes as CUDA graphs (use_graphs)
        self.gguf_block_layers = 0  # layers whose products read the GGUF file's Q4_1 blocks
        self._attention = attention_function(source.config) if self.packable else None
        self._kernel_layers = KernelLayers()  # the layers for one call of the row kernel (_forward_packed)
        if self.packable:
            for layer in self.layers:
                fuse_layer(layer)
            if self.device.type == "cpu" and dtype == torch.float32:
                # Built (once per machine) or loaded now, not at a worker's first step, where a
                # compile would hold up its heartbeats.
                rowkernel.kernel()
                # A GGUF model's layers read in the file's own blocks: the same numbers, a fifth of the bytes.
                self.gguf_block_layers = gguf_blocks.attach(self, head=head_blocks)
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
        head_blocks: bool = True,
    ) -> ModelSegment:
        """Segment ``[lo, hi)``; by default it embeds iff ``lo == 0`` and has the head iff ``hi == N``,
        and computes in the source's dtype (a model object's own, else float32). ``head_blocks``:
        whether the head reads the GGUF file's Q8_0 blocks where it can (``gguf_blocks.attach``)."""
        dtype = source.dtype if dtype is None else dtype
        embed = (lo == 0) if embed is None else embed
        head = (hi == source.n_layers) if head is None else head
        return cls(source, SegmentSpec(lo, hi, embed, head), dtype, torch.device(device), head_blocks)

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
        tree: DraftTree | None = None,
    ) -> SegmentOutput:
        """Run the segment on new positions ``cache.length .. cache.length + T``.

        ``x`` is token ids (1, T) when the segment embeds, else hidden states (1, T, H).
        ``start_layer`` (a global index in ``[lo, hi]``) skips the first layers: a worker that
        holds ``[lo, N)`` serves a session split at any ``k >= lo``. ``logits`` is ``"last"``
        (next-token only), ``"all"``, ``"none"``, or a count ``n``: the last ``n`` positions
        (speculative verification needs the pending token's and the drafts' logits). ``tree``:
        ``x`` holds a token tree's rows (the pending token, then its nodes), each attending to
        the cache and its own ancestors (``partition/tree.py``); the cache then holds every row
        until ``SegmentKVCache.keep`` keeps the accepted path.

        A frame of at most ``PACK_MAX_ROWS`` positions runs as a batch of one through
        ``forward_many``: its numbers are then the same as when it runs beside other sessions.
        """
        return self.forward_many([StepInput(x, cache, start_layer, logits, tree)])[0]

    @torch.inference_mode()
    def forward_many(self, steps: list[StepInput]) -> list[SegmentOutput]:
        """``forward`` for several sessions at once (each its own cache): frames of at most
        ``PACK_MAX_ROWS`` positions share the layers' matrix products, and so do longer ones
        (prefills) where ``whole_frames_packed``; elsewhere those run by themselves, and so do
        batched caches (several rows of one prefix,
        ``SegmentKVCache.repeated``). A frame longer than ``PREFILL_CHUNK`` runs as its chunks
        (``chunk_bounds``), one after another, the way a worker interleaves them with other
        sessions' steps. Each output is bit-identical to that step run alone."""
        if len({id(s.cache) for s in steps}) != len(steps):
            raise ValueError("one step per cache in a batch: a session's steps run one after another")
        for s in steps:
            if s.tree is not None and (s.x.shape[0] != 1 or s.x.shape[1] != s.tree.rows):
                raise ValueError(f"a tree frame has one row per tree row ({s.tree.rows}), got {tuple(s.x.shape)}")
        if not self.layers and self.lm_head is None:
            return [self._no_layers(s) for s in steps]
        long = [i for i, s in enumerate(steps) if s.x.shape[0] == 1 and s.x.shape[1] > PREFILL_CHUNK]
        if not long:
            return self._forward_pass(steps)
        return self._forward_chunked(steps, set(long))

    def _no_layers(self, step: StepInput) -> SegmentOutput:
        """A step of a segment with no layers and no head (the edge's embedding in cloud-only
        mode): its inputs as a pass would give them, without the pass's bookkeeping (a token of
        SmolLM2: 43 against 68 us, medians of single calls; the lookup itself takes 7-11)."""
        self._first_layer(step.start_layer)
        hidden, _ = self._inputs(step.x, step.cache.length, step.tree)
        step.cache.advance(hidden.shape[1])
        return SegmentOutput(hidden=hidden, logits=None)

    def _forward_chunked(self, steps: list[StepInput], long: set[int]) -> list[SegmentOutput]:
        """Passes of every step's next chunk (a frame of at most ``PREFILL_CHUNK`` positions is
        its own single chunk) until all are through; outputs joined back per step."""
        plans = []
        for i, step in enumerate(steps):
            rows = step.x.shape[1]
            count = self._logit_rows(step.logits, rows)
            plans.append(chunk_plan(rows, count) if i in long else [(0, rows, count)])
        pieces: list[list[SegmentOutput]] = [[] for _ in steps]
        for index in range(max(len(p) for p in plans)):
            live = [i for i, plan in enumerate(plans) if index < len(plan)]
            chunk_steps = []
            for i in live:
                a, b, count = plans[i][index]
                chunk_steps.append(StepInput(steps[i].x[:, a:b], steps[i].cache, steps[i].start_layer, count or "none",
                                             None if i in long else steps[i].tree))
            for i, out in zip(live, self._forward_pass(chunk_steps), strict=True):
                pieces[i].append(out)
        return [join_chunks(p) for p in pieces]

    def whole_frames_packed(self) -> bool:
        """Whether frames of any length (prefills too) run packed: where every layer runs as one
        call of the row kernel (``rowkernel.decode_layer``), whose rows never depend on the other
        rows of a call, and which is faster than transformers' layers on a prefill's rows (37
        rows of SmolLM2 in 0.58x the time on the 2-core CPU: BENCHMARKS.md). A prompt's numbers then do not depend on how
        it is cut into frames or on what shares its passes; elsewhere a frame longer than
        ``PACK_MAX_ROWS`` runs by itself through transformers' layers."""
        return self.packable and all_on_kernel(self.layers)

    def _forward_pass(self, steps: list[StepInput]) -> list[SegmentOutput]:
        outputs: list[SegmentOutput | None] = [None] * len(steps)
        packed = []
        whole = None
        for i, step in enumerate(steps):
            # A quantized copy has no float32 weights for transformers' layers: it always packs.
            rows = step.x.shape[1]
            if rows > PACK_MAX_ROWS and not self.quantized and whole is None:
                whole = self.whole_frames_packed()
            if self.packable and step.x.shape[0] == 1 and (rows <= PACK_MAX_ROWS or self.quantized or whole):
                packed.append(i)
            else:
                outputs[i] = self._forward_alone(step)
        if packed:
            for i, out in zip(packed, self._forward_packed([steps[i] for i in packed]), strict=True):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    def _inputs(self, x: torch.Tensor, past: int, tree: DraftTree | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (1, T, H), positions (1, T)) for new input ``x`` after ``past`` positions (a
        tree's rows sit at ``past`` plus their depth)."""
        if tree is not None:
            positions = tree.positions(past, self.device)
        else:
            positions = torch.arange(past, past + x.shape[-2 if x.dim() == 3 else 1], device=self.device).unsqueeze(0)
        if self.embeddings is not None:
            if x.dtype != torch.long or x.dim() != 2:
                raise ValueError(f"a segment with the embedding takes token ids (1, T), got {tuple(x.shape)}")
            hidden = self.embeddings[0](x.to(self.device))  # (1, T, H)
            if self.source.family.learned_positions:
                hidden = hidden + self.embeddings[1](positions)
            return hidden, positions
        if x.dim() != 3:
            raise ValueError(f"a segment without the embedding takes hidden states (1, T, H), got {tuple(x.shape)}")
        return x.to(self.device, self.dtype), positions

    def _first_layer(self, start_layer: int | None) -> int:
        first = 0 if start_layer is None else start_layer - self.spec.lo
        if not 0 <= first <= len(self.layers):
            raise InvalidSplitError(
                f"start layer {start_layer} is outside this segment's range [{self.spec.lo}, {self.spec.hi}]"
            )
        return first

    def _logit_rows(self, logits: str | int, t_new: int) -> int:
        """How many of the last positions get logits (0: none)."""
        if self.lm_head is None or logits == "none":
            return 0
        count = {"all": t_new, "last": 1}.get(logits, logits) if isinstance(logits, str) else logits
        if not isinstance(count, int) or not 1 <= count <= t_new:
            raise ValueError(f"logits must be 'last', 'all', 'none' or 1..{t_new}, got {logits!r}")
        return count

    def _forward_alone(self, step: StepInput) -> SegmentOutput:
        """One frame through transformers' own decoder layers."""
        cache = step.cache
        past = cache.length
        hidden, positions = self._inputs(step.x, past, step.tree)
        t_new = hidden.shape[1]
        first = self._first_layer(step.start_layer)
        count = self._logit_rows(step.logits, t_new)
        if self.layers[first:]:
            shared = self.runner.position_inputs(hidden, positions)
            masks: dict[int | None, torch.Tensor | None] = {}
            for layer, window in zip(self.layers[first:], self.windows[first:], strict=True):
                if window not in masks:
                    masks[window] = _mask(step.tree, t_new, past, hidden.dtype, self.device, window)
                hidden = self.runner.call(layer, hidden, masks[window], cache, shared)
        cache.advance(t_new)
        out_logits = None
        if count:
            normed = self.norm(hidden[:, t_new - count:, :])
            out_logits = self.lm_head(normed).float()  # (1, count, V)
        return SegmentOutput(hidden=hidden, logits=out_logits)

    def _forward_packed(self, steps: list[StepInput]) -> list[SegmentOutput]:
        hiddens: list[torch.Tensor] = []  # (T_i, H) each
        parts: list[Part] = []
        counts = []
        for step in steps:
            past = step.cache.length
            hidden, positions = self._inputs(step.x, past, step.tree)
            t_new = hidden.shape[1]
            counts.append(self._logit_rows(step.logits, t_new))
            masks = {w: _mask(step.tree, t_new, past, hidden.dtype, self.device, w) for w in set(self.windows)}
            shared = self.runner.position_inputs(hidden, positions) if self.layers else {}
            parts.append(Part(step.cache, t_new, self._first_layer(step.start_layer), shared, masks))
            hiddens.append(hidden[0])
        if self.graphs is not None and self.graphs.applies(parts, counts, [s.tree for s in steps]):
            return self._forward_graphs(hiddens, parts, counts[0] > 0)
        ropes: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # per set of sessions
        # Where every layer is one call of the row kernel, the layers between two sessions'
        # first layers (all of them, when the sessions start together) go in one call.
        plan = (self._kernel_layers.plan(self.layers)
                if hiddens and len(set(self.windows)) == 1 and rowkernel.usable_attend(hiddens[0]) else None)
        starts = sorted({part.first_layer for part in parts} | {len(self.layers)})
        index = 0
        while index < len(self.layers):
            active = tuple(j for j, part in enumerate(parts) if part.first_layer <= index)
            end = next(s for s in starts if s > index) if plan is not None else index + 1
            if active:
                if active not in ropes:
                    ropes[active] = rotary_rows([parts[j] for j in active])
                rows = torch.cat([hiddens[j] for j in active]) if len(active) > 1 else hiddens[active[0]]
                active_parts = [parts[j] for j in active]
                if plan is not None:
                    rows = run_kernel_layers(self.layers, plan, index, end, rows, active_parts, self.windows[index],
                                             ropes[active])
                else:
                    rows = run_packed_layer(self.layers[index], rows, active_parts, self.windows[index],
                                            self._attention, ropes[active])
                start = 0
                for j in active:
                    hiddens[j] = rows[start:start + parts[j].rows]
                    start += parts[j].rows
            index = end
        for part in parts:
            part.cache.advance(part.rows)
        logits: list[torch.Tensor | None] = [None] * len(steps)
        wanted = [j for j, count in enumerate(counts) if count]
        if wanted:
            last = torch.cat([hiddens[j][parts[j].rows - counts[j]:] for j in wanted])
            head = packed_linear(self.norm(last), self.lm_head).float()
            start = 0
            for j in wanted:
                logits[j] = head[start:start + counts[j]].unsqueeze(0)
                start += counts[j]
        return [SegmentOutput(hidden=h.unsqueeze(0), logits=lg) for h, lg in zip(hiddens, logits, strict=True)]

    def _forward_graphs(self, hiddens: list[torch.Tensor], parts: list[Part], logits: bool) -> list[SegmentOutput]:
        """A pass of one-token steps as ``partition/graphs.py``'s pieces (``use_graphs``)."""
        assert self.graphs is not None
        rows, head = self.graphs.run(torch.cat(hiddens) if len(hiddens) > 1 else hiddens[0], parts,
                                     rotary_rows(parts), logits)
        for part in parts:
            part.cache.advance(part.rows)
        return [SegmentOutput(hidden=rows[j:j + 1].unsqueeze(0), logits=None if head is None else head[j:j + 1].unsqueeze(0))
                for j in range(len(parts))]

    def use_graphs(self, enabled: bool = True, *, capture: bool | None = None) -> None:
        """Run passes of one-token steps (decode) as CUDA graphs captured between the attentions
        (``partition/graphs.py``); ``capture=False`` runs the same pieces eagerly (tests, any
        device). Their numbers are the eager pass's, bit for bit."""
        self.graphs = DecodeGraphs(self, capture) if enabled else None

    def describe(self) -> str:
        parts = [f"layers [{self.spec.lo}, {self.spec.hi}) of {self.n_layers}"]
        if self.spec.embed:
            parts.append("embedding")
        if self.spec.head:
            parts.append("head")
        return ", ".join(parts)
