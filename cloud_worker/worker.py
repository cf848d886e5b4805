"""The cloud worker: holds layers ``[0, N)`` and the head, serves any split ``k`` a session asks for.

One compute thread takes jobs from ``WorkerConnection`` (whose own I/O thread keeps heartbeats
going while a long prefill runs). Continuous batching: each iteration takes every job that has
arrived (up to ``max_batch``), and the steps among them, whatever their sessions' splits, run as
one forward pass whose results are bit-identical to each step run alone
(``partition/batching.py``); sessions join and leave between iterations. A bad request gets a
typed error reply and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import sha256

import msgpack
import torch

from broker.errors import CryptoError, EdgeCloudError, ProtocolError, UnknownReduction, WorkerLost
from broker.protocol import WorkerId
from broker.transport import client_keys
from broker.wire.crypto import NullCipher, SessionCipher, load_keys, new_session_nonce
from broker.wire.session_protocol import (
    KIND_CLOSE,
    KIND_OPEN,
    KIND_STEP,
    OpenParams,
    check_close_key,
    open_step,
    seal_open_proof,
    seal_step_reply,
)
from broker.worker_api import Job, WorkerConnection, WorkerInfo
from cloud_worker.config import CloudWorkerConfig
from cloud_worker.faults import FaultInjector
from cloud_worker.sessions import Session, SessionTable
from partition.devices import pick_device, pick_dtype
from partition.models import resolve_model
from partition.prefix_cache import PrefixCache, row_digests
from partition.profile import kv_bytes_per_token_per_layer, measure_decode_ms
from partition.reduction import Reduction, ReductionError, ReductionStore
from partition.sampling import SamplingParams
from partition.segment import ModelSegment, StepInput, chunk_plan
from partition.speculative import verify_drafts, verify_tree
from partition.tree import DraftTree

log = logging.getLogger(__name__)

# How often the compute loop wakes when idle, to expire sessions and notice a stop request.
_IDLE_POLL_S = 0.2
# A new prompt sharing at least this many more positions with another prompt of the same pass than
# the prefix cache holds waits for that one and copies them (below it, computing them costs less
# than a pass's wait).
_SHARED_PREFILL_MIN = 16


class LayerCost:
    """The decode cost per layer this worker reports: measured warm at start-up
    (``partition.profile.measure_decode_ms``, the same method as the edge's profile), then
    followed by the one-position steps it serves, so that a worker slowed by load or by its
    neighbours says so in its next heartbeat.

    A served step is compared with what the start-up measurement predicts for it (its layers and
    the head); the reported figure is the start-up per-layer time scaled by the median ratio over
    the last ``WINDOW`` steps. A ratio rather than "step minus head, over layers": a head time
    inflated by a busy start-up, subtracted from every step, read 0.3 ms/layer for a worker that
    took 0.9. The median: one step delayed by a scheduler quantum must not swing the figure.
    """

    WINDOW = 15
    # Steps through fewer layers than this are mostly the head: they say little about the layers.
    MIN_LAYERS = 4
    # Idle this long after serving steps, the worker measures itself again: a figure followed up
    # under load would otherwise stay high once the load is gone, and a planner that prices the
    # cloud by it might never send the steps that would bring it down.
    IDLE_REMEASURE_S = 20.0

    def __init__(self, layer_ms: tuple[float, ...], head_ms: float) -> None:
        self.samples: deque[float] = deque(maxlen=self.WINDOW)
        self.reset(layer_ms, head_ms)

    def reset(self, layer_ms: tuple[float, ...], head_ms: float) -> None:
        """Start again from a fresh measurement (``partition.profile.measure_decode_ms``)."""
        self.n_layers = len(layer_ms)
        self.head_ms = head_ms
        self.measured_ms = sum(layer_ms) / len(layer_ms) if layer_ms else 0.0
        self.per_layer_ms = self.measured_ms
        self.samples.clear()
        self.observed = 0

    def observe(self, compute_ms: float, layers: int, positions: int) -> None:
        """A served step's forward time (head included) over ``layers`` layers and ``positions``."""
        if positions != 1 or layers < min(self.MIN_LAYERS, self.n_layers) or not self.n_layers:
            return  # prefills and verified drafts cost differently per layer: only decode counts
        predicted = layers * self.measured_ms + self.head_ms
        if predicted <= 0:
            return
        self.samples.append(compute_ms / predicted)
        self.observed += 1
        if len(self.samples) >= 3:
            self.per_layer_ms = self.measured_ms * statistics.median(self.samples)

    def stale(self, idle_s: float) -> bool:
        """True when steps moved the figure and none came for IDLE_REMEASURE_S."""
        return self.observed > 0 and idle_s >= self.IDLE_REMEASURE_S


@dataclass
class _Pending:
    """A checked step waiting for its batch's forward pass."""

    job: Job
    session: Session
    hidden: torch.Tensor  # (1, T, H)
    pos: int  # where the step starts in the session's cache
    draft: list[int]  # drafted tokens held by the last len(draft) positions
    seen: Sequence[int]  # generated tokens so far (a repetition penalty reads them)
    epoch: int
    tree: DraftTree | None = None  # the drafts are this tree's nodes, the frame its rows
    done: int = 0  # positions computed so far: a long frame runs one chunk per pass (chunk_plan)
    logits: list[torch.Tensor] = field(default_factory=list)  # its chunks' logits so far
    compute_ms: float = 0.0  # over its passes
    # Chained digests of its frame's rows (None: the session's are not followed, or a token tree,
    # whose kept rows are digested once known); a prompt's joins the prefix cache when computed.
    digests: list[bytes] | None = None
    prompt: bool = False
    filled: bool = False  # a prompt's known beginning has been copied (_fill_prompts)

    def next_chunk(self) -> tuple[int, int, int]:
        """``(a, b, logit rows)`` of the chunk the next pass computes."""
        return next(c for c in chunk_plan(self.hidden.shape[1], len(self.draft) + 1) if c[0] == self.done)


def _shared_prefix(a: list[bytes] | None, b: list[bytes], most: int) -> int:
    """How many leading positions two chained digest lists share (at most ``most``): position
    ``i`` agrees exactly when every position before it does, so a bisection finds the last."""
    if a is None:
        return 0
    lo, hi = 0, min(len(a), len(b), most)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def opener_digest(job: Job) -> bytes:
    """What identifies one opener: its request id and everything it asks for."""
    fields = [job.request_id, job.session_id, job.model_id, job.layer_lo, job.step, job.extra]
    return sha256(msgpack.packb(fields, use_bin_type=True)).digest()


class CloudWorker:
    def __init__(self, config: CloudWorkerConfig) -> None:
        self.config = config
        self.curve_keys = client_keys(config.keys_dir, "worker", config.key_name) if config.curve else None
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.device = pick_device(config.device)
        self.dtype = dtype = pick_dtype(config.dtype, self.device)
        log.info("loading %s on %s in %s, then measuring its speed", config.model, self.device, dtype)
        self.source = resolve_model(config.model)
        self.segment = ModelSegment.load(
            self.source, 0, self.source.n_layers, embed=False, head=True, dtype=dtype, device=self.device,
            head_blocks=config.head_blocks,
        )
        if config.head_blocks and getattr(self.segment.lm_head, "q80", None) is None:
            log.warning("--head-blocks: %s has no head in Q8_0 blocks this worker can read (a GGUF file's, on a "
                        "CPU in float32, with the row kernel); the head stays as loaded", config.model)
        if config.cuda_graphs:
            self.segment.use_graphs(capture=True)  # a clear error where torch put the layers on no GPU
        self.keypair = None
        if config.encryption and config.keys_dir is not None:
            self.keypair = load_keys(config.keys_dir, "worker", config.key_name)
        limit = None if config.max_cache_mb is None else int(config.max_cache_mb * 2**20)
        self.sessions = SessionTable(config.max_sessions, config.session_idle_ttl_s, limit, on_end=self._session_ended)
        # Keys and values one position of one layer adds to a session's cache, in this worker's dtype.
        self._kv_position_layer_bytes = kv_bytes_per_token_per_layer(self.source.config, dtype.itemsize)
        first = (self.segment.new_cache(config.max_session_tokens).capacity_for(1) * self.source.n_layers
                 * self._kv_position_layer_bytes)
        if limit is not None and first > limit:
            log.warning("--max-cache-mb %g is less than a cloud-only session's first KV cache (%.1f MiB for %d "
                        "layers): only sessions that split later can open here", config.max_cache_mb,
                        first / 2**20, self.source.n_layers)
        # Prompts' keys and values, reused by later sessions that start the same way: only where
        # a position's numbers cannot depend on the frame it came in (partition/prefix_cache.py).
        self.prefixes = (PrefixCache(int(config.prefix_cache_mb * 2**20))
                         if config.prefix_cache_mb > 0 and self.segment.whole_frames_packed() else None)
        self.reductions = ReductionStore(config.reductions_dir)
        self.worker_id = WorkerId(config.worker_id or f"w-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        self.cost = LayerCost(*measure_decode_ms(self.segment))
        self.info = WorkerInfo(
            worker_id=self.worker_id, model_id=self.source.model_id,
            layer_ranges=((0, self.source.n_layers),),
            public_key=self.keypair.public_key if self.keypair else b"",
            per_layer_ms=self.cost.per_layer_ms, max_sessions=config.max_sessions, max_batch=config.max_batch,
            cache_limit_bytes=limit or 0,
        )
        self.faults = FaultInjector.from_env()  # off unless EDGECLOUD_FAULT_INJECTION is set (tests)
        self.stop_event = threading.Event()
        self.served = 0
        self.failed = 0
        self.reopeners = 0  # openers the broker ran again here, answered as the first time
        self._broker_epoch = 0  # the WorkerConnection.broker_epoch whose sessions this worker keeps
        self._last_pass_sessions: set[str] = set()  # whose next steps the next pass waits for a moment
        self._last_pass_s = 0.0
        # Long frames (prefills) part-way through: each pass computes their next chunk beside the
        # other sessions' steps. A job of such a session waits in _held until its frame is done,
        # then in _resumed for the next pass, so each session still sees its requests in order.
        self._prefilling: list[_Pending] = []
        self._held: dict[str, list[Job]] = {}
        self._resumed: list[Job] = []
        # New prompts waiting for another session's prompt, which begins the same way, to be
        # computed and kept (by that session's id); then they copy it (_fill_prompts).
        self._after_prompt: dict[str, list[_Pending]] = {}
        self.conn: WorkerConnection | None = None

    def serve(self) -> None:
        """Serve until ``stop_event`` is set; then leave the broker gracefully."""
        self.conn = WorkerConnection(self.config.broker, self.info, curve=self.curve_keys)
        log.info("worker %s serving %s (%d layers on %s with %d torch threads, %.2f ms/layer, batches of up "
                 "to %d) via %s", self.worker_id, self.source.model_id, self.source.n_layers, self.device,
                 torch.get_num_threads(), self.cost.per_layer_ms, self.config.max_batch, self.config.broker)
        last_job = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self._free_lost_sessions()
                expired = self.sessions.expire()
                if expired:
                    log.info("expired %d idle sessions", len(expired))
                self.conn.set_active_sessions(len(self.sessions))
                self.conn.set_cache_bytes(self.sessions.cache_bytes())
                if self.prefixes is not None:
                    self.conn.set_prefix_cache(self.prefixes.nbytes, self.prefixes.reused_positions)
                self.conn.set_per_layer_ms(self.cost.per_layer_ms)
                more_to_do = bool(self._prefilling or self._resumed)
                job = self.conn.get(0.0 if more_to_do else _IDLE_POLL_S)
                if job is not None or more_to_do:
                    carry, self._prefilling = self._prefilling, []
                    self.handle_many(self._gather(job, len(carry)), carry)
                    last_job = time.monotonic()
                elif self.cost.stale(time.monotonic() - last_job):
                    before = self.cost.per_layer_ms
                    self.cost.reset(*measure_decode_ms(self.segment, samples=5))
                    log.info("idle: re-measured %.2f ms/layer (steps had moved it to %.2f)",
                             self.cost.per_layer_ms, before)
        finally:
            self.conn.close(graceful=True)

    def _gather(self, job: Job | None, carried: int = 0) -> list[Job]:
        """The jobs of the next iteration: those resumed after a prefill, ``job``, everything else
        that has arrived, and the next steps of the sessions in the last forward pass, for at
        most ``batch_wait_s`` (and half that pass's time). Those sessions' edges got their
        answers a moment ago and are sending their next steps: computing without them would
        split one batch into two that alternate, each half full. A session that has ended costs
        one wait, once. ``carried``: prefills part-way through, which take seats too."""
        assert self.conn is not None
        room = max(1, self.config.max_batch - carried)
        jobs, self._resumed = self._resumed, []
        if job is not None:
            jobs.append(job)
        jobs += self.conn.take_ready(max(0, room - len(jobs)))
        expected = self._last_pass_sessions - {j.session_id for j in jobs}
        wait = min(self.config.batch_wait_s, self._last_pass_s / 2)
        deadline = time.monotonic() + wait
        while expected and len(jobs) < room:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            more = self.conn.get(left)
            if more is None:
                break
            for j in (more, *self.conn.take_ready(room - len(jobs) - 1)):
                jobs.append(j)
                expected.discard(j.session_id)
        return jobs

    def handle_many(self, jobs: list[Job], carry: Sequence[_Pending] = ()) -> None:
        """Serve jobs in rounds: each session's first job in the first round, its second (a
        pipelined step, or a close after a step) in the next, and so on, so each session sees
        its requests in order while the others' steps still share a pass. A round's opens and
        closes are served first, then its steps run as one packed forward pass
        (``ModelSegment.forward_many``) with the next chunk of each prefill part-way through
        (``carry`` in the first round). A job of a session whose prefill is not through waits
        for it. A request that fails is answered with its error; the others go on."""
        assert self.conn is not None, "serve() sets the connection before jobs arrive"
        # The broker's word that sessions are lost (a DropSession, a new broker's heartbeat) comes
        # just before the jobs that follow it: free them before those ask for room.
        self._free_lost_sessions()
        rounds: list[list[Job]] = []
        seen: dict[str, int] = {}
        for job in jobs:
            index = seen.get(job.session_id, 0)
            seen[job.session_id] = index + 1
            if index == len(rounds):
                rounds.append([])
            rounds[index].append(job)
        for index, round_jobs in enumerate(rounds):
            if index == 0:
                batch: list[_Pending] = list(carry)
            else:
                batch, self._prefilling = self._prefilling, []
            busy = {p.job.session_id for p in batch}
            busy |= {p.job.session_id for waiting in self._after_prompt.values() for p in waiting}
            resumed = {j.session_id for j in self._resumed}
            for job in round_jobs:
                if job.session_id in busy:
                    self._held.setdefault(job.session_id, []).append(job)
                    continue
                if job.session_id in resumed:  # behind its jobs that waited for a prefill
                    self._resumed.append(job)
                    continue
                if job.expired():
                    log.debug("skipping %s: its deadline passed while queued", job.request_id)
                    continue
                if job.broker_epoch < self.conn.broker_epoch:
                    log.debug("skipping %s: the broker that sent it was restarted since", job.request_id)
                    continue
                try:
                    self.faults.before(job)
                    if job.model_id != self.source.model_id:
                        raise ProtocolError("wrong_model", f"this worker holds {self.source.model_id}, not "
                                            f"{job.model_id}: the request was routed to the wrong worker")
                    if job.kind == KIND_STEP:
                        pending = self._prepare_step(job)
                        if isinstance(pending, _Pending):
                            batch.append(pending)
                            continue
                        extra, frames = pending
                    elif job.kind == KIND_OPEN:
                        extra, frames = self._open(job)
                    elif job.kind == KIND_CLOSE:
                        extra, frames = self._close(job)
                    else:
                        raise ProtocolError("bad_kind", f"unknown request kind {job.kind!r}")
                except Exception as exc:  # noqa: BLE001 - a bad request must never stop the worker
                    self._failed(job, exc)
                    continue
                self._answer(job, extra, frames)
            if batch:
                self._run_batch(batch)
        if not rounds and carry:
            self._run_batch(list(carry))

    def _failed(self, job: Job, exc: BaseException) -> None:
        assert self.conn is not None
        self.failed += 1
        if isinstance(exc, EdgeCloudError):
            log.warning("request %s (%s) failed: %s", job.request_id, job.kind, exc)
        else:
            log.error("request %s (%s) raised", job.request_id, job.kind, exc_info=exc)
        self.conn.fail(job, exc)

    def _answer(self, job: Job, extra: dict, frames: list) -> None:
        self._answer_many([(job, extra, frames)])

    def _answer_many(self, answers: list[tuple[Job, dict, list]]) -> None:
        """Replies, sent together (one forward pass's steps: ``WorkerConnection.reply_many``)."""
        assert self.conn is not None
        self.served += len(answers)
        self.conn.reply_many(answers)
        for job, _, _ in answers:
            self.faults.after(job)

    def _open(self, job: Job) -> tuple[dict, list]:
        params = OpenParams.from_extra(job.extra)
        if not 0 <= job.layer_lo <= self.source.n_layers:
            raise ProtocolError("bad_split", f"split {job.layer_lo} is outside [0, {self.source.n_layers}]")
        # One opener per id, ever: the edge opens each attempt under a new id, so an opener for an
        # id held (or held once) here is a replay, which must neither reset a live session (and
        # its replay window) nor bring an ended one back for its captured steps. The one exception
        # changes nothing: the broker's own re-run of the opener (same request id, same content)
        # that opened a session no step has used yet gets the answer it was given before.
        opener = opener_digest(job)
        held = self.sessions.get(job.session_id)
        if held is not None:
            if held.opener == opener and held.open_answer is not None and held.last_step < 0 and held.cache.length == 0:
                self.reopeners += 1
                log.info("session %s: its opener came again (attempt %d of request %s); answered as before",
                         job.session_id, job.attempt, job.request_id)
                return held.open_answer
            raise CryptoError(f"session {job.session_id} is already open here: a second opener for it is refused")
        ended = self.sessions.ended(job.session_id)
        if ended is not None:
            raise CryptoError(f"session {job.session_id} was {ended}: an opener for it again is refused")
        nonce = new_session_nonce()
        if params.edge_pk:
            if self.keypair is None:
                raise ProtocolError("no_encryption", "this worker has no keys; run the edge with --no-encryption "
                                    "or start the worker with --keys DIR")
            cipher = SessionCipher.for_worker(self.keypair.secret_key, params.edge_pk, job.session_id, nonce)
        elif self.keypair is not None and not self.config.allow_plaintext:
            raise CryptoError("this worker only serves encrypted sessions: run the edge without "
                              "--no-encryption (or start the worker with --allow-plaintext)")
        else:
            cipher = NullCipher()
        reduction = self._reduction(params.reduction, job.layer_lo) if params.reduction else None
        try:
            sampling = SamplingParams.from_wire(params.sampling)
        except ValueError as exc:
            raise ProtocolError("bad_open", f"sampling: {exc}") from None
        session = Session(
            session_id=job.session_id, layer_lo=job.layer_lo, cipher=cipher, sampling=sampling,
            cache=self.segment.new_cache(self.config.max_session_tokens), reduction=reduction,
            close_digest=params.close_digest, digests=[] if self.prefixes is not None else None,
        )
        self.sessions.reserve(self._cache_growth(session, 1), f"a new session at split {job.layer_lo}")
        self.sessions.add(session)
        if not params.edge_pk:
            answer: tuple[dict, list] = ({"worker_pk": b""}, seal_open_proof(cipher, job.session_id, job.step))
        else:
            assert self.keypair is not None  # checked above
            answer = ({"worker_pk": self.keypair.public_key, "nonce": nonce},
                      seal_open_proof(cipher, job.session_id, job.step))
        session.opener, session.open_answer, session.broker_epoch = opener, answer, job.broker_epoch
        return answer

    def _free_lost_sessions(self) -> None:
        """Free the sessions the broker dropped, and those opened through a broker process that
        has been replaced: the new one knows none of them. Their edges reopen elsewhere, and
        nothing would use them again before they idle out (``session_idle_ttl_s``, minutes) while
        their caches and slots stay."""
        assert self.conn is not None
        for sid in self.conn.dropped_sessions():
            self.sessions.remove(sid, "dropped by the broker")
        epoch = self.conn.broker_epoch
        if epoch == self._broker_epoch:
            return
        self._broker_epoch = epoch
        stale = [sid for sid in self.sessions.ids() if (s := self.sessions.get(sid)) is not None and s.broker_epoch < epoch]
        for sid in stale:
            self.sessions.remove(sid, "lost with the broker that opened it")
        if stale:
            log.info("freed %d sessions opened through the broker before its restart", len(stale))

    def _close(self, job: Job) -> tuple[dict, list]:
        """Free a session for the edge that opened it (it reveals the close key its opener
        committed to); anyone else's close, or a replayed one, is refused and changes nothing."""
        session = self.sessions.get(job.session_id)
        if session is None:
            ended = self.sessions.ended(job.session_id)
            raise WorkerLost(f"session {job.session_id} is not open here"
                             + (f" (it was {ended})" if ended else ""))
        check_close_key(session.close_digest, job.extra)
        self.sessions.remove(job.session_id)
        return {}, []

    def _reduction(self, sha256: str, split: int) -> Reduction:
        reduction = self.reductions.get(sha256)
        if reduction is None:
            raise UnknownReduction(f"this worker has no reduction with sha256 {sha256} in {self.reductions.directory}: "
                                   "copy the edge's file there (`edgecloud calibrate` prints its path)")
        try:
            reduction.check_matches(self.source.model_id, split, self.source.hidden_size)
        except ReductionError as exc:
            raise UnknownReduction(str(exc)) from None
        return reduction

    def _prepare_step(self, job: Job) -> _Pending | tuple[dict, list]:
        """Open and check a step: what the batch computes, or the answer when there is nothing to
        compute (a skipped conditional frame)."""
        session = self.sessions.get(job.session_id)
        if session is None:
            raise WorkerLost(f"session {job.session_id} is not held by worker {self.worker_id} "
                             "(expired, evicted or the worker restarted): reopen it and replay")
        width = session.reduction.dims if session.reduction else self.source.hidden_size
        req = open_step(session.cipher, job.session_id, job.step, job.frames, width,
                        vocab_size=self.source.vocab_size)
        self.sessions.touch(session)  # authenticated (when encrypted): the session is in use
        hidden = req.hidden
        if session.sampling.uses_history and req.seen is None:
            raise ProtocolError("bad_body", "this session samples with a repetition penalty: each step must carry "
                                "the generated token ids")
        if session.reduction is not None:
            hidden = session.reduction.reconstruct(hidden)  # (1, T, D) -> (1, T, H)
        pos, cache = req.pos, session.cache
        conditional = req.first is not None
        if req.epoch < session.epoch or (req.epoch == session.epoch and job.step < session.last_step):
            # A copy of an earlier step that a reordering link delivered after a later one (or a
            # frame the edge gave up on before it resent from an older position, a new epoch):
            # running it would crop the later step out of the cache. Its answer was taken elsewhere.
            if conditional:
                return self._skipped(job, session)
            raise ProtocolError("stale_step", f"step {job.step} (epoch {req.epoch}) arrived after step "
                                f"{session.last_step} (epoch {session.epoch}); not run again")
        if conditional and (req.epoch != session.epoch or pos != cache.length or req.first != session.expected):
            # A pipelined frame that follows a guess the main model did not make (or a frame that
            # was itself skipped): the edge discards it, so it must leave the cache alone.
            return self._skipped(job, session)
        if pos > cache.length:
            raise WorkerLost(f"session {job.session_id} holds {cache.length} positions but the step starts "
                             f"at {pos}: a step is missing; reopen and replay")
        limit = cache.max_length_tokens
        if limit is not None and pos + hidden.shape[1] > limit:
            raise ProtocolError("too_long", f"session would hold {pos + hidden.shape[1]} tokens, over this "
                                f"worker's limit of {limit} per session")
        if pos < cache.length:
            # A retry of a step this cache already ran (the reply was lost or late): undo it and
            # run it again, so the step affects the cache exactly once.
            cache.crop(pos)
        if session.digests is not None:
            if len(session.digests) < pos:  # cannot happen while the cache and its digests move together
                log.warning("session %s: digests of %d positions for a cache of %d; no longer kept for reuse",
                            session.session_id, len(session.digests), pos)
                session.digests = None
            else:
                del session.digests[pos:]  # a retry or a rewind: what the cache holds now
        preempted = self.sessions.reserve(self._cache_growth(session, pos + hidden.shape[1]), f"step {job.step}",
                                          session)
        if preempted:
            log.warning("ended %d younger sessions (%s) so that session %s, the oldest here, can grow within "
                        "--max-cache-mb; their edges reopen them", len(preempted), ", ".join(preempted),
                        session.session_id)
        digests, prompt = None, False
        if session.digests is not None and req.tree is None:  # a tree's kept rows are digested once known
            digests = row_digests(hidden, session.layer_lo, session.digests[-1] if pos else None)
            # A prompt: its longest known beginning is copied before its pass (_fill_prompts), and
            # the whole prompt is kept once computed.
            prompt = pos == 0 and not req.draft and hidden.shape[1] > 1
        return _Pending(job, session, hidden, pos, list(req.draft), req.seen or (), req.epoch, req.tree,
                        digests=digests, prompt=prompt)

    def _cache_growth(self, session: Session, length: int) -> int:
        """Bytes ``session``'s cache allocates to hold ``length`` positions (0 when it has room)."""
        cache = session.cache
        layers = self.source.n_layers - session.layer_lo
        return (cache.capacity_for(length) - cache.capacity()) * layers * self._kv_position_layer_bytes

    def _fill_prompts(self, batch: list[_Pending]) -> list[_Pending]:
        """Copy each new prompt's longest known beginning into its cache (its last position is
        computed: its logits are the answer). A prompt sharing a longer beginning with another
        prompt of this pass than the cache holds waits for that one to be computed and kept, then
        copies it: chats that arrive together at a cold worker compute their system prompt once.
        Returns what this pass computes."""
        if self.prefixes is None:
            return batch
        out: list[_Pending] = []
        computing: list[_Pending] = []  # prompts whose beginnings this pass computes
        for p in batch:
            if not p.prompt or p.filled:
                out.append(p)
                if p.prompt:
                    computing.append(p)  # a prefill part-way through
                continue
            assert p.digests is not None  # a prompt's are taken in _prepare_step
            most = p.hidden.shape[1] - 1
            known = self.prefixes.longest(p.digests, most)[1]
            shared, leader = max(((_shared_prefix(c.digests, p.digests, most), c) for c in computing),
                                 key=lambda t: t[0], default=(0, None))
            if leader is not None and shared >= known + _SHARED_PREFILL_MIN:
                self._after_prompt.setdefault(leader.job.session_id, []).append(p)
                continue
            p.hidden = p.hidden[:, self.prefixes.fill(p.digests, p.session.cache, most):]
            p.filled = True
            computing.append(p)
            out.append(p)
        return out

    def _run_batch(self, batch: list[_Pending]) -> None:
        """One forward pass over the batch's steps (a long frame's next chunk), then the verdict
        and reply of each step whose frame is through; the others wait in ``_prefilling``."""
        assert self.conn is not None, "serve() sets the connection before jobs arrive"
        batch = self._fill_prompts(batch)
        if not batch:
            return
        chunks = [p.next_chunk() for p in batch]
        t0 = time.perf_counter()
        try:
            # hidden: (1, T, H); the last len(draft) positions are drafted tokens to verify.
            outs = self.segment.forward_many([
                StepInput(p.hidden[:, a:b], p.session.cache, p.session.layer_lo, count or "none", p.tree)
                for p, (a, b, count) in zip(batch, chunks, strict=True)])
        except Exception as exc:  # noqa: BLE001 - every step of the batch is answered, the worker goes on
            for p in batch:
                p.session.cache.crop(p.pos)
                self._failed(p.job, exc)
                self._release(p.job.session_id)
            return
        compute_ms = (time.perf_counter() - t0) * 1e3
        self._last_pass_s = compute_ms / 1e3
        self._last_pass_sessions = {p.job.session_id for p in batch}
        tokens, answers = 0, []
        for p, out, (_, b, _) in zip(batch, outs, chunks, strict=True):
            p.done, p.compute_ms = b, p.compute_ms + compute_ms
            if out.logits is not None:
                p.logits.append(out.logits)
            if b < p.hidden.shape[1]:
                self._prefilling.append(p)
                continue
            self._release(p.job.session_id)
            session, cache = p.session, p.session.cache
            path, tree_rows = None, None
            known = None if session.digests is None else len(session.digests)
            try:
                logits = p.logits[0] if len(p.logits) == 1 else torch.cat(p.logits, dim=1)
                if p.tree is not None:
                    tree_rows, token = verify_tree(logits[0], p.tree, session.sampling, p.job.step, p.seen)
                    cache.keep(p.pos, tree_rows)
                    path, accepted = tree_rows[1:], len(tree_rows) - 1
                else:
                    accepted, token = verify_drafts(logits[0], p.draft, session.sampling, p.job.step, p.seen)
                    cache.crop(cache.length - (len(p.draft) - accepted))
                if session.digests is not None:
                    # What the cache now holds of the frame: its first rows, or a tree's kept path.
                    session.digests += (p.digests[:cache.length - p.pos] if tree_rows is None else
                                        row_digests(p.hidden[:, tree_rows], session.layer_lo,
                                                    session.digests[-1] if p.pos else None))
                    if p.prompt:
                        self.prefixes.add(session.digests, cache)
                worker_ms = (time.monotonic() - p.job.received_at) * 1e3
                reply = seal_step_reply(session.cipher, p.job.session_id, p.job.step, token, cache.length,
                                        p.compute_ms, worker_ms, accepted=accepted, path=path)
            except Exception as exc:  # noqa: BLE001 - this step fails; the pass's other steps are answered
                cache.crop(p.pos)
                if known is not None:
                    del session.digests[known:]
                self._failed(p.job, exc)
                continue
            tokens += accepted + 1
            session.last_step, session.epoch, session.expected = p.job.step, p.epoch, token
            if len(batch) == 1 and p.compute_ms == compute_ms:  # the planner reads a lone step's figure
                self.cost.observe(compute_ms, self.source.n_layers - session.layer_lo, p.hidden.shape[1])
            answers.append((p.job, {}, reply))
        self._answer_many(answers)
        self.conn.record_batch(len(batch), tokens)

    def _session_ended(self, session: Session, why: str) -> None:
        """A session that ends (closed, expired, dropped) leaves its positions, prompt and generated
        tokens, to the prefix cache: a conversation's next turn resends all of them."""
        if self.prefixes is None or not session.digests:
            return
        if len(session.digests) != session.cache.length:
            log.warning("session %s %s with digests of %d positions for a cache of %d; not kept for reuse",
                        session.session_id, why, len(session.digests), session.cache.length)
            return
        try:
            self.prefixes.add(session.digests, session.cache)
        except Exception:  # noqa: BLE001 - a cache that cannot keep it must not stop the worker
            log.exception("session %s could not join the prefix cache", session.session_id)

    def _release(self, session_id: str) -> None:
        """The jobs that waited for this session's frame go in the next pass, in order, and so do
        the prompts that waited for its prompt (kept by then, unless it failed)."""
        self._resumed.extend(self._held.pop(session_id, ()))
        self._prefilling.extend(self._after_prompt.pop(session_id, ()))

    def _skipped(self, job: Job, session: Session) -> tuple[dict, list]:
        worker_ms = (time.monotonic() - job.received_at) * 1e3
        return {}, seal_step_reply(session.cipher, job.session_id, job.step, 0, session.cache.length, 0.0,
                                   worker_ms, skipped=True)

