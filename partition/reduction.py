"""Dimensionality reduction of the boundary activations: a calibrated, centred PCA projection.

The edge projects its (1, T, H) activations onto D principal directions before they leave the
device, and the cloud worker reconstructs (1, T, H) before its first layer:

    z = (h - mean) @ basis          # (1, T, D), what crosses the wire
    h' = z @ basis.T + mean         # (1, T, H), what the worker's layers see

``mean`` (H,) and ``basis`` (H, D, orthonormal columns) come from the hidden states at split
``k`` of a calibration text shipped with the package (``partition/data/calibration.txt``, about
5k positions), computed once per model, split and D by ``edgecloud calibrate`` and saved as a
safetensors file. Both sides identify the file by the sha256 of its bytes: the edge sends it
when it opens a session, and a worker serves only projections it holds (``ReductionStore``).

What it buys and costs is measured, not assumed: ``bench/bench_privacy_quality.py`` (quality)
and the leakage benchmark (how much of the input an attacker still recovers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from partition.errors import PartitionError
from partition.models import ModelSource, cache_root

log = logging.getLogger(__name__)

FORMAT = "edgecloud-reduction/1"
CALIBRATION_TEXT = Path(__file__).with_name("data") / "calibration.txt"
# A reduction file is mean + basis in fp32: at most H * (H + 1) * 4 bytes (1.3 MB for SmolLM2).
# Bigger files in a reductions directory are not projections of ours and are skipped unread.
MAX_FILE_BYTES = 256 * 1024 * 1024
# How often a worker looks again at its directory after an unknown hash (new files appear when an
# edge calibrates next to a running worker); bounds the work a stream of bogus hashes can cause.
RESCAN_INTERVAL_S = 2.0
# Calibration sequences are cut to this many tokens (the paragraphs are shorter anyway), and the
# text to this many positions in all: SmolLM2's tokenizer gives ~5.6k from the shipped text, a
# byte-level tokenizer (the tiny test models) 20k, which would only slow calibration down.
_MAX_CALIBRATION_TOKENS = 512
_MAX_CALIBRATION_POSITIONS = 8192


class ReductionError(PartitionError):
    """A reduction file is missing, malformed, or does not belong to this model and split."""


@dataclass(frozen=True)
class Reduction:
    """A centred projection of one model's hidden states at one split to ``dims`` dimensions."""

    model_id: str
    split: int
    hidden_size: int
    dims: int
    mean: torch.Tensor  # (H,) float32
    basis: torch.Tensor  # (H, D) float32, orthonormal columns
    explained: float  # fraction of the calibration variance the D directions keep
    sha256: str = ""  # of the saved file's bytes; "" until saved or loaded

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """(1, T, H) -> (1, T, D), on the edge before encoding."""
        if hidden.shape[-1] != self.hidden_size:
            raise ReductionError(f"activations are {hidden.shape[-1]} wide, this projection takes {self.hidden_size}")
        return (hidden.detach().to("cpu", torch.float32) - self.mean) @ self.basis

    def reconstruct(self, reduced: torch.Tensor) -> torch.Tensor:
        """(1, T, D) -> (1, T, H), on the worker before its layers."""
        if reduced.shape[-1] != self.dims:
            raise ReductionError(f"reduced activations are {reduced.shape[-1]} wide, expected {self.dims}")
        return reduced.to(torch.float32) @ self.basis.T + self.mean

    def check_matches(self, model_id: str, split: int, hidden_size: int) -> None:
        if (self.model_id, self.split, self.hidden_size) != (model_id, split, hidden_size):
            raise ReductionError(
                f"reduction {self.sha256[:12]} is for {self.model_id} split {self.split} (H={self.hidden_size}), "
                f"not {model_id} split {split} (H={hidden_size})"
            )

    def to_bytes(self) -> bytes:
        meta = {"format": FORMAT, "model_id": self.model_id, "split": self.split,
                "hidden_size": self.hidden_size, "dims": self.dims, "explained": self.explained}
        # One metadata entry holding sorted JSON: safetensors writes a map's entries in a random
        # order, and the same projection must give the same bytes (and so the same sha256).
        return save_safetensors({"mean": self.mean.contiguous(), "basis": self.basis.contiguous()},
                                metadata={"edgecloud": json.dumps(meta, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = "reduction file") -> Reduction:
        """Parse and validate a file's bytes; its sha256 is computed from exactly these bytes."""
        try:
            tensors = load_safetensors(data)
            meta = json.loads(_safetensors_metadata(data).get("edgecloud", "{}"))
            if type(meta) is not dict or meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
            split, hidden, dims = meta["split"], meta["hidden_size"], meta["dims"]
            explained, model_id = meta["explained"], meta["model_id"]
            if not all(type(v) is int for v in (split, hidden, dims)) or type(model_id) is not str:
                raise ValueError("split, hidden_size and dims must be integers, model_id a string")
            explained = float(explained)
            mean, basis = tensors["mean"], tensors["basis"]
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise ReductionError(f"{origin} is not an edgecloud reduction: {exc}") from None
        except Exception as exc:  # safetensors raises its own error type on malformed input
            raise ReductionError(f"{origin} is not an edgecloud reduction: {type(exc).__name__}: {exc}") from None
        if not (0 <= split and 0 < dims <= hidden and mean.shape == (hidden,) and basis.shape == (hidden, dims)
                and mean.dtype == torch.float32 and basis.dtype == torch.float32):
            raise ReductionError(f"{origin}: inconsistent shapes (H={hidden}, D={dims}, mean {tuple(mean.shape)}, "
                                 f"basis {tuple(basis.shape)})")
        if not (torch.isfinite(mean).all() and torch.isfinite(basis).all()):
            raise ReductionError(f"{origin}: non-finite values")
        return cls(model_id, split, hidden, dims, mean, basis, explained, hashlib.sha256(data).hexdigest())


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("truncated header")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


# --- files ---------------------------------------------------------------------------------------


def default_reductions_dir() -> Path:
    """``$EDGECLOUD_REDUCTIONS``, else ``reductions/`` beside the model cache
    (``~/.cache/edgecloud/reductions``)."""
    env = os.environ.get("EDGECLOUD_REDUCTIONS")
    return Path(env) if env else cache_root().parent / "reductions"


def reduction_filename(model_id: str, split: int, dims: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', model_id)}-k{split}-d{dims}.safetensors"


def save_reduction(reduction: Reduction, path: Path) -> Reduction:
    """Write atomically; returns the reduction with its file's sha256 filled in."""
    data = reduction.to_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return Reduction.from_bytes(data, str(path))


def load_reduction(path: Path, expected_sha256: str | None = None) -> Reduction:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ReductionError(f"{path} is {size} bytes, more than a reduction can be")
        data = path.read_bytes()
    except OSError as exc:
        raise ReductionError(f"cannot read reduction file {path}: {exc.strerror or exc}") from None
    reduction = Reduction.from_bytes(data, str(path))
    if expected_sha256 is not None and reduction.sha256 != expected_sha256:
        raise ReductionError(f"{path} has sha256 {reduction.sha256}, expected {expected_sha256}")
    return reduction


# --- calibration ---------------------------------------------------------------------------------


def calibration_sequences(tokenizer, text: str | None = None) -> list[list[int]]:
    """Token id sequences for calibration: every paragraph of the text twice, as plain text and as
    a chat turn (the form prompts take at inference), so the chat template's states are covered."""
    from partition.tokens import encode_prompt

    text = CALIBRATION_TEXT.read_text(encoding="utf-8") if text is None else text
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        raise ReductionError("the calibration text is empty")
    seqs: list[list[int]] = []
    total = 0
    for p in paragraphs:
        for raw in (True, False):
            ids = encode_prompt(tokenizer, p, raw=raw)[:_MAX_CALIBRATION_TOKENS]
            if ids and total < _MAX_CALIBRATION_POSITIONS:
                seqs.append(ids)
                total += len(ids)
    return seqs


@torch.inference_mode()
def calibration_states(edge_segment, sequences: list[list[int]]) -> torch.Tensor:
    """(P, H) float32: the hidden states at the segment's end for every position of every sequence."""
    if not edge_segment.spec.embed or edge_segment.spec.lo != 0:
        raise ReductionError("calibration needs the edge segment: the embedding and layers [0, k)")
    states = []
    for ids in sequences:
        out = edge_segment(torch.tensor([ids], dtype=torch.long), edge_segment.new_cache(), logits="none")
        states.append(out.hidden[0].to("cpu", torch.float32))  # (T, H)
    return torch.cat(states)


def fit_pca(states: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Centred PCA of (P, H) states: (mean (H,), basis (H, D), fraction of variance kept)."""
    n, hidden = states.shape
    if not 0 < dims <= hidden:
        raise ReductionError(f"dims must be in [1, {hidden}], got {dims}")
    x = states.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(1, n - 1)  # (H, H)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(eigvals, descending=True)[:dims]
    basis = eigvecs[:, order]
    # A deterministic sign per direction, so the same states give byte-identical files.
    signs = torch.sign(basis[basis.abs().argmax(0), torch.arange(dims)])
    basis = basis * torch.where(signs == 0, 1.0, signs)
    total = float(eigvals.clamp_min(0).sum())
    explained = float(eigvals[order].clamp_min(0).sum()) / total if total > 0 else 1.0
    return mean.float(), basis.float().contiguous(), explained


def _check_dims(source: ModelSource, dims: int) -> None:
    if not 0 < dims <= source.hidden_size:
        raise ReductionError(f"--dims must be in [1, {source.hidden_size}] for this model, got {dims}")


def _split_states(source: ModelSource, split: int, edge_segment=None, text: str | None = None) -> torch.Tensor:
    """The hidden states at ``split`` of the calibration text; loads layers [0, split) unless the
    caller passes its edge segment."""
    from partition.segment import ModelSegment

    if not 0 <= split <= source.n_layers:
        raise ReductionError(f"split {split} is outside [0, {source.n_layers}]")
    segment = edge_segment if edge_segment is not None else ModelSegment.load(source, 0, split)
    if segment.spec.hi != split:
        raise ReductionError(f"the edge segment ends at layer {segment.spec.hi}, not at split {split}")
    return calibration_states(segment, calibration_sequences(source.load_tokenizer(), text))


def _fit(source: ModelSource, split: int, states: torch.Tensor, dims: int) -> Reduction:
    if states.shape[0] < dims:
        raise ReductionError(f"the calibration text gives {states.shape[0]} positions, fewer than {dims} dims")
    mean, basis, explained = fit_pca(states, dims)
    return Reduction(source.model_id, split, source.hidden_size, dims, mean, basis, explained)


def calibrate(source: ModelSource, split: int, dims: int, edge_segment=None, text: str | None = None) -> Reduction:
    """Compute (not save) the projection for ``source`` at ``split``; loads layers [0, split) unless
    the caller passes its edge segment."""
    _check_dims(source, dims)
    t0 = time.perf_counter()
    states = _split_states(source, split, edge_segment, text)
    reduction = _fit(source, split, states, dims)
    log.info("calibrated %s split %d to %d dims from %d positions in %.1f s (%.2f%% of variance kept)",
             source.model_id, split, dims, states.shape[0], time.perf_counter() - t0, 100 * reduction.explained)
    return reduction


def find_or_calibrate(source: ModelSource, split: int, dims: int, directory: Path | None = None,
                      edge_segment=None) -> Reduction:
    """The saved projection for this model, split and D in ``directory`` (default
    ``default_reductions_dir()``), calibrating and saving it first if there is none."""
    return calibrate_many(source, split, [dims], directory, edge_segment)[dims]


def calibrate_many(source: ModelSource, split: int, dims_list: list[int], directory: Path | None = None,
                   edge_segment=None) -> dict[int, Reduction]:
    """``find_or_calibrate`` for several D at one split: the calibration states are computed once,
    and only for the D that have no file yet."""
    directory = directory or default_reductions_dir()
    found: dict[int, Reduction] = {}
    missing = []
    for dims in dict.fromkeys(dims_list):
        path = directory / reduction_filename(source.model_id, split, dims)
        if not path.exists():
            missing.append(dims)
            continue
        reduction = load_reduction(path)
        reduction.check_matches(source.model_id, split, source.hidden_size)
        if reduction.dims != dims:
            raise ReductionError(f"{path} holds {reduction.dims} dims, not {dims}")
        found[dims] = reduction
    if missing:
        for dims in missing:
            _check_dims(source, dims)
        t0 = time.perf_counter()
        states = _split_states(source, split, edge_segment)
        for dims in missing:
            path = directory / reduction_filename(source.model_id, split, dims)
            reduction = save_reduction(_fit(source, split, states, dims), path)
            log.info("calibrated %s split %d to %d dims from %d positions in %.1f s (%.2f%% of the variance "
                     "kept): %s, sha256 %s", source.model_id, split, dims, states.shape[0],
                     time.perf_counter() - t0, 100 * reduction.explained, path, reduction.sha256)
            found[dims] = reduction
    return found


# --- the worker's side ---------------------------------------------------------------------------


class ReductionStore:
    """The projections a worker holds, by sha256, read from one directory.

    An unknown hash makes the store look at the directory again (at most every
    ``RESCAN_INTERVAL_S``), so a file an edge calibrates next to a running worker is found; files
    already seen (same size and mtime) are not read again.
    """

    def __init__(self, directory: Path | None = None, rescan_interval_s: float = RESCAN_INTERVAL_S) -> None:
        self.directory = directory or default_reductions_dir()
        self.rescan_interval_s = rescan_interval_s
        self._by_hash: dict[str, Reduction] = {}
        self._seen: dict[Path, tuple[int, int]] = {}
        self._last_scan = -math.inf

    def get(self, sha256: str) -> Reduction | None:
        if sha256 not in self._by_hash and time.monotonic() - self._last_scan >= self.rescan_interval_s:
            self.scan()
        return self._by_hash.get(sha256)

    def scan(self) -> None:
        self._last_scan = time.monotonic()
        try:
            paths = sorted(self.directory.glob("*.safetensors"))
        except OSError:
            return
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue
            key = (st.st_size, st.st_mtime_ns)
            if self._seen.get(path) == key:
                continue
            self._seen[path] = key
            try:
                reduction = load_reduction(path)
            except ReductionError as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            self._by_hash[reduction.sha256] = reduction

    def __len__(self) -> int:
        return len(self._by_hash)
