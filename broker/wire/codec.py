"""Tensors as raw body frames plus a small msgpack-able metadata map.

The metadata (``{"dtype": "fp16", "shape": [1, 7, 576]}``) goes into a
header's ``extra`` map; the data goes into a body frame. Encoding avoids a
copy when the tensor already has the wire dtype and is contiguous; decoding
always returns a fresh float32 tensor, because received frames are read-only
buffers owned by ZeroMQ and compute code expects to own its tensors.

``int8`` is lossy: hidden states carry a few channels hundreds of times larger
than the rest (SmolLM2: absmax/rms ~ 379), which make naive per-row int8 break
greedy output within a few tokens. So the largest channels of the tensor travel
as fp16, and the rest as int8 with one fp16 scale per row and group of
``INT8_GROUP`` channels. Meta: ``{"dtype": "int8", "shape": [..., H],
"outliers": n}``; data, little-endian, in this order::

    n      x uint16   outlier channel indices, strictly increasing, < H
    R x n  x fp16     outlier values, row-major (R = rows = prod(shape[:-1]))
    R x G  x fp16     scales, finite and >= 0 (G = ceil((H - n) / INT8_GROUP))
    R x (H - n) x int8  the other channels in order, value = q * scale

This is the only broker module that imports torch; the broker process itself
never imports it.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import numpy as np
import torch

from broker.errors import ProtocolError
from broker.protocol import MAX_FRAME_BYTES

logger = logging.getLogger(__name__)

# Wire dtypes, always little-endian. bf16 has no numpy dtype, so it travels as
# raw uint16 bit patterns and is widened to fp32 by a shift.
WIRE_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "fp32": (torch.float32, np.dtype("<f4")),
    "fp16": (torch.float16, np.dtype("<f2")),
    "bf16": (torch.bfloat16, np.dtype("<u2")),
    "int8": (torch.int8, np.dtype("i1")),  # plus fp16 outliers and scales, see the module doc
}
# Channels per int8 scale. Measured on SmolLM2 hidden states at splits 5/15/25 (8 prompts, 560
# positions): one scale per row leaves 0.1-0.6% relative error even with 8 outlier channels
# removed and 98-99.7% teacher-forced top-1 agreement; groups of 64 bring it to 0.05-0.4% and
# 99.5-100%, for 2 bytes per 64 values.
INT8_GROUP = 64
# A channel whose absmax over the tensor exceeds this many times the median channel's absmax
# travels as fp16. SmolLM2 has 5 (split 5) to 12 (splits 15, 25) such channels per tensor.
OUTLIER_RATIO = 6.0
# At most this many outlier channels (each costs 2 bytes per row instead of 1).
MAX_OUTLIERS = 32
# Bounds decode allocations: a frame can hold at most this many 4-byte
# elements, and the fp32 output of a 2-byte wire dtype is twice the frame.
MAX_TENSOR_ELEMENTS = MAX_FRAME_BYTES // 4
# Activations are at most [batch, seq, hidden] plus a little; 8 dims is plenty.
MAX_TENSOR_DIMS = 8

_LITTLE_ENDIAN = sys.byteorder == "little"


def row_bytes_bound(width: int, wire_dtype: str) -> int:
    """At most how many bytes one row of ``width`` values takes on the wire in ``wire_dtype``
    (int8's outlier channels and scales stay below fp16's two bytes a value)."""
    itemsize = 2 if wire_dtype == "int8" else WIRE_DTYPES[wire_dtype][1].itemsize
    return width * itemsize


def encode_tensor(t: torch.Tensor, wire_dtype: str = "fp16") -> tuple[dict[str, Any], memoryview]:
    """Return ``(meta, data)`` for ``t`` converted to ``wire_dtype``.

    ``data`` is a flat byte memoryview; it aliases the (converted) tensor's
    storage, so the caller must keep ``data`` alive until it is sent, which
    pyzmq's zero-copy send does by holding a reference.
    """
    if wire_dtype not in WIRE_DTYPES:
        raise ProtocolError(
            "bad_dtype", f"unknown wire dtype {wire_dtype!r}; use one of {sorted(WIRE_DTYPES)}"
        )
    if t.dim() > MAX_TENSOR_DIMS:
        raise ProtocolError("bad_shape", f"{t.dim()} dims > {MAX_TENSOR_DIMS}")
    if wire_dtype == "int8":
        return _encode_int8(t)
    torch_dtype, np_dtype = WIRE_DTYPES[wire_dtype]
    src = t.detach()
    if src.device.type != "cpu":
        src = src.to("cpu")
    src = src.to(torch_dtype).contiguous()
    if not all_finite(src):
        # The far side refuses non-finite activations: say why here, where it can be fixed.
        where = "" if all_finite(t.detach().cpu()) else " (they are not finite before conversion either)"
        raise ProtocolError("bad_tensor", f"activations are not finite in {wire_dtype}{where}: "
                            "a wider --wire-dtype (bf16 or fp32) carries values past fp16's 65504")
    if wire_dtype == "bf16":
        src = src.view(torch.int16)
    arr = src.numpy()
    if not _LITTLE_ENDIAN:
        arr = arr.astype(np_dtype)
    meta = {"dtype": wire_dtype, "shape": list(t.shape)}
    return meta, memoryview(arr.reshape(-1)).cast("B")


def _shape_from_meta(meta: Any, max_elements: int) -> tuple[str, list[int], int]:
    if type(meta) is not dict:
        raise ProtocolError("bad_tensor_meta", "tensor metadata is not a map")
    dtype = meta.get("dtype")
    if type(dtype) is not str or dtype not in WIRE_DTYPES:
        raise ProtocolError("bad_dtype", f"unknown wire dtype {dtype!r}")
    shape = meta.get("shape")
    if type(shape) is not list or len(shape) > MAX_TENSOR_DIMS:
        raise ProtocolError("bad_shape", "shape must be a list of at most 8 sizes")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError("bad_shape", "shape sizes must be non-negative integers")
    count = math.prod(shape)
    if count > max_elements:
        raise ProtocolError("tensor_too_large", f"{count} elements > {max_elements}")
    return dtype, shape, count


def decode_tensor(meta: Any, data: Any, max_elements: int = MAX_TENSOR_ELEMENTS) -> torch.Tensor:
    """Rebuild a float32 tensor from ``meta`` and a buffer; validate everything.

    Raises ProtocolError if the dtype is unknown, the shape is malformed or
    too large, the byte length does not match the shape exactly, or a value is
    NaN or infinite.
    """
    dtype, shape, count = _shape_from_meta(meta, max_elements)
    np_dtype = WIRE_DTYPES[dtype][1]
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise ProtocolError("bad_tensor_data", "tensor data is not a contiguous buffer") from exc
    if dtype == "int8":
        return _finite(_decode_int8(meta, view, shape, count))
    expected = count * np_dtype.itemsize
    if view.nbytes != expected:
        raise ProtocolError(
            "bad_tensor_data", f"{view.nbytes} bytes for shape {shape} {dtype}, expected {expected}"
        )
    raw = np.frombuffer(view, dtype=np_dtype, count=count)
    if dtype == "fp32":
        out = raw.astype(np.float32, copy=True)
    elif dtype == "fp16":
        out = raw.astype(np.float32)
    else:  # bf16: the upper half of an fp32 bit pattern
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    return _finite(torch.from_numpy(out).reshape(shape))


def _finite(t: torch.Tensor) -> torch.Tensor:
    # NaN or inf from a peer would run through every layer and come back as a token chosen from
    # garbage (argmax of NaN logits): refused like any other malformed frame.
    if not all_finite(t):
        raise ProtocolError("bad_tensor", "activations with NaN or infinite values are refused")
    return t


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of a CPU tensor without grad is finite. Every step frame is checked on
    both sides, and numpy's check of float32 and float16 runs on the calling thread: after a pause
    (threads asleep, as between a worker's passes) 13 against torch's 38 us for one 576-wide row,
    16 against 73 us for 37 rows (medians; back to back 1.5 against 8 us)."""
    if t.dtype in (torch.float32, torch.float16):
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


# --- int8 with fp16 outlier channels ---------------------------------------------------------------

_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")
_F16_MAX = 65504.0


def _int8_layout(rows: int, width: int, n_out: int) -> tuple[int, int, int, int]:
    """Byte offsets of the outlier values, the scales and the int8 values, and the total size."""
    groups = -(-(width - n_out) // INT8_GROUP)
    at_values = 2 * n_out
    at_scales = at_values + 2 * rows * n_out
    at_q = at_scales + 2 * rows * groups
    return at_values, at_scales, at_q, at_q + rows * (width - n_out)


def _encode_int8(t: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
    x = t.detach().to("cpu", torch.float32)
    width = x.shape[-1] if x.dim() else 1
    rows = x.reshape(-1, width) if width else x.reshape(0, 0)  # (R, H)
    if not all_finite(rows):
        raise ProtocolError("bad_tensor", "int8 cannot encode non-finite activations")
    n_rows = rows.shape[0]
    outliers = torch.zeros(0, dtype=torch.long)
    if n_rows and width:
        absmax = rows.abs().amax(0)  # (H,)
        big = (absmax > OUTLIER_RATIO * absmax.median()).nonzero().flatten()
        if big.numel() > MAX_OUTLIERS:
            big = big[absmax[big].topk(MAX_OUTLIERS).indices]
        outliers = big.sort().values
    keep = torch.ones(width, dtype=torch.bool)
    keep[outliers] = False
    rest = rows[:, keep]  # (R, M)
    n_kept = rest.shape[1]
    groups = -(-n_kept // INT8_GROUP)
    padded = torch.nn.functional.pad(rest, (0, groups * INT8_GROUP - n_kept)).reshape(n_rows, groups, INT8_GROUP)
    # The scale is rounded to fp16 before quantizing, so the decoder's scale is the one used here.
    scales = (padded.abs().amax(-1) / 127.0).clamp(max=_F16_MAX).to(torch.float16)  # (R, G)
    divisor = scales.float().unsqueeze(-1)
    q = torch.where(divisor > 0, padded / divisor.clamp_min(1e-30), 0.0).round().clamp(-127, 127)
    q = q.reshape(n_rows, groups * INT8_GROUP)[:, :n_kept].to(torch.int8)
    parts = [
        outliers.numpy().astype(_U16),
        rows[:, outliers].to(torch.float16).numpy().astype(_F16),
        scales.numpy().astype(_F16),
        q.numpy(),
    ]
    data = np.concatenate([p.reshape(-1).view(np.uint8) for p in parts])
    meta = {"dtype": "int8", "shape": list(t.shape), "outliers": int(outliers.numel())}
    return meta, memoryview(data)


def _decode_int8(meta: dict, view: memoryview, shape: list[int], count: int) -> torch.Tensor:
    width = shape[-1] if shape else 1
    n_out = meta.get("outliers")
    if type(n_out) is not int or not 0 <= n_out <= min(width, MAX_OUTLIERS):
        raise ProtocolError("bad_tensor_meta", f"int8 outliers must be an integer in [0, {MAX_OUTLIERS}] "
                            f"and at most the width {width}, got {n_out!r}")
    n_rows = count // width if width else 0
    at_values, at_scales, at_q, total = _int8_layout(n_rows, width, n_out)
    if view.nbytes != total:
        raise ProtocolError("bad_tensor_data", f"{view.nbytes} bytes for shape {shape} int8 with "
                            f"{n_out} outliers, expected {total}")
    idx = np.frombuffer(view, dtype=_U16, count=n_out).astype(np.int64)
    if n_out and (idx[-1] >= width or np.any(np.diff(idx) <= 0)):
        raise ProtocolError("bad_tensor_data", "int8 outlier channels must be strictly increasing and < width")
    groups = -(-(width - n_out) // INT8_GROUP)
    scales = np.frombuffer(view, dtype=_F16, count=n_rows * groups, offset=at_scales).astype(np.float32)
    if not np.all(np.isfinite(scales) & (scales >= 0)):
        raise ProtocolError("bad_tensor_data", "int8 scales must be finite and non-negative")
    q = np.frombuffer(view, dtype=np.int8, count=n_rows * (width - n_out), offset=at_q)
    q = q.reshape(n_rows, width - n_out)
    out = np.empty((n_rows, width), dtype=np.float32)
    keep = np.ones(width, dtype=bool)
    keep[idx] = False
    out[:, keep] = q * np.repeat(scales.reshape(n_rows, groups), INT8_GROUP, axis=1)[:, : width - n_out]
    values = np.frombuffer(view, dtype=_F16, count=n_rows * n_out, offset=at_values)
    out[:, idx] = values.reshape(n_rows, n_out)
    return torch.from_numpy(out).reshape(shape)
