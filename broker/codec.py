"""Tensors as raw body frames plus a small msgpack-able metadata map.

The metadata (``{"dtype": "fp16", "shape": [1, 7, 576]}``) goes into a
header's ``extra`` map; the data goes into a body frame. Encoding avoids a
copy when the tensor already has the wire dtype and is contiguous; decoding
always returns a fresh float32 tensor, because received frames are read-only
buffers owned by ZeroMQ and compute code expects to own its tensors.

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
}
# Bounds decode allocations: a frame can hold at most this many 4-byte
# elements, and the fp32 output of a 2-byte wire dtype is twice the frame.
MAX_TENSOR_ELEMENTS = MAX_FRAME_BYTES // 4
# Activations are at most [batch, seq, hidden] plus a little; 8 dims is plenty.
MAX_TENSOR_DIMS = 8

_LITTLE_ENDIAN = sys.byteorder == "little"


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
    torch_dtype, np_dtype = WIRE_DTYPES[wire_dtype]
    src = t.detach()
    if src.device.type != "cpu":
        src = src.to("cpu")
    src = src.to(torch_dtype).contiguous()
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
    too large, or the byte length does not match the shape exactly.
    """
    dtype, shape, count = _shape_from_meta(meta, max_elements)
    np_dtype = WIRE_DTYPES[dtype][1]
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise ProtocolError("bad_tensor_data", "tensor data is not a contiguous buffer") from exc
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
    return torch.from_numpy(out).reshape(shape)
