"""``EdgeCloudManager``: the original design's entry point.

It measures the device and the link, prices every split with the cost model
(``partition/planner.py``), runs the chosen split and returns token ids like ``generate()``::

    manager = EdgeCloudManager(model=main_model, device_monitor=DeviceMonitor(background_monitoring=True),
                               cloud_client=CloudClient(api_key="..."), energy_weight=0.3,
                               latency_weight=0.4, memory_weight=0.3)
    output_ids = manager.process_hybrid(input_ids)  # (1, T + new) like generate(): prompt, then new tokens

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
        self.max_new_tokens = max_new_tokens or (int(env_tokens) if env_tokens else DEFAULT_TOKENS)
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
        return self.engine.params(max_new_tokens=max_new_tokens or self.max_new_tokens,
                                  temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)

    def process_hybrid(self, input_ids: Any, max_new_tokens: int | None = None,
                       sampling: SamplingParams | None = None) -> torch.Tensor:
        """Generate from ``input_ids`` ((1, T) tensor or a list of ids); returns (1, T + new) ids."""
        ids = self.engine.encode(input_ids)
        result = self.engine.generate(ids, self._params(max_new_tokens, sampling))
        self.last_result = result
        return torch.tensor([ids + result.token_ids], dtype=torch.long)

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
