"""Per-layer cost profile of a model on this machine: what the split planner prices.

The planner (``partition/planner.py``) needs, for every split ``k``, how long the edge spends on
its part and how many bytes it holds. Both depend on the model *and* on the machine, so we
measure once, on the real segment code path (``LayerRunner`` with our ``SegmentKVCache``), and
cache the result as JSON keyed by model id and machine. Weight sizes come from the loaded
parameters, never from the config, so a tied head or an odd layer is counted as it really is.

Only ``measure_profile`` needs torch; everything else here is plain data, so the planner and its
tests import this module without loading torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partition.models import cache_root

if TYPE_CHECKING:
    from partition.kv_cache import SegmentKVCache
    from partition.models import ModelSource

log = logging.getLogger(__name__)

# Bump when the measurement method or the fields change, so old cached profiles are re-measured.
PROFILE_FORMAT = 2  # 2: probe_ms

# Shapes of the measurement. 64 positions is a short chat prompt; decode is timed with a KV cache
# of that length, which is where per-token cost sits for the prompts this project runs.
PROFILE_PROMPT_TOKENS = 64
# Untimed passes before timing: the first calls allocate caches and wake the OpenMP pool.
_WARMUP_PASSES = 1
# Decode is cheap, so it gets more samples per repeat than prefill for a stable estimate.
_DECODE_SAMPLES_PER_REPEAT = 3

# Bytes a step request carries besides the activations. Measured with broker.protocol.encode on
# a sealed step (broker.wire.session_protocol.seal_step, uuid ids, a 43-character API key, the SmolLM2
# model id, the task id CloudSession puts in extra): 423 bytes = broker envelope header (~233,
# ~41 of it the task id) + sealed msgpack step head (~93) + AEAD overhead on the tensor frame
# (56 = 16 prefix + 24 nonce + 16 tag, broker/wire/crypto.py). Rounded up to cover longer ids;
# tests/test_profile.py re-measures it so this constant cannot drift unseen.
STEP_OVERHEAD_BYTES = 440
# A step reply carries only the sampled token id, position and timings: 246 bytes measured the
# same way (envelope + one sealed msgpack frame), rounded up.
STEP_REPLY_BYTES = 256

@dataclass(frozen=True)
class LayerProfile:
    """Measured costs of one model on one machine (fp32 weights, CPU, this process's threads)."""

    model_id: str
    machine: str  # hostname / cpu count / torch threads: a profile is only valid where measured
    n_layers: int
    hidden_size: int
    embed_ms: float  # embedding lookup of one token
    layer_decode_ms: tuple[float, ...]  # one token through layer i, KV cache of ~64 positions
    layer_prefill_ms_per_token: tuple[float, ...]  # 64-token prefill through layer i, / 64
    head_ms: float  # final norm + LM head on one position
    layer_weight_bytes: tuple[int, ...]
    embed_weight_bytes: int  # token (and learned position) embeddings
    # Final norm, plus the LM head matrix unless it is tied to the embedding (then the edge, which
    # always holds the embedding, shares that one matrix and only the norm is extra).
    head_weight_bytes: int
    kv_bytes_per_token_per_layer: int  # keys + values, fp32
    # ``compute_probe_ms`` when the profile was measured: the same probe timed again before
    # planning says how much slower the device computes now (Conditions.edge_slowdown_measured).
    probe_ms: float = 0.0
    measured_at: float = 0.0  # unix time
    format_version: int = PROFILE_FORMAT

    def __post_init__(self) -> None:
        # Lists from JSON become tuples, so profiles compare equal and stay hashable.
        for name in ("layer_decode_ms", "layer_prefill_ms_per_token", "layer_weight_bytes"):
            value = tuple(getattr(self, name))
            if len(value) != self.n_layers:
                raise ValueError(f"{name} has {len(value)} entries for {self.n_layers} layers")
            object.__setattr__(self, name, value)

    @property
    def total_weight_bytes(self) -> int:
        return self.embed_weight_bytes + sum(self.layer_weight_bytes) + self.head_weight_bytes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LayerProfile:
        """Raise ValueError on anything that is not a complete profile of the current format."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a profile is a JSON object")
        if data.get("format_version") != PROFILE_FORMAT:
            raise ValueError(f"profile format {data.get('format_version')!r}, expected {PROFILE_FORMAT}")
        missing = _KNOWN_FIELDS - data.keys()
        if missing:
            raise ValueError(f"profile lacks {sorted(missing)}")
        try:
            return cls(**{k: data[k] for k in _KNOWN_FIELDS})
        except TypeError as exc:
            raise ValueError(f"malformed profile: {exc}") from None


_KNOWN_FIELDS = frozenset(f.name for f in fields(LayerProfile))


def machine_description() -> str:
    """What makes timings comparable: host, cores, and the threads torch would use."""
    import torch

    return f"{socket.gethostname()}/{os.cpu_count()}cpu/{torch.get_num_threads()}threads"


# --- measuring -------------------------------------------------------------------------------------


def measure_profile(source: ModelSource, repeats: int = 5) -> LayerProfile:
    """Time embedding, every layer (prefill and decode) and the head of ``source`` here.

    Layers are driven one at a time through the segment's own ``LayerRunner`` and KV cache, so
    what is timed is what ``ModelSegment.forward`` runs, minus nothing but Python glue. Each
    number is a low quantile over the samples (see ``_low_quartile_ms``): ``repeats`` decode
    rounds of 3 samples and ``(repeats + 1) // 2`` prefill passes. SmolLM2-135M takes about 4 s
    on 2 idle cores, most of it the 64-token prefills.
    """
    import torch

    from partition.segment import ModelSegment

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    t_load = time.perf_counter()
    _warn_if_busy()
    n = source.n_layers
    segment = ModelSegment.load(source, 0, n)
    log.info("profiling %s (%d layers) with %d threads", source.model_id, n, torch.get_num_threads())
    t_prompt = PROFILE_PROMPT_TOKENS
    generator = torch.Generator().manual_seed(0)
    vocab = segment.embeddings[0].weight.shape[0]
    prompt_ids = torch.randint(0, vocab, (1, t_prompt), generator=generator)
    next_id = torch.randint(0, vocab, (1, 1), generator=generator)
    runner = segment.runner

    def embed(ids: torch.Tensor, past: int) -> torch.Tensor:
        positions = torch.arange(past, past + ids.shape[1]).unsqueeze(0)
        hidden = segment.embeddings[0](ids)
        if source.family.learned_positions:
            hidden = hidden + segment.embeddings[1](positions)
        return hidden

    def prefill(timed: bool) -> SegmentKVCache:
        """One 64-position pass per layer on an empty cache (SDPA's causal path: no mask)."""
        cache = segment.new_cache()
        hidden = embed(prompt_ids, 0)
        shared = runner.position_inputs(hidden, torch.arange(t_prompt).unsqueeze(0))
        for i, layer in enumerate(segment.layers):
            t0 = time.perf_counter()
            hidden = runner.call(layer, hidden, None, cache, shared)
            if timed:
                prefill_s[i].append(time.perf_counter() - t0)
        cache.advance(t_prompt)
        return cache

    def decode(cache: SegmentKVCache, timed: bool) -> None:
        t0 = time.perf_counter()
        x = embed(next_id, t_prompt)
        if timed:
            embed_s.append(time.perf_counter() - t0)
        _decode_sample(segment, x, cache, t_prompt, decode_s if timed else None, head_s if timed else None)

    embed_s: list[float] = []
    head_s: list[float] = []
    prefill_s: list[list[float]] = [[] for _ in range(n)]
    decode_s: list[list[float]] = [[] for _ in range(n)]
    with torch.inference_mode():
        cache = prefill(timed=False)  # warm-up: allocations, the OpenMP pool
        decode(cache, timed=False)
        # Prefill dominates the measurement time (SmolLM2: ~0.7 s a pass on 2 cores), and each
        # pass already averages 64 positions, so it gets fewer passes than decode.
        for _ in range(max(1, (repeats + 1) // 2)):
            cache = prefill(timed=True)
        for _ in range(repeats * _DECODE_SAMPLES_PER_REPEAT):
            decode(cache, timed=True)

    layer_bytes, embed_bytes, head_bytes = segment_weight_bytes(segment)
    probe = compute_probe_ms()
    profile = LayerProfile(
        model_id=source.model_id,
        machine=machine_description(),
        n_layers=n,
        hidden_size=source.hidden_size,
        embed_ms=_low_quartile_ms(embed_s),
        layer_decode_ms=tuple(_low_quartile_ms(s) for s in decode_s),
        layer_prefill_ms_per_token=tuple(_low_quartile_ms(s) / t_prompt for s in prefill_s),
        head_ms=_low_quartile_ms(head_s),
        layer_weight_bytes=layer_bytes,
        embed_weight_bytes=embed_bytes,
        head_weight_bytes=head_bytes,
        kv_bytes_per_token_per_layer=kv_bytes_per_token_per_layer(source.config),
        probe_ms=probe,
        measured_at=time.time(),
    )
    log.info("profiled %s in %.1f s: %.2f ms/token decode, %.2f ms/token prefill, %.0f MiB",
             source.model_id, time.perf_counter() - t_load,
             profile.embed_ms + sum(profile.layer_decode_ms) + profile.head_ms,
             sum(profile.layer_prefill_ms_per_token), profile.total_weight_bytes / 2**20)
    return profile


def _decode_sample(segment, x, cache: SegmentKVCache, past: int, layer_s: list[list[float]] | None,
                   head_s: list[float] | None) -> None:
    """Time one position through every layer of ``segment`` (appending to ``layer_s[i]``) and
    through its head when it has one; the cache is cropped back to ``past`` so every sample sees
    the same length. ``None`` lists: an untimed warm-up pass."""
    import torch

    runner = segment.runner
    shared = runner.position_inputs(x, torch.tensor([[past]], device=x.device))
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for i, layer in enumerate(segment.layers):
        t0 = time.perf_counter()
        x = runner.call(layer, x, None, cache, shared)  # one query position: no mask
        sync()
        if layer_s is not None:
            layer_s[i].append(time.perf_counter() - t0)
    cache.crop(past)
    if segment.lm_head is not None:
        t0 = time.perf_counter()
        segment.lm_head(segment.norm(x))
        sync()
        if head_s is not None:
            head_s.append(time.perf_counter() - t0)


def measure_decode_ms(segment, samples: int = 15) -> tuple[tuple[float, ...], float]:
    """(per-layer decode ms, head ms) of an already loaded segment, measured the way
    ``measure_profile`` measures decode: a warm 64-position cache, untimed warm-up passes, then
    the lower quartile of ``samples`` one-token passes. Random activations stand in for real ones
    (dense compute costs the same for any values).

    This is what a cloud worker reports when it registers: its layers timed warm, so that the
    planner compares like with like against the edge's profile. (A cold cache and a sleeping
    OpenMP pool made the first decode passes read several times slower than steady state.)
    """
    import torch

    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if not segment.layers:
        return (), 0.0
    hidden = segment.source.hidden_size
    generator = torch.Generator().manual_seed(0)
    dtype = next(segment.layers[0].parameters()).dtype
    prompt = torch.randn(1, PROFILE_PROMPT_TOKENS, hidden, generator=generator).to(segment.device, dtype)
    x = torch.randn(1, 1, hidden, generator=generator).to(segment.device, dtype)
    layer_s: list[list[float]] = [[] for _ in segment.layers]
    head_s: list[float] = []
    with torch.inference_mode():
        cache = segment.new_cache()
        segment(prompt, cache, logits="none")
        for _ in range(_WARMUP_PASSES + 2):
            _decode_sample(segment, x, cache, PROFILE_PROMPT_TOKENS, None, None)
        for _ in range(samples):
            _decode_sample(segment, x, cache, PROFILE_PROMPT_TOKENS, layer_s, head_s)
    head_ms = _low_quartile_ms(head_s) if head_s else 0.0
    return tuple(_low_quartile_ms(s) for s in layer_s), head_ms


# The probe's matrix: about one decoder layer of a small model (12 MB of fp32 weights), so that it
# meets what a decode step meets: memory bandwidth, the thread pool, other processes.
_PROBE_SHAPE = (5120, 576)
# Enough samples to span several scheduler slices (~15 ms in all): a busy neighbour delays some
# of them by a slice and leaves others alone, and the mean is what a decode step meets.
_PROBE_SAMPLES = 48
_probe_weight = None


def compute_probe_ms() -> float:
    """How long this device takes now for a fixed decode-like job (one matrix-vector product over
    a layer-sized fp32 matrix, with torch's threads): the mean of _PROBE_SAMPLES samples, about
    15 ms in all. The mean, not a low quantile: this measures the contention the profile's low
    quantiles leave out. Its ratio to the value stored in the profile is the device's current
    slowdown, measured rather than inferred from a CPU-load percentage (on a 2-core machine a busy
    neighbour slowed 2-thread decode about 4x while the load formula said 2x)."""
    import torch

    global _probe_weight
    if _probe_weight is None:
        _probe_weight = torch.randn(*_PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, _PROBE_SHAPE[1], generator=torch.Generator().manual_seed(1))
    samples = []
    with torch.inference_mode():
        torch.nn.functional.linear(x, _probe_weight)  # warm-up: wakes the thread pool
        for _ in range(_PROBE_SAMPLES):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, _probe_weight)
            samples.append(time.perf_counter() - t0)
    return sum(samples) / len(samples) * 1e3


# A 1-minute load average above this fraction of the cores means other processes compete for
# them: on a 2-core VM a concurrent test run made 2-thread decode 5x slower than idle.
_BUSY_LOAD_FRACTION = 0.5


def _warn_if_busy() -> None:
    """Timings taken under contention are inflated and get cached: say so where it happens."""
    try:
        load_1m = os.getloadavg()[0]
    except OSError:  # not available on every platform
        return
    cores = os.cpu_count() or 1
    if load_1m > _BUSY_LOAD_FRACTION * cores:
        log.warning("the machine is busy (load %.1f on %d cores): the profile's timings may be inflated; "
                    "re-measure when it is idle (edgecloud plan --remeasure)", load_1m, cores)


def _low_quartile_ms(samples_s: list[float]) -> float:
    """The lower quartile (the minimum for fewer than 5 samples), in ms.

    Not the median: other processes on the device only ever add time, and on a shared 2-core
    machine they slow a third or more of the samples by a scheduler quantum (~6 ms a layer). The
    profile should hold the machine's uncontended cost, which ``Conditions.edge_cpu_load`` then
    scales; a median would freeze one moment's load into a cached profile. The lower quartile
    rather than the minimum keeps a lucky outlier from setting the number.
    """
    ordered = sorted(samples_s)
    return ordered[(len(ordered) - 1) // 4] * 1e3


def _param_bytes(module, seen: set[int]) -> int:
    """Bytes of ``module``'s parameters not already counted: a tied matrix (the same storage under
    two names, however it was assigned) counts once."""
    total = 0
    for p in module.parameters():
        key = p.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += p.numel() * p.element_size()
    return total


def segment_weight_bytes(segment) -> tuple[tuple[int, ...], int, int]:
    """(per-layer, embedding, head) parameter bytes of a whole-model segment.

    The embedding is counted first, so a head tied to it adds only the final norm.
    """
    seen: set[int] = set()
    embed = _param_bytes(segment.embeddings, seen) if segment.embeddings is not None else 0
    layers = tuple(_param_bytes(layer, seen) for layer in segment.layers)
    head = 0
    if segment.norm is not None:
        head += _param_bytes(segment.norm, seen)
    if segment.lm_head is not None:
        head += _param_bytes(segment.lm_head, seen)
    return layers, embed, head


def kv_bytes_per_token_per_layer(config, element_bytes: int = 4) -> int:
    """Keys + values one position adds to one layer's cache: 2 x kv_heads x head_dim x 4 (fp32)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * kv_heads * head_dim * element_bytes


# --- the cache -------------------------------------------------------------------------------------


def profile_cache_path(model_id: str, machine: str, cache_dir: Path | None = None) -> Path:
    machine_hash = hashlib.sha256(machine.encode()).hexdigest()[:12]
    directory = cache_dir if cache_dir is not None else cache_root() / "profiles"
    return Path(directory) / f"{model_id}-{machine_hash}.json"


def load_or_measure_profile(
    source: ModelSource, cache_dir: Path | None = None, *, remeasure: bool = False, repeats: int = 5
) -> LayerProfile:
    """The cached profile of ``source`` on this machine, measuring (and caching) it when there is
    none, it is unreadable, or it belongs to another model or machine. Timings drift with load,
    so ``remeasure`` forces a fresh measurement."""
    machine = machine_description()
    path = profile_cache_path(source.model_id, machine, cache_dir)
    if not remeasure and path.exists():
        try:
            profile = LayerProfile.from_json(path.read_text())
            if profile.model_id == source.model_id and profile.machine == machine:
                log.debug("using cached profile %s", path)
                return profile
            log.info("cached profile %s is for another model or machine; re-measuring", path)
        except (OSError, ValueError) as exc:
            log.warning("cached profile %s is unreadable (%s); re-measuring", path, exc)
    profile = measure_profile(source, repeats=repeats)
    _write_atomically(path, profile.to_json())
    return profile


def _write_atomically(path: Path, text: str) -> None:
    """Write beside the target and rename, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def profile_summary(profile: LayerProfile) -> dict[str, Any]:
    """The headline numbers of a profile, for logs and ``edgecloud plan --json``."""
    return {
        "model_id": profile.model_id,
        "machine": profile.machine,
        "n_layers": profile.n_layers,
        "hidden_size": profile.hidden_size,
        "decode_ms_local": round(profile.embed_ms + sum(profile.layer_decode_ms) + profile.head_ms, 3),
        "prefill_ms_per_token_local": round(sum(profile.layer_prefill_ms_per_token), 3),
        "weight_bytes": profile.total_weight_bytes,
    }
