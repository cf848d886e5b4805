"""The edge's generation loop, shared by every mode.

The edge always runs its own segment (embedding plus layers ``[0, k)``); what happens to the
boundary activations is the job of a *backend*:

* ``None``: the edge segment holds every layer and the head (``local`` mode);
* ``LocalBackend`` (``backends.py``): the rest of the model in this process (used by tests and benchmarks to check
  that splitting changes nothing);
* a remote backend over the broker (``hybrid``, or ``cloud`` when ``k == 0``).

Keeping one loop for all of them is what makes "hybrid output equals local output" a property of
the backends alone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from edge_worker.backends import Backend, FrameLost, PipelinedBackend, PipelinedFrame, SplitMover, StepStats
from edge_worker.drafting import DraftController, MiniSettings, TreeShaper
from partition.kv_cache import SegmentKVCache
from partition.prefix_cache import PrefixCache, row_digests
from partition.sampling import SamplingParams, choose_token
from partition.segment import ModelSegment, SegmentOutput
from partition.tree import DraftTree

log = logging.getLogger(__name__)


def mode_for(split: int, n_layers: int) -> str:
    """The JSON contract's mode name for a split."""
    return "local" if split == n_layers else ("cloud" if split == 0 else "hybrid")


@dataclass
class Timings:
    edge_compute_ms: float = 0.0
    cloud_compute_ms: float = 0.0
    transport_ms: float = 0.0
    waiting_ms: float = 0.0


@dataclass
class GenerationResult:
    """The JSON contract every mode prints with ``--json``."""

    text: str
    token_ids: list[int]  # generated tokens only
    mode: str  # "local", "cloud" or "hybrid"
    split: int
    n_layers: int
    model: str
    prompt_tokens: int  # what the model read (after --truncate-prompt dropped any)
    cloud_round_trips: int = 0  # frames sent to the cloud (pipelined frames included)
    cloud_waits: int = 0  # times the edge had to wait for a cloud answer that was not in yet
    bytes_sent: int = 0
    bytes_received: int = 0
    tokens_from_mini: int = 0  # drafted tokens emitted (kept by the main model, or trusted)
    tokens_drafted: int = 0
    acceptance_rate: float | None = None  # tokens_from_mini / tokens_drafted
    mini: str | None = None  # the drafter: self, lookup or a model name
    mini_mode: str | None = None  # verify or trust
    retries: int = 0
    ttft_ms: float = 0.0
    ms_per_token: float = 0.0  # mean time per generated token after the first
    total_ms: float = 0.0
    stop_reason: str = "length"  # "eos", "stop" (a stop string; the text ends before it) or "length"
    timings: Timings = field(default_factory=Timings)
    splits_used: list[int] = field(default_factory=list)
    workers_used: list[str] = field(default_factory=list)  # in the order they first served
    decision: dict | None = None  # how the split was chosen, when the planner chose it
    decisions: list[dict] = field(default_factory=list)  # that and every re-plan that moved it
    prompt_tokens_dropped: int = 0  # the prompt's oldest tokens cut so the generation fits the context
    fallback_at_step: int | None = None  # the step from which the edge ran every layer itself
    # Split moves during the generation: {"step", "from", "to", "rebuild_ms", "reason"}.
    moves: list[dict] = field(default_factory=list)
    # One entry per round (one edge pass and at most one backend step; several tokens when
    # drafts were kept): where its time and bytes went.
    trace: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("ttft_ms", "ms_per_token", "total_ms"):
            d[key] = round(d[key], 3)
        d["timings"] = {k: round(v, 3) for k, v in d["timings"].items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


class GenerationCancelled(Exception):
    """The caller stopped wanting the generation (a closed stream, a client that went away); it
    ended early and its cloud session was closed."""


class TextStream:
    """Turns a growing list of token ids into text increments, holding back split characters.

    With ``stop`` strings it also holds back a tail that could still become one, and once one
    appears it emits only the text before it and reports the stop (``update`` returns True);
    ``stopped_at`` is then where the final text ends.
    """

    def __init__(self, tokenizer, sink: Callable[[str], None] | None = None, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.sink = sink
        self.stop = tuple(s for s in stop if s)
        self.emitted = ""
        self.stopped_at: int | None = None

    def update(self, token_ids: list[int], final: bool = False) -> bool:
        if self.stopped_at is not None:
            return True
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # an incomplete UTF-8 sequence: wait for the next token
            return False
        end = len(text)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped_at = end = min(hits)
        elif not final:
            end -= _held_for_stop(text, self.stop)
        if text.startswith(self.emitted) and end > len(self.emitted):
            if self.sink is not None:
                self.sink(text[len(self.emitted):end])
            self.emitted = text[:end]
        return self.stopped_at is not None


def _held_for_stop(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that begins some stop string (it may yet become one)."""
    held = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if s.startswith(text[-n:]):
                held = n
                break
    return held


class EdgeGenerator:
    """Generates text with the edge segment and a backend for the remaining layers.

    With ``mini`` (a drafter, see ``edge_worker/drafting.py``) each round trip carries the
    pending token plus the tokens the drafter guessed: in ``verify`` mode the backend keeps the
    longest prefix the main model agrees with (the output is the main model's), in ``trust``
    mode confident drafts are emitted at once and their activations ride along with the next
    frame so the cloud's cache stays complete.
    """

    def __init__(
        self,
        edge: ModelSegment,
        backend: Backend | None,
        tokenizer,
        eos_token_ids: set[int],
        mode: str,
        mini: MiniSettings | None = None,
        mover: SplitMover | None = None,
        prefixes: PrefixCache | None = None,
    ) -> None:
        if backend is None and not edge.spec.head:
            raise ValueError("an edge segment without the head needs a backend for the remaining layers")
        self.edge = edge
        self.backend = backend
        # Prompts the edge's layers computed before (the engine's, shared by its generations):
        # only where a position's numbers cannot depend on the frame it came in.
        self.prefixes = prefixes if prefixes is not None and edge.whole_frames_packed() else None
        self._t_start = time.perf_counter()  # the current generation's start (generate sets it)
        # The boundary activations of the positions the edge cache holds, in runs as computed
        # (_observed): what the cloud got of them, kept with the generation for the next turn.
        # None: a position went unseen, so nothing is kept.
        self._boundary: list[torch.Tensor] | None = []
        self._boundary_len = 0
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.mode = mode
        self.mini = mini if backend is not None else None  # local mode makes no round trips to save
        self.mover = mover

    def generate(
        self,
        input_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        on_text: Callable[[str], None] | None = None,
        stop: tuple[str, ...] = (),
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Up to ``max_new_tokens`` tokens after ``input_ids``. ``on_text`` receives the text as it
        is produced; the generation ends at an end-of-sequence token or at the first of the ``stop``
        strings (the text ends before it); setting ``cancel`` ends it at the next step with
        ``GenerationCancelled``."""
        if not input_ids:
            raise ValueError("the prompt encodes to no tokens")
        if max_new_tokens < 1:
            raise ValueError(f"tokens must be at least 1, got {max_new_tokens}")
        sampling = sampling or SamplingParams()
        stream = TextStream(self.tokenizer, on_text, stop) if on_text or stop else None
        stopped = False  # a stop string appeared
        result = GenerationResult(
            text="", token_ids=[], mode=self.mode, split=self.edge.spec.hi, n_layers=self.edge.n_layers,
            model=self.edge.source.name, prompt_tokens=len(input_ids),
        )
        timings = result.timings
        result.splits_used = [self.edge.spec.hi]
        mini = self.mini
        controller = None
        shaper: TreeShaper | None = None  # the shape of token trees, measured over this generation
        if mini is not None:
            result.mini, result.mini_mode = mini.drafter.name, mini.mode
            controller = _controller(mini)
            mini.drafter.reset(list(input_ids))
        committed = list(input_ids)  # prompt and generated tokens; the last one is pending
        generated = result.token_ids
        cache = self.edge.new_cache()
        self._boundary, self._boundary_len = [], 0
        if self.backend is not None:
            self.backend.start(sampling)
        t_start = self._t_start = time.perf_counter()
        t_first = t_start

        def commit(token: int) -> None:
            """A pipelined frame's answer: one more token of the output."""
            nonlocal t_first, stopped
            generated.append(token)
            committed.append(token)
            if len(generated) == 1:
                t_first = time.perf_counter()
                result.ttft_ms = (t_first - t_start) * 1e3
            if stream and token not in self.eos_token_ids:
                stopped = stream.update(generated) or stopped
        def halted() -> bool:
            """A stop string appeared or the caller cancelled (read within a pipelined cycle)."""
            return stopped or (cancel is not None and cancel.is_set())

        x = torch.tensor([input_ids], dtype=torch.long)  # (1, T): positions the edge has not run
        try:
            while len(generated) < max_new_tokens and not stopped:
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled(f"cancelled after {len(generated)} tokens")
                step = len(generated)
                if self.mover is not None and step:
                    new_k = self.mover.replan(step, result)
                    if new_k is not None and new_k != self.edge.spec.hi:
                        cache = self._move_split(new_k, committed, sampling, result)
                        mini = self.mini
                        if mini is not None:
                            if controller is None:
                                controller = _controller(mini)
                pipelined = mini is not None and mini.pipelined and getattr(self.backend, "pipelines", False)
                plain_cycle = False  # a pipelined generation's cycle without guesses: an ordinary step
                if pipelined and controller is not None and self.backend.can_pipeline():  # type: ignore[union-attr]
                    controller.setup_ms = _setup_ms(mini.drafter)
                    controller.tokens_left = max_new_tokens - step
                    # Sampling: a frame per guess, so each token is the main model's own draw for its
                    # step (a chain's verification draws otherwise: the same distribution, not the
                    # same text as plain sampling with that seed).
                    controller.group = mini.group if sampling.greedy else 1
                    depth = controller.pipeline_depth() if mini.adaptive else mini.max_draft
                    # No guesses this cycle: the ordinary step (a pipelined frame's path costs ~3 ms
                    # more per token at loopback), measured for the controller as a plain cycle.
                    plain_cycle = depth == 0
                if pipelined and controller is not None and not plain_cycle and self.backend.can_pipeline():  # type: ignore[union-attr]
                    last = self._pipeline_cycle(mini, controller, x, cache, committed, max_new_tokens, result,
                                                commit, depth, halted, controller.group)
                    if last in self.eos_token_ids:
                        result.stop_reason = "eos"
                        break
                    x = torch.tensor([[last]], dtype=torch.long)
                    continue
                t0 = time.perf_counter()
                out = self._run_edge(x, cache, logits="last" if self.backend is None else "none")
                base_ms = (time.perf_counter() - t0) * 1e3
                drafts: list[int] = []
                parts = [out.hidden]
                draft_ms = 0.0
                if (mini is not None and controller is not None and mini.trees and step
                        and max_new_tokens - step > 1 and x.shape[1] == 1):
                    shaper = shaper or TreeShaper()
                    kept = self._tree_round(mini, controller, shaper, out, cache, committed, step, max_new_tokens,
                                            sampling, result, base_ms)
                    if kept[-1] in self.eos_token_ids:
                        result.stop_reason = "eos"
                        break
                    if stream:
                        stopped = stream.update(generated)
                    x = torch.tensor([[kept[-1]]], dtype=torch.long)
                    continue
                # Pipelined, a round the backend cannot pipeline (the opener, the local fallback) is plain.
                if mini is not None and controller is not None and not pipelined:
                    budget = max_new_tokens - step - 1
                    adapt = mini.adaptive and mini.mode == "verify"
                    n_max = min(budget, controller.best_length() if adapt else mini.max_draft)
                    if n_max > 0:
                        _prepare(mini.drafter)
                        t1 = time.perf_counter()
                        drafts = self._draft(mini, committed, parts, cache, n_max)
                        draft_ms = (time.perf_counter() - t1) * 1e3
                edge_ms = base_ms + draft_ms
                timings.edge_compute_ms += edge_ms
                accepted = 0
                if self.backend is None:
                    tokens = [choose_token(out.logits[0, -1], sampling, step, generated)]
                    stats = StepStats()
                else:
                    hidden = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (1, T, H)
                    if mini is not None and mini.mode == "trust":
                        tail, stats = self.backend.step(hidden, step + len(drafts), seen=[*generated, *drafts])
                        tokens, accepted = [*drafts, *tail], len(drafts)
                    else:
                        tokens, stats = self.backend.step(hidden, step, drafts, seen=generated)
                        accepted = len(tokens) - 1
                        if accepted < len(drafts):
                            cache.crop(cache.length - (len(drafts) - accepted))
                    _add_stats(result, stats)
                    if stats.fell_back and result.fallback_at_step is None:
                        result.fallback_at_step = step
                    if controller is not None and mini is not None and mini.mode == "verify" and not pipelined:
                        controller.record(len(drafts), accepted, base_ms, draft_ms,
                                          stats.transport_ms + stats.waiting_ms + stats.worker_overhead_ms,
                                          stats.cloud_compute_ms)
                kept = self._keep(result, tokens, len(drafts), accepted, stats, step, max_new_tokens,
                                  x.shape[1] + len(drafts), edge_ms)
                generated.extend(kept)
                committed.extend(kept)
                if plain_cycle and controller is not None:
                    if x.shape[1] == 1:
                        controller.record_edge(base_ms=base_ms)
                    measured = stats.round_trips and not stats.retries
                    controller.record_reply(stats.transport_ms + stats.waiting_ms + stats.worker_overhead_ms
                                            if measured else None, stats.cloud_compute_ms)
                    controller.record_cycle(0)
                    controller.record_tokens(False, (time.perf_counter() - t0) * 1e3 if x.shape[1] == 1 else None,
                                             len(kept))
                    if controller.worth_preparing():
                        _build_soon(mini.drafter)
                if step == 0:
                    t_first = time.perf_counter()
                    result.ttft_ms = (t_first - t_start) * 1e3
                if kept[-1] in self.eos_token_ids:
                    result.stop_reason = "eos"
                    break
                if stream:
                    stopped = stream.update(generated)
                x = torch.tensor([[kept[-1]]], dtype=torch.long)
        finally:
            if self.backend is not None:
                self.backend.close()
        if self.prefixes is not None and 1 < cache.length <= len(committed):
            self._keep_conversation(committed[:cache.length], cache)
        if stream:  # what was held back for a next token that never came (the final text has it too)
            stream.update(generated, final=True)
        t_end = time.perf_counter()
        result.total_ms = (t_end - t_start) * 1e3
        if len(generated) > 1:
            result.ms_per_token = (t_end - t_first) * 1e3 / (len(generated) - 1)
        if result.tokens_drafted:
            result.acceptance_rate = round(result.tokens_from_mini / result.tokens_drafted, 4)
        result.text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if stream is not None and stream.stopped_at is not None:
            result.text = result.text[:stream.stopped_at]
            result.stop_reason = "stop"
        return result

    def _move_split(self, k: int, committed: list[int], sampling: SamplingParams,
                    result: GenerationResult) -> SegmentKVCache:
        """Continue with layers ``[0, k)`` here: rebuild the edge cache for them from the committed
        tokens, and give a backend for ``[k, N)`` the boundary activations of the same positions
        (the side that gains layers rebuilds their cache; the output does not change)."""
        assert self.mover is not None
        t0 = time.perf_counter()
        old_k = self.edge.spec.hi
        edge = self.mover.edge_segment(k)
        cache = edge.new_cache()
        prefix = torch.tensor([committed[:-1]], dtype=torch.long)  # all but the pending token
        out = edge(prefix, cache, logits="none")
        backend = self.mover.backend_for(k)
        if self.backend is not None:
            self.backend.close()
        if backend is not None:
            backend.start(sampling)
            backend.prime(out.hidden)
        self.edge, self.backend = edge, backend
        self.mini = self.mover.mini_for(k, edge) if backend is not None else None
        if self.mini is not None:
            self.mini.drafter.reset(list(committed))
            self._observed(out.hidden, 0)
        rebuild_ms = (time.perf_counter() - t0) * 1e3
        result.timings.edge_compute_ms += rebuild_ms
        result.splits_used.append(k)
        result.moves.append({"step": len(result.token_ids), "from": old_k, "to": k,
                             "rebuild_ms": round(rebuild_ms, 3), "positions": prefix.shape[1]})
        log.info("moved the split from %d to %d at step %d (%d positions rebuilt in %.0f ms)",
                 old_k, k, len(result.token_ids), prefix.shape[1], rebuild_ms)
        return cache

    def _keep(self, result: GenerationResult, got: list[int], drafted: int, accepted: int, stats: StepStats,
              step: int, max_new_tokens: int, positions: int, edge_ms: float, **trace: Any) -> list[int]:
        """The tokens a cycle keeps of those it got (up to an end-of-sequence token or the token
        budget), counted in ``result`` and traced with ``trace``'s extra fields."""
        kept = []
        for token in got:
            kept.append(token)
            if token in self.eos_token_ids or step + len(kept) >= max_new_tokens:
                break
        result.tokens_drafted += drafted
        result.tokens_from_mini += min(accepted, len(kept))
        result.cloud_waits += stats.round_trips
        result.trace.append({
            "token": kept[-1], "tokens": kept, "drafted": drafted, "accepted": accepted, "positions": positions,
            "edge_ms": round(edge_ms, 3), **_trace_figures(stats), "at_ms": self._since_start(),
            "round_trips": stats.round_trips, **trace,
        })
        return kept

    def _since_start(self) -> float:
        """Milliseconds since the generation began (a trace row's ``at_ms``: when its tokens came)."""
        return round((time.perf_counter() - self._t_start) * 1e3, 3)

    def _pipeline_cycle(self, mini: MiniSettings, controller: DraftController, x: torch.Tensor,
                        cache: SegmentKVCache, committed: list[int], max_new_tokens: int,
                        result: GenerationResult, commit: Callable[[int], None], depth: int,
                        halted: Callable[[], bool] = lambda: False, group_max: int = 1) -> int:
        """Pipelined drafting: the round trip is paid per rejected guess, not per token.

        The edge runs its layers on the pending tokens ``x`` and sends them; then, instead of
        waiting, it guesses the main model's next token (the drafter), runs its layers on the
        guess, guesses the one after, and so on while the controller's depth allows and the oldest
        answer is not in. What it guessed in that time goes out as one frame (at most
        ``group_max`` guesses), *conditional* on its first guess and carrying the rest as a
        chain's drafts to verify: one pass of the worker's layers for several positions, which
        costs about what one position costs. Answers come back in order; each commits the drafts
        the main model kept and its token after them. While that token equals the guess the next
        frame was sent with, that frame is valid (the worker ran it); at the first difference the
        worker skips every later frame (its condition fails), and so does the edge: it crops its
        cache to the committed positions and returns. Output is the main model's, token for token
        (a frame's rows compute what one-token steps compute: ``partition/batching.py``).

        A cycle whose guesses all hit could last the whole generation: ``halted`` (a stop string
        appeared, the caller cancelled) ends it at the next answer, and the loop above acts on it.

        Returns the last committed token (the next pending one). A frame that gets no usable
        answer (timeout, lost worker, error) ends the pipeline: the edge forgets what is in flight
        and resends that frame through the backend's ordinary step, with its retries, failover,
        replay and local fallback.
        """
        backend: PipelinedBackend = self.backend  # type: ignore[assignment]
        timings = result.timings
        _prepare(mini.drafter)
        controller.setup_ms = 0.0  # paid
        t0 = last_commit = time.perf_counter()
        out = self._run_edge(x, cache)
        base_ms = (time.perf_counter() - t0) * 1e3
        timings.edge_compute_ms += base_ms
        if x.shape[1] == 1:
            controller.record_edge(base_ms=base_ms)
        step = len(result.token_ids)
        generated = result.token_ids
        inflight: deque[PipelinedFrame] = deque([backend.submit(out.hidden, step, cache.length - x.shape[1], None,
                                                                seen=generated)])
        result.cloud_round_trips += 1
        h = out.hidden[0, -1]
        next_step = step + 1  # the generation index of the token after the newest guess
        group: list[int] = []  # guesses whose positions the edge ran but has not sent yet
        rows: list[torch.Tensor] = []  # their boundary activations
        drafting = depth > 0
        drafted = 0

        def guessed() -> list[int]:
            """The guesses not yet verified, in order: in flight and not yet sent. (The oldest
            frame's first guess is the token its predecessor's answer committed.)"""
            frames = list(inflight)
            return [*(frames[0].draft if frames else ()),
                    *(t for f in frames[1:] for t in (f.first, *f.draft)), *group]  # type: ignore[misc]

        def send_group() -> None:
            if not group:
                return
            before = guessed()[:-len(group)]
            frame = backend.submit(torch.cat(rows, dim=1) if len(rows) > 1 else rows[0], next_step - len(group),
                                   cache.length - len(group), group[0], seen=[*generated, *before, group[0]],
                                   draft=group[1:])
            inflight.append(frame)
            result.cloud_round_trips += 1
            group.clear()
            rows.clear()

        try:
            while True:
                while (drafting and len(guessed()) < depth and next_step < max_new_tokens
                       and not backend.ready(inflight[0])):
                    if mini.adaptive:  # the choice is taken again before every guess
                        depth = controller.pipeline_depth()
                        if len(guessed()) >= depth:
                            drafting = depth > 0
                            break
                    t1 = time.perf_counter()
                    guess = mini.drafter.guess(committed + guessed(), h)
                    if guess is None or guess[1] < mini.threshold:
                        drafting = False
                        break
                    token = guess[0]
                    out = self._run_edge(torch.tensor([[token]], dtype=torch.long), cache)
                    h = out.hidden[0, -1]
                    group.append(token)
                    rows.append(out.hidden)
                    next_step += 1
                    if len(group) >= group_max:
                        send_group()
                        if inflight[-1].failed is not None:
                            drafting = False  # the cloud is out of reach: resolve what is in flight first
                    draft_ms = (time.perf_counter() - t1) * 1e3
                    timings.edge_compute_ms += draft_ms
                    controller.record_edge(draft_ms=draft_ms)
                    result.tokens_drafted += 1
                    drafted += 1
                    if token in self.eos_token_ids:
                        drafting = False
                send_group()  # what was guessed goes out before the edge reads (or waits for) an answer
                frame = inflight.popleft()
                try:
                    tokens, stats = backend.collect(frame)
                    if tokens is None:
                        raise FrameLost(f"the worker skipped pipelined step {frame.step}, which the edge "
                                        "expected it to run")
                except FrameLost as exc:
                    log.info("pipelined step %d: %s; resending it alone", frame.step, exc)
                    backend.discard(list(inflight))
                    inflight.clear()
                    cache.crop(frame.pos + frame.hidden.shape[1])
                    tokens, stats = backend.resend(frame)
                    drafting = False
                    stats.retries += 1
                    stats.waited = False
                else:
                    stats.round_trips = 0  # counted when the frame was sent
                _add_stats(result, stats)
                if stats.fell_back and result.fallback_at_step is None:
                    result.fallback_at_step = frame.step
                result.cloud_waits += 1 if stats.waited or stats.retries else 0
                if stats.waited and not stats.retries:
                    controller.record_reply(stats.transport_ms + stats.waiting_ms + stats.worker_overhead_ms,
                                            stats.cloud_compute_ms)
                elif not stats.retries:
                    controller.record_reply(None, stats.cloud_compute_ms)
                accepted = len(tokens) - 1  # of the frame's drafts (its first guess was checked before)
                for _ in range(accepted):
                    controller.record_guess(True)
                if accepted < len(frame.draft):
                    controller.record_guess(False)
                token = tokens[-1]
                condition = inflight[0].first if inflight else None  # the guess the next frame was sent with
                hit = accepted == len(frame.draft) and condition is not None and condition == token
                if accepted == len(frame.draft) and condition is not None:
                    controller.record_guess(hit)
                kept = 0
                for t in tokens:
                    commit(t)
                    kept += 1
                    if t in self.eos_token_ids or len(result.token_ids) >= max_new_tokens:
                        break
                token = tokens[kept - 1]
                now = time.perf_counter()
                controller.record_tokens(drafted > 0, (now - last_commit) * 1e3, tokens=kept)
                last_commit = now
                result.trace.append({
                    "token": token, "tokens": tokens[:kept], "drafted": len(frame.draft) + int(frame.first is not None),
                    "accepted": accepted + int(frame.first is not None), "positions": frame.hidden.shape[1],
                    "edge_ms": 0.0, **_trace_figures(stats), "at_ms": self._since_start(),
                    # 1: a frame whose round trip was measured (the edge was waiting when its answer
                    # came); the answers it found already in have no arrival time.
                    "round_trips": int(stats.waited), "in_flight": len(inflight), "depth": depth,
                })
                result.tokens_from_mini += min(accepted, kept) + int(hit and kept == len(tokens))
                if (token in self.eos_token_ids or len(result.token_ids) >= max_new_tokens or not hit
                        or kept < len(tokens) or self.backend is not backend or not backend.can_pipeline()
                        or halted()):
                    # The frame's positions up to the last committed token (which is pending).
                    cache.crop(frame.pos + frame.hidden.shape[1] - len(frame.draft) + kept - 1)
                    return token
        finally:
            if inflight:
                backend.discard(list(inflight))
            controller.record_cycle(drafted)

    def _tree_round(self, mini: MiniSettings, controller: DraftController, shaper: TreeShaper, out,
                    cache: SegmentKVCache, committed: list[int], step: int, max_new_tokens: int,
                    sampling: SamplingParams, result: GenerationResult, base_ms: float) -> list[int]:
        """One round trip with a token tree: the drafter's chain of best guesses, and beside each
        of them its next likeliest tokens as leaves, each node taken while the shaper's measured
        acceptance says it pays for its cost at this round trip (``TreeShaper``; at most
        ``tree_nodes`` nodes, a chain of at most ``max_draft``). The edge drafts the chain one
        position at a time (the int8 copy needs each position's exact activations), then runs its
        layers on the pending token and the whole tree in one pass with the tree's mask; the
        backend verifies it and both keep the accepted path. Returns the committed tokens (the path
        and the next). Not adaptive (``--mini-fixed``): every node the budget allows."""
        drafter = mini.drafter
        pending_pos = cache.length - 1  # the pending token's position; out holds its activation
        budget = min(mini.tree_nodes, max_new_tokens - step - 1)
        # The controller says whether drafting pays at all (0: a plain step), the shaper how much.
        depth = min(mini.max_draft if not mini.adaptive or controller.best_length() else 0, budget)
        if depth:
            _prepare(drafter)
        t1 = time.perf_counter()
        shaper.start((controller.base_ms or 0.0) + (controller.round_trip_ms or 0.0) + (controller.cloud_one_ms or 0.0))
        leaf_ms = (shaper.edge_row_ms or 0.0) + (controller.cloud_per_draft_ms or 0.0)
        tokens: list[int] = []
        parents: list[int] = []
        ranks: list[int] = []
        probs: list[float] = []
        chain_parent = -1
        chain: set[int] = set()  # the nodes of the chain of best guesses (the rest are leaves)
        h = out.hidden[0, -1]
        t_step = None
        for d in range(depth):
            room = budget - len(tokens)
            if room <= 0:
                break
            ranked = drafter.candidates(h, min(4, room))
            if t_step is not None:
                shaper.record_costs(step_ms=(time.perf_counter() - t_step) * 1e3)
            if not ranked or ranked[0][1] < mini.threshold:
                break
            best, best_p = ranked[0]
            last = best in self.eos_token_ids or d == depth - 1
            # --mini-fixed (not adaptive): every node the budget allows, a fixed shape. The best
            # guess and the others are siblings: each joins on its own value; the chain goes on
            # only below the best guess.
            took = not mini.adaptive or shaper.take_chain(best_p, leaf_ms + (0.0 if last else shaper.step_ms or 0.0))
            parent = chain_parent
            if took:
                tokens.append(best)
                parents.append(parent)
                ranks.append(0)
                probs.append(best_p)
                chain_parent = len(tokens) - 1
                chain.add(chain_parent)
            for rank, (token, p) in enumerate(ranked[1:], start=1):
                if len(tokens) < budget and (not mini.adaptive or shaper.take_leaf(rank, p, leaf_ms)):
                    tokens.append(token)
                    parents.append(parent)
                    ranks.append(rank)
                    probs.append(p)
            if last or not took:
                break
            shaper.descend(best_p)
            t_step = time.perf_counter()
            h = self._run_edge(torch.tensor([[best]], dtype=torch.long), cache).hidden[0, -1]
        draft_ms = (time.perf_counter() - t1) * 1e3
        if not tokens:
            hidden, tree = out.hidden, None
        else:
            # Sibling leaves must come after their chain sibling's children in no order: a node's
            # parent only has to be earlier, which the construction keeps.
            tree = DraftTree(tuple(tokens), tuple(parents))
            cache.crop(pending_pos)
            t2 = time.perf_counter()
            hidden = self.edge(torch.tensor([[committed[-1], *tokens]], dtype=torch.long), cache, logits="none",
                               tree=tree).hidden
            pass_ms = (time.perf_counter() - t2) * 1e3
            shaper.record_costs(row_ms=pass_ms / (1 + len(tokens)))
            draft_ms += pass_ms
        result.timings.edge_compute_ms += base_ms + draft_ms
        got, stats = self.backend.step(hidden, step, seen=result.token_ids, tree=tree)  # type: ignore[union-attr]
        _add_stats(result, stats)
        if stats.fell_back and result.fallback_at_step is None:
            result.fallback_at_step = step
        accepted = len(got) - 1
        leaf_kept = False
        if tree is not None:
            rows = tree.rows_of(got[:-1])
            leaf_kept = any(r - 1 not in chain for r in rows[1:])
            shaper.record(tree.parents, ranks, probs, [r - 1 for r in rows[1:]])
            cache.keep(pending_pos, rows)
            self._observed(hidden[:, rows], pending_pos)  # the drafter follows the kept path
        controller.record(len(tokens), accepted, base_ms, draft_ms,
                          stats.transport_ms + stats.waiting_ms + stats.worker_overhead_ms, stats.cloud_compute_ms)
        kept = self._keep(result, got, len(tokens), accepted, stats, step, max_new_tokens, 1 + len(tokens),
                          base_ms + draft_ms, tree=None if tree is None else list(tree.parents), leaf_kept=leaf_kept)
        result.token_ids.extend(kept)
        committed.extend(kept)
        return kept

    def _run_edge(self, x: torch.Tensor, cache: SegmentKVCache, logits: str = "none"):
        """The edge's layers on new positions; a drafter that follows every position (the int8
        copy of the cloud's layers) is shown their boundary activations. A prompt copies the
        longest beginning an earlier generation computed (its keys and values, and its boundary
        activations for the cloud) and computes the rest; it is then kept for later ones."""
        start = cache.length
        digests, known = None, None
        if self.prefixes is not None and start == 0 and x.shape[1] > 1 and logits in ("none", "last"):
            digests = row_digests(x, self._prefix_salt())
            copied, known = self.prefixes.fill_with_extra(digests, cache, x.shape[1] - 1)
            x = x[:, copied:]
        out = self.edge(x, cache, logits=logits)
        if known is not None:
            out = SegmentOutput(hidden=torch.cat([known, out.hidden], dim=1), logits=out.logits)
        if digests is not None:  # with the activations the cloud needs, where there is one
            self.prefixes.add(digests, cache, out.hidden if self.backend is not None else None)
        self._observed(out.hidden, start)
        return out

    def _keep_conversation(self, ids: list[int], cache: SegmentKVCache) -> None:
        """Keep what the edge cache holds, prompt and answer, for the conversation's next turn
        (which resends both); at a split, with the boundary activations the cloud got of them."""
        assert self.prefixes is not None
        extra = None
        if self.backend is not None:
            if self._boundary is None or self._boundary_len < len(ids):
                return  # some positions went unseen (cannot happen while every edge run reports them)
            extra = torch.cat(self._boundary, dim=1)[:, :len(ids)]
        self.prefixes.add(row_digests(torch.tensor([ids]), self._prefix_salt()), cache, extra)

    def _prefix_salt(self) -> str:
        """What besides the tokens decides the edge's keys and values: its layers."""
        spec = self.edge.spec
        return f"edge:{spec.lo}:{spec.hi}:{spec.head}"

    def _observed(self, hidden: torch.Tensor, start: int) -> None:
        """The boundary activations of positions ``start..`` as the edge cache now holds them (a
        later run from an earlier position replaces what was cropped)."""
        if self.prefixes is not None and self.backend is not None:
            if start == 0:  # a prompt, or the cache rebuilt for a new split
                self._boundary, self._boundary_len = [], 0
            if self._boundary is None or start > self._boundary_len:  # a gap (cannot happen)
                self._boundary = None
            else:
                self._crop_boundary(start)
                self._boundary.append(hidden)
                self._boundary_len += hidden.shape[1]
        observe = getattr(self.mini.drafter, "observe", None) if self.mini is not None else None
        if observe is not None:
            observe(hidden, start)

    def _crop_boundary(self, length: int) -> None:
        assert self._boundary is not None
        while self._boundary_len > length:
            last = self._boundary.pop()
            self._boundary_len -= last.shape[1]
            if self._boundary_len < length:
                self._boundary.append(last[:, :length - self._boundary_len])
                self._boundary_len = length

    def _draft(self, mini: MiniSettings, committed: list[int], parts: list[torch.Tensor], cache,
               n_max: int) -> list[int]:
        """Guess up to ``n_max`` tokens after ``committed``; run the edge layers on them (appending
        their activations to ``parts``) so they can travel with the pending token."""
        drafter = mini.drafter
        drafts: list[int] = []
        if drafter.incremental:  # early exit: each draft comes from the previous one's activations
            h = parts[-1][0, -1]
            while len(drafts) < n_max:
                token, conf = drafter.next_from_hidden(h)
                if conf < mini.threshold:
                    break
                drafts.append(token)
                out = self._run_edge(torch.tensor([[token]], dtype=torch.long), cache)
                parts.append(out.hidden)
                h = out.hidden[0, -1]
                if token in self.eos_token_ids:
                    break
            return drafts
        for token, _conf in drafter.propose(committed, n_max, mini.threshold):
            drafts.append(token)
            if token in self.eos_token_ids:
                break
        if drafts:
            out = self._run_edge(torch.tensor([drafts], dtype=torch.long), cache)
            parts.append(out.hidden)
        return drafts


def _controller(mini: MiniSettings) -> DraftController:
    return DraftController(max_tokens=mini.max_draft, group=mini.group,
                           guess_in_cloud_passes=getattr(mini.drafter, "guess_in_cloud_passes", 0.0))


def _setup_ms(drafter: Any) -> float:
    setup = getattr(drafter, "setup_ms", None)
    return setup() if setup is not None else 0.0


def _build_soon(drafter: Any) -> None:
    start = getattr(drafter, "build_soon", None)
    if start is not None:
        start()


def _prepare(drafter: Any) -> None:
    """Let a drafter do its one-off work (the int8 copy: build itself, catch up with the positions
    the edge ran before drafting began) before a draft is timed: the controller's figures are
    per-draft costs, and a first draft that carried the build would switch drafting off."""
    prepare = getattr(drafter, "prepare", None)
    if prepare is not None:
        prepare()


def _trace_figures(stats: StepStats) -> dict[str, Any]:
    """A trace row's cloud-side columns (every kind of step reports the same ones)."""
    return {"cloud_ms": round(stats.cloud_compute_ms, 3), "worker_overhead_ms": round(stats.worker_overhead_ms, 3),
            "transport_ms": round(stats.transport_ms, 3), "waiting_ms": round(stats.waiting_ms, 3),
            "bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received, "retries": stats.retries}


def _add_stats(result: GenerationResult, stats: StepStats) -> None:
    result.cloud_round_trips += stats.round_trips
    result.bytes_sent += stats.bytes_sent
    result.bytes_received += stats.bytes_received
    result.retries += stats.retries
    result.timings.cloud_compute_ms += stats.cloud_compute_ms
    result.timings.transport_ms += stats.transport_ms
    result.timings.waiting_ms += stats.waiting_ms
    if stats.worker_id and stats.worker_id not in result.workers_used:
        result.workers_used.append(stats.worker_id)
