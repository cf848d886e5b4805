"""A float32 matrix product whose rows never depend on each other: the packed decode step's kernel
(and its twin with int8 weights, for the edge's quantized copy of the cloud's layers), and the
step's attention, every session's rows in one call, each row computed on its own (``attend``).

Batching decode steps pays off only if a row's numbers are the same whatever else is in the call
(``partition/batching.py``). MKL gives that only within a range of row counts that share one of
its kernels, and its kernel for 2..15 rows costs more per row the more rows it gets: on this
project's 2-core CPU a SmolLM2 step of eight sessions took 2.2-3x the products of one session,
the 49152-row head 3.3x. ``data/rowdot.c`` is a small AVX2 kernel that sums every output in one
fixed order (see its comment), so any number of rows gives each row the same bits, and it reads
each weight once for all the rows of a call: measured against MKL on the same shapes, as fast
alone (0.9-1.0x) and 1.2-1.7x faster at eight rows.

It is compiled once per machine with the C compiler found (``$CC``, else ``cc``) into
``$EDGECLOUD_CACHE/kernels`` and loaded next to torch's OpenMP runtime, whose threads it shares.
Without a compiler, on a CPU without AVX2 and FMA, or with ``EDGECLOUD_ROW_KERNEL=off``, packed
products use MKL's kernels in tiles of one kernel's rows instead: just as invariant, slower
batched. Edge and worker on one machine take the same path, so a split run still computes what
a local run does.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from partition.models import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "data" / "rowdot.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
WIDE_FLAGS = ["-mavx512f"]  # 16 lanes where the CPU has AVX-512 (its sums then differ from 8 lanes')
SWITCH = "EDGECLOUD_ROW_KERNEL"  # "off": MKL's kernels in tiles instead

_lock = threading.Lock()
_state: dict[str, object] = {}


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _capability() -> str | None:
    """"AVX512", "AVX2" or None (neither, or not x86)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        found = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # an older torch without the query
        return None
    return found if found in ("AVX2", "AVX512") else None


def _flags() -> list[str]:
    return FLAGS + (WIDE_FLAGS if _capability() == "AVX512" else [])


def _build(compiler: str, source: str | None = None) -> Path:
    """The shared library for this source (``SOURCE``'s text unless given: a bench builds an older
    one), these flags and this compiler, built unless cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = _flags()
    text = SOURCE.read_text() if source is None else source
    digest = hashlib.sha256("\0".join([text, *flags, version]).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"rowdot-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        src = Path(tmp) / "rowdot.c"
        src.write_text(text)
        done = subprocess.run([compiler, *flags, str(src), "-o", str(built)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: another process building it too reads a whole file
    return target


def _self_test(fn) -> None:
    """The kernel against torch's product (close) and against itself alone (bit for bit)."""
    gen = torch.Generator().manual_seed(0)
    for n, k in ((37, 29), (64, 576)):
        w = torch.randn(n, k, generator=gen)
        x = torch.randn(17, k, generator=gen)
        out = _call(fn, x, w)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w), rtol=1e-4, atol=1e-4)
        for rows in (1, 2, 5, 7, 17):
            if not torch.equal(_call(fn, x[rows - 1:rows], w)[0], out[rows - 1]):
                raise RuntimeError(f"row {rows - 1} differs between a call of {rows} rows and one of 17")


def _self_test_i8(fn) -> None:
    """The int8 kernel against the product with its weights widened (close), and row by row."""
    gen = torch.Generator().manual_seed(1)
    for n, k in ((37, 29), (64, 576)):
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scale = torch.rand(n, generator=gen) / 127
        x = torch.randn(17, k, generator=gen)
        out = _call_i8(fn, x, q, scale)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, q.float()) * scale, rtol=1e-4, atol=1e-4)
        for rows in (1, 2, 5, 7, 17):
            if not torch.equal(_call_i8(fn, x[rows - 1:rows], q, scale)[0], out[rows - 1]):
                raise RuntimeError(f"int8: row {rows - 1} differs between a call of {rows} rows and one of 17")


def _self_test_attend(fn) -> None:
    """The attention kernel against SDPA (close), and each row of a masked frame against the same
    row as a one-row step (bit for bit)."""
    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, past, rows = 6, 2, 20, 9, 4
    keys = torch.randn(rows, kv_heads, dim, generator=gen)
    values = torch.randn(rows, kv_heads, dim, generator=gen)
    query = torch.randn(rows, heads, dim, generator=gen)
    cached = (torch.randn(1, kv_heads, 16, dim, generator=gen), torch.randn(1, kv_heads, 16, dim, generator=gen))
    causal = torch.zeros(rows, past + rows)
    causal.masked_fill_(torch.ones(rows, past + rows, dtype=torch.bool).triu(past + 1), torch.finfo(torch.float32).min)
    ck, cv = cached[0].clone(), cached[1].clone()
    out = attend(query, keys, values, [(ck, cv, past, rows, causal)], 0.3, fn)
    full_k = torch.cat([cached[0][0, :, :past], keys.transpose(0, 1)], dim=1).repeat_interleave(heads // kv_heads, 0)
    full_v = torch.cat([cached[1][0, :, :past], values.transpose(0, 1)], dim=1).repeat_interleave(heads // kv_heads, 0)
    expected = F.scaled_dot_product_attention(query.transpose(0, 1), full_k, full_v, attn_mask=causal, scale=0.3)
    torch.testing.assert_close(out, expected.transpose(0, 1), rtol=1e-4, atol=1e-5)
    for i in range(rows):
        ck, cv = cached[0].clone(), cached[1].clone()
        attend(query[:i], keys[:i], values[:i], [(ck, cv, past, i, None)], 0.3, fn)  # the rows before it
        alone = attend(query[i:i + 1], keys[i:i + 1], values[i:i + 1], [(ck, cv, past + i, 1, None)], 0.3, fn)
        if not torch.equal(alone[0], out[i]):
            raise RuntimeError(f"attention: row {i} of a masked frame differs from it as a one-row step")


def _self_test_layer(fn, layers_fn=None) -> None:
    """The decoder layer kernel against the layer as torch operations (close), and a frame's
    rows against the same rows computed in two calls, the first rows then the rest (bit for
    bit: what lets a worker cut prompts anywhere and reuse their beginnings); ``layers_fn``
    (``decode_layers``) against the layers one call at a time, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    hidden_size, heads, kv_heads, dim, inter, rows, eps, scale = 32, 4, 2, 8, 40, 19, 1e-5, 8 ** -0.5

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.3

    norm1, norm2 = 1 + randn(hidden_size), 1 + randn(hidden_size)
    wqkv, wo = randn((heads + 2 * kv_heads) * dim, hidden_size), randn(hidden_size, heads * dim)
    wgu, wd = randn(2 * inter, hidden_size), randn(hidden_size, inter)
    weights = (norm1, norm2, wqkv, None, wo, None, wgu, None, wd, None)
    dims = (heads, kv_heads, dim, inter, eps, scale)
    angle = torch.arange(rows).unsqueeze(1) * (1e-2 ** (torch.arange(dim // 2) / (dim // 2)))
    cos, sin = torch.cat([angle.cos()] * 2, 1), torch.cat([angle.sin()] * 2, 1)
    x = randn(rows, hidden_size)

    def storage() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, kv_heads, 32, dim), torch.zeros(1, kv_heads, 32, dim)

    k_store, v_store = storage()
    out = decode_layer(x, weights, dims, (cos, sin), [(k_store, v_store, 0, rows, None)], fn)

    def norm(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))

    def rotate(t: torch.Tensor) -> torch.Tensor:  # (rows, heads, dim)
        half = dim // 2
        return t * cos.unsqueeze(1) + torch.cat((-t[..., half:], t[..., :half]), -1) * sin.unsqueeze(1)

    q, k, v = F.linear(norm(x, norm1), wqkv).split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q, k = rotate(q.view(rows, heads, dim)), rotate(k.view(rows, kv_heads, dim))
    att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(heads // kv_heads, 0),
                                         v.view(rows, kv_heads, dim).transpose(0, 1).repeat_interleave(
                                             heads // kv_heads, 0), is_causal=True, scale=scale)
    mid = x + F.linear(att.transpose(0, 1).reshape(rows, -1), wo)
    gate, up = F.linear(norm(mid, norm2), wgu).split([inter, inter], -1)
    torch.testing.assert_close(out, mid + F.linear(F.silu(gate) * up, wd), rtol=1e-4, atol=1e-4)
    k_store, v_store = storage()
    first = decode_layer(x[:7], weights, dims, (cos[:7], sin[:7]), [(k_store, v_store, 0, 7, None)], fn)
    rest = decode_layer(x[7:], weights, dims, (cos[7:], sin[7:]), [(k_store, v_store, 7, rows - 7, None)], fn)
    if not torch.equal(torch.cat([first, rest]), out):
        raise RuntimeError("decoder layer: a frame's rows differ when it is computed in two calls")
    # Q4_1 blocks for the products whose inputs hold whole blocks (q/k/v, o, gate/up: 32 wide),
    # float32 for down (40): the same bits as the float32 layer on the dequantized weights.
    blocks = [random_q41(w.shape[0], w.shape[1], gen) for w in (wqkv, wo, wgu)]
    wqkv, wo, wgu = (dequantize_q41(b, 32) for b in blocks)
    k_store, v_store = storage()
    plain = decode_layer(x, (norm1, norm2, wqkv, None, wo, None, wgu, None, wd, None), dims, (cos, sin),
                         [(k_store, v_store, 0, rows, None)], fn)
    k_store, v_store = storage()
    packed = decode_layer(x, (norm1, norm2, blocks[0], None, blocks[1], None, blocks[2], None, wd, None), dims,
                          (cos, sin), [(k_store, v_store, 0, rows, None)], fn)
    if not torch.equal(packed, plain):
        raise RuntimeError("decoder layer: Q4_1 blocks give other numbers than their dequantized weights")
    if layers_fn is None:
        return
    # Three layers (float32, Q4_1, float32 again) in one call, and the last two from the second:
    # the bits and the caches of one call per layer.
    stacks = [(norm1, norm2, wqkv, None, wo, None, wgu, None, wd, None),
              (norm2, norm1, blocks[0], None, blocks[1], None, blocks[2], None, wd, None),
              (norm1, norm1, wqkv, None, wo, None, wgu, None, wd, None)]
    plan = LayersPlan(stacks, dims)
    for lo in (0, 1):
        alone, together = [storage() for _ in stacks], [storage() for _ in stacks]
        y = x
        for weights, (k_store, v_store) in zip(stacks[lo:], alone[lo:], strict=True):
            y = decode_layer(y, weights, dims, (cos, sin), [(k_store, v_store, 0, rows, None)], fn)
        z = decode_layers(x, plan, lo, len(stacks), (cos, sin),
                          [[(k_store, v_store, 0, rows, None)] for k_store, v_store in together[lo:]], layers_fn)
        if not (torch.equal(y, z) and all(torch.equal(a, b) for s, t in zip(alone, together, strict=True)
                                          for a, b in zip(s, t, strict=True))):
            raise RuntimeError(f"decoder layers from {lo}: one call gives other numbers than a call per layer")


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           parts: list[tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor | None]], scale: float,
           fn=None) -> torch.Tensor:
    """Attention of every part's new rows over its cache, their keys and values written into it
    first (``data/rowdot.c``; ``usable_attend`` first). ``query`` (R, H, D), ``keys`` and
    ``values`` (R, Hkv, D): the parts' rows in turn. A part is ``(key storage, value storage,
    past, rows, mask)``: its cache's storage (1, Hkv, capacity, D), contiguous, with room for its
    ``rows`` after its ``past`` positions, and its additive mask (rows, past + rows), or None for
    causal. Returns (R, H, D); each row's numbers depend on nothing else in the call."""
    if fn is None:
        kernel()
        fn = _state.get("attend")
        if fn is None:
            raise RuntimeError(f"the row kernel's attention is not available here: {reason()}")
    count, rows, kc, vc, caps, pasts, masks = _part_arrays(parts)
    query, keys, values = query.contiguous(), keys.contiguous(), values.contiguous()
    out = torch.empty(query.shape)
    if fn(query.data_ptr(), keys.data_ptr(), values.data_ptr(), count, rows, kc, vc, caps, pasts, masks,
          query.shape[1], keys.shape[1], query.shape[2], scale, out.data_ptr(), torch.get_num_threads()):
        raise RuntimeError("the attention kernel could not allocate its scratch memory")
    return out


def _part_arrays(parts) -> tuple:
    count = len(parts)
    rows, caps, pasts = (ctypes.c_long * count)(), (ctypes.c_long * count)(), (ctypes.c_long * count)()
    kc, vc, masks = (ctypes.c_void_p * count)(), (ctypes.c_void_p * count)(), (ctypes.c_void_p * count)()
    for i, (k_store, v_store, past, n, mask) in enumerate(parts):
        if not (k_store.is_contiguous() and v_store.is_contiguous() and past + n <= k_store.shape[-2]):
            raise ValueError(f"a part's cache storage must be contiguous with room for {n} rows after {past}")
        kc[i], vc[i], caps[i], pasts[i], rows[i] = k_store.data_ptr(), v_store.data_ptr(), k_store.shape[-2], past, n
        masks[i] = None if mask is None else mask.data_ptr()
    return count, rows, kc, vc, caps, pasts, masks


def decode_layer(hidden: torch.Tensor, weights: tuple, dims: tuple[int, int, int, int, float, float],
                 rope: tuple[torch.Tensor, torch.Tensor],
                 parts: list[tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor | None]], fn=None) -> torch.Tensor:
    """A Llama decoder layer over ``hidden`` (R, H) in one call (``data/rowdot.c``): ``weights``
    are (input norm, post-attention norm, then weight and scale (None: float32) of the stacked
    q/k/v, o, the stacked gate/up and down products; a uint8 weight holds Q4_1 blocks,
    ``repack_q41``); ``dims`` (heads, kv heads, head dim,
    intermediate size, norm epsilon, attention scale); ``rope`` each row's cos and sin (R, D);
    ``parts`` as for ``attend``. Returns the layer's output (R, H); ``hidden`` is left alone."""
    out = hidden.contiguous().clone()
    heads, kv_heads, dim, inter, eps, scale = dims
    cos, sin = (t.reshape(out.shape[0], dim).contiguous() for t in rope)
    count, rows, kc, vc, caps, pasts, masks = _part_arrays(parts)
    norm1, norm2, wqkv, sqkv, wo, so, wgu, sgu, wd, sd = (None if t is None else t.data_ptr() for t in weights)
    failed = (fn or _state["layer"])(out.data_ptr(), out.shape[0], out.shape[1], norm1, norm2, eps, wqkv, sqkv, wo, so,
                             wgu, sgu, inter, wd, sd, heads, kv_heads, dim, cos.data_ptr(), sin.data_ptr(),
                             count, rows, kc, vc, caps, pasts, masks, scale, _q41_flags(weights), torch.get_num_threads())
    _check_layers(failed)
    return out


def _q41_flags(weights: tuple) -> int:
    """Which of a layer's four products (bit 0: q/k/v, 1: o, 2: gate/up, 3: down) hold Q4_1 blocks."""
    return sum(1 << i for i, w in enumerate(weights[2::2]) if w.dtype == torch.uint8)


def _check_layers(failed: int) -> None:
    if failed:
        raise RuntimeError(f"the decode layer kernel failed ({'head dim over 1024' if failed == 1 else 'no memory'})")


class LayersPlan:
    """A run of packable layers for ``decode_layers``: each layer's ten weight pointers and Q4_1
    flags, laid out once (the weights never move; the plan keeps them alive), and their sizes,
    the same for all."""

    def __init__(self, weights: list[tuple], dims: tuple[int, int, int, int, float, float]) -> None:
        self.tensors = [t for w in weights for t in w if t is not None]
        self.n = len(weights)
        self.pointers = (ctypes.c_void_p * (10 * self.n))(
            *[None if t is None else t.data_ptr() for w in weights for t in w])
        self.q41 = (ctypes.c_int * self.n)(*[_q41_flags(w) for w in weights])
        self.dims = dims


def decode_layers(hidden: torch.Tensor, plan: LayersPlan, lo: int, hi: int, rope: tuple[torch.Tensor, torch.Tensor],
                  runs: list[list[tuple]], fn=None) -> torch.Tensor:
    """Layers ``[lo, hi)`` of ``plan`` over ``hidden`` (R, H) in one call of the row kernel, the
    same bits as ``decode_layer`` one layer at a time. ``runs[l]``: layer ``lo + l``'s parts, as
    ``decode_layer`` takes them (the parts' rows and masks are the same in every layer)."""
    count, layers = len(runs[0]) if runs else 0, hi - lo
    if not (0 <= lo < hi <= plan.n and len(runs) == layers and all(len(r) == count for r in runs)
            and sum(run[3] for run in runs[0]) == hidden.shape[0]):
        raise ValueError(f"layers [{lo}, {hi}) of a plan of {plan.n} need a list of parts per layer, the same "
                         f"parts in each, whose rows add up to the {hidden.shape[0]} rows given")
    out = hidden.contiguous().clone()
    heads, kv_heads, dim, inter, eps, scale = plan.dims
    cos, sin = (t.reshape(out.shape[0], dim).contiguous() for t in rope)
    rows = (ctypes.c_long * count)(*[run[3] for run in runs[0]])
    masks = (ctypes.c_void_p * count)(*[None if run[4] is None else run[4].data_ptr() for run in runs[0]])
    kc, vc = (ctypes.c_void_p * (layers * count))(), (ctypes.c_void_p * (layers * count))()
    caps, pasts = (ctypes.c_long * (layers * count))(), (ctypes.c_long * (layers * count))()
    i = 0
    for layer_runs in runs:
        for k_store, v_store, past, n, _ in layer_runs:
            if past + n > k_store.shape[-2]:
                raise ValueError(f"a part's cache storage must have room for {n} rows after {past}")
            kc[i], vc[i], caps[i], pasts[i] = k_store.data_ptr(), v_store.data_ptr(), k_store.shape[-2], past
            i += 1
    size = ctypes.sizeof(ctypes.c_void_p)
    failed = (fn or _state["layers"])(
        out.data_ptr(), out.shape[0], out.shape[1], layers, ctypes.addressof(plan.pointers) + 10 * lo * size,
        ctypes.addressof(plan.q41) + lo * ctypes.sizeof(ctypes.c_int), eps, inter, heads, kv_heads, dim,
        cos.data_ptr(), sin.data_ptr(), count, rows, kc, vc, caps, pasts, masks, scale, torch.get_num_threads())
    _check_layers(failed)
    return out


def usable_attend(query: torch.Tensor) -> bool:
    """Whether ``attend`` runs here for this query: float32 on the CPU (its caches must be too)."""
    return query.dtype == torch.float32 and query.device.type == "cpu" and kernel() is not None


def _self_test_blocks(fblocks, fn, kind: str) -> None:
    """A block kernel (``kind`` "Q4_1" or "Q8_0") against the float32 kernel on the same weights
    dequantized: bit for bit."""
    make, dequantize = {"Q4_1": (random_q41, dequantize_q41), "Q8_0": (random_q80, dequantize_q80)}[kind]
    gen = torch.Generator().manual_seed(2)
    for n, k in ((37, 64), (64, 576)):
        blocks = make(n, k, gen)
        x = torch.randn(17, k, generator=gen)
        expected = _call(fn, x, dequantize(blocks, k))
        for rows in (1, 2, 17):
            if not torch.equal(_call(fblocks, x[:rows], blocks), expected[:rows]):
                raise RuntimeError(f"{kind}: a call of {rows} rows differs from the float32 kernel's")


Q80_BYTES, GGUF_Q80_BYTES = 36, 34  # bytes per block of 32 as the kernel reads it (float32 d) and in a file


def repack_q80(gguf_rows: torch.Tensor, k: int) -> torch.Tensor:
    """GGUF's Q8_0 rows (N, K / 32 * 34) uint8 as the kernel reads them, (N, K / 32 * 36): each
    block's float16 scale widened to float32 (exactly), then its 32 int8 q."""
    n = gguf_rows.shape[0]
    if k % Q41_BLOCK or gguf_rows.shape[1] != k // Q41_BLOCK * GGUF_Q80_BYTES:
        raise ValueError(f"Q8_0 rows of {gguf_rows.shape[1]} bytes do not hold {k} weights")
    b = gguf_rows.reshape(n, k // Q41_BLOCK, GGUF_Q80_BYTES)
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # (N, K/32, 1)
    return torch.cat([d.view(torch.uint8), b[..., 2:]], dim=-1).reshape(n, -1).contiguous()


def dequantize_q80(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Repacked Q8_0 rows (``repack_q80``) as float32 (N, K): d * q, as GGUF computes it."""
    n = blocks.shape[0]
    b = blocks.view(n, k // Q41_BLOCK, Q80_BYTES)
    d = b[..., 0:4].contiguous().view(torch.float32)  # (N, K/32, 1)
    return (d * b[..., 4:].contiguous().view(torch.int8).float()).reshape(n, k)


def random_q80(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random GGUF Q8_0 rows (tests), repacked."""
    blocks = torch.randint(0, 256, (n, k // Q41_BLOCK, GGUF_Q80_BYTES), generator=gen, dtype=torch.uint8)
    blocks[..., 0:2] = (torch.rand(n, k // Q41_BLOCK, 1, generator=gen) * 0.001).half().view(torch.uint8)
    return repack_q80(blocks.reshape(n, -1), k)


Q41_BLOCK, Q41_BYTES = 32, 24  # weights per block; bytes per block as the kernel reads it
GGUF_Q41_BYTES = 20  # bytes per block in a GGUF file: float16 d and m, 16 bytes of 4-bit q


def repack_q41(gguf_rows: torch.Tensor, k: int) -> torch.Tensor:
    """GGUF's Q4_1 rows (N, K / 32 * 20) uint8 as the kernel reads them, (N, K / 32 * 24): each
    block's float16 scale and minimum widened to float32 (exactly), then its 16 bytes of q."""
    n = gguf_rows.shape[0]
    if k % Q41_BLOCK or gguf_rows.shape[1] != k // Q41_BLOCK * GGUF_Q41_BYTES:
        raise ValueError(f"Q4_1 rows of {gguf_rows.shape[1]} bytes do not hold {k} weights")
    b = gguf_rows.reshape(n, k // Q41_BLOCK, GGUF_Q41_BYTES)
    dm = b[..., 0:4].contiguous().view(torch.float16).float()  # (N, K/32, 2): d, m
    return torch.cat([dm.view(torch.uint8), b[..., 4:]], dim=-1).reshape(n, -1).contiguous()


def dequantize_q41(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Repacked Q4_1 rows (``repack_q41``) as float32 (N, K), computed as GGUF does: d * q,
    rounded, plus m."""
    n = blocks.shape[0]
    b = blocks.view(n, k // Q41_BLOCK, Q41_BYTES)
    dm = b[..., 0:8].contiguous().view(torch.float32)  # (N, K/32, 2)
    q = b[..., 8:]
    q = torch.cat([q & 0x0F, q >> 4], dim=-1).float()  # (N, K/32, 32): low halves first
    return (dm[..., 0:1] * q + dm[..., 1:2]).reshape(n, k)


def random_q41(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random GGUF Q4_1 rows (tests), repacked: scales and minimums of a trained layer's size."""
    blocks = torch.randint(0, 256, (n, k // Q41_BLOCK, GGUF_Q41_BYTES), generator=gen, dtype=torch.uint8)
    blocks[..., 0:2] = (torch.rand(n, k // Q41_BLOCK, 1, generator=gen) * 0.01).half().view(torch.uint8)
    blocks[..., 2:4] = (-torch.rand(n, k // Q41_BLOCK, 1, generator=gen) * 0.08).half().view(torch.uint8)
    return repack_q41(blocks.reshape(n, -1), k)


def _call_i8(fn, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], q.shape[0])
    fn(x.data_ptr(), q.data_ptr(), scale.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], q.shape[0],
       torch.get_num_threads())
    return out


def _call(fn, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0])
    fn(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], w.shape[0], torch.get_num_threads())
    return out


def products(lib: ctypes.CDLL) -> tuple:
    """The library's four products, typed: ``rowdot``, ``rowdot_q41``, ``rowdot_q80`` (x, w, y, R, K,
    N, threads) and ``rowdot_i8`` (x, w, scale, y, R, K, N, threads)."""
    fns = lib.rowdot, lib.rowdot_q41, lib.rowdot_q80, lib.rowdot_i8
    for f, pointers in zip(fns, (3, 3, 3, 4), strict=True):
        f.restype = None
        f.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_long] * 3 + [ctypes.c_int]
    return fns


def kernel():
    """The loaded kernel (a ctypes function), or None where it cannot be used here; why is logged
    once and kept in ``reason()``."""
    if "fn" in _state:
        return _state["fn"]
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn, reason = None, None
        compiler = _compiler()
        if os.environ.get(SWITCH, "").lower() in ("off", "0", "mkl"):
            reason = f"{SWITCH}={os.environ[SWITCH]}"
        elif _capability() is None:
            reason = "the CPU lacks AVX2 and FMA"
        elif compiler is None:
            reason = "no C compiler (set $CC or install one, for example build-essential)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(compiler)))
                fn, fq4, fq8, fn8 = products(lib)
                fa = lib.attend
                fa.restype = ctypes.c_int
                fa.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_long] + [ctypes.c_void_p] * 6
                               + [ctypes.c_long] * 3 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int])
                fl = lib.decode_layer
                fl.restype = ctypes.c_int
                fl.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_float] + [ctypes.c_void_p] * 6 + [ctypes.c_long] + [ctypes.c_void_p] * 2
                               + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_long] + [ctypes.c_void_p] * 6
                               + [ctypes.c_float, ctypes.c_int, ctypes.c_int])
                _self_test(fn)
                _self_test_i8(fn8)
                _self_test_blocks(fq4, fn, "Q4_1")
                _self_test_blocks(fq8, fn, "Q8_0")
                _self_test_attend(fa)
                fls = lib.decode_layers
                fls.restype = ctypes.c_int
                fls.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_float] + [ctypes.c_long] * 4 + [ctypes.c_void_p] * 2
                                + [ctypes.c_long] + [ctypes.c_void_p] * 6 + [ctypes.c_float, ctypes.c_int])
                _self_test_layer(fl, fls)
                _state["fn8"] = fn8
                _state["fq4"] = fq4
                _state["fq8"] = fq8
                _state["attend"] = fa
                _state["layer"] = fl
                _state["layers"] = fls
            except (OSError, RuntimeError, subprocess.SubprocessError, AssertionError) as exc:
                fn, reason = None, f"it could not be built or failed its check: {exc}"
        if fn is None:
            log.info("packed products use MKL in tiles, not the row kernel: %s", reason)
        _state.update(fn=fn, reason=reason)
        return fn


def reason() -> str | None:
    """Why the kernel is not in use (None when it is, or before anyone asked)."""
    return _state.get("reason")  # type: ignore[return-value]


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and weight.is_contiguous() and kernel() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` (R, K) with the row kernel (``usable`` first)."""
    out = _call(kernel(), x.contiguous(), weight)
    return out if bias is None else out.add_(bias)


def usable_i8(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and qweight.dtype == torch.int8 and x.device.type == "cpu"
            and qweight.device.type == "cpu" and qweight.is_contiguous() and kernel() is not None)


def linear_i8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T`` for ``x`` (R, K), int8 ``qweight`` (N, K) and float32
    ``scale`` (N,), with the weights widened as they stream (``usable_i8`` first)."""
    return _call_i8(_state["fn8"], x.contiguous(), qweight, scale.contiguous())


def usable_blocks(x: torch.Tensor, blocks: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and blocks.dtype == torch.uint8 and x.device.type == "cpu"
            and blocks.device.type == "cpu" and blocks.is_contiguous() and kernel() is not None)


def linear_q41(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ dequantize_q41(blocks, K).T`` for ``x`` (R, K) and Q4_1 rows ``blocks`` (N, K / 32 *
    24) uint8 (``repack_q41``), the weights widened as they stream (``usable_blocks`` first): bit for
    bit what ``linear`` gives on the dequantized matrix, from 0.19x its bytes."""
    return _linear_blocks(x, blocks, "Q4_1", Q41_BYTES, "fq4")


def linear_q80(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ dequantize_q80(blocks, K).T`` for ``x`` (R, K) and Q8_0 rows ``blocks`` (N, K / 32 *
    36) uint8 (``repack_q80``; ``usable_blocks`` first): bit for bit what ``linear`` gives on the
    dequantized matrix."""
    return _linear_blocks(x, blocks, "Q8_0", Q80_BYTES, "fq8")


def _linear_blocks(x: torch.Tensor, blocks: torch.Tensor, kind: str, block_bytes: int, fn: str) -> torch.Tensor:
    k = x.shape[1]
    if k % Q41_BLOCK or blocks.shape[1] != k // Q41_BLOCK * block_bytes:
        raise ValueError(f"{kind} rows of {blocks.shape[1]} bytes do not hold {k} weights")
    if kernel() is None:
        raise RuntimeError(f"the row kernel is not in use here: {reason()}")
    return _call(_state[fn], x.contiguous(), blocks)
