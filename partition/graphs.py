"""Decode passes as captured CUDA graphs, in pieces between the attentions.

On a GPU, an eager decode step of a small model is bound by launching kernels, not by computing
them: each layer is some fifteen small kernels, each launched from Python, while the GPU waits.
The issue's measurement: a 1B Llama-shaped model took the same time per step at every batch size
from 1 to 64 on an H200. A CUDA graph records a sequence of kernels once and launches all of them
with one call.

A whole step cannot be one graph here. Every session attends over its own cache, and those
caches grow, move and differ in length from step to step. So, like vLLM's piecewise graphs,
attention stays eager and everything between two attentions is a graph:

    start(f)     layer f's norm, q/k/v product and rotary positions
    attention    eager, each session over its own cache (``batching.attend_parts``, as the eager pass)
    after(i)     layer i's o product, MLP and residuals, then layer i+1's start (or the final norm
                 and the head)

For a bucket of ``B`` rows (1, 2, 4, ..., 64) the graphs read and write one set of buffers of ``B``
rows: the residual stream, the rotary cos and sin, q, k, v, the attention output and the logits.
A pass of ``R`` one-token steps uses the smallest bucket that holds ``R``; the other rows keep
whatever the last pass left there and are computed and ignored. That changes no session's numbers:
the pieces are the eager pass's own functions (``batching.attention_inputs``, ``finish_layer``),
and each of their operations is row-wise or a packed product, whose rows do not depend on the
other rows of the call (``batching.packed_linear``). The bench's batch-invariance check
(``bench/bench_gpu.py``) verifies that claim on the device, since GPU kernels are where it can fail.

Each piece runs eagerly the first time (that run warms up cuBLAS and the row-range probes) and is
captured right after; later passes replay it. With ``capture=False`` the same pieces run eagerly
on any device: the tests check on a CPU that they compute bit for bit what the eager pass does.

What takes the eager path instead: frames of more than one row (prefills, drafts to verify, token
trees), sessions starting at different layers in one pass, more sessions than the largest bucket,
a segment whose layers run on the CPU row kernel, and quantized copies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from partition.batching import (
    Part,
    attend_parts,
    attention_inputs,
    finish_layer,
    fused_weights,
    packed_linear,
)

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _Bucket:
    """The buffers every piece of one bucket reads and writes, and its pieces."""

    def __init__(self, rows: int, segment: Any) -> None:
        layer = segment.layers[0]
        attn = layer.self_attn
        heads = layer.packed_qkv.sizes[0] // attn.head_dim
        kv_heads = layer.packed_qkv.sizes[1] // attn.head_dim
        hidden_size = layer.input_layernorm.weight.shape[0]

        def zeros(*shape: int, dtype: torch.dtype = segment.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=segment.device)

        self.rows = rows
        self.hidden = zeros(rows, hidden_size)
        # The rotary cos and sin are in the dtype the rotary module gives (the hidden states').
        self.cos = zeros(rows, 1, attn.head_dim)
        self.sin = zeros(rows, 1, attn.head_dim)
        self.q = zeros(rows, heads, attn.head_dim)
        self.k = zeros(rows, kv_heads, attn.head_dim)
        self.v = zeros(rows, kv_heads, attn.head_dim)
        self.attended = zeros(rows, heads * attn.head_dim)
        vocab = segment.lm_head.weight.shape[0] if segment.lm_head is not None else 0
        self.logits = zeros(rows, vocab, dtype=torch.float32) if vocab else None
        self.pieces: dict[tuple, Callable[[], None]] = {}


class DecodeGraphs:
    """One segment's decode passes as pieces between attentions, captured as CUDA graphs where
    ``capture`` (the default on a CUDA device), run eagerly otherwise."""

    def __init__(self, segment: Any, capture: bool | None = None) -> None:
        if capture is None:
            capture = segment.device.type == "cuda"
        if capture and segment.device.type != "cuda":
            raise ValueError(f"CUDA graphs (--cuda-graphs) need a segment on a CUDA device, this one is on "
                             f"{segment.device}")
        if not segment.packable:
            raise ValueError("decode graphs run the Llama architecture's packed layers; this model has none")
        self.segment = segment
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._capture_stream: torch.cuda.Stream | None = None
        self.buckets: dict[int, _Bucket] = {}
        # One pass at a time: every pass of a bucket uses its buffers, and an engine's generations
        # share their segments across threads.
        self._lock = threading.Lock()
        self.passes = 0  # decode passes run as pieces
        self.captured = 0  # pieces captured as graphs
        self.capture_s = 0.0  # time spent capturing them

    def applies(self, parts: list[Part], counts: list[int], trees: list[Any]) -> bool:
        """Whether a packed pass of ``parts`` (``counts``: logit rows of each) runs as pieces."""
        seg = self.segment
        if not parts or len(parts) > BUCKETS[-1] or seg.quantized:
            return False
        first = parts[0].first_layer
        return (first < len(seg.layers) and all(p.rows == 1 and p.first_layer == first for p in parts)
                and all(t is None for t in trees) and len(set(counts)) == 1 and counts[0] in (0, 1)
                and fused_weights(seg.layers[first]) is None)

    @torch.inference_mode()
    def run(self, rows: torch.Tensor, parts: list[Part], rope: tuple[torch.Tensor, torch.Tensor],
            logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pass over ``rows`` (R, H), one row per part in order: the rows after the segment's
        last layer, and the head's float32 logits (R, V) where ``logits``."""
        seg = self.segment
        n = rows.shape[0]
        with self._lock:
            bucket = self._bucket(n)
            bucket.hidden[:n].copy_(rows)
            bucket.cos[:n].copy_(rope[0])
            bucket.sin[:n].copy_(rope[1])
            first = parts[0].first_layer
            self._piece(bucket, ("start", first))()
            for index in range(first, len(seg.layers)):
                layer = seg.layers[index]
                attended = attend_parts(layer.self_attn, bucket.q[:n], bucket.k[:n], bucket.v[:n], parts,
                                        seg.windows[index], seg._attention)
                bucket.attended[:n].copy_(attended)
                self._piece(bucket, ("after", index, logits))()
            self.passes += 1
            out = bucket.logits[:n].clone() if logits and bucket.logits is not None else None
            return bucket.hidden[:n].clone(), out

    def _bucket(self, rows: int) -> _Bucket:
        size = next(b for b in BUCKETS if b >= rows)
        bucket = self.buckets.get(size)
        if bucket is None:
            bucket = self.buckets[size] = _Bucket(size, self.segment)
        return bucket

    def _piece(self, bucket: _Bucket, key: tuple) -> Callable[[], None]:
        piece = bucket.pieces.get(key)
        if piece is not None:
            return piece
        fn = self._start(bucket, key[1]) if key[0] == "start" else self._after(bucket, key[1], key[2])
        if not self.capture:
            bucket.pieces[key] = fn
            return fn

        def first_run() -> None:
            # The real work of this pass, on the stream that then captures: its first run there
            # is the warm-up a capture needs (cuBLAS's workspace, the row-range probes).
            device = self.segment.device
            stream = self._stream()
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream(device).wait_stream(stream)
            t0 = time.perf_counter()
            graph = torch.cuda.CUDAGraph()
            # thread_local: another generation's thread may run eager work (a prefill) meanwhile.
            with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
                fn()  # recorded, not run
            bucket.pieces[key] = graph.replay
            self.captured += 1
            self.capture_s += time.perf_counter() - t0

        return first_run

    def _stream(self) -> torch.cuda.Stream:
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.segment.device)
        return self._capture_stream

    def _start(self, bucket: _Bucket, index: int) -> Callable[[], None]:
        layer = self.segment.layers[index]

        def start() -> None:
            q, k, v = attention_inputs(layer, bucket.hidden, (bucket.cos, bucket.sin))
            bucket.q.copy_(q)
            bucket.k.copy_(k)
            bucket.v.copy_(v)

        return start

    def _after(self, bucket: _Bucket, index: int, logits: bool) -> Callable[[], None]:
        seg = self.segment
        layer = seg.layers[index]
        start_next = self._start(bucket, index + 1) if index + 1 < len(seg.layers) else None
        head = logits and bucket.logits is not None

        def after() -> None:
            bucket.hidden.copy_(finish_layer(layer, bucket.hidden, bucket.attended))
            if start_next is not None:
                start_next()
            elif head:
                bucket.logits.copy_(packed_linear(seg.norm(bucket.hidden), seg.lm_head).float())

        return after
