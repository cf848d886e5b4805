"""The end-to-end bodies: round trips, and fuzzing of every decoder that reads network bytes.

``EDGECLOUD_FUZZ_EXAMPLES`` sets how hard the fuzz tests try (``make fuzz`` raises it)."""

from __future__ import annotations

import os

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import CryptoError, ProtocolError
from broker.wire import session_protocol as sp
from broker.wire.crypto import NullCipher, SessionCipher, generate_keypair, new_session_nonce

FUZZ = settings(max_examples=int(os.environ.get("EDGECLOUD_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
HIDDEN = 8
SID = "s" * 32


def ciphers():
    worker = generate_keypair()
    edge = generate_keypair()
    nonce = new_session_nonce()
    return (SessionCipher.for_edge(edge.secret_key, worker.public_key, SID, nonce),
            SessionCipher.for_worker(worker.secret_key, edge.public_key, SID, nonce))


def test_step_and_reply_round_trip_encrypted():
    edge, worker = ciphers()
    hidden = torch.randn(1, 3, HIDDEN)
    frames = sp.seal_step(edge, SID, 4, 10, hidden, "fp32")
    req = sp.open_step(worker, SID, 4, frames, HIDDEN)
    assert req.pos == 10 and torch.equal(req.hidden, hidden) and req.draft == []
    reply = sp.seal_step_reply(worker, SID, 4, token=42, pos=13, compute_ms=1.5, worker_ms=2.0)
    r = sp.open_step_reply(edge, SID, 4, reply)
    assert (r.token, r.pos, r.compute_ms, r.worker_ms, r.accepted) == (42, 13, 1.5, 2.0, 0)


def test_drafts_travel_with_the_step_and_the_verdict_with_the_reply():
    edge, worker = ciphers()
    frames = sp.seal_step(edge, SID, 4, 10, torch.randn(1, 3, HIDDEN), "fp16", draft=[5, 9])
    assert sp.open_step(worker, SID, 4, frames, HIDDEN, vocab_size=100).draft == [5, 9]
    reply = sp.seal_step_reply(worker, SID, 4, token=7, pos=12, compute_ms=1.0, worker_ms=1.0, accepted=1)
    assert sp.open_step_reply(edge, SID, 4, reply).accepted == 1


def test_generated_tokens_for_a_penalty_travel_in_their_own_frame():
    edge, worker = ciphers()
    plain = sp.seal_step(edge, SID, 4, 10, torch.randn(1, 1, HIDDEN), "fp16")
    assert sp.open_step(worker, SID, 4, plain, HIDDEN).seen is None, "no penalty: no frame"
    frames = sp.seal_step(edge, SID, 5, 10, torch.randn(1, 1, HIDDEN), "fp16", seen=[9, 3, 9, 0])
    assert sp.open_step(worker, SID, 5, frames, HIDDEN, vocab_size=10).seen == [0, 3, 9]
    empty = sp.seal_step(edge, SID, 6, 10, torch.randn(1, 1, HIDDEN), "fp16", seen=[])
    assert sp.open_step(worker, SID, 6, empty, HIDDEN).seen == []
    for bad in (b"\x01\x00\x00", (10).to_bytes(4, "little"), (-1).to_bytes(4, "little", signed=True)):
        body = [msgpack.packb({"pos": 0, "tensor": {"dtype": "fp32", "shape": [1, 1, 2]}}), bytes(8), bad]
        with pytest.raises(ProtocolError):
            sp.open_step(NullCipher(), SID, 0, NullCipher().seal(b"", body), 2, vocab_size=10)


@pytest.mark.parametrize("draft, positions, vocab", [
    ([5, 9], 2, 100),  # two drafts need three positions
    ([5, 100], 3, 100),  # outside the vocabulary
    (list(range(40)), 41, 100),  # more drafts than the wire allows
])
def test_bad_drafts_are_protocol_errors(draft, positions, vocab):
    frames = sp.seal_step(NullCipher(), SID, 0, 0, torch.randn(1, positions, HIDDEN), "fp16", draft=draft)
    with pytest.raises(ProtocolError):
        sp.open_step(NullCipher(), SID, 0, frames, HIDDEN, vocab_size=vocab)


def test_a_body_moved_to_another_step_or_session_is_refused():
    edge, worker = ciphers()
    frames = sp.seal_step(edge, SID, 4, 10, torch.randn(1, 1, HIDDEN), "fp16")
    with pytest.raises(CryptoError):
        sp.open_step(worker, SID, 5, frames, HIDDEN)


def test_openers_carry_every_wire_dtype_and_a_reduction_hash():
    sampling = {"temperature": 0.0, "top_p": 1.0, "seed": 0}
    for dtype in ("fp32", "fp16", "bf16", "int8"):
        p = sp.OpenParams(b"", sampling, dtype, sp.close_digest(b"k" * 32), reduction="0f" * 32)
        assert sp.OpenParams.from_extra(p.to_extra()) == p
    assert "reduction" not in sp.OpenParams(b"", sampling, "fp16", sp.close_digest(b"k" * 32)).to_extra()


def test_int8_step_round_trips_encrypted_at_a_reduced_width():
    edge, worker = ciphers()
    hidden = torch.randn(1, 3, HIDDEN)
    hidden[..., 2] *= 500
    frames = sp.seal_step(edge, SID, 1, 0, hidden, "int8")
    req = sp.open_step(worker, SID, 1, frames, HIDDEN)
    pos, got = req.pos, req.hidden
    assert pos == 0 and got.shape == hidden.shape
    assert torch.allclose(got, hidden, rtol=0.02, atol=0.05)
    with pytest.raises(ProtocolError):
        sp.open_step(worker, SID, 2, sp.seal_step(edge, SID, 2, 3, hidden, "int8"), HIDDEN + 1)


def test_wrong_hidden_size_is_a_protocol_error():
    frames = sp.seal_step(NullCipher(), SID, 0, 0, torch.randn(1, 2, HIDDEN + 1), "fp16")
    with pytest.raises(ProtocolError):
        sp.open_step(NullCipher(), SID, 0, frames, HIDDEN)


@pytest.mark.parametrize("extra", [
    {}, {"edge_pk": b"x" * 31, "sampling": {"temperature": 0, "top_p": 1, "seed": 0}},
    {"edge_pk": b"", "sampling": {"temperature": "hot", "top_p": 1, "seed": 0}},
    {"edge_pk": b"", "sampling": {"temperature": 0, "top_p": 1, "seed": 0}, "wire_dtype": "int4"},
    {"edge_pk": b"", "sampling": {"temperature": 0, "top_p": 1, "seed": 0}, "wire_dtype": ["fp16"]},
    {"edge_pk": b"", "sampling": {"temperature": 0, "top_p": 1, "seed": 0}, "reduction": "ab" * 31},
    {"edge_pk": b"", "sampling": {"temperature": 0, "top_p": 1, "seed": 0}, "reduction": "AB" * 32},
    {"edge_pk": b"", "sampling": {"temperature": 0, "top_p": 1, "seed": 0}, "reduction": b"\x00" * 32},
    {"edge_pk": b"", "sampling": {"temperature": 0, "top_p": 1, "seed": 0, "typical_p": 0.5}},
])
def test_bad_openers_are_protocol_errors(extra):
    with pytest.raises(ProtocolError):
        sp.OpenParams.from_extra(extra)


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=4), st.integers(0, 2**20))
def test_fuzz_step_bodies_only_raise_typed_errors(frames, step):
    try:
        req = sp.open_step(NullCipher(), SID, step, frames, HIDDEN)
    except ProtocolError:
        return
    assert req.pos >= 0 and req.hidden.shape[-1] == HIDDEN and len(req.draft) < req.hidden.shape[1]


@FUZZ
@given(st.dictionaries(st.sampled_from(["pos", "tensor", "draft", "x"]),
                       st.one_of(st.integers(-5, 2**40), st.text(max_size=5), st.none(),
                                 st.dictionaries(st.sampled_from(["dtype", "shape", "outliers"]),
                                                 st.one_of(st.sampled_from(["fp16", "int8"]), st.integers(-3, 40),
                                                           st.text(max_size=5),
                                                           st.lists(st.integers(-3, 10 ** 6), max_size=9)))),
                       max_size=3),
       st.binary(max_size=200))
def test_fuzz_structured_step_metadata(head, data):
    try:
        sp.open_step(NullCipher(), SID, 0, [msgpack.packb(head), data], HIDDEN)
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=120), max_size=3))
def test_fuzz_step_replies_only_raise_typed_errors(frames):
    try:
        r = sp.open_step_reply(NullCipher(), SID, 0, frames)
    except ProtocolError:
        return
    assert r.token >= 0 and r.pos >= 0


@FUZZ
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=3))
def test_fuzz_sealed_bodies_fail_authentication(frames):
    _, worker = ciphers()
    with pytest.raises((CryptoError, ProtocolError)):
        sp.open_step(worker, SID, 0, frames, HIDDEN)


def test_a_token_tree_travels_with_its_step_and_the_kept_path_with_the_reply():
    hidden = torch.randn(1, 4, HIDDEN)
    frames = sp.seal_step(NullCipher(), SID, 3, 10, hidden, "fp32", draft=[5, 9, 7], tree=[-1, -1, 0])
    req = sp.open_step(NullCipher(), SID, 3, frames, HIDDEN, vocab_size=50)
    assert req.tree is not None and req.tree.tokens == (5, 9, 7) and req.tree.parents == (-1, -1, 0)
    assert req.draft == [5, 9, 7] and req.pos == 10
    reply = sp.seal_step_reply(NullCipher(), SID, 3, 4, 13, 1.0, 2.0, accepted=2, path=[1, 3])
    got = sp.open_step_reply(NullCipher(), SID, 3, reply)
    assert got.path == (1, 3) and got.accepted == 2
    assert sp.open_step_reply(NullCipher(), SID, 3, sp.seal_step_reply(NullCipher(), SID, 3, 4, 13, 1.0, 2.0)).path is None


@pytest.mark.parametrize(("draft", "tree", "positions", "first", "match"), [
    ([5, 9], [-1, 1], 3, None, "not the root"),  # a parent after its child
    ([5, 5], [-1, -1], 3, None, "twice under the same parent"),
    ([5, 9], [-1], 3, None, "a parent per node"),
    ([5, 9], [-1, 0], 5, None, "its 3 rows only"),  # positions before the tree's root
    ([5, 9], [-1, 0], 3, 4, "cannot be conditional"),
])
def test_bad_token_trees_are_protocol_errors(draft, tree, positions, first, match):
    frames = sp.seal_step(NullCipher(), SID, 0, 0, torch.randn(1, positions, HIDDEN), "fp16", draft=draft,
                          tree=tree, first=first)
    with pytest.raises(ProtocolError, match=match):
        sp.open_step(NullCipher(), SID, 0, frames, HIDDEN, vocab_size=50)


def test_a_chain_longer_than_the_draft_limit_is_refused_but_a_tree_of_63_nodes_is_not():
    chain = list(range(1, sp.MAX_DRAFT_TOKENS + 2))
    frames = sp.seal_step(NullCipher(), SID, 0, 0, torch.randn(1, len(chain) + 1, HIDDEN), "fp16", draft=chain)
    with pytest.raises(ProtocolError, match="at most"):
        sp.open_step(NullCipher(), SID, 0, frames, HIDDEN)
    nodes = list(range(1, 64))
    frames = sp.seal_step(NullCipher(), SID, 0, 0, torch.randn(1, 64, HIDDEN), "fp16", draft=nodes,
                          tree=[-1] * 63)
    assert sp.open_step(NullCipher(), SID, 0, frames, HIDDEN).tree.rows == 64
