"""Choosing the next token from logits: greedy, or seeded temperature / top-k / top-p sampling.

Sampling is a pure function of (logits, parameters, step): the random draw for step ``s`` comes
from a generator seeded with ``(seed, s)``. The same seed therefore gives the same text whether
the head runs on the edge (local mode) or on a cloud worker (hybrid mode), and a step replayed
after a failure draws the same token again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept; 1.0 keeps every token
    seed: int = 0
    top_k: int = 0  # only the k most likely tokens; 0 keeps every token

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_wire(self) -> dict[str, float | int]:
        wire: dict[str, float | int] = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}
        if self.top_k:  # absent means 0: an edge that predates top_k reads the same
            wire["top_k"] = self.top_k
        return wire

    @classmethod
    def from_wire(cls, d: dict) -> SamplingParams:
        return cls(float(d["temperature"]), float(d["top_p"]), int(d["seed"]), int(d.get("top_k", 0)))


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from, after temperature, top-k and top-p. logits: (V,)."""
    logits = logits.float()
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th are kept
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs /= probs.sum()
    return probs


def choose_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """Next token for generation step ``step`` (0 = first generated token). logits: (V,)."""
    if logits.dim() != 1:
        raise ValueError(f"choose_token takes one row of logits (V,), got {tuple(logits.shape)}")
    if params.greedy:
        return int(torch.argmax(logits))
    gen = torch.Generator().manual_seed((params.seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
    return int(torch.multinomial(probabilities(logits, params), 1, generator=gen))
