"""``EdgeCloudManager``: the original design's entry point.

It measures the device and the link, prices every split with the cost model
(``partition/planner.py``), runs the chosen split and returns token ids like ``generate()``::

    manager = EdgeCloudManager(model=main_model, device_monitor=DeviceMonitor(background_monitoring=True),
                               cloud_client=CloudClient(api_key="..."), energy_weight=0.3,
                               latency_weight=0.4, memory_weight=0.3)
    output_ids = manager.process_hybrid(input_ids)  # (1, T + new) like generate(): prompt, then new tokens
    batch_ids = manager.process_hybrid([ids_a, ids_b, ids_c])  # three sessions at once, batched in the cloud

Defaults: ``max_new_tokens`` from the keyword, else ``$EDGECLOUD_MAX_NEW_TOKENS``, else 64; the
broker address and keys from the CloudClient (``$EDGECLOUD_BROKER``, ``$EDGECLOUD_KEYS``).
When the cloud cannot be reached the manager runs locally, before the first token or from the
step the cloud went away, with the same output, and says so in the log and in ``last_result``
(``fallback_at_step``). Every decision is logged with the measurements behind it and kept in
``decisions``. ``stream(input_ids)`` yields the text as it is generated.

The manager is the seed's interface to ``EdgeEngine`` (``edge_worker/engine.py``), which does
the work: the manager maps its arguments onto the engine's settings and nothing more.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from edge_worker.cloud_client import CloudClient
from edge_worker.config import (
    DEFAULT_ENERGY_WEIGHT,
    DEFAULT_LATENCY_WEIGHT,
    DEFAULT_MEMORY_WEIGHT,
    DEFAULT_TOKENS,
    EdgeConfig,
)
from edge_worker.engine import EdgeEngine, GenerationStream
from edge_worker.generation import GenerationResult
from edge_worker.mini_llm import MiniLLMHandler
from edge_worker.planning import Decision
from edge_worker.privacy import PrivacyProtection
from partition.planner import WIFI, Conditions, PowerModel
from partition.sampling import SamplingParams

log = logging.getLogger(__name__)

FORCE_MODES = ("local-only", "cloud-only")
__all__ = ["EdgeCloudManager", "Decision", "FORCE_MODES"]


@dataclass(frozen=True)
class _Row:
    given: list[int]  # the row as the caller gave it, padding included
    ids: list[int]  # its real tokens: the prompt that runs


def batch_rows(input_ids: Any, attention_mask: Any = None) -> list[_Row]:
    """The prompts of ``input_ids`` (a (T,) or (B, T) tensor, a list of ids or a list of id lists),
    less the positions ``attention_mask`` marks 0."""
    if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                      and all(isinstance(r, str) for r in input_ids)):
        raise TypeError("input_ids are token ids (a tensor, a list of ints or a list of such lists), not text: "
                        "encode the text first, e.g. tokenizer(text)['input_ids'], or use EdgeEngine.generate(text)")
    rows = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if not rows:
        raise ValueError("input_ids is empty")
    if not isinstance(rows[0], (list, tuple)) and not (isinstance(rows[0], torch.Tensor) and rows[0].dim() == 1):
        rows = [rows]
    rows = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in rows]
    if attention_mask is None:
        return [_Row(r, r) for r in rows]
    mask = attention_mask.tolist() if isinstance(attention_mask, torch.Tensor) else [list(m) for m in attention_mask]
    if len(mask) != len(rows) or any(len(m) != len(r) for m, r in zip(mask, rows, strict=True)):
        raise ValueError(f"attention_mask must have the shape of input_ids: {len(rows)} rows of "
                         f"{[len(r) for r in rows][:4]} tokens, got {len(mask)} rows")
    return [_Row(r, [t for t, m in zip(r, ms, strict=True) if m]) for r, ms in zip(rows, mask, strict=True)]


class EdgeCloudManager:
    def __init__(
        self,
        model: Any = "smollm2-135m",
        device_monitor: Any = None,
        cloud_client: CloudClient | None = None,
        mini_llm: MiniLLMHandler | None = None,
        privacy_protection: PrivacyProtection | None = None,
        energy_weight: float = DEFAULT_ENERGY_WEIGHT,
        latency_weight: float = DEFAULT_LATENCY_WEIGHT,
        memory_weight: float = DEFAULT_MEMORY_WEIGHT,
        force_mode: str | None = None,
        split: int | None = None,
        max_new_tokens: int | None = None,
        tokenizer: Any = None,
        power: PowerModel = WIFI,
        base_conditions: Conditions | None = None,
        dynamic: bool = True,
        replan_every: int = 8,
        replan_margin: float = 0.1,
        min_split: int = 0,
        fallback_local: bool = True,
    ) -> None:
        if force_mode is not None and force_mode not in FORCE_MODES:
            raise ValueError(f"force_mode must be one of {FORCE_MODES} or None, got {force_mode!r}")
        forced = 0 if force_mode == "cloud-only" else split
        if forced is not None and forced < min_split:
            raise ValueError(f"the forced split {forced} is below min_split {min_split}")
        env_tokens = os.environ.get("EDGECLOUD_MAX_NEW_TOKENS")
        self.max_new_tokens = (max_new_tokens if max_new_tokens is not None
                               else int(env_tokens) if env_tokens else DEFAULT_TOKENS)
        privacy = privacy_protection or PrivacyProtection()
        settings = EdgeConfig(
            max_new_tokens=self.max_new_tokens, split=split, min_split=min_split,
            force_local=force_mode == "local-only", force_cloud=force_mode == "cloud-only",
            encryption=privacy.encryption_enabled, wire_dtype=privacy.wire_dtype,
            reduce_dims=privacy.reduce_dims, reductions_dir=privacy.reductions_dir,
            energy_weight=energy_weight, latency_weight=latency_weight, memory_weight=memory_weight,
            dynamic=dynamic, fallback_local=fallback_local,
        )
        self.engine = EdgeEngine(
            # A tokenizer handed to the mini-LLM is the user's tokenizer too (the seed passes it there).
            model, settings, tokenizer=tokenizer or getattr(mini_llm, "tokenizer", None),
            cloud_client=cloud_client or CloudClient(),
            device_monitor=device_monitor, mini_llm=mini_llm, privacy=privacy, power=power,
            base_conditions=base_conditions, replan_every=replan_every, replan_margin=replan_margin,
        )
        self.last_result: GenerationResult | None = None
        self.last_results: list[GenerationResult] = []

    # The seed's attributes, read from the engine.
    @property
    def source(self):
        return self.engine.source

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def cloud_client(self) -> CloudClient:
        return self.engine.client

    @property
    def device_monitor(self) -> Any:
        return self.engine.device_monitor

    @property
    def decisions(self) -> list[Decision]:
        return self.engine.decisions

    def measure_conditions(self) -> tuple[Conditions, float | None]:
        """Conditions for the planner from the device monitor and a ping through the broker."""
        if self.engine.planner is None:
            raise ValueError("this manager has a forced split: it measures nothing")
        return self.engine.planner.measure_conditions()

    def choose_split(self, prompt_tokens: int, new_tokens: int) -> Decision:
        return self.engine.choose_split(prompt_tokens, new_tokens)

    def _params(self, max_new_tokens: int | None, sampling: SamplingParams | None):
        sampling = sampling or SamplingParams()
        return self.engine.params(max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
                                  temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)

    def process_hybrid(self, input_ids: Any, max_new_tokens: int | None = None,
                       sampling: SamplingParams | None = None, attention_mask: Any = None) -> torch.Tensor:
        """Generate from ``input_ids``, like ``generate()``: a (1, T) tensor or a list of ids gives
        (1, T + new) ids, the prompt then its new tokens.

        A batch, a (B, T) tensor or a list of B id lists (of any lengths), runs as B generations at
        once, each its own cloud session, which a batching worker computes together; each row
        equals that prompt run alone (greedy). Row i is prompt i (as given, padding included),
        then its new tokens, then the pad id up to the longest row. ``attention_mask`` (B, T) marks
        a padded tensor's real tokens (0 for padding, on either side) as a tokenizer returns it.
        ``last_results`` holds every row's ``GenerationResult``, ``last_result`` the last row's."""
        rows = batch_rows(input_ids, attention_mask)
        params = self._params(max_new_tokens, sampling)
        if len(rows) == 1:
            results = [self.engine.generate(rows[0].ids, params)]
        else:
            results = self.engine.generate_many([r.ids for r in rows], params)
        self.last_results = results
        self.last_result = results[-1]
        outputs = [r.given + res.token_ids for r, res in zip(rows, results, strict=True)]
        width = max(len(o) for o in outputs)
        pad = self.pad_id
        return torch.tensor([o + [pad] * (width - len(o)) for o in outputs], dtype=torch.long)

    @property
    def pad_id(self) -> int:
        """What fills a batch's shorter rows: the tokenizer's pad id, else an end-of-sequence id."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is not None:
            return int(pad)
        return min(self.engine.eos) if self.engine.eos else 0

    def stream(self, input_ids: Any, max_new_tokens: int | None = None,
               sampling: SamplingParams | None = None) -> GenerationStream:
        """The text of a generation from ``input_ids`` (ids, or a prompt string) as it is produced;
        the stream's ``result`` (and ``last_result``) once it ends."""
        ids = input_ids if isinstance(input_ids, str) else self.engine.encode(input_ids)

        def record(result: GenerationResult) -> None:
            self.last_result = result

        return self.engine.stream(ids, self._params(max_new_tokens, sampling), on_result=record)

    def close(self) -> None:
        self.engine.close()
        if self.device_monitor is not None and hasattr(self.device_monitor, "stop"):
            self.device_monitor.stop()
