"""Property-based fuzzing of what a peer's bytes reach beyond the envelope and step bodies (those
are fuzzed in test_broker_protocol.py, test_session_protocol.py and test_broker_codec.py): an
opener's fields, a close's key, a tensor's metadata of any dtype, the worker's answer to an opener,
a step's generated-token frame, the error codes a broker sends, and the HTTP API's request bodies.
Each may raise only the project's typed errors (or, for HTTP bodies, the API's own), never crash.

``EDGECLOUD_FUZZ_EXAMPLES`` sets how hard they try (``make fuzz`` raises it).
"""

from __future__ import annotations

import os

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import EdgeCloudError
from broker.wire import session_protocol as sp
from broker.wire.codec import decode_tensor
from broker.wire.crypto import NullCipher, SessionCipher, generate_keypair

FUZZ = settings(max_examples=int(os.environ.get("EDGECLOUD_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# What msgpack can carry in a map a peer sends: the values a decoder may meet.
leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=80), st.binary(max_size=80))
value = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                  st.dictionaries(st.text(max_size=12), inner, max_size=5)),
                     max_leaves=12)
OPEN_KEYS = ["edge_pk", "sampling", "wire_dtype", "reduction", "close_digest", "x"]


@FUZZ
@given(st.dictionaries(st.sampled_from(OPEN_KEYS), value, max_size=6),
       st.dictionaries(st.sampled_from(["temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty",
                                        "other"]), leaf, max_size=7))
def test_fuzz_openers_only_raise_typed_errors(extra, sampling):
    for candidate in (extra, {**extra, "sampling": sampling}):
        try:
            params = sp.OpenParams.from_extra(candidate)
        except EdgeCloudError:
            continue
        assert sp.OpenParams.from_extra(params.to_extra()) == params


@FUZZ
@given(st.dictionaries(st.sampled_from(["close_key", "x"]), value, max_size=2), st.binary(min_size=32, max_size=32))
def test_fuzz_closes_are_refused_without_the_key(extra, key):
    digest = sp.close_digest(key)
    try:
        sp.check_close_key(digest, extra)
    except EdgeCloudError:
        return
    assert extra["close_key"] == key  # only the key itself opens it


@FUZZ
@given(st.dictionaries(st.sampled_from(["dtype", "shape", "outliers", "x"]), value, max_size=4),
       st.sampled_from(["fp32", "fp16", "bf16", "int8", "fp8", ""]), st.lists(st.integers(-2, 70), max_size=4),
       st.binary(max_size=600))
def test_fuzz_tensor_metadata_of_every_dtype_only_raises_typed_errors(meta, dtype, shape, data):
    for candidate in (meta, {**meta, "dtype": dtype, "shape": shape}):
        try:
            out = decode_tensor(candidate, data)
        except EdgeCloudError:
            continue
        assert isinstance(out, torch.Tensor) and bool(torch.isfinite(out).all())


@FUZZ
@given(st.binary(max_size=40), st.binary(max_size=40), st.lists(st.binary(max_size=120), max_size=3))
def test_fuzz_the_workers_answer_to_an_opener_only_raises_typed_errors(worker_pk, nonce, frames):
    edge = generate_keypair()
    try:
        cipher = SessionCipher.for_edge(edge.secret_key, worker_pk, "s" * 32, nonce)
        sp.check_open_proof(cipher, "s" * 32, 0, frames)
    except EdgeCloudError:
        return
    raise AssertionError("an answer from nobody proved a session")


@FUZZ
@given(st.binary(max_size=400), st.integers(0, 3000))
def test_fuzz_generated_token_frames_only_raise_typed_errors(seen, vocab):
    head = msgpack.packb({"pos": 0, "tensor": {"dtype": "fp32", "shape": [1, 1, 4]}})
    frames = [head, torch.zeros(4).numpy().tobytes(), seen]
    try:
        req = sp.open_step(NullCipher(), "s", 0, frames, 4, vocab_size=vocab or None)
    except EdgeCloudError:
        return
    assert req.seen is not None and all(0 <= t < (vocab or 2**31) for t in req.seen)


@FUZZ
@given(st.text(max_size=30), st.text(max_size=200), st.integers(0, 2**32))
def test_fuzz_error_codes_from_a_broker_become_typed_errors(code, message, retry_after_ms):
    from broker.errors import error_from_code

    err = error_from_code(code, message, retry_after_ms)
    assert isinstance(err, EdgeCloudError)
    str(err)


@FUZZ
@given(st.dictionaries(st.sampled_from(["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n",
                                        "stream", "stop", "seed", "logprobs", "stream_options", "x"]),
                       value, max_size=8),
       st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]), value, max_size=3), max_size=3))
def test_fuzz_http_request_bodies_only_raise_the_apis_errors(body, messages):
    pydantic = pytest.importorskip("pydantic")
    from edge_worker.openai_schema import APIError, ChatCompletionRequest, CompletionRequest

    for cls, candidate in ((CompletionRequest, body), (ChatCompletionRequest, {**body, "messages": messages})):
        try:
            cls.model_validate(candidate)
        except (pydantic.ValidationError, APIError, ValueError):
            continue
