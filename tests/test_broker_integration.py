"""A real broker (in a thread, random loopback port) with real worker and client objects."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from brokerutil import (
    EXPIRY_S,
    MODEL,
    EchoWorker,
    client,
    counters,
    echo_workers,
    raw_dealer,
    recv_msg,
    recv_until,
    running_broker,
    wait_until,
)

from broker import protocol as p
from broker.broker import Broker
from broker.errors import (
    AuthError,
    Busy,
    NoWorkerAvailable,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    WorkerLost,
)

V = p.MAGIC + bytes([p.PROTOCOL_VERSION])  # the header prefix of this protocol version

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def broker() -> Iterator[Broker]:
    with running_broker() as b:
        yield b


def test_request_reply_ping_and_status(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "w1") as _, client(broker.endpoint) as c:
        assert 0 < c.ping(2.0) < 2.0
        r = c.request(
            "s1", "open", MODEL, 4, 0, [b"\x01" * 1200, b"tail"], timeout_s=2.0, extra={"m": [1, 2]}
        )
        assert [bytes(f) for f in r.frames] == [b"\x01" * 1200, b"tail"]
        assert r.header == {"worker": "w1", "kind": "open", "step": 0, "m": [1, 2]}
        assert (r.session_id, r.worker_id, r.attempt, r.step) == ("s1", "w1", 1, 0)
        assert c.request("s1", "decode", MODEL, 4, 1, timeout_s=2.0).header["step"] == 1
        st = c.status()
        assert st["sessions"] == 1 and st["queue_depth"] == 0 and st["in_flight"] == 0
        (w,) = st["workers"]
        assert w["worker_id"] == "w1" and w["model_id"] == MODEL and w["layer_ranges"] == [[0, 32]]
        assert w["sessions"] == 1 and w["in_flight"] == 0 and 0 <= w["last_seen_s_ago"] < 1.0
        assert w["pid"] > 0
        assert st["counters"]["requests_served"] == 2
        assert st["protocol_errors"] == {}


def test_pipelined_requests_keep_session_order(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "w1") as (w,), client(broker.endpoint) as c:
        ids = [c.submit("s1", "open" if i == 0 else "decode", MODEL, 4, i, [bytes([i])]) for i in range(20)]
        replies = [c.result(rid) for rid in ids]
        assert [r.step for r in replies] == list(range(20))
        assert [j.step for j in w.jobs] == list(range(20))


def test_session_affinity_and_least_load(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "w1", "w2") as (w1, w2), client(broker.endpoint) as c:
        owner = {}
        for i in range(4):
            owner[f"s{i}"] = c.request(f"s{i}", "open", MODEL, 2, 0).worker_id
        assert sorted(owner.values()) == ["w1", "w1", "w2", "w2"]  # least load alternates
        for step in range(1, 4):
            for sid, wid in owner.items():
                assert c.request(sid, "decode", MODEL, 2, step).worker_id == wid
        assert w1.sessions_seen() | w2.sessions_seen() == set(owner)
        assert not (w1.sessions_seen() & w2.sessions_seen())
        # Closing both of w1's sessions makes it the least loaded for the next two.
        for sid in [s for s, wid in owner.items() if wid == "w1"]:
            c.request(sid, "close", MODEL, 2, 9)
        assert c.status()["sessions"] == 2
        assert [c.request(f"n{i}", "open", MODEL, 2, 0).worker_id for i in range(2)] == ["w1", "w1"]


def test_new_sessions_go_where_the_most_batch_seats_are_free(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "big", max_batch=4) as (big,), \
            echo_workers(broker.endpoint, "small", max_batch=1), client(broker.endpoint) as c:
        owners = [c.request(f"s{i}", "open", MODEL, 2, 0).worker_id for i in range(5)]
        # Free seats big 4, small 1: big takes three; at one seat each the less loaded (small)
        # comes next, then big again (one seat against none).
        assert owners == ["big", "big", "big", "small", "big"]
        (w,) = [w for w in c.status()["workers"] if w["worker_id"] == "big"]
        assert w["max_batch"] == 4 and w["free_capacity"] == 0
        assert big.sessions_seen() == {"s0", "s1", "s2", "s4"}


def test_an_opener_asking_for_a_worker_goes_there_while_its_batch_is_at_most_one_fuller(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "w1", max_batch=4) as _, echo_workers(broker.endpoint, "w2", max_batch=4), \
            client(broker.endpoint) as c:
        def open_near(sid: str, near: object) -> str:
            return c.request(sid, "open", MODEL, 2, 0, extra={p.NEAR_KEY: near}).worker_id

        first = c.request("s0", "open", MODEL, 2, 0).worker_id
        other = ({"w1", "w2"} - {first}).pop()
        assert open_near("s1", first) == first  # 1 session against 0: by load it would have gone to the other
        assert open_near("s2", first) == other  # 2 against 0: too much fuller, capacity decides
        assert open_near("s3", first) == first  # 2 against 1
        assert open_near("s4", "nobody") == other  # an unknown worker: ignored (3 against 1)
        assert open_near("s5", 7) == other  # a malformed one too (3 against 2)
        assert c.status()["counters"]["placed_near"] == 2
        # A step never moves a pinned session, whatever it names.
        assert c.request("s1", "decode", MODEL, 2, 1, extra={p.NEAR_KEY: other}).worker_id == first
        with echo_workers(broker.endpoint, "w3", max_batch=1), client(broker.endpoint) as c3:
            assert c3.request("t0", "open", MODEL, 2, 0, extra={p.NEAR_KEY: "w3"}).worker_id == "w3"
            # w3's one seat is taken: the opener goes where seats are free.
            assert c3.request("t1", "open", MODEL, 2, 0, extra={p.NEAR_KEY: "w3"}).worker_id != "w3"


def test_free_capacity_is_the_least_of_slots_batch_seats_and_cache_memory() -> None:
    from broker.state import WorkerState

    w = WorkerState.from_register(p.Register(p.WorkerId("w"), MODEL, ((0, 2),), b"", 1.0, 1, max_sessions=6,
                                             max_batch=16, cache_limit_bytes=100 << 20), b"id", 0.0)
    assert w.free_capacity() == 6  # session slots bind; nothing reported yet
    w.sessions |= {"a", "b"}
    w.reported_sessions, w.cache_bytes = 2, 40 << 20  # 20 MiB a session: three more fit in 100
    assert w.free_capacity() == 3
    w.sessions.add("c")  # placed since the heartbeat: counted against the memory too
    assert w.free_capacity() == 2
    w.cache_limit_bytes = 0
    assert w.free_capacity() == 3  # no memory limit: the slots again (6 - 3)
    w.max_batch, w.max_sessions = 2, 64
    assert w.free_capacity() == -1  # past its batch: one session waits for a seat in each pass


def test_closed_or_unknown_session_is_worker_lost_and_a_closed_id_is_never_opened_again(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "w1"), client(broker.endpoint) as c:
        c.request("s1", "open", MODEL, 2, 0)
        c.request("s1", "close", MODEL, 2, 1)
        with pytest.raises(WorkerLost, match="closed by its client"):
            c.request("s1", "decode", MODEL, 2, 2)
        with pytest.raises(WorkerLost):
            c.request("never", "decode", MODEL, 2, 0)
        # An opener replayed after the close (from anyone) is refused before it reaches a worker.
        with client(broker.endpoint) as other:
            with pytest.raises(ProtocolError, match="opened before .closed by its client.; open a new session id"):
                other.request("s1", "open", MODEL, 2, 0)
    assert counters(broker)["reopen_refused"] == 1


def test_layer_range_and_model_select_workers(broker: Broker) -> None:
    with (
        echo_workers(broker.endpoint, "low", layer_ranges=((0, 10),)),
        echo_workers(broker.endpoint, "high", layer_ranges=((10, 32),)),
        client(broker.endpoint) as c,
    ):
        assert c.request("a", "open", MODEL, 3, 0).worker_id == "low"
        assert c.request("b", "open", MODEL, 12, 0).worker_id == "high"
        with pytest.raises(NoWorkerAvailable):
            c.request("c", "open", MODEL, 40, 0)
        with pytest.raises(NoWorkerAvailable):
            c.request("d", "open", "other-model", 3, 0)
        with pytest.raises(ProtocolError, match="session_model_mismatch"):
            c.request("a", "decode", "other-model", 3, 1)


def test_no_worker_then_worker_arrives_within_grace() -> None:
    with running_broker(no_worker_grace_s=3.0) as b, client(b.endpoint) as c:
        rid = c.submit("s1", "open", MODEL, 0, 0, [b"x"], timeout_s=4.0)
        wait_until(lambda: c.status()["queue_depth"] == 1, what="request to queue")
        w = EchoWorker(b.endpoint, "late")
        try:
            assert c.result(rid).worker_id == "late"
        finally:
            w.close()


def test_an_opener_whose_deadline_ends_before_the_grace_hears_that_no_worker_serves_it() -> None:
    """Its own deadline, not the grace, ends the wait; the answer still names the reason (the edge
    turns it into 'these weights are not served', where a timeout would read as a slow worker)."""
    with running_broker(no_worker_grace_s=3.0) as b, client(b.endpoint) as c:
        t0 = time.monotonic()
        with pytest.raises(NoWorkerAvailable, match="no worker serves model"):
            c.request("s1", "open", MODEL, 0, 0, timeout_s=0.5)
        assert time.monotonic() - t0 < 2.5, "answered at the request's deadline, not the grace's end"
        seen = counters(c)
        assert seen["no_worker"] == 1 and seen.get("timeouts", 0) == 0, seen


def test_remote_error_is_typed(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "w1") as (w,), client(broker.endpoint) as c:
        c.request("s1", "open", MODEL, 2, 0)
        w.fail_with = ValueError("bad shape [1, 2]")
        with pytest.raises(RemoteError) as info:
            c.request("s1", "decode", MODEL, 2, 1)
        assert info.value.remote_type == "ValueError" and "bad shape" in str(info.value)
        w.fail_with = Busy("worker full")
        with pytest.raises(Busy):
            c.request("s1", "decode", MODEL, 2, 2)
        w.fail_with = None
        assert c.request("s1", "decode", MODEL, 2, 3).step == 3  # the session survived
        assert counters(c)["worker_errors"] == 2


def test_failed_open_drops_the_session(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "w1") as (w,), client(broker.endpoint) as c:
        w.fail_with = RuntimeError("out of memory")
        with pytest.raises(RemoteError):
            c.request("s1", "open", MODEL, 2, 0)
        assert c.status()["sessions"] == 0


def test_wrong_api_key_is_auth_error() -> None:
    with running_broker(api_keys=frozenset({"good-key"})) as b:
        with (
            echo_workers(b.endpoint, "w1", api_key="good-key"),
            client(b.endpoint, "good-key") as good,
            client(b.endpoint, "bad") as bad,
        ):
            with pytest.raises(AuthError, match="API key"):
                bad.request("s1", "open", MODEL, 2, 0)
            with pytest.raises(AuthError):
                bad.status()
            assert bad.ping() > 0  # liveness needs no key
            assert good.request("s1", "open", MODEL, 2, 0).worker_id == "w1"
            assert counters(good)["auth_failures"] == 2


def test_deadline_gives_timeout_and_late_reply_is_discarded(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "w1") as (w,), client(broker.endpoint) as c:
        c.request("s1", "open", MODEL, 2, 0)
        w.gate.clear()
        start = time.monotonic()
        with pytest.raises(RequestTimeout, match="deadline"):
            c.request("s1", "decode", MODEL, 2, 1, timeout_s=0.2)
        assert time.monotonic() - start < 1.0
        assert counters(c)["timeouts"] == 1
        w.gate.set()
        wait_until(
            lambda: counters(c).get("late_replies_discarded", 0) == 1, what="late reply to be discarded"
        )
        assert c.request("s1", "decode", MODEL, 2, 2).step == 2
        assert c.stale_replies == 0  # the late reply never reached the client


def test_queue_bound_gives_busy_then_drains() -> None:
    with running_broker(max_queue=2, worker_max_in_flight=1) as b:
        with echo_workers(b.endpoint, "w1") as (w,), client(b.endpoint) as c:
            c.request("s1", "open", MODEL, 2, 0)
            w.gate.clear()
            first = c.submit("s1", "decode", MODEL, 2, 1)
            wait_until(lambda: len(w.jobs) == 2, what="first decode to be dispatched")
            queued = [c.submit("s1", "decode", MODEL, 2, s) for s in (2, 3)]
            wait_until(lambda: c.status()["queue_depth"] == 2, what="two queued requests")
            with pytest.raises(Busy, match="queue full"):
                c.request("s1", "decode", MODEL, 2, 4)
            w.gate.set()
            assert [c.result(r).step for r in (first, *queued)] == [1, 2, 3]
            assert counters(c)["busy"] == 1


def test_max_sessions_gives_busy(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "w1", max_sessions=1), client(broker.endpoint) as c:
        c.request("s1", "open", MODEL, 2, 0)
        with pytest.raises(Busy, match="maximum sessions"):
            c.request("s2", "open", MODEL, 2, 0)
        c.request("s1", "close", MODEL, 2, 1)
        assert c.request("s2", "open", MODEL, 2, 0).worker_id == "w1"


def test_heartbeats_continue_during_long_compute(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "w1", delay_s=EXPIRY_S * 2.5) as _, client(broker.endpoint) as c:
        r = c.request("s1", "open", MODEL, 2, 0, timeout_s=5.0)
        assert r.worker_id == "w1"
        assert counters(c).get("workers_expired", 0) == 0


def test_garbage_leaves_broker_serving(broker: Broker) -> None:
    with (
        echo_workers(broker.endpoint, "w1"),
        client(broker.endpoint) as c,
        raw_dealer(broker.endpoint) as raw,
    ):
        raw.send(b"complete garbage")
        raw.send_multipart([V + b"\xc1\xc1", b"x"])
        raw.send_multipart([b"EC\x07" + b"\x80"])
        raw.send_multipart([V + b"\x81\xa1t\x63"])  # {"t": 99}
        raw.send_multipart([*p.encode(p.Ping(request_id="pp")), b"body"])
        raw.send_multipart(p.encode(p.BrokerHeartbeat()))  # a broker->worker type sent to the broker
        req = p.encode(p.Request(request_id="bad1", session_id="s", model_id=MODEL, layer_lo=1, deadline_ms=10,
                                 step=0, kind="open", api_key=""))[0]  # fmt: skip
        raw.send_multipart([req] + [b""] * (p.MAX_BODY_FRAMES + 1))
        # A REQUEST with a mistyped field: the sender gets a ProtocolError naming its request.
        raw.send_multipart([req.replace(b"bad1", b"bad2").replace(b"\xa4step\x00", b"\xa4step\xa1x")])
        errors = [recv_until(raw, p.Error) for _ in range(4)]
        assert [(e.request_id, e.code) for e in errors] == [("", "protocol"), ("pp", "protocol"), ("bad1", "protocol"),
                                                            ("bad2", "protocol")]  # fmt: skip
        # Another version is answered too (its sender cannot read the answer, but its log says why).
        assert "bad_version" in errors[0].message and "different edgecloud versions" in errors[0].message
        assert "unexpected_frames" in errors[1].message and "too_many_frames" in errors[2].message
        assert "step" in errors[3].message
        # The loop kept running: a normal request succeeds and the counters moved.
        assert c.request("s1", "open", MODEL, 2, 0).worker_id == "w1"
        errs = c.status()["protocol_errors"]
        for reason in ("bad_magic", "bad_msgpack", "bad_version", "unknown_type", "unexpected_frames",
                       "too_many_frames", "wrong_direction", "bad_field"):  # fmt: skip
            assert errs.get(reason, 0) >= 1, (reason, errs)


def test_oversized_frame_is_dropped_by_libzmq(broker: Broker) -> None:
    # Frames over MAXMSGSIZE make libzmq drop the connection before Python sees them.
    with (
        echo_workers(broker.endpoint, "w1"),
        client(broker.endpoint) as c,
        raw_dealer(broker.endpoint) as raw,
    ):
        raw.send_multipart([V, b"\x00" * (129 << 20)])
        assert c.request("s1", "open", MODEL, 2, 0).worker_id == "w1"


def test_a_duplicated_request_gets_exactly_one_answer(broker: Broker) -> None:
    """Copies of a request, in flight or after its answer, are dropped: one reply, one execution."""
    with echo_workers(broker.endpoint, "w1") as (w,), raw_dealer(broker.endpoint) as raw, \
            client(broker.endpoint) as c:
        w.gate.clear()
        req = p.Request(request_id="dup", session_id="s", model_id=MODEL, layer_lo=1, deadline_ms=2000, step=0,
                        kind="open", api_key="")  # fmt: skip
        raw.send_multipart(p.encode(req))
        raw.send_multipart(p.encode(req))  # while the original is in flight
        w.gate.set()
        assert isinstance(recv_msg(raw), p.Reply)
        raw.send_multipart(p.encode(req))  # after it was answered
        assert wait_until(lambda: counters(c).get("duplicate_requests_dropped") == 2,
                          what="both copies counted")  # fmt: skip
        assert not raw.poll(200), "a copy must not be answered a second time"


def test_a_session_answers_only_the_client_that_opened_it_and_each_client_has_a_quota() -> None:
    with running_broker(api_keys=frozenset({"key-a", "key-b"}), max_sessions_per_client=2) as b, \
            echo_workers(b.endpoint, "w1", api_key="key-a"), client(b.endpoint, "key-a") as a, \
            client(b.endpoint, "key-b") as intruder:
        a.request("s1", "open", MODEL, 2, 0)
        # Another client naming the session's id: refused, and the owner's session goes on.
        for kind, step in (("decode", 1), ("close", 1), ("open", 0)):
            with pytest.raises(AuthError, match="belongs to another client"):
                intruder.request("s1", kind, MODEL, 2, step)
        assert a.request("s1", "decode", MODEL, 2, 1).worker_id == "w1"
        # Two sessions each; a third opener is told the client is busy, with what to do.
        a.request("s2", "open", MODEL, 2, 0)
        with pytest.raises(Busy, match="this client holds 2 sessions.*close finished ones") as busy:
            a.request("s3", "open", MODEL, 2, 0)
        # The hint: when its first idle session expires (both are idle: about --session-idle).
        idle_s = b.config.session_idle_s
        assert idle_s - 5 < busy.value.retry_after_s <= idle_s
        assert intruder.request("t1", "open", MODEL, 2, 0).worker_id == "w1"  # its own quota
        a.request("s2", "close", MODEL, 2, 1)
        assert a.request("s3", "open", MODEL, 2, 0).worker_id == "w1"
        st = a.status()
        assert st["counters"]["client_quota_refused"] == 1 and st["counters"]["auth_refused_sessions"] == 3


def test_a_request_over_the_size_limit_is_refused_and_a_client_past_its_bytes_in_flight_is_told_when_to_retry() -> None:
    mib = 1 << 20
    with running_broker(max_request_bytes=2 * mib, max_client_bytes=3 * mib) as b, \
            echo_workers(b.endpoint, "w1") as (w,), client(b.endpoint) as big, client(b.endpoint) as other:
        with pytest.raises(ProtocolError, match="too_large.*--max-request-mb.*--max-frame-mb"):
            big.request("s1", "open", MODEL, 2, 0, [b"x" * (2 * mib + 1)])
        big.request("s1", "open", MODEL, 2, 0)
        other.request("o1", "open", MODEL, 2, 0)
        w.gate.clear()  # the worker holds what it gets: the bytes stay in flight
        held = [big.submit("s1", "decode", MODEL, 2, i, [b"x" * (1 * mib + 1)], timeout_s=10) for i in (1, 2)]
        with pytest.raises(Busy, match="this client has 2.0 MiB of requests in flight.*--max-client-mb") as busy:
            big.request("s1", "decode", MODEL, 2, 3, [b"x" * (1 * mib + 1)], timeout_s=10)
        assert busy.value.retry_after_s > 0
        # Another client's share is its own.
        rid = other.submit("o1", "decode", MODEL, 2, 1, [b"y" * (2 * mib)], timeout_s=10)
        w.gate.set()
        assert [big.result(r).worker_id for r in held] == ["w1", "w1"]
        assert other.result(rid).worker_id == "w1"
        # Answered, the bytes are free again.
        assert big.request("s1", "decode", MODEL, 2, 3, [b"x" * (2 * mib)]).worker_id == "w1"
        st = big.status()
    assert st["counters"]["too_large_refused"] == 1 and st["counters"]["client_bytes_refused"] == 1


def test_the_bodies_on_their_way_to_a_worker_stay_under_its_byte_cap_and_the_rest_waits_at_the_broker() -> None:
    mib = 1 << 20
    with running_broker(worker_max_in_flight_bytes=2 * mib) as b, echo_workers(b.endpoint, "w1") as (w,), \
            client(b.endpoint) as c:
        for sid in ("a", "b", "c", "d"):
            c.request(sid, "open", MODEL, 2, 0)
        w.gate.clear()
        held = [c.submit(sid, "decode", MODEL, 2, 1, [b"x" * mib], timeout_s=10) for sid in ("a", "b", "c")]
        # Dispatch happens as a request arrives: once all three are in, two went and the third waits.
        wait_until(lambda: (lambda st: (st["workers"][0]["in_flight"], st["queue_depth"]))(c.status()) == (2, 1),
                   what="two bodies in flight and the third queued at the broker")
        w.gate.set()
        assert [c.result(r).worker_id for r in held] == ["w1"] * 3
        # One body over the cap still goes, alone: nothing else is on its way.
        assert c.request("d", "decode", MODEL, 2, 1, [b"y" * (3 * mib)]).worker_id == "w1"
