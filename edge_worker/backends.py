"""What runs the layers after the edge's: the ``Backend`` protocol the generation loop drives,
the in-process ``LocalBackend`` (the reference a remote backend must match, and the local
fallback), and the figures one step reports (``StepStats``).

A remote backend over the broker is ``edge_worker.cloud_client.CloudSession``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from edge_worker.drafting import MiniSettings
from partition.sampling import SamplingParams
from partition.segment import ModelSegment
from partition.speculative import run_and_verify, run_and_verify_tree
from partition.tree import DraftTree

if TYPE_CHECKING:
    from edge_worker.generation import GenerationResult


@dataclass
class StepStats:
    """What one backend step cost, as seen from the edge."""

    cloud_compute_ms: float = 0.0
    worker_overhead_ms: float = 0.0  # time in the worker outside the forward pass (decrypt, decode)
    transport_ms: float = 0.0  # serialisation, encryption and time on the wire
    waiting_ms: float = 0.0  # queueing at the broker and worker
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trips: int = 0
    retries: int = 0
    worker_id: str = ""  # the worker that answered, for the trace
    fell_back: bool = False  # the remaining layers ran on the edge because the cloud was unavailable
    waited: bool = False  # a pipelined frame: the edge had to wait for its answer (it was not in yet)


@dataclass
class PipelinedFrame:
    """A frame sent while earlier ones are unanswered (pipelined drafting, see
    ``EdgeGenerator._pipeline_cycle``): ``hidden`` (1, T, H) holds positions ``pos ..``; ``first``,
    when set, is the drafter's guess of the token at ``pos`` that the frame is conditional on;
    ``draft``, the guessed tokens at the positions after it, which the worker verifies as a
    chain's (the frame's answer: the ones the main model kept, then its token after them)."""

    hidden: torch.Tensor
    step: int
    pos: int
    first: int | None
    seen: tuple[int, ...] = ()  # the generated tokens up to the frame's first position (a repetition penalty's)
    draft: tuple[int, ...] = ()
    handle: object = None  # the backend's request handle
    sent_at: float = 0.0
    bytes_sent: int = 0
    failed: Exception | None = None  # it could not be sent: collecting it raises FrameLost


class FrameLost(Exception):
    """A pipelined frame got no usable answer (timeout, lost worker, skipped): the edge gives up
    on everything in flight and resends it through the ordinary step path."""


class Backend(Protocol):
    """Runs layers ``[k, N)`` and the head for one session and returns the next tokens."""

    def start(self, sampling: SamplingParams) -> None: ...

    def step(self, hidden: torch.Tensor, step: int, draft: list[int] | tuple[int, ...] = (),
             seen: Sequence[int] = (), tree: DraftTree | None = None) -> tuple[list[int], StepStats]:
        """hidden: (1, T, H) boundary activations for T new positions, the last ``len(draft)`` of
        which hold drafted tokens; ``step`` is the generation index of the first token returned;
        ``seen``: the tokens generated up to the last position before the drafts (what a
        repetition penalty reads). With ``tree``, the last ``tree.rows`` positions are a token
        tree's rows (the pending token and the nodes; ``draft`` is unused) and the cache keeps
        the path the main model accepts.

        Returns the drafts the main model kept followed by the token after them (without drafts:
        one token); positions of rejected drafts are dropped from the cache.
        """
        ...

    def prime(self, hidden: torch.Tensor) -> None:
        """Make the backend hold ``hidden`` (1, P, H), the boundary activations of every position
        before the pending token, without producing a token (after the split moved)."""
        ...

    def close(self) -> None: ...


class PipelinedBackend(Backend, Protocol):
    """A backend that also takes frames without waiting for the earlier ones' answers."""

    pipelines: bool  # it implements the methods below (can_pipeline says whether it can right now)

    def can_pipeline(self) -> bool: ...

    def submit(self, hidden: torch.Tensor, step: int, pos: int, first: int | None,
               seen: Sequence[int] = (), draft: Sequence[int] = ()) -> PipelinedFrame: ...

    def ready(self, frame: PipelinedFrame) -> bool: ...

    def collect(self, frame: PipelinedFrame) -> tuple[list[int] | None, StepStats]:
        """The frame's answer: the drafts the main model kept and its token after them (None:
        the worker skipped the frame, its condition failed)."""
        ...

    def discard(self, frames: list[PipelinedFrame]) -> None: ...

    def resend(self, frame: PipelinedFrame) -> tuple[list[int], StepStats]: ...


class SplitMover(Protocol):
    """Moves the split during a generation (``EdgeCloudManager`` implements it)."""

    def replan(self, step: int, result: GenerationResult) -> int | None:
        """A new split to move to before generation step ``step``, or None to stay."""
        ...

    def edge_segment(self, k: int) -> ModelSegment: ...

    def backend_for(self, k: int) -> Backend | None: ...

    def mini_for(self, k: int, edge: ModelSegment) -> MiniSettings | None: ...


class LocalBackend:
    """The rest of the model in this process: the reference a remote backend must match."""

    def __init__(self, segment: ModelSegment, pipelined: bool = False) -> None:
        self.segment = segment
        self.pipelined = pipelined  # take pipelined frames (tests of the generation loop)
        self.cache = segment.new_cache()
        self.sampling = SamplingParams()

    def start(self, sampling: SamplingParams) -> None:
        self.cache = self.segment.new_cache()
        self.sampling = sampling

    def step(self, hidden: torch.Tensor, step: int, draft: list[int] | tuple[int, ...] = (),
             seen: Sequence[int] = (), tree: DraftTree | None = None) -> tuple[list[int], StepStats]:
        t0 = time.perf_counter()
        if tree is not None:
            path, token = run_and_verify_tree(self.segment, hidden, self.cache, self.sampling, step, tree, seen=seen)
            return [*tree.path_tokens(path), token], StepStats(cloud_compute_ms=(time.perf_counter() - t0) * 1e3)
        accepted, token = run_and_verify(self.segment, hidden, self.cache, self.sampling, step, draft, seen=seen)
        return [*draft[:accepted], token], StepStats(cloud_compute_ms=(time.perf_counter() - t0) * 1e3)

    def prime(self, hidden: torch.Tensor) -> None:
        self.segment(hidden, self.cache, logits="none")

    def close(self) -> None:
        self.cache = self.segment.new_cache()

    # Pipelined frames, for tests of the generation loop: an answer is never in before the edge
    # asks for it (so the edge fills its pipeline), and a frame runs only when collected, which
    # the loop does oldest first and never for a frame it discarded, like a worker's skip.
    @property
    def pipelines(self) -> bool:
        return self.pipelined

    def can_pipeline(self) -> bool:
        return self.pipelined

    def submit(self, hidden: torch.Tensor, step: int, pos: int, first: int | None,
               seen: Sequence[int] = (), draft: Sequence[int] = ()) -> PipelinedFrame:
        if pos != self.cache.length and first is None:
            raise ValueError(f"frame at {pos}, cache holds {self.cache.length}")
        return PipelinedFrame(hidden=hidden, step=step, pos=pos, first=first, seen=tuple(seen), draft=tuple(draft))

    def ready(self, frame: PipelinedFrame) -> bool:
        return frame.failed is not None

    def collect(self, frame: PipelinedFrame) -> tuple[list[int] | None, StepStats]:
        if frame.failed is not None:
            raise FrameLost(f"not sent: {frame.failed}")
        if frame.pos != self.cache.length:
            return None, StepStats()
        tokens, stats = self.step(frame.hidden, frame.step, frame.draft, seen=frame.seen)
        stats.round_trips, stats.waited = 1, True
        return tokens, stats

    def discard(self, frames: list[PipelinedFrame]) -> None:
        pass

    def resend(self, frame: PipelinedFrame) -> tuple[list[int], StepStats]:
        self.cache.crop(frame.pos)
        return self.step(frame.hidden, frame.step, frame.draft, seen=frame.seen)
