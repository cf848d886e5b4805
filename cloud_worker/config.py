"""A cloud worker's settings, without torch: the CLI builds and checks them before the worker
(``cloud_worker.worker``) and its imports load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from partition.devices import check_device, check_dtype


@dataclass(frozen=True)
class CloudWorkerConfig:
    broker: str = "tcp://127.0.0.1:5555"
    model: str = "smollm2-135m"
    keys_dir: Path | None = None  # holds worker-<name>.key; None or missing keys: no encryption
    key_name: str = "default"
    encryption: bool = True
    # A worker with keys refuses sessions in the clear unless this is set: an edge that forgot
    # --keys (or an attacker with an API key) must not downgrade a deployment that encrypts.
    allow_plaintext: bool = False
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: float32 on a CPU, bfloat16 on a GPU)
    # Decode passes as CUDA graphs captured between the attentions (partition/graphs.py); a GPU only.
    cuda_graphs: bool = False
    # The head reads a GGUF file's Q8_0 blocks (partition/gguf_blocks.py): every pass cheaper, a
    # lone session's by 30%, eight sessions' by 12% (so batching's own saving looks smaller).
    head_blocks: bool = False
    worker_id: str | None = None
    max_sessions: int = 64
    # A session untouched this long is freed: the broker drops its record first (after 300 s) and
    # tells the worker; this is the backstop for a broker that could not.
    session_idle_ttl_s: float = 360.0
    max_session_tokens: int = 8192  # KV cache length limit per session
    max_batch: int = 16  # steps of different sessions computed in one forward pass
    # What the sessions' KV caches may hold together, in MiB; past it a new session or a step that
    # would grow a cache is answered Busy. None: no limit but max_sessions.
    max_cache_mb: float | None = None
    # Prompts' and ended sessions' keys and values kept for sessions that start the same way
    # (partition/prefix_cache.py); 0: none.
    prefix_cache_mb: float = 128.0
    # How long a pass may wait for the next steps of the sessions in the previous one (at most
    # half that pass's time): fuller batches instead of two half-full ones taking turns.
    batch_wait_s: float = 0.02
    torch_threads: int | None = None
    # Where the projection files of reduced sessions are (partition/reduction.py); None: the default,
    # $EDGECLOUD_REDUCTIONS or ~/.cache/edgecloud/reductions.
    reductions_dir: Path | None = None
    # CURVE to the broker with worker-<key_name>.key and the broker's public key from keys_dir
    # (when they are there); False (--no-curve) connects in the clear.
    curve: bool = True

    def __post_init__(self) -> None:
        # What can be checked without torch is checked here, before the worker loads anything: a
        # typo costs a fraction of a second, not the imports.
        from edge_worker.config import check_endpoint
        from partition.model_spec import parse_model_spec

        check_endpoint(self.broker)
        parse_model_spec(self.model)
        check_device(self.device)
        check_dtype(self.dtype)
        if self.cuda_graphs and self.device == "cpu":
            raise ValueError("--cuda-graphs needs the worker on a GPU: --device cuda (or auto)")
        if not 0 <= self.batch_wait_s <= 10:
            raise ValueError(f"--batch-wait-ms must be in [0, 10000], got {self.batch_wait_s * 1e3:g}")
        if self.max_cache_mb is not None and self.max_cache_mb <= 0:
            raise ValueError(f"--max-cache-mb must be positive, got {self.max_cache_mb:g}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"--prefix-cache-mb must be 0 (off) or more, got {self.prefix_cache_mb:g}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, got {self.max_batch}")
