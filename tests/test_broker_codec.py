"""Tensor codec: exact fp32, bounded fp16/bf16 error, and refusal of lying metadata."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import ProtocolError
from broker.wire.codec import decode_tensor, encode_tensor


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
        ({"dtype": "int8", "shape": [4]}, 4),  # int8 without its outlier count
        ({"dtype": "int4", "shape": [4]}, 2),
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


# --- int8 with fp16 outlier channels --------------------------------------------------------------

FUZZ = settings(max_examples=int(os.environ.get("EDGECLOUD_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _with_outliers(rows: int = 5, width: int = 576) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, rows, width, generator=g)
    h[..., 7] *= 400.0  # like the massive channels of real hidden states
    h[..., 300] *= -150.0
    return h


def test_int8_keeps_outlier_channels_in_fp16_and_bounds_the_rest() -> None:
    h = _with_outliers()
    meta, data = encode_tensor(h, "int8")
    assert meta["dtype"] == "int8" and meta["outliers"] == 2
    out = decode_tensor(meta, bytes(data))
    assert torch.equal(out[..., [7, 300]], h[..., [7, 300]].half().float())
    rest = [c for c in range(576) if c not in (7, 300)]
    err = (out[..., rest] - h[..., rest]).abs()
    # Each group's step is its absmax / 127; rounding is off by at most half a step (plus the
    # fp16 rounding of the scale, < 0.1%).
    groups = h[..., rest].reshape(1, 5, -1)
    bound = torch.nn.functional.pad(groups.abs(), (0, 64 - 574 % 64)).reshape(1, 5, -1, 64).amax(-1)
    bound = bound.repeat_interleave(64, -1)[..., :574] / 127 * 0.501 + 1e-6
    assert torch.all(err <= bound)
    naive = h / h.abs().amax(-1, keepdim=True) * 127
    naive_err = (naive.round() * h.abs().amax(-1, keepdim=True) / 127 - h).norm()
    assert (out - h).norm() < naive_err / 20  # what the outlier channels buy


def test_int8_is_a_bit_over_one_byte_per_value() -> None:
    h = _with_outliers(rows=1)
    meta, data = encode_tensor(h, "int8")
    n = meta["outliers"]
    groups = -(-(576 - n) // 64)
    assert data.nbytes == 2 * n + 2 * n + 2 * groups + (576 - n) < 0.55 * 576 * 2


def test_int8_refuses_non_finite_activations() -> None:
    with pytest.raises(ProtocolError):
        encode_tensor(torch.tensor([1.0, float("nan")]), "int8")


def _int8_frame(h: torch.Tensor) -> tuple[dict, bytearray]:
    meta, data = encode_tensor(h, "int8")
    return meta, bytearray(bytes(data))


def test_int8_decode_refuses_inconsistent_frames() -> None:
    meta, data = _int8_frame(_with_outliers(rows=2))
    assert meta["outliers"] == 2
    for bad_meta in ({**meta, "outliers": 3}, {**meta, "outliers": -1}, {**meta, "outliers": 1.0},
                     {**meta, "outliers": 10**6}, {k: v for k, v in meta.items() if k != "outliers"}):
        with pytest.raises(ProtocolError):
            decode_tensor(bad_meta, bytes(data))
    with pytest.raises(ProtocolError):
        decode_tensor(meta, bytes(data[:-1]))
    swapped = bytearray(data)
    swapped[0:4] = data[2:4] + data[0:2]  # indices no longer increasing
    with pytest.raises(ProtocolError):
        decode_tensor(meta, bytes(swapped))
    out_of_range = bytearray(data)
    out_of_range[2:4] = (576).to_bytes(2, "little")
    with pytest.raises(ProtocolError):
        decode_tensor(meta, bytes(out_of_range))
    nan_scale = bytearray(data)
    at_scales = 2 * 2 + 2 * 2 * 2
    nan_scale[at_scales:at_scales + 2] = b"\x00\x7e"  # fp16 NaN
    with pytest.raises(ProtocolError):
        decode_tensor(meta, bytes(nan_scale))
    negative = bytearray(data)
    negative[at_scales + 1] |= 0x80
    with pytest.raises(ProtocolError):
        decode_tensor(meta, bytes(negative))


@FUZZ
@given(st.lists(st.integers(0, 6), min_size=0, max_size=3), st.integers(-3, 40), st.binary(max_size=400))
def test_fuzz_int8_frames_only_raise_protocol_errors(shape, outliers, data):
    try:
        out = decode_tensor({"dtype": "int8", "shape": shape, "outliers": outliers}, data)
    except ProtocolError:
        return
    assert out.dtype == torch.float32 and list(out.shape) == shape


_VALID_INT8 = _int8_frame(_with_outliers(rows=2, width=400))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(-2, 2))
def test_fuzz_corrupted_int8_frames_decode_to_the_right_shape_or_fail_typed(flips, outlier_delta):
    meta, data = _VALID_INT8
    corrupt = bytearray(data)
    for at, value in flips:
        corrupt[at % len(corrupt)] = value
    meta = {**meta, "outliers": meta["outliers"] + outlier_delta}
    try:
        out = decode_tensor(meta, bytes(corrupt))
    except ProtocolError:
        return
    assert out.shape == (1, 2, 400) and out.dtype == torch.float32


@FUZZ
@given(st.integers(1, 4), st.integers(1, 200), st.floats(0.01, 1e4), st.integers(0, 2**31 - 1))
def test_fuzz_int8_round_trips_within_its_error_bound(rows, width, scale, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, width, generator=g) * scale
    meta, data = encode_tensor(h, "int8")
    out = decode_tensor(meta, bytes(data))
    assert out.shape == h.shape
    # Never worse than one int8 step of the row's largest magnitude.
    step = h.abs().amax(-1, keepdim=True) / 127 * 1.01 + 1e-6
    assert torch.all((out - h).abs() <= step)


@pytest.mark.real_model
def test_int8_keeps_smollm2_greedy_output_where_naive_int8_does_not(smollm2) -> None:
    """The point of the outlier channels, on real hidden states at split 15: 16 greedy tokens stay
    those of the unmodified model, while naive per-row int8 changes the top-1 token at some
    positions of the same text."""
    from edge_worker.privacy import worker_input
    from partition.segment import ModelSegment
    from partition.tokens import encode_prompt

    split = 15
    edge = ModelSegment.load(smollm2, 0, split)
    rest = ModelSegment.load(smollm2, split, smollm2.n_layers, embed=False)
    ids = encode_prompt(smollm2.load_tokenizer(), "Explain why the sky is blue.")

    def generate(transform) -> list[int]:
        ec, rc, x, out = edge.new_cache(), rest.new_cache(), torch.tensor([ids]), []
        for _ in range(16):
            h = edge(x, ec, logits="none").hidden  # (1, T, H)
            out.append(int(rest(transform(h), rc).logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
        return out

    reference = generate(lambda h: h)
    assert generate(lambda h: worker_input(h, "int8")) == reference

    def naive(h: torch.Tensor) -> torch.Tensor:
        scale = h.abs().amax(-1, keepdim=True) / 127
        return (h / scale).round() * scale

    text = torch.tensor([ids + reference])
    h = edge(text, edge.new_cache(), logits="none").hidden
    top1 = rest(h, rest.new_cache(), logits="all").logits.argmax(-1)
    assert torch.equal(rest(worker_input(h, "int8"), rest.new_cache(), logits="all").logits.argmax(-1), top1)
    assert not torch.equal(rest(naive(h), rest.new_cache(), logits="all").logits.argmax(-1), top1)


def test_the_torch_free_list_of_wire_dtypes_is_the_codecs():
    from broker.wire import WIRE_DTYPE_NAMES
    from broker.wire.codec import WIRE_DTYPES

    assert tuple(WIRE_DTYPES) == WIRE_DTYPE_NAMES


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
def test_non_finite_activations_are_refused_on_both_sides(dtype):
    good = torch.randn(1, 3, 64)
    meta, data = encode_tensor(good, dtype)
    raw = bytearray(data)
    if dtype == "int8":  # an outlier channel's fp16 value (the layout's first values after the indices)
        meta, data = encode_tensor(torch.cat([good, torch.full((1, 3, 1), 500.0)], dim=-1), dtype)
        raw = bytearray(data)
        assert meta["outliers"] >= 1
        at = 2 * meta["outliers"]
        raw[at:at + 2] = b"\x00\x7c"  # fp16 +inf
    else:
        width = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
        raw[:width] = {"fp32": b"\x00\x00\xc0\x7f", "fp16": b"\x00\x7e", "bf16": b"\xc0\x7f"}[dtype]  # NaN
    with pytest.raises(ProtocolError, match="NaN or infinite"):
        decode_tensor(meta, bytes(raw))
    bad = good.clone()
    bad[0, 1, 5] = float("inf")
    with pytest.raises(ProtocolError, match="not finite|non-finite"):
        encode_tensor(bad, dtype)


def test_values_past_fp16_say_to_widen_the_wire_dtype():
    big = torch.full((1, 1, 8), 1e6)
    with pytest.raises(ProtocolError, match="wider --wire-dtype"):
        encode_tensor(big, "fp16")
    meta, data = encode_tensor(big, "bf16")
    assert torch.allclose(decode_tensor(meta, bytes(data)), big, rtol=1e-2)
