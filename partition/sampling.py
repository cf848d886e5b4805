"""Choosing the next token from logits: greedy, or seeded sampling shaped by transformers' logits
processors (repetition penalty, temperature, top-k, top-p, min-p).

Sampling is a pure function of (logits, parameters, step, seen tokens): the random draw for step
``s`` comes from a generator seeded with ``(seed, s)``. The same seed therefore gives the same text
whether the head runs on the edge (local mode) or on a cloud worker (hybrid mode), and a step
replayed after a failure draws the same token again.

The repetition penalty applies to the tokens *generated* so far, not to the prompt's: in hybrid
mode the worker that holds the head would otherwise need the prompt's token ids, which never leave
the device. The edge sends the distinct generated ids with each step (the worker chose them, so
they tell it nothing new); local mode penalises the same set, so both sample the same text.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from partition.sampling_params import SamplingParams

__all__ = ["SamplingParams", "choose_token", "greedy_token", "probabilities", "processed_logits"]


@functools.lru_cache(maxsize=64)
def _warpers(temperature: float, top_k: int, top_p: float, min_p: float) -> LogitsProcessorList:
    """transformers' warpers for a sampled draw, in the order its generate() applies them."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers


def _seen_ids(seen: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(seen, torch.Tensor):
        return seen.reshape(1, -1).long()
    return torch.tensor([list(seen)], dtype=torch.long)


def processed_logits(logits: torch.Tensor, params: SamplingParams, seen: Sequence[int] = ()) -> torch.Tensor:
    """One row of logits (V,) after the penalty on ``seen`` and, when sampling, the warpers
    (tokens they drop are -inf). Greedy without a penalty returns the logits unchanged."""
    # On the CPU whatever device computed them: the draw (a CPU generator) and the history ids are
    # there, and the same seed then picks the same token on every device.
    scores = logits.detach().float().cpu().reshape(1, -1)
    if params.uses_history and len(seen):
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(_seen_ids(seen), scores)
    if not params.greedy:
        scores = _warpers(params.temperature, params.top_k, params.top_p, params.min_p)(None, scores)  # the warpers read only the scores
    return scores[0]


def greedy_token(logits: torch.Tensor, params: SamplingParams, seen: Sequence[int] = ()) -> int:
    """The highest-scoring token of one row of logits (V,) after the penalty on ``seen``; the
    first of equal ones, as ``torch.argmax``. Through numpy: torch's argmax of one CPU row costs
    ten times as much (43 against 4 us for SmolLM2's 49152 logits), once per session per step."""
    return int(processed_logits(logits, params, seen).numpy().argmax())


def probabilities(logits: torch.Tensor, params: SamplingParams, seen: Sequence[int] = ()) -> torch.Tensor:
    """The distribution sampling draws from. logits: (V,); ``seen``: the generated tokens so far."""
    return torch.softmax(processed_logits(logits, params, seen), dim=-1)


def choose_token(logits: torch.Tensor, params: SamplingParams, step: int, seen: Sequence[int] = ()) -> int:
    """Next token for generation step ``step`` (0 = first generated token). logits: (V,);
    ``seen``: the tokens generated before it (only a repetition penalty reads them)."""
    if logits.dim() != 1:
        raise ValueError(f"choose_token takes one row of logits (V,), got {tuple(logits.shape)}")
    if params.greedy:
        return greedy_token(logits, params, seen)
    gen = torch.Generator().manual_seed((params.seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
    return int(torch.multinomial(probabilities(logits, params, seen), 1, generator=gen))
