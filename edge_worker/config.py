"""The edge process's configuration: one frozen record built by the CLI or by library users."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from broker.wire import WIRE_DTYPE_NAMES
from partition.devices import check_device, check_dtype
from partition.sampling_params import MAX_DRAFT_TOKENS, MAX_GROUP, MAX_TREE_NODES

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
DEFAULT_TOKENS = 64
# The cost model's weights when none are given: the original design's (energy 0.3, latency 0.4,
# memory 0.3). Every entry point (edge, demo, plan, EdgeCloudManager) reads them from here.
DEFAULT_ENERGY_WEIGHT = 0.3
DEFAULT_LATENCY_WEIGHT = 0.4
DEFAULT_MEMORY_WEIGHT = 0.3
MINI_MODES = ("verify", "trust")


def check_mini_options(mode: str, threshold: float | None, max_draft: int) -> None:
    """The mini-LLM settings every entry point accepts (CLI config, handler, generation loop)."""
    if mode not in MINI_MODES:
        raise ValueError(f"mini mode must be one of {', '.join(MINI_MODES)}, got {mode!r}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"mini threshold must be in [0, 1], got {threshold}")
    if not 1 <= max_draft <= MAX_DRAFT_TOKENS:
        raise ValueError(f"draft length must be in 1..{MAX_DRAFT_TOKENS}, got {max_draft}")


# tcp://HOST:PORT (a name, IPv4 or [IPv6] and a port), or ipc:// / inproc:// with a path or name.
_ENDPOINT = re.compile(r"^(tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.*-]+):(\d{1,5}|\*)|(ipc|inproc)://.+)$")


def check_endpoint(address: str) -> None:
    """Refuse a broker address ZeroMQ cannot use, before any model loads (ZeroMQ's own message
    is 'Invalid argument (addr=...)', which does not say which address or what it should be)."""
    if not _ENDPOINT.match(address):
        raise ValueError(f"broker address {address!r} is not a ZeroMQ endpoint: use tcp://HOST:PORT "
                         "(for example tcp://127.0.0.1:5555)")


def default_broker() -> str:
    """``$EDGECLOUD_BROKER``, else the loopback default."""
    return os.environ.get("EDGECLOUD_BROKER", DEFAULT_BROKER)


def builtin_keys_dir() -> Path:
    """Where keys are looked for when nobody says: ``~/.config/edgecloud/keys``."""
    return Path.home() / ".config" / "edgecloud" / "keys"


def default_keys_dir() -> Path:
    """``$EDGECLOUD_KEYS``, else ``builtin_keys_dir()``."""
    return Path(os.environ.get("EDGECLOUD_KEYS", builtin_keys_dir()))


def check_keys_dir(path: Path) -> Path:
    """``path``, unless it is not a directory: only the built-in default may be missing (a broker
    run in the clear); a directory someone named is a typo when it is not there, which a
    handshake would only hint at, seconds later. Raises ``ConfigError``."""
    if not path.is_dir() and path != builtin_keys_dir():
        from broker.errors import ConfigError

        what = "is not a directory" if path.exists() else "does not exist"
        raise ConfigError(f"the keys directory {path} {what}: give the directory `edgecloud keys generate` "
                          "wrote (--keys or EDGECLOUD_KEYS)")
    return path


API_KEYS_FILE = "api_keys.txt"


def resolve_api_key(api_key: str | None, keys_dir: Path) -> str:
    """The key to present to the broker: the one given, else ``$EDGECLOUD_API_KEY``, else the
    first of ``api_keys.txt`` in the keys directory, else none."""
    if api_key:
        return api_key
    if os.environ.get("EDGECLOUD_API_KEY"):
        return os.environ["EDGECLOUD_API_KEY"]
    path = keys_dir / API_KEYS_FILE
    if path.exists():
        from broker.wire.crypto import load_api_keys

        keys = sorted(load_api_keys(path))
        if keys:
            return keys[0]
    return ""


@dataclass(frozen=True)
class EdgeConfig:
    """The edge's settings: the model to load when none is handed over, how the split is chosen,
    privacy and the wire, the drafter, deadlines and fallback, and the defaults of each request
    (``max_new_tokens``, sampling, ``raw_prompt``), which a request may override."""

    model: str = "smollm2-135m"
    max_new_tokens: int = DEFAULT_TOKENS
    split: int | None = None  # layers kept on the edge; None lets the planner choose
    # Privacy floor: never fewer layers on the edge (a fixed --split below it is refused, the
    # planner never goes below it). See the leakage table in BENCHMARKS.md for what depth buys.
    min_split: int = 0
    # Alternatively a leakage budget: the floor becomes the shallowest split whose measured token
    # recovery (partition/data/leakage-*.json, best attack) is at most this fraction.
    max_leakage: float | None = None
    force_local: bool = False  # every layer on the edge, no broker needed
    force_cloud: bool = False  # only the embedding on the edge (split 0)
    raw_prompt: bool = False  # skip the chat template of instruct models
    truncate_prompt: bool = False  # a prompt too long for the context loses its oldest tokens instead of an error
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0  # sample among the k most likely tokens; 0: every token
    min_p: float = 0.0  # drop tokens below min_p times the top token's probability; 0: every token
    repetition_penalty: float = 1.0  # >1 discourages repeating generated tokens (not the prompt's); 1: off
    stop: tuple[str, ...] = ()  # end the text before the first of these strings
    broker: str = DEFAULT_BROKER
    keys_dir: Path | None = None
    api_key: str | None = None
    encryption: bool = True
    wire_dtype: str = "fp16"
    reduce_dims: int | None = None  # project the activations to this many dims before they leave
    reductions_dir: Path | None = None  # projection files; None: partition.reduction default
    request_timeout_s: float = 30.0  # one cloud request, queueing included, before it is retried
    step_deadline_s: float = 60.0  # one step, retries and failovers included, before giving up
    max_frame_mb: float = 8.0  # a longer prompt's activations go to the cloud in frames of at most this
    dynamic: bool = True  # with a planned split, move it when the link or the device changes
    adaptive_timeout: bool = True  # resend a decode step after ~one measured round trip, not request_timeout_s
    fallback_local: bool = True  # when the cloud is gone, load layers [k, N) here and carry on
    cloud_latency_s: float = 0.0  # emulated extra round trip between edge and broker
    bandwidth_mbps: float | None = None  # emulated link bandwidth, each direction; None: unlimited
    torch_threads: int | None = None  # None keeps torch's default (one per core)
    # Where the edge's own layers compute (cpu, cuda, or auto: a GPU when torch sees one) and in
    # what (auto: a model object's own dtype, else float32 on a CPU and bfloat16 on a GPU).
    device: str = "cpu"
    dtype: str = "auto"
    # On a GPU, run decode steps as CUDA graphs captured between the attentions
    # (partition/graphs.py): the same numbers as eager steps, fewer kernel launches.
    cuda_graphs: bool = False
    # Prompts' and generations' keys and values of the edge's layers kept for generations that start
    # the same way (partition/prefix_cache.py: a system prompt, a conversation's earlier turns); 0: none.
    prefix_cache_mb: float = 64.0
    # The mini-LLM: "auto" (the int8 copy where the model allows it and memory suffices, else
    # none), "none", "int8" (an int8 copy of the cloud's layers), "self" (early exit from the
    # edge's layers), "lookup" (prompt lookup) or a model name/path sharing the main model's tokenizer.
    mini: str = "auto"
    # Drafter confidence below which a token is hard: stop drafting. None: the drafter's own
    # (0.5; 0 for the int8 copy in verify mode, which is right about as often when unsure).
    mini_threshold: float | None = None
    mini_mode: str = "verify"  # verify: the main model checks every draft; trust: confident drafts go out
    mini_max_draft: int = 8  # most tokens drafted per round trip (the controller may use fewer)
    mini_adaptive: bool = True  # False: always draft mini_max_draft tokens (measurements)
    mini_pipeline: bool = True  # verify mode: send guesses while earlier frames are in flight
    mini_group: int = 8  # pipelined: at most this many guesses per frame (1: a frame per guess)
    mini_tree: int = 0  # verify mode: draft a token tree of this many nodes per round trip (0: chains)
    mini_adapter: Path | None = None  # --mini self: this adapter file instead of the calibrated default
    # Cost-model weights for choosing the split when none is given (the original design's defaults).
    energy_weight: float = DEFAULT_ENERGY_WEIGHT
    latency_weight: float = DEFAULT_LATENCY_WEIGHT
    memory_weight: float = DEFAULT_MEMORY_WEIGHT
    curve: bool = True  # CURVE to the broker when the keys directory has the client key (--no-curve: off)

    def __post_init__(self) -> None:
        if isinstance(self.model, str):  # a name or path: refused here when it cannot be one, before any import
            from partition.errors import InvalidSplitError
            from partition.model_spec import layer_count, parse_model_spec

            n_layers = layer_count(parse_model_spec(self.model))
            if self.split is not None and n_layers is not None and self.split > n_layers:
                raise InvalidSplitError(f"split {self.split} is outside [0, {n_layers}] for this model")
        if self.force_local and self.force_cloud:
            raise ValueError("--force-local and --force-cloud exclude each other")
        if self.max_new_tokens < 1:
            raise ValueError(f"tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_leakage is not None and not 0.0 <= self.max_leakage <= 1.0:
            raise ValueError(f"max leakage must be a fraction in [0, 1], got {self.max_leakage}")
        if self.min_split < 0:
            raise ValueError(f"min split must be >= 0, got {self.min_split}")
        if self.split is not None and self.split < 0:
            raise ValueError(f"split must be >= 0, got {self.split}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {self.request_timeout_s}")
        if not self.step_deadline_s > 0:
            raise ValueError(f"--deadline must be > 0 seconds, got {self.step_deadline_s}")
        if self.cloud_latency_s < 0:
            raise ValueError(f"cloud latency must be >= 0 seconds, got {self.cloud_latency_s}")
        if self.bandwidth_mbps is not None and self.bandwidth_mbps <= 0:
            raise ValueError(f"bandwidth must be > 0 Mbit/s, got {self.bandwidth_mbps}")
        if not self.prefix_cache_mb >= 0:
            raise ValueError(f"--prefix-cache-mb must be 0 (off) or more, got {self.prefix_cache_mb}")
        if not self.max_frame_mb > 0:
            raise ValueError(f"--max-frame-mb must be > 0, got {self.max_frame_mb}")
        check_mini_options(self.mini_mode, self.mini_threshold, self.mini_max_draft)
        if not 1 <= self.mini_group <= MAX_GROUP:
            raise ValueError(f"--mini-group must be in 1..{MAX_GROUP}, got {self.mini_group}")
        if not 0 <= self.mini_tree <= MAX_TREE_NODES:
            raise ValueError(f"--mini-tree must be in 0..{MAX_TREE_NODES}, got {self.mini_tree}")
        if self.mini_adapter is not None and self.mini != "self":
            raise ValueError(f"--mini-adapter is for --mini self, not --mini {self.mini}")
        if self.mini_adapter is not None and not Path(self.mini_adapter).is_file():
            # Checked here, not when the drafter first loads: a generation that runs locally
            # never loads it, and the mistake would pass unnoticed until one is split.
            raise ValueError(f"no drafter adapter at {self.mini_adapter}: run `edgecloud calibrate --drafter "
                             "--out FILE` to make one")
        from partition.sampling_params import SamplingParams

        SamplingParams(self.temperature, self.top_p, self.seed, self.top_k, self.min_p,
                       self.repetition_penalty)  # raises ValueError on a value it cannot draw with
        if self.reduce_dims is not None and self.reduce_dims < 1:
            raise ValueError(f"--reduce-dims must be at least 1, got {self.reduce_dims}")
        check_device(self.device)
        check_dtype(self.dtype)
        if self.cuda_graphs and self.device == "cpu":
            raise ValueError("--cuda-graphs needs the edge's layers on a GPU: --device cuda (or auto)")
        if self.wire_dtype not in WIRE_DTYPE_NAMES:
            raise ValueError(f"wire dtype must be one of {', '.join(WIRE_DTYPE_NAMES)}, got {self.wire_dtype!r}")
        if not self.force_local:
            check_endpoint(self.broker)
