"""Read single tensors from safetensors checkpoints without loading the rest.

A segment holding layers ``[lo, hi)`` asks only for its own tensors, so an edge device never
holds the whole model in memory (``bench/bench_memory.py`` measures this).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from partition.errors import WeightsMissingError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightStore:
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
        self._file_of = weight_map

    @staticmethod
    def exists_in(directory: Path) -> bool:
        return (directory / INDEX_FILE).exists() or (directory / SINGLE_FILE).exists()

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self._file_of if n.startswith(prefix)]

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
