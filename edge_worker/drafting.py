"""Drafters: cheap guesses of the next tokens, made on the device, checked by the main model.

Four kinds, all proposing greedy drafts with a confidence (the drafter's probability of its own
guess; prompt lookup has none and reports 1.0):

* ``SelfDrafter``: the edge's own layers ``[0, k)`` followed by the final norm and the LM head
  (early exit), optionally through a learned adapter (``edgecloud calibrate --drafter``). It
  needs no second model: the boundary activations it computes for a draft are exactly the ones
  the cloud needs to verify it.
* ``LookupDrafter``: prompt lookup, i.e. the tokens that followed the most recent earlier
  occurrence of the context's last n-gram. Nearly free; strong when the answer repeats the
  prompt or itself.
* ``CopyDrafter``: an int8 copy of the cloud's layers and head, run on the edge's exact boundary
  activations: the whole model, approximately, on the device.
* ``ModelDrafter``: any small causal LM that shares the main model's tokenizer, with its own
  KV cache kept in step with the committed tokens.

``DraftController`` decides how many tokens to draft per cloud round trip from measured
quantities (acceptance rate, edge cost per draft, the round trip, the cloud's cost per verified
position), so drafting switches itself off where it does not pay (near-zero delay).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edge_worker.config import MINI_MODES, check_mini_options  # noqa: F401 - re-exported
from partition.errors import PartitionError
from partition.kv_cache import SegmentKVCache
from partition.sampling_params import MAX_DRAFT_TOKENS, MAX_GROUP
from partition.tree import MAX_TREE_NODES

log = logging.getLogger(__name__)

_PLAIN_FIRST = 3  # tokens every pipelined generation starts with in plain hybrid (they measure it)
# The int8 copy's one-off costs, measured on this project's 2-core CPU (SmolLM2 at split 15: an
# 82 MB copy built in 0.28-0.34 s; a pass over 16-64 positions 1.2-1.5 ms each): estimates the
# controller weighs against what drafting would save in the tokens left.
_BUILD_MS_PER_MB = 4.0
_CATCH_UP_MS_PER_ROW = 1.5
_CATCH_UP_ROWS = 4  # a backlog longer than this is caught up before drafting, untimed
_EXPLORE_TOKENS = 3  # tokens of the choice the measurements do not favour, in each exploring window


class DrafterError(PartitionError):
    """A drafter that cannot be used with this model (wrong tokenizer, bad adapter file, ...)."""


def _top1(logits: torch.Tensor) -> tuple[int, float]:
    probs = torch.softmax(logits.float(), dim=-1)
    conf, token = torch.max(probs, dim=-1)
    return int(token), float(conf)


# --- self-drafting (early exit) -----------------------------------------------------------------


class DrafterAdapter(torch.nn.Module):
    """A residual linear map from the hidden state at layer k towards the last layer's:
    ``h + W h + b``, initialised at zero so an untrained adapter is plain early exit.

    ``vocab`` (token ids, ascending), when set, restricts the drafter's guesses to those tokens
    (the ones the model produced in calibration): the LM head then computes only their rows."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, hidden_size)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)
        self.vocab: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(h)


def adapter_path(directory: Path, model_id: str, split: int) -> Path:
    return Path(directory) / f"drafter-{model_id}-k{split}.pt"


def save_adapter(adapter: DrafterAdapter, path: Path, model_id: str, split: int, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model_id": model_id, "split": split, "state": adapter.state_dict(), "vocab": adapter.vocab,
                "metrics": metrics}, tmp)
    tmp.replace(path)


def load_adapter(path: Path, model_id: str, split: int, hidden_size: int) -> DrafterAdapter:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        # torch's own message suggests weights_only=False, which would run the file's code: not shown.
        raise DrafterError(f"cannot read the drafter adapter {path}: it is not a file that `edgecloud calibrate "
                           f"--drafter` wrote ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or "state" not in blob:
        raise DrafterError(f"{path} is not a drafter adapter (`edgecloud calibrate --drafter` writes them)")
    if blob.get("model_id") != model_id or blob.get("split") != split:
        raise DrafterError(f"{path} was calibrated for {blob.get('model_id')} at split {blob.get('split')}, "
                           f"not {model_id} at split {split}: run `edgecloud calibrate --drafter --split {split}`")
    adapter = DrafterAdapter(hidden_size)
    vocab = blob.get("vocab")  # absent from adapters calibrated before vocabularies
    try:
        adapter.load_state_dict(blob["state"])
        if vocab is not None:
            vocab = torch.as_tensor(vocab, dtype=torch.long)
            if vocab.dim() != 1 or not len(vocab) or int(vocab.min()) < 0:
                raise ValueError("its vocabulary is not a list of token ids")
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise DrafterError(f"the drafter adapter {path} is damaged: {exc}") from None
    adapter.vocab = vocab
    return adapter.eval()


class SelfDrafter:
    """Early exit from the edge's layers: norm and LM head applied to the layer-k hidden state."""

    name = "self"
    incremental = True  # drafts one token at a time from the edge's own forward pass

    def __init__(self, norm: torch.nn.Module, lm_head: torch.nn.Module, adapter: DrafterAdapter | None = None,
                 lookup: LookupDrafter | None = None):
        self.norm = norm
        self.lm_head = lm_head
        self.adapter = adapter
        self.vocab = adapter.vocab if adapter is not None else None
        if self.vocab is not None:
            if int(self.vocab.max()) >= lm_head.weight.shape[0]:
                raise DrafterError(f"the adapter's vocabulary has token {int(self.vocab.max())}, beyond the "
                                   f"model's {lm_head.weight.shape[0]}")
            self.head_rows = lm_head.weight[self.vocab].detach().clone()  # (V', H): the only rows used
        # Pipelined drafting asks prompt lookup first: a match costs no LM head.
        self.lookup = lookup

    def reset(self, prompt: list[int]) -> None:
        pass

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V') over the drafter's candidates (its vocabulary, else the whole head)."""
        h = hidden.float()
        if self.adapter is not None:
            h = self.adapter(h)
        h = self.norm(h.to(self.lm_head.weight.dtype))
        return self.lm_head(h) if self.vocab is None else h @ self.head_rows.T

    @torch.inference_mode()
    def next_from_hidden(self, hidden: torch.Tensor) -> tuple[int, float]:
        """hidden: (H,) the boundary activation of the newest position."""
        index, conf = _top1(self._scores(hidden))
        return (index if self.vocab is None else int(self.vocab[index])), conf

    @torch.inference_mode()
    def candidates(self, hidden: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """The drafter's ``k`` likeliest next tokens with their probabilities, best first."""
        probs = torch.softmax(self._scores(hidden).float(), dim=-1)
        conf, index = torch.topk(probs, min(k, probs.shape[-1]))
        tokens = index if self.vocab is None else self.vocab[index]
        return [(int(t), float(c)) for t, c in zip(tokens, conf, strict=True)]

    @torch.inference_mode()
    def guesses(self, hidden: torch.Tensor) -> torch.Tensor:
        """Top-1 guesses (P,) for the boundary activations of P positions (P, H)."""
        index = self._scores(hidden).argmax(-1)
        return index if self.vocab is None else self.vocab[index]

    def guess(self, context: list[int], hidden: torch.Tensor) -> tuple[int, float] | None:
        """The next token after ``context``, whose newest position has the boundary activation
        ``hidden`` (H,): a prompt-lookup match when there is one, else early exit."""
        if self.lookup is not None:
            found = self.lookup.propose(context, 1, 0.0)
            if found:
                return found[0]
        return self.next_from_hidden(hidden)


# --- an int8 copy of the cloud's layers ---------------------------------------------------------


class CopyDrafter:
    """The cloud's layers ``[k, N)`` and the head as an int8 copy on the edge
    (``partition/quantize.py``), fed the exact boundary activations the edge's own layers compute
    for every position: the whole model, approximately, on the device. Its greedy token is the
    model's at 98.4% of positions on SmolLM2 at split 15; the cloud's verification makes the
    output exact.

    The generation loop hands it every boundary activation the edge computes (``observe``) and
    asks for the next token after the newest one (``guess``). The copy runs the positions it has
    not run yet in one pass, with a KV cache of its own that follows the edge's: a position the
    edge computes again (after a rejected guess) replaces the old one from there on."""

    name = "int8"
    incremental = True
    # A guess runs the cloud's layers (int8, on the edge): before any is measured, the controller
    # prices it as one cloud pass of a position on top of the edge's own layers.
    guess_in_cloud_passes = 1.0

    def __init__(self, segment: Any, nbytes: int = 0) -> None:
        # A quantized ModelSegment [k, N) with the head, shared between generations, or a function
        # that builds it (``nbytes``: the size it will have): then it is built when drafting first
        # pays, so an edge where it never does (a loopback cloud) neither builds nor holds it.
        built = isinstance(segment, torch.nn.Module)  # a module is callable too: tell them apart
        self._segment = segment if built else None
        self._build = None if built else segment
        self._bytes = nbytes
        self._building: threading.Thread | None = None
        self._build_error: BaseException | None = None
        self.reset([])

    @property
    def segment(self) -> Any:
        if self._building is not None:
            self._building.join()
            self._building = None
            if self._build_error is not None:
                error, self._build_error = self._build_error, None
                raise error
        if self._segment is None:
            self._segment = self._build()
        return self._segment

    def build_soon(self) -> None:
        """Start building the copy in the background (the generation loop calls this once the
        measured round trip says drafting would pay): the build then overlaps the plain tokens'
        waits for the cloud instead of holding up the first guess."""
        if self._segment is not None or self._building is not None:
            return

        def build() -> None:
            try:
                with torch.inference_mode():
                    self._segment = self._build()
            except BaseException as exc:  # noqa: BLE001 - raised where the copy is first needed
                self._build_error = exc

        # Not a daemon: a process whose generation ended before the copy was needed waits for the
        # build at exit (a daemon thread still inside torch when the interpreter finalises aborts
        # the process: "terminate called without an active exception").
        self._building = threading.Thread(target=build, name="int8-copy-build", daemon=False)
        self._building.start()

    def setup_ms(self) -> float:
        """What drafting would cost once before its first guess (``prepare``): the build, estimated
        from the copy's size at the rate measured on a 2-core CPU, and the catch-up over positions
        observed while nothing was drafted (about 1.5 ms a position in a batched pass)."""
        build = 0.0 if self._segment is not None or self._building is not None else _BUILD_MS_PER_MB * self._bytes / 2**20
        backlog = self.known - self.cache.length  # observed positions the copy has not run
        return build + (_CATCH_UP_MS_PER_ROW * backlog if backlog > _CATCH_UP_ROWS else 0.0)

    @torch.inference_mode()
    def prepare(self) -> None:
        """The one-off work before drafting (re)starts: build the copy if it is not built, and run
        a backlog of positions observed while nothing was drafted. A position or two left by the
        last cycle are a guess's ordinary work: they run in the next (timed) guess."""
        self.segment  # noqa: B018 - built here, not at a timed guess
        if not self.lost and self.known - self.cache.length > _CATCH_UP_ROWS:
            self._newest_logits()

    def reset(self, prompt: list[int]) -> None:
        self.cache = SegmentKVCache()
        self.rows: list[torch.Tensor] = []  # observed activations (T_i, H) the copy has not run yet
        self.known = 0  # positions observed: those in the cache and those in rows
        self.logits: torch.Tensor | None = None  # the newest position's, once run
        self.lost = False  # it missed positions: no guesses until the next reset

    def observe(self, hidden: torch.Tensor, start: int) -> None:
        """The edge computed the boundary activations ``hidden`` (1, T, H) of positions ``start ..
        start + T`` (those from ``start`` on replace any it had)."""
        if start > self.known:
            if not self.lost:
                log.warning("the int8 drafter missed positions %d..%d: it stops guessing for this generation",
                            self.known, start)
            self.lost = True
            return
        if start < self.known:
            self._crop(start)
        self.rows.append(hidden[0].detach())
        self.known += hidden.shape[1]
        self.logits = None

    def _crop(self, length: int) -> None:
        if length >= self.cache.length:
            keep, kept = length - self.cache.length, []
            for row in self.rows:
                if keep <= 0:
                    break
                kept.append(row[:keep])
                keep -= row.shape[0]
            self.rows = kept
        else:
            self.cache.crop(length)
            self.rows = []
        self.known = length
        self.logits = None

    def _newest_logits(self) -> torch.Tensor:
        if self.rows:
            rows = torch.cat(self.rows) if len(self.rows) > 1 else self.rows[0]
            self.rows = []
            self.logits = self.segment(rows.unsqueeze(0), self.cache, logits="last").logits[0, -1]
        assert self.logits is not None
        return self.logits

    @torch.inference_mode()
    def next_from_hidden(self, hidden: torch.Tensor) -> tuple[int, float]:
        """The next token after the newest observed position (``hidden`` is its activation,
        already observed)."""
        if self.lost or not self.known:
            return 0, 0.0  # no confidence: drafting stops
        return _top1(self._newest_logits())

    def guess(self, context: list[int], hidden: torch.Tensor) -> tuple[int, float] | None:
        if self.lost or self.known != len(context):
            return None
        return self.next_from_hidden(hidden)

    @torch.inference_mode()
    def candidates(self, hidden: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """The copy's ``k`` likeliest tokens after the newest observed position, best first."""
        if self.lost or not self.known:
            return []
        probs = torch.softmax(self._newest_logits().float(), dim=-1)
        conf, index = torch.topk(probs, k)
        return [(int(t), float(c)) for t, c in zip(index, conf, strict=True)]


# --- prompt lookup ------------------------------------------------------------------------------


class LookupDrafter:
    """Proposes what followed the most recent earlier match of the context's last n-gram."""

    name = "lookup"
    incremental = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def reset(self, prompt: list[int]) -> None:
        pass

    def propose(self, context: list[int], max_tokens: int, threshold: float) -> list[tuple[int, float]]:
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            tail = context[n_ctx - n:]
            # Most recent earlier occurrence first: recent text predicts the continuation best.
            for start in range(n_ctx - n - 1, -1, -1):
                if context[start:start + n] == tail:
                    follow = context[start + n:start + n + max_tokens]
                    if follow:
                        return [(t, 1.0) for t in follow]
        return []

    def guess(self, context: list[int], hidden: torch.Tensor) -> tuple[int, float] | None:
        found = self.propose(context, 1, 0.0)
        return found[0] if found else None


# --- a separate small model ---------------------------------------------------------------------


class ModelDrafter:
    """A small causal LM with the main model's tokenizer, run fully on the device."""

    name = "model"
    incremental = False

    def __init__(self, model: Any, label: str = "model") -> None:
        self.model = model  # a ModelSegment holding every layer and the head
        self.name = label
        self.cache = model.new_cache()
        self.ids: list[int] = []  # tokens the cache holds
        self.last_logits: torch.Tensor | None = None

    def reset(self, prompt: list[int]) -> None:
        self.cache = self.model.new_cache()
        self.ids = []
        self.last_logits = None

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        out = self.model(torch.tensor([tokens], dtype=torch.long), self.cache, logits="last")
        self.ids.extend(tokens)
        return out.logits[0, -1]

    @torch.inference_mode()
    def propose(self, context: list[int], max_tokens: int, threshold: float) -> list[tuple[int, float]]:
        common = 0
        for a, b in zip(self.ids, context, strict=False):
            if a != b:
                break
            common += 1
        if common == len(context) and common == len(self.ids) and self.last_logits is not None:
            logits = self.last_logits
        else:
            common = min(common, len(context) - 1)  # the newest token must be fed to get logits
            self.cache.crop(common)
            del self.ids[common:]
            logits = self._feed(context[common:])
        drafts: list[tuple[int, float]] = []
        while len(drafts) < max_tokens:
            token, conf = _top1(logits)
            if conf < threshold:
                break
            drafts.append((token, conf))
            logits = self._feed([token])
        self.last_logits = logits
        return drafts

    def guess(self, context: list[int], hidden: torch.Tensor) -> tuple[int, float] | None:
        found = self.propose(context, 1, 0.0)
        return found[0] if found else None


# --- how many tokens to draft -------------------------------------------------------------------


@dataclass
class DraftController:
    """Chooses the draft length that maximises expected tokens per unit of time.

    With a per-token acceptance probability ``a``, a round with ``n`` drafts yields
    ``(1 - a^(n+1)) / (1 - a)`` tokens and costs ``base + n * edge_per_draft + round_trip +
    cloud_one + n * cloud_per_draft`` milliseconds; ``n = 0`` is plain hybrid. Every quantity is a
    running estimate from this generation's own rounds. When ``n = 0`` wins, a probe round every
    ``probe_every`` rounds keeps the estimates fresh, so drafting comes back when the link slows.
    """

    max_tokens: int = 8
    probe_every: int = 32
    smoothing: float = 0.3
    # Priors, replaced by measurements as rounds complete.
    accept_hits: float = 2.0  # pseudo-counts for the acceptance rate (prior 0.5)
    accept_trials: float = 4.0
    edge_per_draft_ms: float | None = None
    round_trip_ms: float | None = None
    cloud_one_ms: float | None = None
    cloud_per_draft_ms: float | None = None
    base_ms: float | None = None
    rounds_since_draft: int = 0
    rtt_when_off: float | None = None  # the round trip when drafting last switched off

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"draft length must be in 1..{MAX_DRAFT_TOKENS}, got {self.max_tokens}")

    @property
    def acceptance(self) -> float:
        return self.accept_hits / self.accept_trials

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def expected_rate(self, n: int) -> float:
        """Expected tokens per millisecond with ``n`` drafts (the cost model, exposed for tests)."""
        a = min(self.acceptance, 0.999)
        tokens = (1 - a ** (n + 1)) / (1 - a)
        cost = ((self.base_ms or 0.0) + n * (self.edge_per_draft_ms or 0.0) + (self.round_trip_ms or 0.0)
                + (self.cloud_one_ms or 0.0) + n * (self.cloud_per_draft_ms or 0.0))
        return tokens / max(cost, 1e-3)

    def best_length(self) -> int:
        if self.round_trip_ms is None:
            return min(2, self.max_tokens)  # nothing measured yet: a short draft measures everything
        best = max(range(self.max_tokens + 1), key=self.expected_rate)
        if best == 0:
            if self.rtt_when_off is None:
                self.rtt_when_off = self.round_trip_ms
            slower = self.round_trip_ms > 1.5 * self.rtt_when_off + 1.0  # the link slowed since
            if slower or self.rounds_since_draft >= self.probe_every:
                self.rtt_when_off = None
                return 1
        return best

    # --- pipelined drafting (EdgeGenerator._pipeline_cycle) ---------------------------------------
    # One frame per position: the pending token, then one conditional frame per guess, sent while
    # earlier ones are in flight. A cycle ends at the first guess the main model does not make.
    # With acceptance ``a``, base edge time ``b`` (layers for one token), draft time ``e`` (a guess
    # and its layers), round trip ``R`` and cloud time ``c`` per frame, a cycle costs about
    # ``b + R + c`` plus the chain of kept guesses, each taking ``tau = max(e + c, (R + c + e) /
    # (n + 1))`` with at most ``n`` guesses in flight; it yields ``1 / (1 - a)`` tokens. Edge and
    # cloud compute are counted as if they could not overlap (they share a CPU in our tests, and
    # overlapping them there costs more than it saves): only the round trip is hidden. A rejected
    # guess may find the edge in the middle of a draft (``e / 2``). Plain hybrid costs ``b + R + c``
    # per token. With frames of several guesses (``group`` > 1: those drafted while the oldest
    # answer is out go together), a guess also waits in the edge for its frame to go: just before
    # an answer, the guesses in flight are that frame's and the next one's, so covering a round
    # trip takes twice the guesses, ``tau = max(e + c, (R + c + e) / (n / 2 + 1))``, and the depth
    # may reach twice ``max_tokens``; the worker's pass for a frame costs about one position's.
    group: int = 1
    min_gain: float = 0.05  # pipeline only when it is predicted this much faster than plain hybrid
    # Realised [ms, tokens] of recent tokens committed with guesses in flight (True) and without
    # (False), each kind decayed per token of its own: once both are known they decide, so the
    # choice also holds where the cost model does not (an edge and a worker sharing one loaded CPU,
    # where a guess slows the worker down). They are per token, not per cycle, and the choice is
    # taken again before every guess: a cycle whose guesses all hit can last a whole generation.
    # Exploring windows of _EXPLORE_TOKENS tokens measure the other choice afresh (its old figure
    # is dropped: the link may have changed since): every probe_every tokens while the two are
    # close, four times as rarely otherwise.
    realised: dict = field(default_factory=lambda: {True: [0.0, 0.0], False: [0.0, 0.0]})
    tokens: int = 0  # tokens committed so far (prompt pass included)
    # Before a guess is measured, its cost is priced as the edge's layers plus this many cloud
    # passes of one position (the drafter's ``guess_in_cloud_passes``: 1 for the int8 copy).
    guess_in_cloud_passes: float = 0.0
    # What drafting would still cost once before its first guess (the drafter's ``setup_ms``: the
    # int8 copy's build), and the tokens left to repay it: the cost model pipelines only if the
    # predicted saving over those tokens covers it. The generation loop sets both every cycle.
    setup_ms: float = 0.0
    tokens_left: int | None = None
    explore_at: int | None = None  # where the next exploring window starts
    exploring_until: int = 0
    exploring: bool = False  # the choice tried in the current exploring window

    def pipeline_ms_per_token(self, n: int, overlap: bool = False) -> float:
        """Predicted ms per token with at most ``n`` guesses in flight (``n = 0``: plain hybrid);
        ``overlap``: edge and cloud compute in parallel (separate machines)."""
        b, r, c = self.base_ms or 0.0, self.round_trip_ms or 0.0, self.cloud_one_ms or 0.0
        if n == 0:
            return b + r + c
        a = min(self.acceptance, 0.95)
        e = self.edge_per_draft_ms if self.edge_per_draft_ms is not None else b + self.guess_in_cloud_passes * c
        covering = n / 2 if self.group > 1 else n
        tau = max(max(e, c) if overlap else e + c, (r + c + e) / (covering + 1))
        return (1 - a) * (b + r + c + e / 2) + a * tau

    def realised_ms(self, pipelined: bool) -> float | None:
        ms, tokens = self.realised[pipelined]
        return ms / tokens if tokens >= 1.5 else None  # two tokens, decayed

    def _measured(self) -> bool:
        return self.round_trip_ms is not None and self.base_ms is not None and self.cloud_one_ms is not None

    def _model_depth(self) -> int:
        """How many in flight: enough to cover a round trip if edge and cloud do overlap (whether
        at all: only if it pays even when they do not)."""
        most = self.max_tokens * (2 if self.group > 1 else 1)
        return min(range(1, most + 1), key=lambda n: self.pipeline_ms_per_token(n, overlap=True))

    def worth_preparing(self) -> bool:
        """Whether the measured costs say pipelining would pay, the drafter's one-off setup left
        out: the drafter may then get ready in the background (``CopyDrafter.build_soon``) while
        the first plain tokens wait for the cloud."""
        if not self._measured():
            return False
        return self.pipeline_ms_per_token(self._model_depth()) <= (1 - self.min_gain) * self.pipeline_ms_per_token(0)

    def pipeline_depth(self) -> int:
        """How many guesses may be in flight now (0: none, plain hybrid). Asked before every cycle
        and before every guess within one.

        The first tokens are plain (they measure the round trip and the costs), then the cost
        model decides until the realised ms per token of both choices is known; from then on
        those decide, with exploring windows of the other choice."""
        if self.tokens < _PLAIN_FIRST:
            return 0
        measured = self._measured()
        best = self._model_depth() if measured else min(2, self.max_tokens)
        pipe, plain = self.realised_ms(True), self.realised_ms(False)
        if measured:
            pipe_model, plain_model = self.pipeline_ms_per_token(best), self.pipeline_ms_per_token(0)
            repaid = self.tokens_left is None or (plain_model - pipe_model) * self.tokens_left >= self.setup_ms
            model = pipe_model <= (1 - self.min_gain) * plain_model and repaid
        else:
            model = True
        known = pipe is not None and plain is not None
        use = pipe <= (1 - self.min_gain) * plain if known else model  # type: ignore[operator]
        # Explore once both choices have been measured, whatever the model says now (a link that
        # got faster since must be able to turn guessing off); at loopback round trips the model
        # never starts pipelining, so there is nothing to explore there.
        if known:
            close = 0.75 * plain <= pipe <= plain / 0.75  # type: ignore[operator]
            if self.explore_at is None:
                self.explore_at = self.tokens + self.probe_every * (1 if close else 4)
            if self.tokens >= self.explore_at:
                self.exploring_until, self.exploring = self.tokens + _EXPLORE_TOKENS, not use
                self.explore_at = self.tokens + self.probe_every * (1 if close else 4)
                self.realised[self.exploring] = [0.0, 0.0]  # measured afresh: its figure may be stale
            if self.tokens < self.exploring_until:
                use = self.exploring  # the window's choice holds for the whole window
        return best if use else 0

    def record_edge(self, base_ms: float | None = None, draft_ms: float | None = None) -> None:
        if base_ms is not None:
            self.base_ms = self._ewma(self.base_ms, base_ms)
        if draft_ms is not None:
            self.edge_per_draft_ms = self._ewma(self.edge_per_draft_ms, draft_ms)

    def record_reply(self, round_trip_ms: float | None, cloud_ms: float) -> None:
        """A one-position frame's answer: ``round_trip_ms`` when its arrival time is known."""
        self.cloud_one_ms = self._ewma(self.cloud_one_ms, cloud_ms)
        if round_trip_ms is not None:
            self.round_trip_ms = self._ewma(self.round_trip_ms, round_trip_ms)

    def record_guess(self, hit: bool) -> None:
        self.accept_hits += hit
        self.accept_trials += 1

    def record_cycle(self, drafted: int) -> None:
        """A pipelined generation's cycle ended, with ``drafted`` guesses sent."""
        self.rounds_since_draft = 0 if drafted else self.rounds_since_draft + 1

    def record_tokens(self, pipelined: bool, ms: float | None, tokens: int = 1) -> None:
        """``tokens`` committed in ``ms`` (None: not a decode figure, the prompt's pass), with
        guesses in flight or not."""
        self.tokens += tokens
        if ms is not None and tokens:
            acc = self.realised[pipelined]
            decay = 0.9 ** tokens
            acc[0], acc[1] = acc[0] * decay + ms, acc[1] * decay + tokens

    def record(self, drafted: int, accepted: int, edge_base_ms: float, edge_draft_ms: float,
               round_trip_ms: float, cloud_ms: float) -> None:
        """One round's measurements: ``drafted`` tokens proposed, ``accepted`` kept."""
        if drafted:
            self.rounds_since_draft = 0
            self.accept_hits += accepted
            self.accept_trials += accepted + (1 if accepted < drafted else 0)
            self.edge_per_draft_ms = self._ewma(self.edge_per_draft_ms, edge_draft_ms / drafted)
            if self.cloud_one_ms is not None:
                self.cloud_per_draft_ms = self._ewma(
                    self.cloud_per_draft_ms, max(0.0, cloud_ms - self.cloud_one_ms) / drafted)
        else:
            self.rounds_since_draft += 1
            self.cloud_one_ms = self._ewma(self.cloud_one_ms, cloud_ms)
        if self.cloud_one_ms is None:  # first round drafted: split its cloud time evenly
            self.cloud_one_ms = cloud_ms / (drafted + 1)
        self.base_ms = self._ewma(self.base_ms, edge_base_ms)
        self.round_trip_ms = self._ewma(self.round_trip_ms, round_trip_ms)



# --- the shape of a token tree ----------------------------------------------------------------

_RANKS = 3  # acceptance is measured for the best guess, the second, and the rest together
_BINS = 5  # ... in bins of the drafter's own probability for the token: [0, 0.2), ..., [0.8, 1]


@dataclass
class TreeShaper:
    """Which nodes a token tree gets (``EdgeGenerator._tree_round``), from this generation's own
    measurements, in the manner of EAGLE-2's dynamic trees.

    A node's value is the probability that it ends up on the accepted path: the product of its
    ancestors' acceptance and its own, where acceptance is *measured*: how often a node of that
    rank (the drafter's best guess, its second, the rest) and of that drafter probability (five
    bins) was on the accepted path, among the nodes whose parent was (pseudo-counts start it at
    the drafter's probability). The expected tokens of a round are one (the cloud's own next
    token) plus the sum of its nodes' values; its cost is the round's fixed time (the edge's
    pass, the round trip, the cloud's pass of one position) plus each node's: a leaf its row in
    the edge's tree pass and in the cloud's verification, a chain node also the edge and drafter
    pass that drafts the next depth. A node joins while its value per millisecond beats the
    round's tokens per millisecond so far: a long round trip makes every node cheap next to it and
    the tree grows, a short one keeps it to the nodes the drafter is sure of.
    """

    prior: float = 2.0  # pseudo-trials per bin, at the bin's mid probability
    hits: list = field(default_factory=list)
    trials: list = field(default_factory=list)
    edge_row_ms: float | None = None  # one node's row in the edge's tree pass
    step_ms: float | None = None  # the edge's and the drafter's pass for one more depth of the chain
    # The current round (start / take_chain / take_leaf / descend).
    tokens: float = 1.0
    ms: float = 0.0
    reach: float = 1.0

    def __post_init__(self) -> None:
        if not self.hits:
            mids = [(b + 0.5) / _BINS for b in range(_BINS)]
            self.hits = [[self.prior * m for m in mids] for _ in range(_RANKS)]
            self.trials = [[self.prior] * _BINS for _ in range(_RANKS)]

    @staticmethod
    def _bin(rank: int, prob: float) -> tuple[int, int]:
        return min(rank, _RANKS - 1), min(max(int(prob * _BINS), 0), _BINS - 1)

    def acceptance(self, rank: int, prob: float) -> float:
        """How often a node of this rank and drafter probability was accepted once reached."""
        r, b = self._bin(rank, prob)
        return self.hits[r][b] / self.trials[r][b]

    def start(self, fixed_ms: float) -> None:
        self.tokens, self.ms, self.reach = 1.0, max(fixed_ms, 1e-3), 1.0

    def _take(self, value: float, cost_ms: float) -> bool:
        if value * self.ms < max(cost_ms, 0.0) * self.tokens:  # value / cost < tokens / ms
            return False
        self.tokens += value
        self.ms += max(cost_ms, 0.0)
        return True

    def take_chain(self, prob: float, cost_ms: float) -> bool:
        """Whether the drafter's best guess at this depth (probability ``prob``) joins."""
        return self._take(self.reach * self.acceptance(0, prob), cost_ms)

    def take_leaf(self, rank: int, prob: float, cost_ms: float) -> bool:
        """Whether its guess of ``rank`` (1: the second likeliest) joins, beside the chain's."""
        return self._take(self.reach * self.acceptance(rank, prob), cost_ms)

    def descend(self, prob: float) -> None:
        """The chain goes on below its guess of probability ``prob``."""
        self.reach *= self.acceptance(0, prob)

    def record(self, parents: tuple[int, ...], ranks: list[int], probs: list[float], kept: list[int]) -> None:
        """A verified tree: each node's parent (-1: the pending token), rank and drafter
        probability, and the nodes on the accepted path."""
        on_path = set(kept)
        for node, parent in enumerate(parents):
            if parent == -1 or parent in on_path:  # reached: its parent was accepted
                r, b = self._bin(ranks[node], probs[node])
                self.trials[r][b] += 1
                self.hits[r][b] += node in on_path

    def record_costs(self, row_ms: float | None = None, step_ms: float | None = None) -> None:
        """Measured: a node's row in the edge's tree pass; the edge and drafter pass that takes
        the chain one depth further."""
        if row_ms is not None:
            self.edge_row_ms = row_ms if self.edge_row_ms is None else self.edge_row_ms + 0.3 * (row_ms - self.edge_row_ms)
        if step_ms is not None:
            self.step_ms = step_ms if self.step_ms is None else self.step_ms + 0.3 * (step_ms - self.step_ms)


@dataclass
class MiniSettings:
    """What the generation loop needs from a ``MiniLLMHandler``: the drafter and how to use it."""

    drafter: SelfDrafter | LookupDrafter | ModelDrafter | CopyDrafter
    mode: str = "verify"
    threshold: float = 0.5
    max_draft: int = 8
    adaptive: bool = True  # False: always draft up to max_draft (tests, fixed-length benchmarks)
    # Verify mode: send guesses while earlier frames are in flight (EdgeGenerator._pipeline_cycle)
    # instead of one frame of drafts per round trip. max_draft then bounds the guesses in flight.
    pipeline: bool = True
    # Verify mode, one frame per round trip: draft a token tree of at most this many nodes (the
    # chain of best guesses, with the drafter's next likeliest tokens as leaves beside each of
    # them; EdgeGenerator._draft_tree); 0: a chain.
    tree_nodes: int = 0
    # Pipelined: the guesses made while the oldest answer is out go in one frame, at most this
    # many (the first is the frame's condition, the rest drafts the worker verifies in the same
    # pass); 1: a frame per guess. Greedy only: with sampling a frame carries one guess, so each
    # token is the main model's own draw for its step, as without drafting.
    group: int = 8

    @property
    def pipelined(self) -> bool:
        return self.pipeline and self.mode == "verify" and not self.tree_nodes

    @property
    def trees(self) -> bool:
        return bool(self.tree_nodes) and self.mode == "verify" and hasattr(self.drafter, "candidates")

    def __post_init__(self) -> None:
        check_mini_options(self.mode, self.threshold, self.max_draft)
        if self.mode == "trust" and isinstance(self.drafter, LookupDrafter):
            raise ValueError("trust mode needs a drafter with a probability (self or a model): "
                             "prompt lookup has no confidence to trust")
        if not 1 <= self.group <= MAX_GROUP:
            raise ValueError(f"a pipelined frame holds 1 to {MAX_GROUP} guesses, got {self.group}")
        if not 0 <= self.tree_nodes <= MAX_TREE_NODES:
            raise ValueError(f"a draft tree has at most {MAX_TREE_NODES} nodes, got {self.tree_nodes}")
        if self.tree_nodes and not hasattr(self.drafter, "candidates"):
            raise ValueError(f"--mini-tree needs a drafter that ranks its guesses (int8 or self), not {self.drafter.name}")
