"""Read single tensors from safetensors checkpoints without loading the rest.

A segment holding layers ``[lo, hi)`` asks only for its own tensors, so an edge device never
holds the whole model in memory (``bench/bench_memory.py`` measures this).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from partition.errors import WeightsMissingError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class _Named:
    """The name look-ups every store answers from its ``_index`` (a dict keyed by tensor name)."""

    _index: dict[str, object]

    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self._index if n.startswith(prefix)]


class WeightStore(_Named):
    """Names -> tensors over one or several (sharded) safetensors files in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_FILE).exists():
            with safe_open(self.directory / SINGLE_FILE, framework="pt") as f:
                weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise WeightsMissingError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.directory}")
        self._file_of = self._index = weight_map

    @staticmethod
    def exists_in(directory: Path) -> bool:
        return (directory / INDEX_FILE).exists() or (directory / SINGLE_FILE).exists()

    def load(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Read the named tensors, grouped by file so each shard is opened once."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self._file_of:
                raise WeightsMissingError(f"tensor {name!r} is missing from {self.directory}")
            by_file.setdefault(self._file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(self.directory / file, framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name).to(dtype)
        return out


class ModuleStore(_Named):
    """Names -> tensors of a model already in memory: the user's own tensors, not copies (a
    segment built from it shares their storage, in their dtype unless asked for another)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._tensors = self._index = module.state_dict()  # detached, sharing the parameters' storage

    def load(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in names:
            if name not in self._tensors:
                raise WeightsMissingError(f"tensor {name!r} is missing from the model object")
            t = self._tensors[name]
            out[name] = t if t.dtype == dtype else t.to(dtype)
        return out


# Tensors hashed per read: bounds the memory a fingerprint of a large checkpoint needs.
_FINGERPRINT_BATCH = 32


def content_fingerprint(store: WeightStore | ModuleStore, skip: Iterable[str] = ()) -> str:
    """A digest of every tensor's name, shape and values (as float32, so a float32 copy of
    bfloat16 weights is the same model): the same weights give the same digest whichever file,
    format or object holds them, and any changed value gives another. ``skip``: names that only
    repeat another tensor (a tied LM head, which some checkpoints store and others do not)."""
    h = hashlib.blake2b(digest_size=16)
    names = sorted(set(store.names()) - set(skip))
    for i in range(0, len(names), _FINGERPRINT_BATCH):
        batch = names[i:i + _FINGERPRINT_BATCH]
        tensors = store.load(batch, torch.float32)
        for name in batch:
            t = tensors[name].detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(t.numpy().data)
    return h.hexdigest()[:12]
