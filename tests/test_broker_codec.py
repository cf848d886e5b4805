"""Tensor codec: exact fp32, bounded fp16/bf16 error, and refusal of lying metadata."""

from __future__ import annotations

import pytest
import torch

from broker.codec import decode_tensor, encode_tensor
from broker.errors import ProtocolError


@pytest.fixture
def activations() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 7, 64, generator=g) * 3


def test_fp32_round_trip_is_exact(activations: torch.Tensor) -> None:
    meta, data = encode_tensor(activations, "fp32")
    assert meta == {"dtype": "fp32", "shape": [2, 7, 64]}
    assert data.nbytes == activations.numel() * 4
    out = decode_tensor(meta, bytes(data))
    assert out.dtype == torch.float32 and torch.equal(out, activations)


def test_fp32_encode_is_zero_copy(activations: torch.Tensor) -> None:
    _, data = encode_tensor(activations, "fp32")
    activations[0, 0, 0] = 123.0
    assert decode_tensor({"dtype": "fp32", "shape": [2, 7, 64]}, data)[0, 0, 0] == 123.0


@pytest.mark.parametrize(("wire", "rel_tol"), [("fp16", 2**-10), ("bf16", 2**-7)])
def test_half_precision_error_is_bounded(activations: torch.Tensor, wire: str, rel_tol: float) -> None:
    meta, data = encode_tensor(activations, wire)
    assert data.nbytes == activations.numel() * 2
    out = decode_tensor(meta, data)
    assert out.dtype == torch.float32 and out.shape == activations.shape
    assert torch.all((out - activations).abs() <= activations.abs() * rel_tol + 1e-6)


def test_bf16_decode_matches_torch(activations: torch.Tensor) -> None:
    meta, data = encode_tensor(activations, "bf16")
    assert torch.equal(decode_tensor(meta, data), activations.to(torch.bfloat16).float())


def test_decoded_tensor_is_writable_and_owned() -> None:
    meta, data = encode_tensor(torch.ones(3), "fp32")
    frozen = bytes(data)
    out = decode_tensor(meta, frozen)
    out += 1
    assert frozen == bytes(data)


def test_non_contiguous_scalar_and_empty_tensors() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(decode_tensor(*encode_tensor(t, "fp32")), t)
    s = torch.tensor(2.5)
    assert torch.equal(decode_tensor(*encode_tensor(s, "fp16")), s)
    e = torch.zeros(0, 5)
    assert decode_tensor(*encode_tensor(e, "bf16")).shape == (0, 5)


@pytest.mark.parametrize(
    ("meta", "nbytes"),
    [
        ({"dtype": "fp32", "shape": [4]}, 12),  # shape claims more than the data holds
        ({"dtype": "fp32", "shape": [2]}, 16),  # and less
        ({"dtype": "int8", "shape": [4]}, 4),
        ({"dtype": "fp16", "shape": [-1]}, 2),
        ({"dtype": "fp16", "shape": [True]}, 2),
        ({"dtype": "fp16", "shape": "4"}, 8),
        ({"dtype": "fp16", "shape": [1] * 9}, 2),
        ({"dtype": "fp32", "shape": [1 << 20, 1 << 20]}, 16),
        ({"shape": [1]}, 4),
        ([1, 2], 4),
    ],
)
def test_rejects_lying_metadata(meta: object, nbytes: int) -> None:
    with pytest.raises(ProtocolError):
        decode_tensor(meta, b"\x00" * nbytes)


def test_rejects_bad_wire_dtype_and_non_buffer() -> None:
    with pytest.raises(ProtocolError):
        encode_tensor(torch.ones(2), "fp8")
    with pytest.raises(ProtocolError):
        decode_tensor({"dtype": "fp32", "shape": [1]}, 1234)
    with pytest.raises(ProtocolError):
        decode_tensor({"dtype": "fp32", "shape": [4]}, b"\x00" * 16, max_elements=3)
