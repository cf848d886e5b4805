"""How long the edge waits for a step's reply before sending another copy: TCP's RTO, for steps.

A fixed request timeout makes every lost frame cost that whole timeout (seconds), although a
decode step takes tens of milliseconds. ``StepTimer`` keeps a smoothed mean and mean deviation of
measured step round trips (Jacobson/Karels, RFC 6298: alpha 1/8, beta 1/4, K = 4) and proposes
``mean + K * deviation``, never below a floor and never above the step's remaining budget. When
that passes without a reply the edge sends a copy of the step (a new request id, freshly sealed)
and keeps waiting for *either*; each further copy waits twice as long, so a worker that is slow
rather than unreachable is not flooded. The worker's crop-and-recompute makes a copy that
arrives after its original harmless (the step still affects the cache once).

Pure arithmetic, tested with plain numbers (tests/test_timeouts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

# Steps with more positions than this (the prefill, a replay after failover) take a time the
# decode samples say nothing about: they get the fixed request budget, and are not sampled. 16
# covers decode and multi-token verification steps.
ADAPTIVE_MAX_POSITIONS = 16
# Below this a copy would mostly duplicate a reply that is merely delayed by the scheduler: on a
# loaded 2-core machine, Python processes waking in turn add tens of milliseconds of jitter.
DEFAULT_MIN_TIMEOUT_S = 0.05
# Copies of one step in flight at most; with doubling waits the last one waits 2**5 = 32 timeouts.
MAX_COPIES = 6


@dataclass
class StepTimer:
    """Smoothed step round trip and deviation; the per-copy wait derived from them."""

    min_timeout_s: float = DEFAULT_MIN_TIMEOUT_S
    k: float = 4.0  # deviations above the mean before a reply counts as lost
    alpha: float = 1 / 8  # weight of a new sample in the mean
    beta: float = 1 / 4  # weight of a new sample's error in the deviation
    min_samples: int = 3  # until then the fixed timeout applies: one sample says little
    mean_s: float | None = None
    dev_s: float = 0.0
    samples: int = 0

    def observe(self, rtt_s: float) -> None:
        """Add one measured round trip of a step that was answered (any copy: replies name their request)."""
        if rtt_s < 0:
            return
        if self.mean_s is None:
            self.mean_s, self.dev_s = rtt_s, rtt_s / 2
        else:
            self.dev_s = (1 - self.beta) * self.dev_s + self.beta * abs(self.mean_s - rtt_s)
            self.mean_s = (1 - self.alpha) * self.mean_s + self.alpha * rtt_s
        self.samples += 1

    def timeout_s(self, ceiling_s: float) -> float | None:
        """The wait before the first copy, or None while too few samples exist (use the fixed budget)."""
        if self.mean_s is None or self.samples < self.min_samples:
            return None
        return min(ceiling_s, max(self.min_timeout_s, self.mean_s + self.k * self.dev_s))

    def copy_wait_s(self, copies_sent: int, ceiling_s: float) -> float | None:
        """How long to wait after the ``copies_sent``-th copy (1 = the original) before the next.

        Doubles with every copy (exponential backoff, as TCP does for retransmissions); None once
        no further copy should be sent (too few samples, or MAX_COPIES reached).
        """
        base = self.timeout_s(ceiling_s)
        if base is None or copies_sent >= MAX_COPIES:
            return None
        return min(ceiling_s, base * 2 ** (copies_sent - 1))
