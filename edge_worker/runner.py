"""Run one generation from an ``EdgeConfig``: what ``edgecloud edge`` does."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from edge_worker.config import EdgeConfig
from edge_worker.generation import EdgeGenerator, GenerationResult, LocalBackend, mode_for
from partition.errors import InvalidSplitError
from partition.models import ModelSource, resolve_model
from partition.sampling import SamplingParams
from partition.segment import ModelSegment
from partition.tokens import encode_prompt, eos_token_ids

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def resolve_split(config: EdgeConfig, n_layers: int) -> int | None:
    """The split the user fixed, or None when the planner should choose. A fixed split below
    ``min_split`` is refused rather than raised: the user asked for both, and only they can say
    which one they meant."""
    if config.min_split > n_layers:
        raise InvalidSplitError(f"--min-split {config.min_split} is above this model's {n_layers} layers")
    if config.force_local:
        return n_layers
    if config.force_cloud:
        k = 0
    elif config.split is None:
        return None
    else:
        k = config.split
    if not 0 <= k <= n_layers:
        raise InvalidSplitError(f"split {k} is outside [0, {n_layers}] for this model")
    if k < config.min_split:
        raise InvalidSplitError(
            f"split {k} is below --min-split {config.min_split}: fewer layers on the edge than the privacy "
            "floor allows; raise the split, lower --min-split, or leave --split out to let the planner choose"
        )
    return k


def apply_leakage_budget(config: EdgeConfig, source: ModelSource, tables_dir: Path | None = None) -> EdgeConfig:
    """``config`` with ``min_split`` raised to what ``max_leakage`` needs under the measured table
    for this model and protection (unchanged without a budget). Tables: ``partition/data``."""
    if config.max_leakage is None:
        return config
    from partition.leakage import DATA_DIR, measured_leakage, protection_name
    from partition.planner import min_split_for_leakage

    name = protection_name(config.wire_dtype, config.reduce_dims)
    table = measured_leakage(source.model_id, name, tables_dir or DATA_DIR)
    floor = min_split_for_leakage(table, config.max_leakage, source.n_layers)
    log.info("leakage budget %.2f with %s: no split below %d", config.max_leakage, name, floor)
    return replace(config, min_split=max(config.min_split, floor))


def mini_handler(config: EdgeConfig):
    """The MiniLLMHandler the options ask for, or None for ``--mini none``."""
    from edge_worker.mini_llm import MiniLLMHandler

    if config.mini == "none":
        return None
    return MiniLLMHandler(model=config.mini, threshold=config.mini_threshold, mode=config.mini_mode,
                          max_draft=config.mini_max_draft, adaptive=config.mini_adaptive,
                          pipeline=config.mini_pipeline, adapter=config.mini_adapter)


def make_client(config: EdgeConfig):
    from broker.linkproxy import LinkConfig  # imports zmq only when needed
    from edge_worker.cloud_client import CloudClient

    link = None
    if config.cloud_latency_s or config.bandwidth_mbps:
        link = LinkConfig(rtt_ms=config.cloud_latency_s * 1e3, uplink_mbps=config.bandwidth_mbps,
                          downlink_mbps=config.bandwidth_mbps)
    return CloudClient(
        api_key=config.api_key, broker=config.broker, keys_dir=config.keys_dir, encryption=config.encryption,
        wire_dtype=config.wire_dtype, request_timeout_s=config.request_timeout_s,
        step_deadline_s=config.step_deadline_s, link=link, curve=config.curve,
        adaptive_timeout=config.adaptive_timeout,
    )


def privacy_of(config: EdgeConfig):
    """The PrivacyProtection the edge options describe."""
    from edge_worker.privacy import PrivacyProtection

    return PrivacyProtection(config.encryption, config.wire_dtype, config.reduce_dims, config.reductions_dir)


def plan_split(config: EdgeConfig, source: ModelSource, client, prompt_tokens: int, mini=None):
    """Let the cost model choose: measured link and device, the per-layer profile, the weights.

    Returns the decision and the manager, which keeps watching the link and the device during
    the generation and moves the split when they change (``EdgeCloudManager.replan``)."""
    from edge_worker.device_monitor import DeviceMonitor
    from edge_worker.manager import EdgeCloudManager

    manager = EdgeCloudManager(
        model=source, cloud_client=client, energy_weight=config.energy_weight,
        latency_weight=config.latency_weight, memory_weight=config.memory_weight,
        privacy_protection=privacy_of(config),
        max_new_tokens=config.max_new_tokens, device_monitor=DeviceMonitor(), mini_llm=mini,
        dynamic=config.dynamic, min_split=config.min_split,
    )
    decision = manager.choose_split(prompt_tokens, config.max_new_tokens)
    log.info("planner: %s", decision.summary())
    return decision, manager


def run_edge(config: EdgeConfig, on_text: Callable[[str], None] | None = None,
             progress: Progress = _quiet) -> GenerationResult:
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    t0 = time.perf_counter()
    progress(f"preparing model {config.model}")
    source = resolve_model(config.model)
    config = apply_leakage_budget(config, source)
    split = resolve_split(config, source.n_layers)
    tokenizer = source.load_tokenizer()
    ids = encode_prompt(tokenizer, config.prompt, raw=config.raw_prompt)
    client = None if split == source.n_layers else make_client(config)
    decision = mover = None
    handler = mini_handler(config)
    if split is None:
        progress("measuring the link and pricing every split")
        decision, mover = plan_split(config, source, client, len(ids), handler)
        split = decision.k
        mover.prepare(len(ids), config.max_new_tokens)
    if split == source.n_layers and mover is None:
        handler = None
    head = split == source.n_layers or bool(handler and handler.needs_edge_head)
    progress(f"loading layers [0, {split}) of {source.n_layers}" + (" and the head" if head else ""))
    edge = mover.edge_segment(split) if mover is not None else ModelSegment.load(source, 0, split, head=head)
    log.info("edge segment ready: %s (%.1f s)", edge.describe(), time.perf_counter() - t0)
    backend = None
    if split < source.n_layers:
        from edge_worker.manager import cloud_backend

        if config.reduce_dims is not None:
            progress(f"finding or calibrating the {config.reduce_dims}-dim projection for split {split}")
        backend = cloud_backend(client, privacy_of(config), source, split, edge)
    if backend is not None and config.fallback_local:
        n, k = source.n_layers, split
        backend.fallback = lambda: LocalBackend(ModelSegment.load(source, k, n, embed=False))
    mini = handler.settings(source, edge, tokenizer) if handler and backend is not None else None
    generator = EdgeGenerator(edge, backend, tokenizer, eos_token_ids(source, tokenizer),
                              mode=mode_for(split, source.n_layers), mini=mini,
                              mover=mover if mover is not None and mover.dynamic else None)
    progress(f"generating up to {config.max_new_tokens} tokens from a {len(ids)}-token prompt")
    sampling = SamplingParams(config.temperature, config.top_p, config.seed)
    try:
        result = generator.generate(ids, config.max_new_tokens, sampling, on_text=on_text)
    finally:
        if client is not None:
            client.close()
    if decision is not None:
        result.decision = decision.to_dict()
        result.decisions = [d.to_dict() for d in mover.decisions]
    return result
