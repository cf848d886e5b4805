"""``EdgeEngine``: the one place on the device that assembles and runs a generation.

Built once from a model (a ``--model`` name or path, a ``ModelSource``, or a transformers model
the user loaded) and one ``EdgeConfig``, it owns everything a generation needs: the tokenizer,
the model's segments (each loaded once and shared by every generation), the cloud client, the
split planner and the re-planning during a generation, the drafter and the local fallback.
``edgecloud edge``, ``edgecloud demo`` (through ``edge``), ``EdgeCloudManager`` and the benches
call it; nothing else wires segments, sessions, drafters or fallback together::

    with EdgeEngine("smollm2-135m", EdgeConfig(split=15)) as engine:
        result = engine.generate("What is edge computing?", GenerationParams(max_new_tokens=32))
        for piece in engine.stream("And fog computing?"):
            print(piece, end="", flush=True)

Several generations may run at once from different threads: each has its own caches, cloud
session and drafter state; the segments, the cloud client (one broker socket per thread) and the
planner are shared.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from broker.errors import (
    CacheLimitExceeded,
    EdgeCloudError,
    NoWorkerAvailable,
    WeightsMismatch,
    is_unavailable,
)
from edge_worker.backends import LocalBackend
from edge_worker.config import EdgeConfig
from edge_worker.generation import EdgeGenerator, GenerationCancelled, GenerationResult, mode_for
from edge_worker.planning import Decision, ReplanWatch, SplitPlanner, servable_splits
from partition.devices import pick_device, pick_dtype
from partition.errors import InvalidSplitError, PartitionError
from partition.models import ModelSource, source_of
from partition.planner import WIFI, Conditions, PowerModel, Weights
from partition.prefix_cache import Continuations, PrefixCache
from partition.sampling import SamplingParams
from partition.segment import ModelSegment
from partition.tokens import encode_messages, encode_prompt, eos_token_ids

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
# Segments an engine keeps loaded: the edge's for the current split and one it moved from, and
# the remaining layers for a local fallback of each. A generation holds its own references, so
# one dropped here stays alive until that generation ends.
MAX_CACHED_SEGMENTS = 4
# A fixed split asks the broker, before the generation starts, whether a worker serves it. A broker
# that cannot answer a status request within this cannot carry a generation either; the check
# costs one round trip (about a millisecond on a LAN) when it can.
PREFLIGHT_TIMEOUT_S = 2.0
_FROM_SETTINGS = object()  # "build it from the settings", where None means "none"
RAN_HERE = "forced split ran here"  # a decision's reason when a fixed split ran every layer here


class ContextLengthError(PartitionError):
    """The prompt plus the tokens asked for do not fit in the model's context."""


@dataclass(frozen=True)
class GenerationParams:
    """What one request may choose; the engine's settings give the defaults."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    raw_prompt: bool = False  # skip the chat template of instruct models
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)
    top_k: int = 0  # sample among the k most likely tokens only; 0 keeps every token
    stop: tuple[str, ...] = ()  # end the text before the first of these strings
    min_p: float = 0.0  # drop tokens below min_p times the top token's probability; 0 keeps every token
    repetition_penalty: float = 1.0  # >1 discourages repeating generated tokens; 1 is off
    # A prompt that does not fit the context with max_new_tokens after it loses its oldest tokens
    # instead of being refused.
    truncate_prompt: bool = False

    @classmethod
    def from_settings(cls, settings: EdgeConfig) -> GenerationParams:
        return cls(settings.max_new_tokens, settings.temperature, settings.top_p, settings.seed,
                   settings.raw_prompt, top_k=settings.top_k, stop=settings.stop, min_p=settings.min_p,
                   repetition_penalty=settings.repetition_penalty, truncate_prompt=settings.truncate_prompt)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.seed, self.top_k, self.min_p,
                              self.repetition_penalty)


def _quiet(_: str) -> None:
    pass


# --- settings -> objects: the one place each option becomes a component ----------------------------

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
                          pipeline=config.mini_pipeline, adapter=config.mini_adapter, tree_nodes=config.mini_tree,
                          group=config.mini_group)


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
        adaptive_timeout=config.adaptive_timeout, max_frame_bytes=int(config.max_frame_mb * 2**20),
    )


def privacy_of(config: EdgeConfig):
    """The PrivacyProtection the edge options describe."""
    from edge_worker.privacy import PrivacyProtection

    return PrivacyProtection(config.encryption, config.wire_dtype, config.reduce_dims, config.reductions_dir)


def context_length_of(source: ModelSource) -> int | None:
    """Positions the model was built for (Llama's ``max_position_embeddings``, GPT-2's ``n_positions``)."""
    config = source.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --- the engine ----------------------------------------------------------------------------------

class EdgeEngine:
    """Creates and runs generations for one model with one set of settings."""

    def __init__(
        self,
        model: Any = None,
        settings: EdgeConfig | None = None,
        *,
        tokenizer: Any = None,
        cloud_client: Any = None,
        device_monitor: Any = _FROM_SETTINGS,
        mini_llm: Any = _FROM_SETTINGS,
        privacy: Any = None,
        power: PowerModel = WIFI,
        base_conditions: Conditions | None = None,
        replan_every: int = 8,
        replan_margin: float = 0.1,
        progress: Progress | None = None,
    ) -> None:
        """``model``: a name or path as for ``--model`` (default: ``settings.model``), a
        ``ModelSource`` or a loaded transformers model. ``cloud_client``, ``device_monitor`` (None:
        plan on ``base_conditions`` and pings alone), ``mini_llm`` (a ``MiniLLMHandler`` or None)
        and ``privacy`` (a ``PrivacyProtection``) replace what the settings would build; the
        client's encryption and wire format then follow ``privacy``."""
        settings = settings or EdgeConfig()
        self.progress = progress or _quiet
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.progress(f"preparing model {model if isinstance(model, str) else settings.model}")
        self.source = source_of(settings.model if model is None else model)
        self.settings = apply_leakage_budget(settings, self.source)
        self.device = pick_device(self.settings.device)
        self.dtype = self._dtype(self.settings.dtype)
        n = self.source.n_layers
        self.fixed_split = resolve_split(self.settings, n)
        self.tokenizer = tokenizer or self.source.load_tokenizer()
        self.eos = eos_token_ids(self.source, self.tokenizer)
        self.context_length = context_length_of(self.source)
        self.privacy = privacy or privacy_of(self.settings)
        self.mini_llm = mini_handler(self.settings) if mini_llm is _FROM_SETTINGS else mini_llm
        if self.mini_llm is not None:
            self.mini_llm.check_tokenizer(self.tokenizer)
        if cloud_client is not None:  # the privacy settings decide how activations leave the device
            cloud_client.encryption = self.privacy.encryption_enabled
            cloud_client.wire_dtype = self.privacy.wire_dtype
        elif self.fixed_split != n:
            cloud_client = make_client(replace(self.settings, encryption=self.privacy.encryption_enabled,
                                               wire_dtype=self.privacy.wire_dtype))
        self.client = cloud_client
        self._own_monitor = False
        self.planner: SplitPlanner | None = None
        if self.fixed_split is None:
            if device_monitor is _FROM_SETTINGS:
                from edge_worker.device_monitor import DeviceMonitor

                device_monitor, self._own_monitor = DeviceMonitor(), True
            s = self.settings
            self.planner = SplitPlanner(
                self.source, self.client, Weights(s.energy_weight, s.latency_weight, s.memory_weight),
                monitor=device_monitor, wire_dtype=self.privacy.wire_dtype, reduce_dims=self.privacy.reduce_dims,
                min_split=s.min_split, power=power, base_conditions=base_conditions,
                drafter_bytes=None if self.mini_llm is None else functools.partial(self.mini_llm.edge_bytes, self.source))
        self.device_monitor = None if device_monitor is _FROM_SETTINGS else device_monitor
        self.replan_every = replan_every
        self.replan_margin = replan_margin
        self.defaults = GenerationParams.from_settings(self.settings)
        self.decisions: list[Decision] = []  # every generation's, in order
        self._segments: OrderedDict[tuple[int, int, bool, bool], ModelSegment] = OrderedDict()
        self._lock = threading.RLock()
        # Prompts' keys and values of the edge's layers, for generations that start the same way.
        self.prefixes = PrefixCache(int(self.settings.prefix_cache_mb * 2**20)) if self.settings.prefix_cache_mb else None
        # Which worker holds each recent generation: the next turn of a conversation asks for it,
        # so the worker's prefix cache, which kept the turns before, serves it.
        self.continuations = Continuations()

    # --- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self._own_monitor and hasattr(self.device_monitor, "stop"):
            self.device_monitor.stop()

    def __enter__(self) -> EdgeEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ----------------------------------------------------------------------------------
    def params(self, **overrides: Any) -> GenerationParams:
        """The engine's defaults with some fields changed."""
        return replace(self.defaults, **overrides)

    def encode(self, prompt: str | list[int] | torch.Tensor, raw: bool = False) -> list[int]:
        """Token ids of a text prompt (the chat template unless ``raw``), or ids given as a list
        or a (T,) / (1, T) tensor."""
        if isinstance(prompt, str):
            return encode_prompt(self.tokenizer, prompt, raw=raw)
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if ids and isinstance(ids[0], list):
            if len(ids) != 1:
                raise ValueError(f"one sequence at a time (batch size 1), got {len(ids)}")
            ids = ids[0]
        ids = [int(i) for i in ids]
        vocab = int(self.source.config.vocab_size)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token ids must be in [0, {vocab}) for {self.source.name}; got {bad[:5]}")
        return ids

    def fit_prompt(self, ids: list[int], new_tokens: int, truncate: bool) -> list[int]:
        """``ids`` when they and ``new_tokens`` fit the context; with ``truncate``, their newest
        tokens that do; otherwise ``ContextLengthError``. Asking for more tokens than the whole
        context holds is refused either way."""
        limit = self.context_length
        if limit is None or len(ids) + new_tokens <= limit:
            return ids
        if not truncate:
            raise ContextLengthError(
                f"the prompt is {len(ids)} tokens and {new_tokens} more were asked for, "
                f"{len(ids) + new_tokens} positions; {self.source.name} holds {limit}: "
                "shorten the prompt, ask for fewer tokens, or let the prompt lose its oldest tokens "
                "(--truncate-prompt)")
        if new_tokens >= limit:
            raise ContextLengthError(
                f"{new_tokens} tokens were asked for and {self.source.name} holds {limit} positions: "
                "no prompt fits before them; ask for fewer tokens")
        return ids[len(ids) + new_tokens - limit:]

    def generate(self, prompt: str | list[int] | torch.Tensor, params: GenerationParams | None = None,
                 on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Run one generation; ``on_text`` receives the text as it is produced. Setting ``cancel``
        (from any thread) ends it at its next step with ``GenerationCancelled``, its cloud
        session closed."""
        params = params or self.defaults
        ids = self.encode(prompt, params.raw_prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        if params.max_new_tokens < 1:
            raise ValueError(f"tokens must be at least 1, got {params.max_new_tokens}")
        given = len(ids)
        ids = self.fit_prompt(ids, params.max_new_tokens, params.truncate_prompt)
        if len(ids) < given:
            self.progress(f"the prompt lost its {given - len(ids)} oldest tokens to fit {self.context_length} "
                          "positions")
        decision, watch = self._decide(len(ids), params.max_new_tokens)
        run = _Run(self, watch)
        k = decision.k
        edge = run.edge_segment(k)
        backend = run.backend_for(k)
        if backend is not None and hasattr(backend, "near"):
            backend.near = self.continuations.worker_for(ids, k)
        eos = set() if params.ignore_eos else self.eos
        generator = EdgeGenerator(edge, backend, self.tokenizer, eos, mode=mode_for(k, self.source.n_layers),
                                  mini=run.mini_for(k, edge), mover=run if watch is not None else None,
                                  prefixes=self.prefixes)
        self.progress(f"generating up to {params.max_new_tokens} tokens from a {len(ids)}-token prompt")
        try:
            result = generator.generate(ids, params.max_new_tokens, params.sampling, on_text=on_text,
                                        stop=params.stop, cancel=cancel)
        except NoWorkerAvailable as exc:
            if isinstance(exc, WeightsMismatch | CacheLimitExceeded) or self.planner is None and self.client is None:
                raise
            raise self.serving_error(exc) from None
        result.prompt_tokens_dropped = given - len(ids)
        if result.workers_used and result.fallback_at_step is None:
            self.continuations.add(ids, result.token_ids, result.workers_used[-1], result.splits_used[-1])
        if decision.reason.startswith(RAN_HERE):
            result.fallback_at_step = 0
        if result.fallback_at_step == 0:
            result.mode = "local"  # what ran: the cloud computed no step (split still says where it was meant to be)
        if decision.reason != "forced":
            result.decision = decision.to_dict()
            result.decisions = [decision.to_dict(), *(d.to_dict() for d in run.decisions)]
        if self.planner is not None:
            if watch is not None:
                watch.feed(result.trace)
            else:
                self.planner.feed(result.trace)
            self.planner.feed_upload(result.trace)
        return result

    def generate_many(self, prompts: list[str | list[int] | torch.Tensor], params: GenerationParams | None = None,
                      max_concurrent: int | None = None) -> list[GenerationResult]:
        """Run several generations at once, one thread each (at most ``max_concurrent`` at a time;
        default: all): each is its own cloud session, and a batching worker computes their steps
        together. Results come in the prompts' order, each as the prompt would give alone (greedy:
        the same tokens). Every prompt is checked before any starts; if one generation fails, the
        others stop at their next step and its error is raised."""
        params = params or self.defaults
        if not prompts:
            return []
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        encoded = []  # token ids, handed to generate(): each prompt is tokenized once
        for i, prompt in enumerate(prompts):  # bad input fails before any work starts
            try:
                ids = self.encode(prompt, params.raw_prompt)
                if not ids:
                    raise ValueError("the prompt encodes to no tokens")
                self.fit_prompt(ids, params.max_new_tokens, params.truncate_prompt)
            except (ValueError, PartitionError) as exc:
                raise type(exc)(f"prompt {i}: {exc}") from exc
            encoded.append(ids)
        cancel = threading.Event()
        results: list[GenerationResult | None] = [None] * len(prompts)
        errors: list[tuple[int, BaseException]] = []

        def run(i: int) -> None:
            if cancel.is_set():
                return
            try:
                results[i] = self.generate(encoded[i], params, cancel=cancel)
            except GenerationCancelled:
                pass
            except BaseException as exc:  # noqa: BLE001 - raised below, once the others have stopped
                errors.append((i, exc))
                cancel.set()

        with ThreadPoolExecutor(max_workers=min(max_concurrent or len(prompts), len(prompts)),
                                thread_name_prefix="edgecloud-batch") as pool:
            list(pool.map(run, range(len(prompts))))
        if errors:
            raise errors[0][1]  # the first to fail: the others stopped because of it
        return results  # type: ignore[return-value]  (every slot is filled when nothing failed)

    def stream(self, prompt: str | list[int] | torch.Tensor, params: GenerationParams | None = None,
               on_result: Callable[[GenerationResult], None] | None = None) -> GenerationStream:
        """The generation's text as it is produced: iterate over it; ``.result`` once it ends
        (also handed to ``on_result``)."""
        return GenerationStream(self, prompt, params, on_result)

    def serving_error(self, exc: Exception, workers: list[dict] | None = None) -> NoWorkerAvailable:
        """``exc`` (no worker took this model's session) with what the registered workers serve
        instead, and what to do when it is this model with other weights."""
        if workers is None:
            try:
                workers = self.client.status(PREFLIGHT_TIMEOUT_S).get("workers", [])
            except EdgeCloudError:
                return NoWorkerAvailable(str(exc))
        mine = self.source.model_id
        arch = mine.split("@")[0]
        others = sorted({str(w.get("model_id")) for w in workers if w.get("model_id") != mine})
        if not any(o.split("@")[0] == arch for o in others):
            return NoWorkerAvailable(f"{exc}; the registered workers serve: {', '.join(others) or 'nothing'}")
        return WeightsMismatch(
            f"no worker holds these weights ({mine}); the workers hold {', '.join(others)}, the same "
            "architecture with other weights (the model was changed in memory, fine-tuned, or is another "
            "checkpoint). Start a worker with them: partition.models.save_checkpoint(model, DIR, tokenizer), "
            "then `edgecloud cloud-worker --model DIR`")

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation (``[{"role": ..., "content": ...}, ...]``) through the
        tokenizer's chat template (``partition.tokens.encode_messages``)."""
        return encode_messages(self.tokenizer, messages)

    # --- deciding ----------------------------------------------------------------------------------
    def choose_split(self, prompt_tokens: int, new_tokens: int) -> Decision:
        """The split a generation of this size would start at (and why)."""
        return self._decide(prompt_tokens, new_tokens, record=False)[0]

    def _decide(self, prompt_tokens: int, new_tokens: int, record: bool = True
                ) -> tuple[Decision, ReplanWatch | None]:
        watch = None
        if self.planner is None:
            decision = self._check_forced(self.fixed_split)  # type: ignore[arg-type]
        else:
            self.progress("measuring the link and pricing every split")
            decision, snapshot = self.planner.choose(prompt_tokens, new_tokens, fallback=self.settings.fallback_local)
            log.info("planner: %s", decision.summary())
            if self.settings.dynamic and snapshot is not None:
                watch = ReplanWatch(self.planner, snapshot, prompt_tokens, new_tokens,
                                    every=self.replan_every, margin=self.replan_margin)
        if record:
            with self._lock:
                self.decisions.append(decision)
        return decision, watch

    def _check_forced(self, k: int) -> Decision:
        """A fixed split, checked with the broker before the generation starts, so that a broker
        that does not answer, or workers that hold other weights, cost a status request and not
        the step deadline. Not served: refused at once without the fallback (saying what the
        workers hold), else every layer runs here from the start. No broker answer: with the
        fallback, every layer here; without it the generation tries, and retries until its
        deadline, since the broker may come back. No worker registered yet: it tries (workers
        may be starting)."""
        n = self.source.n_layers
        now = time.time()
        if k == n or self.client is None:
            return Decision(k, "forced", None, None, None, now)
        fallback = self.settings.fallback_local
        try:
            workers = self.client.status(PREFLIGHT_TIMEOUT_S).get("workers", [])
        except EdgeCloudError as exc:
            if not is_unavailable(exc):
                raise  # a refused key or a protocol error is never papered over by a local run
            if not fallback:
                return Decision(k, "forced", None, None, None, now)
            log.warning("cloud unavailable (%s): running every layer here", exc)
            return Decision(n, f"{RAN_HERE}: the broker did not answer", None, None, None, now)
        if not workers or k in servable_splits(workers, self.source.model_id, n):
            return Decision(k, "forced", None, None, None, now)
        error = self.serving_error(NoWorkerAvailable(
            f"no registered worker serves {self.source.model_id} from layer {k}"), workers)
        if not fallback:
            raise error
        log.warning("%s; running every layer here", error)
        return Decision(n, f"{RAN_HERE}: no worker serves split {k} of this model", None, None, None, now)

    def _dtype(self, name: str) -> torch.dtype:
        """What the edge's layers compute in: ``auto`` keeps a model object's own dtype and
        takes float32 on a CPU, bfloat16 on a GPU for weights read from files."""
        if name == "auto" and (self.source.module is not None or self.device.type == "cpu"):
            return self.source.dtype
        return pick_dtype(name, self.device)

    # --- parts, loaded once ------------------------------------------------------------------------
    def segment(self, lo: int, hi: int, *, head: bool, embed: bool | None = None) -> ModelSegment:
        """Layers ``[lo, hi)`` (with the embedding iff ``lo == 0``, unless ``embed`` says), loaded
        once per engine. A segment loaded with the head also serves requests without it."""
        embed = lo == 0 if embed is None else embed
        with self._lock:
            for key in ((lo, hi, embed, head), (lo, hi, embed, True)):
                if key in self._segments:
                    self._segments.move_to_end(key)
                    return self._segments[key]
            what = f"layers [{lo}, {hi}) of {self.source.n_layers}" + (" and the head" if head else "")
            self.progress(f"loading {what}")
            t0 = time.perf_counter()
            seg = ModelSegment.load(self.source, lo, hi, embed=embed, head=head, dtype=self.dtype, device=self.device)
            if self.settings.cuda_graphs:
                seg.use_graphs(capture=True)  # a clear error where torch put the layers on no GPU
            log.info("segment ready: %s, on %s in %s (%.1f s)", seg.describe(), self.device,
                     str(self.dtype).removeprefix("torch."), time.perf_counter() - t0)
            self._segments[(lo, hi, embed, head)] = seg
            while len(self._segments) > MAX_CACHED_SEGMENTS:
                self._segments.popitem(last=False)
            return seg

    def warm_up(self, prompt_tokens: int = 32) -> int | None:
        """Build the edge's layers for the split the engine would pick now for a short prompt, so
        that a server's first request does not wait for them (the segment is cached and reused);
        returns that split, or None when it could not be decided now (the broker not answering
        with the fallback off): the first request then builds what it needs, as without this."""
        try:
            decision, _ = self._decide(prompt_tokens, self.defaults.max_new_tokens, record=False)
        except EdgeCloudError as exc:
            log.warning("no split decided before the first request (%s); its layers load then", exc)
            return None
        self.edge_segment(decision.k)
        return decision.k

    def edge_segment(self, k: int) -> ModelSegment:
        """The edge's layers ``[0, k)``, with the head when it runs every layer or the drafter
        applies the head to its own activations."""
        n = self.source.n_layers
        return self.segment(0, k, head=k == n or bool(self.mini_llm and k < n and self.mini_llm.needs_head_at(self.source, k)))

    def backend_for(self, k: int, edge: ModelSegment | None):
        """A cloud session for layers ``[k, N)`` (None at ``k = N``), with the projection the
        privacy settings ask for and, unless turned off, the local fallback."""
        n = self.source.n_layers
        if k == n:
            return None
        if self.privacy.reduce_dims is not None:
            self.progress(f"finding or calibrating the {self.privacy.reduce_dims}-dim projection for split {k}")
        reduction = self.privacy.reduction_for(self.source, k, edge)  # None unless reduce_dims
        session = self.client.session(self.source.model_id, k, self.source.hidden_size, reduction)
        if self.settings.fallback_local:
            # It takes over from the cloud: the activations at k, even at k = 0 (no embedding).
            session.fallback = lambda: LocalBackend(self.segment(k, n, head=True, embed=False))
        return session

    def mini_for(self, k: int, edge: ModelSegment):
        if self.mini_llm is None or k == self.source.n_layers:
            return None
        with self._lock:  # loads the adapter or the drafter model once
            return self.mini_llm.settings(self.source, edge, self.tokenizer)


class _Run:
    """One generation's SplitMover: re-plans through its ``ReplanWatch`` and builds the parts for
    a new split from the engine."""

    def __init__(self, engine: EdgeEngine, watch: ReplanWatch | None) -> None:
        self.engine = engine
        self.watch = watch
        self.decisions: list[Decision] = []  # re-plans that moved the split

    def replan(self, step: int, result: GenerationResult) -> int | None:
        if self.watch is None:
            return None
        decision = self.watch.replan(step, result.trace, result.splits_used[-1])
        if decision is None:
            return None
        self.decisions.append(decision)
        with self.engine._lock:
            self.engine.decisions.append(decision)
        return decision.k

    def edge_segment(self, k: int) -> ModelSegment:
        return self.engine.edge_segment(k)

    def backend_for(self, k: int):
        edge = self.edge_segment(k) if k < self.engine.source.n_layers else None  # loaded already: a cache hit
        return self.engine.backend_for(k, edge)

    def mini_for(self, k: int, edge: ModelSegment):
        return self.engine.mini_for(k, edge)


_END = object()


class GenerationStream:
    """A generation running on its own thread, read as an iterator of text pieces.

    ``result`` holds the ``GenerationResult`` once the iterator is exhausted; an error in the
    generation is raised from the iteration. ``close()`` (or leaving a ``with`` block) stops a
    generation the reader no longer wants, at its next token."""

    def __init__(self, engine: EdgeEngine, prompt: Any, params: GenerationParams | None,
                 on_result: Callable[[GenerationResult], None] | None = None) -> None:
        self.result: GenerationResult | None = None
        self._on_result = on_result
        self._error: BaseException | None = None
        self._pieces: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(engine, prompt, params), daemon=True,
                                        name="edgecloud-generation")
        self._thread.start()

    def _run(self, engine: EdgeEngine, prompt: Any, params: GenerationParams | None) -> None:
        try:
            self.result = engine.generate(prompt, params, on_text=self._piece, cancel=self._cancel)
            if self._on_result is not None:
                self._on_result(self.result)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
            self._error = exc
        finally:
            self._pieces.put(_END)

    def _piece(self, text: str) -> None:
        if self._cancel.is_set():  # nothing more reaches a closed stream, even before the next step
            raise GenerationCancelled("the reader closed the stream")
        self._pieces.put(text)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        item = self._pieces.get()
        if item is _END:
            self._pieces.put(_END)  # later calls end too
            self._thread.join()
            if self._error is not None and not isinstance(self._error, GenerationCancelled):
                raise self._error
            raise StopIteration
        return item

    def close(self) -> None:
        self._cancel.set()
        self._thread.join()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
