"""Wire protocol: round trips per message type, limits, and fuzzing of decode."""

from __future__ import annotations

import dataclasses
import os

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol as p
from broker.errors import (
    AuthError,
    BrokerUnavailable,
    Busy,
    EdgeCloudError,
    NoWorkerAvailable,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    WorkerLost,
    error_from_code,
)

V = p.MAGIC + bytes([p.PROTOCOL_VERSION])  # the header prefix of this protocol version

EXAMPLES = [
    p.Request(request_id="r1", session_id="s1", model_id="smollm2", layer_lo=6, deadline_ms=2500, step=3,
              kind="decode", api_key="k", extra={"t": {"dtype": "fp16", "shape": [1, 1, 576]}},
              frames=[b"\x00" * 10, b"abc"]),
    p.Status(request_id="r2", api_key=""),
    p.Ping(request_id="r3"),
    p.Reply(request_id="r1", session_id="s1", step=3, worker_id="w1", attempt=2, extra={"n": 1}, frames=[b"x"]),
    p.Error(request_id="r1", code="busy", message="queue full"),
    p.Error(request_id="", code="protocol", message="bad_magic"),
    p.StatusReply(request_id="r2", status={"workers": [{"id": "w1", "ranges": [[0, 30]]}], "queue_depth": 0}),
    p.Pong(request_id="r3"),
    p.Register(worker_id="w1", model_id="smollm2", layer_ranges=((0, 15), (15, 30)), public_key=b"\x01" * 32,
               per_layer_ms=0.75, pid=1234, max_sessions=16),
    p.Register(worker_id="w2", model_id="m", layer_ranges=((3, 4),), public_key=b"", per_layer_ms=0.0, pid=0,
               max_sessions=1),
    p.Heartbeat(worker_id="w1", active_sessions=4, queue_depth=1, per_layer_ms=0.8),
    p.WorkerReply(request_id="r1", session_id="s1", step=3, attempt=2, extra={}, frames=[b"y" * 100]),
    p.WorkerError(request_id="r1", attempt=1, code="remote", message="ValueError: bad shape"),
    p.WorkerReplies(replies=(("r1", "s1", 3, 1, {}, 1), ("r2", "s2", 0, 2, {"n": 1}, 2), ("r3", "s1", 4, 1, {}, 0)),
                    frames=[b"a" * 10, b"b", b"c"]),
    p.Disconnect(worker_id="w1"),
    p.Dispatch(request_id="r1", session_id="s1", model_id="smollm2", step=3, attempt=1, kind="prefill",
               deadline_ms=900, layer_lo=6, extra={"eph": b"\x02" * 32}, frames=[]),
    p.Dispatches(dispatches=(("r1", "s1", "smollm2", 3, 1, "decode", 900, 15, {}, 1),
                             ("r2", "s2", "smollm2", 0, 2, "prefill", 0, 0, {"eph": b"\x02" * 32}, 0)),
                 frames=[b"h" * 12]),
    p.BrokerHeartbeat(),
    p.DropSession(session_id="s1", reason="idle"),
    p.Reregister(reason="unknown worker"),
    p.BrokerDisconnect(reason="shutdown"),
]  # fmt: skip


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(p.MESSAGE_CLASSES.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: p.Message) -> None:
    frames = p.encode(msg)
    assert frames[0][:3] == V
    back = p.decode([bytes(f) for f in frames])
    assert back == msg
    assert type(back).TYPE == type(msg).TYPE


def _header(fields: dict) -> bytes:
    return p.MAGIC + bytes([p.PROTOCOL_VERSION]) + msgpack.packb(fields, use_bin_type=True)


def _reason(frames: list) -> str:
    with pytest.raises(ProtocolError) as info:
        p.decode(frames)
    return info.value.reason


def test_rejects_bad_magic_version_and_type() -> None:
    assert _reason([b"XX\x01\x80"]) == "bad_magic"
    for old in (1, 2, 3):  # earlier versions
        assert _reason([b"EC" + bytes([old]) + msgpack.packb({"t": 3, "request_id": "x"})]) == "bad_version"
    assert _reason([b"EC"]) == "bad_version"
    assert _reason([_header({"t": 99})]) == "unknown_type"
    assert _reason([_header({"x": 1})]) == "bad_header"
    assert _reason([_header([1, 2])]) == "bad_header"
    assert _reason([]) == "empty"
    assert _reason([V + b"\xc1"]) == "bad_msgpack"


def test_rejects_missing_and_mistyped_fields() -> None:
    good = msgpack.unpackb(p.encode(EXAMPLES[0])[0][3:])
    for name in ("request_id", "layer_lo", "extra"):
        bad = {k: v for k, v in good.items() if k != name}
        with pytest.raises(ProtocolError) as info:
            p.decode([_header(bad)])
        assert info.value.reason == "missing_field"
        assert info.value.msg_type == p.MsgType.REQUEST
        assert info.value.request_id == ("r1" if name != "request_id" else None)
    for name, value in [("layer_lo", -1), ("layer_lo", True), ("step", 1.5), ("kind", ""), ("extra", {1: 2}),
                        ("request_id", "x" * 500), ("deadline_ms", 2**63)]:  # fmt: skip
        assert _reason([_header({**good, name: value})]) in ("bad_field", "bad_msgpack"), (name, value)


def test_rejects_bad_register_fields() -> None:
    good = msgpack.unpackb(p.encode(EXAMPLES[8])[0][3:])
    for value in ([], [[5, 5]], [[1]], [["a", 2]], "0-30"):
        assert _reason([_header({**good, "layer_ranges": value})]) == "bad_field"
    assert _reason([_header({**good, "public_key": b"short"})]) == "bad_field"
    assert _reason([_header({**good, "per_layer_ms": float("nan")})]) == "bad_field"
    assert _reason([_header({**good, "max_sessions": 0})]) == "bad_field"


def test_rejects_ext_types_and_body_on_bodyless_types() -> None:
    ext = p.MAGIC + bytes([p.PROTOCOL_VERSION]) + msgpack.packb({"t": 3, "request_id": msgpack.ExtType(5, b"x")})
    assert _reason([ext]) in ("ext_type", "bad_msgpack")
    assert _reason([*p.encode(p.Ping(request_id="a")), b"body"]) == "unexpected_frames"


def test_size_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    head = p.encode(EXAMPLES[0])[0]
    assert _reason([head] + [b""] * (p.MAX_BODY_FRAMES + 1)) == "too_many_frames"
    monkeypatch.setattr(p, "MAX_FRAME_BYTES", 100)
    assert _reason([head, b"x" * 101]) == "frame_too_large"
    monkeypatch.setattr(p, "MAX_MESSAGE_BYTES", 150)
    assert _reason([head, b"x" * 100, b"y" * 100]) == "message_too_large"
    assert _reason([V + b"\x00" * p.MAX_HEADER_BYTES]) == "header_too_large"
    with pytest.raises(ProtocolError):
        p.encode(
            p.Reply(request_id="r", session_id="s", step=0, worker_id="w", attempt=1, frames=[b"z" * 101])
        )


def test_worker_replies_split_into_the_replies_they_carry() -> None:
    replies = [p.WorkerReply(request_id="r1", session_id="s1", step=3, attempt=1, frames=[b"a", b"b"]),
               p.WorkerReply(request_id="r2", session_id="s2", step=7, attempt=2, extra={"k": "v"}, frames=[]),
               p.WorkerReply(request_id="r3", session_id="s3", step=0, attempt=1, frames=[b"c"])]
    back = p.decode([bytes(f) for f in p.encode(p.WorkerReplies.of(replies))])
    assert [(r.request_id, r.session_id, r.step, r.attempt, r.extra, [bytes(f) for f in r.frames])
            for r in back.split()] == [(r.request_id, r.session_id, r.step, r.attempt, r.extra, r.frames)
                                       for r in replies]  # fmt: skip


def test_worker_replies_whose_frames_do_not_add_up_are_refused() -> None:
    frames = p.encode(next(m for m in EXAMPLES if type(m) is p.WorkerReplies))
    assert _reason(frames[:-1]) == "bad_body"  # a frame short
    assert _reason([*frames, b"extra"]) == "bad_body"
    with pytest.raises(ProtocolError, match="claim 1 body frames"):
        p.encode(p.WorkerReplies(replies=(("r1", "s1", 0, 1, {}, 1),), frames=[]))
    good = msgpack.unpackb(frames[0][3:])
    for value in ([], [["r1", "s1", 0, 1, {}]], [["r1", "s1", -1, 1, {}, 0]], [["", "s1", 0, 1, {}, 0]],
                  [["r1", "s1", 0, 1, {1: 2}, 0]], [["r1", "s1", 0, 1, {}, 0]] * (p.MAX_BODY_FRAMES + 1)):
        assert _reason([_header({**good, "replies": value})]) in ("bad_field", "bad_msgpack"), value


def test_a_bundles_heads_are_its_items_fields_in_dataclass_order() -> None:
    """``Bundle.split`` builds each message from its head's values in turn."""
    for bundle in (p.WorkerReplies, p.Dispatches):
        names = [f.name for f in dataclasses.fields(bundle.ITEM)]
        assert names == [name for name, _ in bundle.ITEM.FIELDS] + ["frames"], bundle


def test_dispatches_split_into_the_dispatches_they_carry() -> None:
    dispatches = [p.Dispatch(request_id="r1", session_id="s1", model_id="m", step=3, attempt=1, kind="decode",
                             deadline_ms=500, layer_lo=15, extra={"t": {"shape": [1, 1, 4]}}, frames=[b"a", b"b"]),
                  p.Dispatch(request_id="r2", session_id="s2", model_id="m", step=0, attempt=2, kind="open",
                             deadline_ms=0, layer_lo=0, frames=[]),
                  p.Dispatch(request_id="r3", session_id="s1", model_id="m", step=4, attempt=1, kind="decode",
                             deadline_ms=9, layer_lo=15, frames=[b"c"])]  # fmt: skip
    back = p.decode([bytes(f) for f in p.encode(p.Dispatches.of(dispatches))])
    assert type(back) is p.Dispatches
    assert [(d, [bytes(f) for f in d.frames]) for d in back.split()] == [(d, d.frames) for d in dispatches]


def test_dispatches_whose_frames_or_heads_are_wrong_are_refused() -> None:
    frames = p.encode(next(m for m in EXAMPLES if type(m) is p.Dispatches))
    assert _reason(frames[:-1]) == "bad_body"
    assert _reason([*frames, b"extra"]) == "bad_body"
    good = msgpack.unpackb(frames[0][3:])
    head = ["r1", "s1", "m", 3, 1, "decode", 900, 15, {}, 0]
    for value in ([], [head[:-1]], [[*head[:3], -1, *head[4:]]], [["", *head[1:]]], [[*head[:8], {1: 2}, 0]],
                  [[*head[:5], "", *head[6:]]], [head] * (p.MAX_BODY_FRAMES + 1)):
        assert _reason([_header({**good, "dispatches": value})]) in ("bad_field", "bad_msgpack"), value


def test_encode_refuses_what_decode_would_reject() -> None:
    with pytest.raises(ProtocolError):
        p.encode(p.Ping(request_id=""))
    with pytest.raises(ProtocolError):
        p.encode(p.Error(request_id="r", code="x", message=object()))  # type: ignore[arg-type]


def test_error_codes_round_trip() -> None:
    errors: list[EdgeCloudError] = [
        ProtocolError("bad_magic", "not an edgecloud frame"), AuthError("nope"), Busy("full"),
        NoWorkerAvailable("none"), WorkerLost("gone"), RequestTimeout("late"),
        RemoteError("ValueError", "bad: shape"), BrokerUnavailable("tcp://x:1"),
    ]  # fmt: skip
    for err in errors:
        back = error_from_code(err.code, str(err))
        assert type(back) is type(err)
        assert str(back) == str(err)
        assert back.retryable == err.retryable
    assert isinstance(error_from_code("remote", "ValueError: bad: shape"), RemoteError)
    assert error_from_code("remote", "ValueError: bad: shape").remote_type == "ValueError"
    assert type(error_from_code("from_the_future", "x")) is EdgeCloudError
    assert Busy.retryable and not WorkerLost.retryable and NoWorkerAvailable.retryable


# ------------------------------------------------------------------ fuzzing
FUZZ = settings(max_examples=int(os.environ.get("EDGECLOUD_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=25,
)  # fmt: skip


def _decode_only_protocol_errors(frames: list) -> None:
    try:
        msg = p.decode(frames)
    except ProtocolError:
        return
    # Whatever decodes must survive re-encoding (fields were validated).
    assert p.decode([bytes(f) for f in p.encode(msg)]) == msg


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_fuzz_arbitrary_frames(frames: list[bytes]) -> None:
    _decode_only_protocol_errors(frames)


@FUZZ
@given(st.binary(max_size=300), st.lists(st.binary(max_size=50), max_size=3))
def test_fuzz_after_valid_prefix(payload: bytes, body: list[bytes]) -> None:
    _decode_only_protocol_errors([p.MAGIC + bytes([p.PROTOCOL_VERSION]) + payload, *body])


@FUZZ
@given(
    st.sampled_from(sorted(p.MESSAGE_CLASSES)),
    st.dictionaries(st.sampled_from(["request_id", "session_id", "model_id", "layer_lo", "deadline_ms", "step",
                                     "kind", "api_key", "extra", "worker_id", "attempt", "code", "message",
                                     "layer_ranges", "public_key", "per_layer_ms", "pid", "max_sessions",
                                     "active_sessions", "queue_depth", "status", "reason", "replies", "zzz"]),
                    msgpack_values, max_size=12),
    st.lists(st.binary(max_size=20), max_size=3),
)  # fmt: skip
def test_fuzz_structured_headers(t: int, fields: dict, body: list[bytes]) -> None:
    _decode_only_protocol_errors([_header({"t": t, **fields}), *body])


@FUZZ
@given(st.sampled_from(EXAMPLES), st.integers(0, 400), st.integers(0, 255))
def test_fuzz_bit_flips_of_valid_messages(msg: p.Message, pos: int, byte: int) -> None:
    frames = [bytearray(f) for f in p.encode(msg)]
    head = frames[0]
    head[pos % len(head)] = byte
    _decode_only_protocol_errors([bytes(f) for f in frames])


@FUZZ
@given(st.sampled_from(EXAMPLES), st.integers(0, 400))
def test_fuzz_truncation(msg: p.Message, cut: int) -> None:
    frames = [bytes(f) for f in p.encode(msg)]
    _decode_only_protocol_errors([frames[0][: cut % (len(frames[0]) + 1)], *frames[1:]])
