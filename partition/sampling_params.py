"""What a sampled draw may choose, as plain data: no torch here, so the CLI and the server check
a request's options before anything heavy is imported. ``partition.sampling`` draws with them."""

from __future__ import annotations

from dataclasses import dataclass

# Upper bound on drafts per verification (partition/speculative.py): the wire format and the
# worker both enforce it, and the edge's options are checked against it.
MAX_DRAFT_TOKENS = 32
# Guesses per pipelined frame: a frame of at most this many positions is packed with other
# sessions' steps in a worker's pass (PACK_MAX_ROWS).
MAX_GROUP = 16
MAX_TREE_NODES = 63  # with the root, a token tree's frame is one prefill chunk (PREFILL_CHUNK) at most


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept; 1.0 keeps every token
    seed: int = 0
    top_k: int = 0  # only the k most likely tokens; 0 keeps every token
    min_p: float = 0.0  # drop tokens below min_p times the top token's probability; 0 keeps every token
    repetition_penalty: float = 1.0  # >1 makes generated tokens less likely again (CTRL's rule); 1: off

    def __post_init__(self) -> None:
        if not -(2**63) <= self.seed < 2**64:  # what the wire's integers carry
            raise ValueError(f"seed must be a 64-bit integer (-2**63 to 2**64 - 1), got {self.seed}")
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be a positive number (1: off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_history(self) -> bool:
        """Whether a token's choice depends on the tokens generated before it."""
        return self.repetition_penalty != 1.0

    def to_wire(self) -> dict[str, float | int]:
        wire: dict[str, float | int] = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}
        # Absent means off: an edge that predates an option reads the same to a newer worker.
        if self.top_k:
            wire["top_k"] = self.top_k
        if self.min_p:
            wire["min_p"] = self.min_p
        if self.repetition_penalty != 1.0:
            wire["repetition_penalty"] = self.repetition_penalty
        return wire

    @classmethod
    def from_wire(cls, d: dict) -> SamplingParams:
        return cls(float(d["temperature"]), float(d["top_p"]), int(d["seed"]), int(d.get("top_k", 0)),
                   float(d.get("min_p", 0.0)), float(d.get("repetition_penalty", 1.0)))
