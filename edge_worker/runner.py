"""Run one generation from an ``EdgeConfig``: what ``edgecloud edge`` does."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from edge_worker.config import EdgeConfig
from edge_worker.generation import Backend, EdgeGenerator, GenerationResult
from partition.errors import InvalidSplitError
from partition.models import ModelSource, resolve_model
from partition.sampling import SamplingParams
from partition.segment import ModelSegment
from partition.tokens import encode_prompt, eos_token_ids

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def resolve_split(config: EdgeConfig, n_layers: int) -> int:
    if config.force_local:
        return n_layers
    if config.force_cloud:
        return 0
    if config.split is None:
        raise InvalidSplitError("hybrid mode needs --split K (or --force-local / --force-cloud)")
    if not 0 <= config.split <= n_layers:
        raise InvalidSplitError(f"split {config.split} is outside [0, {n_layers}] for this model")
    return config.split


def make_backend(config: EdgeConfig, source: ModelSource, split: int) -> Backend | None:
    """The remote side for hybrid and cloud modes; None when the edge runs every layer."""
    if split == source.n_layers:
        return None
    from broker.linkproxy import LinkConfig  # imports zmq only when needed
    from edge_worker.cloud_client import CloudClient

    link = None
    if config.cloud_latency_s or config.bandwidth_mbps:
        link = LinkConfig(rtt_ms=config.cloud_latency_s * 1e3, uplink_mbps=config.bandwidth_mbps,
                          downlink_mbps=config.bandwidth_mbps)
    client = CloudClient(
        api_key=config.api_key, broker=config.broker, keys_dir=config.keys_dir, encryption=config.encryption,
        wire_dtype=config.wire_dtype, request_timeout_s=config.request_timeout_s, link=link,
    )
    return client.session(source.model_id, split, source.hidden_size)


def run_edge(config: EdgeConfig, on_text: Callable[[str], None] | None = None,
             progress: Progress = _quiet) -> GenerationResult:
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    t0 = time.perf_counter()
    progress(f"preparing model {config.model}")
    source = resolve_model(config.model)
    split = resolve_split(config, source.n_layers)
    tokenizer = source.load_tokenizer()
    progress(f"loading layers [0, {split}) of {source.n_layers}" + (" and the head" if split == source.n_layers else ""))
    edge = ModelSegment.load(source, 0, split)
    log.info("edge segment ready: %s (%.1f s)", edge.describe(), time.perf_counter() - t0)
    backend = make_backend(config, source, split)
    generator = EdgeGenerator(edge, backend, tokenizer, eos_token_ids(source, tokenizer), mode=config.mode)
    ids = encode_prompt(tokenizer, config.prompt, raw=config.raw_prompt)
    progress(f"generating up to {config.max_new_tokens} tokens from a {len(ids)}-token prompt")
    sampling = SamplingParams(config.temperature, config.top_p, config.seed)
    try:
        return generator.generate(ids, config.max_new_tokens, sampling, on_text=on_text)
    finally:
        client = getattr(backend, "client", None)
        if client is not None:
            client.close()
