"""``MiniLLMHandler``: the original design's on-device model for easy tokens.

It holds the choice of drafter and how to use it, and builds the drafter once the edge knows its
model and split:

* ``model=None`` or ``"self"``: early exit from the edge's own layers (the default; no second
  model), with the adapter ``edgecloud calibrate --drafter`` trained, when one exists;
* ``"lookup"``: prompt lookup (n-gram matching against the context);
* ``"int8"``: an int8 copy of the cloud's layers ``[k, N)`` and the head, made on the edge from
  the model's own weights (``partition/quantize.py``; Llama-shaped models), run on the exact
  activations of the edge's layers: nearly always right, at about a quarter of those layers'
  float32 memory;
* ``"auto"`` (the CLI's default): ``"int8"`` at a hybrid split where the model allows it and the
  copy fits in a quarter of the memory available, else no drafter;
* a model name or path (as for ``--model``), or a loaded transformers model: a separate small
  causal LM, which must share the main model's tokenizer.

``threshold`` is the drafter's confidence below which a token counts as hard and drafting stops
(None: the drafter's own, ``threshold_for``).
``mode="verify"`` (default) has the main model check every draft, so the output is the main
model's; ``mode="trust"`` emits confident drafts without waiting for the cloud.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from edge_worker.drafting import (
    CopyDrafter,
    DrafterError,
    LookupDrafter,
    MiniSettings,
    ModelDrafter,
    SelfDrafter,
    adapter_path,
    check_mini_options,
    load_adapter,
)
from partition.models import ModelSource, source_of
from partition.quantize import copy_bytes, quantize_segment, segment_bytes, unsupported
from partition.segment import ModelSegment

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX_DRAFT = 8
DEFAULT_GROUP = 8  # guesses per pipelined frame at most (MiniSettings.group)
# ``auto`` keeps an int8 copy of the cloud's layers only when it takes at most this share of the
# memory available when it is chosen.
AUTO_MEMORY_SHARE = 0.25


class TokenizerMismatchError(DrafterError):
    """The drafter's tokenizer does not produce the main model's token ids."""


# Probe strings for the tokenizer check: ASCII, whitespace runs, digits, accents, CJK, emoji.
_TOKENIZER_PROBES = ("Hello, world!", "  indented\n\ttext 12345", "café naïve", "边缘云", "🙂 ok")


def quantized_copy(source: ModelSource, k: int) -> ModelSegment:
    """Layers ``[k, N)`` and the head of ``source`` as int8 weights (about 0.3 s for SmolLM2's
    layers 15-29 on the 2-core CPU, from its float32 weights)."""
    t0 = time.perf_counter()
    segment = quantize_segment(ModelSegment.load(source, k, source.n_layers, embed=False, head=True,
                                                 dtype=torch.float32))
    log.info("int8 drafter: layers [%d, %d) and the head quantized in %.2f s (%.0f MB)", k, source.n_layers,
             time.perf_counter() - t0, segment_bytes(segment) / 1e6)
    return segment


def default_adapters_dir() -> Path:
    """``$EDGECLOUD_CACHE/drafters`` (default ``~/.cache/edgecloud/drafters``)."""
    root = os.environ.get("EDGECLOUD_CACHE")
    return Path(root) / "drafters" if root else Path.home() / ".cache" / "edgecloud" / "drafters"


class MiniLLMHandler:
    def __init__(self, model: Any = None, tokenizer: Any = None, threshold: float | None = None,
                 main_tokenizer: Any = None, mode: str = "verify", max_draft: int = DEFAULT_MAX_DRAFT,
                 adapter: str | Path | None = None, use_adapter: bool = True, adaptive: bool = True,
                 pipeline: bool = True, tree_nodes: int = 0, group: int = DEFAULT_GROUP) -> None:
        check_mini_options(mode, threshold, max_draft)
        self.model = "self" if model is None else model
        self.tokenizer = tokenizer
        self.threshold = threshold  # None: the drafter's own (threshold_for)
        self.mode = mode
        self.max_draft = max_draft
        self.adapter = Path(adapter) if adapter is not None else None
        self.use_adapter = use_adapter
        self.adaptive = adaptive  # False: always draft max_draft tokens instead of what pays
        self.pipeline = pipeline  # verify mode: guesses go out while earlier frames are in flight
        self.tree_nodes = tree_nodes  # verify mode: a token tree of this many nodes per round trip (0: chains)
        self.group = group  # pipelined: at most this many guesses per frame (MiniSettings.group)
        # What settings() loads once and every later generation reuses: adapters by file, the
        # separate drafter model's segment. The drafters themselves hold per-generation state
        # (a cache, the context), so each generation gets new ones around these.
        self._loaded: dict[Any, Any] = {}
        self._lock = threading.Lock()  # generations of several threads may build the int8 copy at once
        if main_tokenizer is not None:
            self.check_tokenizer(main_tokenizer)

    @property
    def kind(self) -> str:
        """``self``, ``lookup``, ``int8``, ``auto`` or ``model``."""
        return self.model if self.model in ("self", "lookup", "int8", "auto") else "model"

    def resolve(self, source: ModelSource, k: int) -> str | None:
        """The drafter ``auto`` stands for with this model at split ``k`` (None: no drafting);
        any other choice is itself. ``auto`` takes the int8 copy of the cloud's layers at a hybrid
        split where the model allows one and it takes at most ``AUTO_MEMORY_SHARE`` of the memory
        available now
        (it is the one drafter measured to pay: 2.5x plain hybrid at 100 ms on SmolLM2); the
        generation then drafts only while drafting measures faster."""
        if self.kind != "auto":
            return self.kind
        key = ("auto", source.model_id, k)
        if key not in self._loaded:
            choice, why = "int8", None
            reason = unsupported(source.config)
            if k == 0:  # cloud-only: the mode that keeps the model off the device, for comparison
                choice, why = None, "cloud-only mode keeps the model's layers off the device (--mini int8 does not)"
            elif reason is not None:
                choice, why = None, reason
            else:
                need, free = copy_bytes(source.config, k), psutil.virtual_memory().available
                if need > AUTO_MEMORY_SHARE * free:
                    choice, why = None, (f"an int8 copy of layers [{k}, {source.n_layers}) would take "
                                         f"{need / 2**20:.0f} MiB of the {free / 2**20:.0f} MiB available")
            self._loaded[key] = (choice, why)
        return self._loaded[key][0]

    def edge_bytes(self, source: ModelSource, k: int) -> int:
        """Memory the drafter holds on the edge at split ``k`` beyond the edge's own layers (the
        int8 copy's; the others' are small or, for a separate model, not priced here)."""
        return copy_bytes(source.config, k) if k < source.n_layers and self.resolve(source, k) == "int8" else 0

    def threshold_for(self, kind: str) -> float:
        """The confidence below which drafting stops: the one given, else the drafter's own. The
        int8 copy's guesses are right nearly as often when it is unsure (93-96% below 0.5 on
        SmolLM2 at split 15, against 97.4% overall), so in verify mode it always guesses."""
        if self.threshold is not None:
            return self.threshold
        return 0.0 if kind == "int8" and self.mode == "verify" else DEFAULT_THRESHOLD

    @property
    def needs_edge_head(self) -> bool:
        """The self-drafter applies the final norm and LM head to the edge's own activations."""
        return self.kind == "self"

    def needs_head_at(self, source: ModelSource, k: int) -> bool:
        """Whether the drafter at split ``k`` applies the head to the edge's activations: the
        self-drafter's, except where it drafts by lookup alone (``_lookup_only``)."""
        return self.needs_edge_head and not self._lookup_only(source, k)

    def check_tokenizer(self, main_tokenizer: Any) -> None:
        """Refuse a drafter whose tokenizer would give different ids than the main model's."""
        if self.tokenizer is None or self.tokenizer is main_tokenizer:
            return
        if len(self.tokenizer) != len(main_tokenizer):
            raise TokenizerMismatchError(
                f"the mini-LLM's tokenizer has {len(self.tokenizer)} tokens, the main model's {len(main_tokenizer)}: "
                "a drafter must share the main model's tokenizer"
            )
        for text in _TOKENIZER_PROBES:
            if self.tokenizer(text)["input_ids"] != main_tokenizer(text)["input_ids"]:
                raise TokenizerMismatchError(
                    f"the mini-LLM's tokenizer encodes {text!r} differently from the main model's"
                )

    def settings(self, source: ModelSource, edge: ModelSegment, main_tokenizer: Any) -> MiniSettings | None:
        """The drafter for this model and edge segment, ready for the generation loop (None when
        ``auto`` finds none that fits)."""
        kind = self.resolve(source, edge.spec.hi)
        if self.kind == "auto" and ("told", edge.spec.hi) not in self._loaded:
            self._loaded[("told", edge.spec.hi)] = True
            if kind is None:
                log.info("no drafter (--mini auto): %s", self._loaded[("auto", source.model_id, edge.spec.hi)][1])
            else:
                log.info("--mini auto drafts with an int8 copy of layers [%d, %d) (%.0f MiB)", edge.spec.hi,
                         source.n_layers, copy_bytes(source.config, edge.spec.hi) / 2**20)
        if kind is None:
            return None
        if kind == "self" and self._lookup_only(source, edge.spec.hi):
            # Cloud-only: no layer of the edge's to exit early from. The head over the bare
            # embedding guesses a token like the last one, rarely right, for a head pass per token
            # on the edge. The seed manager with its MiniLLMHandler(model=None), eight prompts
            # cloud-only one after another and then at once (three runs each): the edge's CPU
            # 1.70-1.74 -> 1.37-1.54 ms a token alone and 1.20-1.29 -> 0.75-0.91 at once, one
            # frame fewer per generation. Prompt lookup alone drafts what repeats.
            if ("told-lookup", source.model_id) not in self._loaded:
                self._loaded[("told-lookup", source.model_id)] = True
                log.info("cloud-only: the self-drafter has no edge layers to exit from and drafts by prompt lookup "
                         "alone (`edgecloud calibrate --drafter --split 0` trains an adapter for it)")
            kind, drafter = "lookup", LookupDrafter(min_ngram=2)
        elif kind == "self":
            if edge.norm is None or edge.lm_head is None:
                raise DrafterError("the self-drafter needs the edge segment loaded with head=True")
            adapter = None
            path = self._adapter_file(source, edge.spec.hi)
            if self.use_adapter and path.exists():
                key = ("adapter", path, source.model_id, edge.spec.hi)
                if key not in self._loaded:
                    self._loaded[key] = load_adapter(path, source.model_id, edge.spec.hi, source.hidden_size)
                    log.info("self-drafter uses the adapter %s", path)
                adapter = self._loaded[key]
            elif self.adapter is not None:
                raise DrafterError(f"no drafter adapter at {path}: run `edgecloud calibrate --drafter`")
            elif self.use_adapter:
                log.warning("no drafter adapter for split %d: the self-drafter guesses by plain early exit, "
                            "which is rarely right; `edgecloud calibrate --drafter --split %d` trains one",
                            edge.spec.hi, edge.spec.hi)
            # Pipelined, prompt lookup is asked first (bigram matches or longer: a lone repeated
            # token predicts little); a match skips the LM head.
            drafter: Any = SelfDrafter(edge.norm, edge.lm_head, adapter, lookup=LookupDrafter(min_ngram=2))
        elif kind == "lookup":
            drafter = LookupDrafter()
        elif kind == "int8":
            key = ("int8", source.model_id, edge.spec.hi)
            reason = unsupported(source.config)
            if reason is not None:
                raise DrafterError(f"--mini int8: {reason}; --mini self, lookup or a small model draft for it")
            with self._lock:
                built = self._loaded.get(key)
            drafter = CopyDrafter(built) if built is not None else CopyDrafter(
                lambda: self._copy(key, source, edge.spec.hi), copy_bytes(source.config, edge.spec.hi))
        else:
            if "model" not in self._loaded:
                self._loaded["model"] = self._load_model(source, main_tokenizer)
            small, segment = self._loaded["model"]
            drafter = ModelDrafter(segment, label=small.name)
        return MiniSettings(drafter, self.mode, self.threshold_for(kind), self.max_draft, self.adaptive, self.pipeline,
                            self.tree_nodes, self.group)

    def _adapter_file(self, source: ModelSource, k: int) -> Path:
        """The self-drafter's adapter at split ``k``: the one given, else where calibration writes it."""
        return self.adapter or adapter_path(default_adapters_dir(), source.model_id, k)

    def _lookup_only(self, source: ModelSource, k: int) -> bool:
        """The self-drafter drafts by prompt lookup alone at split 0 (cloud-only: no edge layer to
        exit early from) unless it has an adapter for it, given or calibrated."""
        return k == 0 and self.adapter is None and not (self.use_adapter and self._adapter_file(source, 0).exists())

    def _copy(self, key: Any, source: ModelSource, k: int) -> ModelSegment:
        """The int8 copy of layers [k, N), built once (by the first generation that drafts)."""
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = quantized_copy(source, k)
            return self._loaded[key]

    def _load_model(self, source: ModelSource, main_tokenizer: Any) -> tuple[ModelSource, ModelSegment]:
        """The separate drafter model, checked against the main model's tokenizer."""
        small = source_of(self.model)
        if small.model_id == source.model_id:
            log.warning("the drafter is the main model itself: every draft is accepted, nothing is saved")
        small_tokenizer = self.tokenizer or small.load_tokenizer()
        saved, self.tokenizer = self.tokenizer, small_tokenizer
        try:
            self.check_tokenizer(main_tokenizer)
        finally:
            self.tokenizer = saved
        return small, ModelSegment.load(small, 0, small.n_layers)
