"""Broker behaviour when workers die or hang, the broker restarts, or nothing answers."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import zmq
from brokerutil import (
    CLIENT,
    EXPIRY_S,
    HEARTBEAT_S,
    LIVENESS,
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
from broker.client_api import BrokerClient, ClientConfig
from broker.errors import BrokerUnavailable, RequestTimeout, WorkerLost

pytestmark = pytest.mark.timeout(30)
# A dead worker must be noticed within its liveness window plus scheduling slack,
# far below the request deadlines used here (10 s).
PROMPT_S = EXPIRY_S + 1.0
LONG_S = 10.0


@pytest.fixture
def broker() -> Iterator[Broker]:
    with running_broker() as b:
        yield b


def _register_raw(sock: zmq.Socket, worker_id: str, max_batch: int = 1) -> None:
    sock.send_multipart(p.encode(p.Register(worker_id=worker_id, model_id=MODEL, layer_ranges=((0, 32),),
                                            public_key=b"", per_layer_ms=1.0, pid=os.getpid(), max_sessions=8,
                                            max_batch=max_batch)))  # fmt: skip
    recv_until(sock, p.BrokerHeartbeat)


@pytest.mark.parametrize("graceful", [False, True], ids=["crash", "disconnect"])
def test_worker_death_fails_in_flight_promptly(broker: Broker, graceful: bool) -> None:
    with echo_workers(broker.endpoint, "w1", "w2") as (w1, w2), client(broker.endpoint) as c:
        victim_sid = next(s for s in ("a", "b") if c.request(s, "open", MODEL, 2, 0).worker_id == "w1")
        w1.gate.clear()
        rid = c.submit(victim_sid, "decode", MODEL, 2, 1, timeout_s=LONG_S)
        wait_until(lambda: len(w1.jobs) == 2, what="decode to reach w1")
        start = time.monotonic()
        w1.close(graceful=graceful)
        with pytest.raises(WorkerLost, match="reopen") as info:
            c.result(rid)
        assert time.monotonic() - start < PROMPT_S
        if graceful:  # DISCONNECT, not the liveness window, told the broker
            assert "w1 disconnected" in str(info.value)
        with pytest.raises(WorkerLost, match="w1"):
            c.request(victim_sid, "decode", MODEL, 2, 2)
        assert {c.request(f"new{i}", "open", MODEL, 2, 0).worker_id for i in range(3)} == {"w2"}
        st = c.status()
        assert [w["worker_id"] for w in st["workers"]] == ["w2"]
        assert st["counters"]["workers_expired"] == 1 and st["counters"]["worker_lost"] >= 2
        assert w2.replied >= 3


def test_hung_worker_expires_and_open_is_redispatched(broker: Broker) -> None:
    with raw_dealer(broker.endpoint) as hung, client(broker.endpoint) as c:
        _register_raw(hung, "hung")
        rid = c.submit("s1", "open", MODEL, 2, 0, [b"payload"], timeout_s=LONG_S)
        dispatch = recv_until(hung, p.Dispatch)  # it gets the job and then never answers nor beats
        assert (dispatch.request_id, dispatch.attempt, dispatch.kind) == (rid, 1, "open")
        assert [bytes(f) for f in dispatch.frames] == [b"payload"]
        with echo_workers(broker.endpoint, "healthy"):
            start = time.monotonic()
            reply = c.result(rid)
            assert (reply.worker_id, reply.attempt) == ("healthy", 2)
            assert time.monotonic() - start < PROMPT_S
            assert c.request("s1", "decode", MODEL, 2, 1).worker_id == "healthy"
            cn = counters(c)
            assert cn["workers_expired"] == 1 and cn["redispatched"] == 1
            # The hung worker wakes up and answers its old attempt: discarded, and told to re-register.
            hung.send_multipart(p.encode(p.WorkerReply(request_id=rid, session_id="s1", step=0, attempt=1)))
            assert isinstance(recv_until(hung, p.Reregister), p.Reregister)
            wait_until(lambda: counters(c).get("late_replies_discarded", 0) == 1, what="late reply discarded")


def test_one_message_of_replies_reaches_each_client_and_a_stale_reply_in_it_is_dropped(broker: Broker) -> None:
    """A batching worker answers a forward pass's steps in one WORKER_REPLIES message: each reply
    reaches its own client, with its own frames, and one the broker no longer waits for (a
    timed-out attempt, a foreign id) is discarded without costing the others theirs."""
    with raw_dealer(broker.endpoint) as worker, client(broker.endpoint) as c1, client(broker.endpoint) as c2:
        _register_raw(worker, "batcher", max_batch=4)
        r1 = c1.submit("s1", "open", MODEL, 2, 0, [b"one"], timeout_s=LONG_S)
        r2 = c2.submit("s2", "open", MODEL, 2, 0, [b"two"], timeout_s=LONG_S)
        jobs = {d.request_id: d for d in (recv_until(worker, p.Dispatch), recv_until(worker, p.Dispatch))}
        assert set(jobs) == {r1, r2}
        replies = [p.WorkerReply(request_id=rid, session_id=jobs[rid].session_id, step=0, attempt=1,
                                 extra={"who": jobs[rid].session_id}, frames=[b"answer-" + bytes(jobs[rid].frames[0])])
                   for rid in (r2, r1)]  # fmt: skip
        stale = p.WorkerReply(request_id="gone", session_id="s9", step=0, attempt=1, frames=[b"x", b"y"])
        worker.send_multipart(p.encode(p.WorkerReplies.of([replies[0], stale, replies[1]])))
        for c, rid, sid, body in ((c1, r1, "s1", b"answer-one"), (c2, r2, "s2", b"answer-two")):
            reply = c.result(rid)
            assert (reply.worker_id, reply.header, [bytes(f) for f in reply.frames]) == ("batcher", {"who": sid}, [body])
        cn = counters(c1)
        assert cn["requests_served"] == 2 and cn["late_replies_discarded"] == 1


def test_a_worker_declared_lost_is_told_to_free_its_sessions_when_it_comes_back(broker: Broker) -> None:
    """Its edges heard their sessions were lost and reopen elsewhere: a worker that had only hung
    still holds those caches, and must hear to free them rather than keep them until they idle
    out (by default for minutes, with their memory and session slots)."""
    with raw_dealer(broker.endpoint) as flaky, client(broker.endpoint) as c:
        _register_raw(flaky, "flaky")
        for sid in ("s1", "s2"):
            rid = c.submit(sid, "open", MODEL, 2, 0, timeout_s=LONG_S)
            recv_until(flaky, p.Dispatch)
            flaky.send_multipart(p.encode(p.WorkerReply(request_id=rid, session_id=sid, step=0, attempt=1)))
            assert c.result(rid).worker_id == "flaky"
        # It stops beating (a hang) and is declared lost with both sessions.
        wait_until(lambda: counters(c).get("workers_expired") == 1, what="the hung worker to expire")
        with pytest.raises(WorkerLost, match="flaky"):
            c.request("s1", "decode", MODEL, 2, 1)
        _register_raw(flaky, "flaky")  # it resumes and registers again
        dropped = {recv_until(flaky, p.DropSession).session_id for _ in range(2)}
        assert dropped == {"s1", "s2"}
        assert counters(c)["orphans_dropped"] == 2
        # Once told, never again: registering once more drops nothing.
        _register_raw(flaky, "flaky")
        with pytest.raises(AssertionError, match="nothing received"):
            recv_until(flaky, p.DropSession, timeout_s=0.5)


def test_an_opener_run_again_is_freed_on_the_hung_worker_only_once_it_landed_elsewhere() -> None:
    """The hung worker may have opened the session before it hung. Its opener runs again: if it
    lands on another worker, the hung one frees its copy when it is back; if the hung one is the
    only worker, the rerun comes back to it, and nothing may free the session first."""
    with (
        running_broker(no_worker_grace_s=5.0) as broker,  # the opener waits for the worker to return
        raw_dealer(broker.endpoint) as flaky,
        client(broker.endpoint) as c,
    ):
        _register_raw(flaky, "flaky")
        elsewhere = c.submit("s1", "open", MODEL, 2, 0, timeout_s=LONG_S)
        recv_until(flaky, p.Dispatch)  # it opens s1, then hangs: no reply, no heartbeat
        with echo_workers(broker.endpoint, "healthy"):
            assert c.result(elsewhere).worker_id == "healthy"
            _register_raw(flaky, "flaky")
            assert recv_until(flaky, p.DropSession).session_id == "s1"
        # Now alone: an opener it hangs on has nowhere else to go, and comes back to it.
        wait_until(lambda: [w["worker_id"] for w in c.status()["workers"]] == ["flaky"], what="healthy to leave")
        here = c.submit("s2", "open", MODEL, 2, 0, timeout_s=LONG_S)
        assert recv_until(flaky, p.Dispatch).attempt == 1
        # (Expiries so far: flaky, then healthy on leaving.)
        wait_until(lambda: counters(c).get("workers_expired") == 3, what="the hung worker to expire again")
        flaky.send_multipart(p.encode(p.Register(worker_id="flaky", model_id=MODEL, layer_ranges=((0, 32),),
                                                 public_key=b"", per_layer_ms=1.0, pid=os.getpid(), max_sessions=8)))
        seen = []
        while not seen or not isinstance(seen[-1], p.Dispatch):
            seen.append(recv_msg(flaky))
        assert not any(isinstance(m, p.DropSession) for m in seen), seen
        assert (seen[-1].session_id, seen[-1].attempt) == ("s2", 2)
        flaky.send_multipart(p.encode(p.WorkerReply(request_id=here, session_id="s2", step=0, attempt=2)))
        assert c.result(here).worker_id == "flaky"


def _back_with_one_slot_of_two(flaky: zmq.Socket, c: BrokerClient) -> tuple[dict[str, str], p.Dispatch]:
    """``flaky`` takes the openers of s1 and s2, hangs until it is declared lost, and registers
    again with one slot: one rerun comes back to it (returned), the other is kept waiting for it.
    Returns the openers' request ids by session too."""
    _register_raw(flaky, "flaky", max_batch=2)
    openers = {sid: c.submit(sid, "open", MODEL, 2, 0, timeout_s=LONG_S) for sid in ("s1", "s2")}
    assert {recv_until(flaky, p.Dispatch).session_id for _ in range(2)} == {"s1", "s2"}  # then it hangs
    wait_until(lambda: counters(c).get("workers_expired") == 1, what="the hung worker to expire")
    _register_raw(flaky, "flaky", max_batch=1)
    back = recv_until(flaky, p.Dispatch)
    assert back.attempt == 2
    return openers, back


def test_an_opener_run_again_that_lands_elsewhere_after_the_hung_worker_came_back_frees_its_copy() -> None:
    """A rerun may still wait unplaced when the hung worker registers again: here it had two
    openers in flight and comes back with one slot. The second rerun is kept for it then, as it
    may come back there; when it lands on another worker instead, the first must free its copy."""
    with (
        running_broker(no_worker_grace_s=5.0, worker_max_in_flight=1) as broker,
        raw_dealer(broker.endpoint) as flaky,
        client(broker.endpoint) as c,
    ):
        openers, back = _back_with_one_slot_of_two(flaky, c)
        first, second = openers["s1"], openers["s2"]
        with echo_workers(broker.endpoint, "healthy"):  # the other rerun goes there
            other = first if back.session_id == "s2" else second
            assert c.result(other).worker_id == "healthy"
            stale = {"s1", "s2"} - {back.session_id}
            assert {recv_until(flaky, p.DropSession).session_id} == stale
            flaky.send_multipart(p.encode(p.WorkerReply(request_id=back.request_id, session_id=back.session_id,
                                                        step=0, attempt=2)))
            assert c.result(second if other is first else first).worker_id == "flaky"
            assert counters(c)["orphans_dropped"] == 1


def test_a_worker_that_hangs_again_before_a_kept_rerun_lands_is_told_to_free_it_when_back() -> None:
    """As above, but the worker that came back hangs again while the rerun kept for it still
    waits: it must still hear to free that copy when it is back the second time."""
    with (
        running_broker(no_worker_grace_s=5.0, worker_max_in_flight=1) as broker,
        raw_dealer(broker.endpoint) as flaky,
        client(broker.endpoint) as c,
    ):
        openers, _ = _back_with_one_slot_of_two(flaky, c)  # and it hangs again
        wait_until(lambda: counters(c).get("workers_expired") == 2, what="the worker to expire again")
        with echo_workers(broker.endpoint, "healthy"):
            assert {c.result(rid).worker_id for rid in openers.values()} == {"healthy"}
            _register_raw(flaky, "flaky", max_batch=1)
            assert {recv_until(flaky, p.DropSession).session_id for _ in range(2)} == {"s1", "s2"}


def test_a_worker_registering_from_a_new_connection_is_told_to_free_what_the_old_one_held(broker: Broker) -> None:
    with raw_dealer(broker.endpoint) as old, raw_dealer(broker.endpoint) as new, client(broker.endpoint) as c:
        _register_raw(old, "w")
        rid = c.submit("s1", "open", MODEL, 2, 0, timeout_s=LONG_S)
        recv_until(old, p.Dispatch)
        old.send_multipart(p.encode(p.WorkerReply(request_id=rid, session_id="s1", step=0, attempt=1)))
        c.result(rid)
        _register_raw(new, "w")  # the same worker id from another socket (it reconnected)
        assert recv_until(new, p.DropSession).session_id == "s1"
        with pytest.raises(WorkerLost, match="new connection"):
            c.request("s1", "decode", MODEL, 2, 1)


def test_a_worker_that_failed_is_avoided_when_it_comes_back(broker: Broker) -> None:
    with raw_dealer(broker.endpoint) as flaky, client(broker.endpoint) as c:
        _register_raw(flaky, "flaky")
        c.submit("s1", "open", MODEL, 2, 0, timeout_s=LONG_S)
        recv_until(flaky, p.Dispatch)  # it takes the opener, then hangs: no reply, no heartbeat
        with echo_workers(broker.endpoint, "healthy"):
            wait_until(lambda: counters(c).get("workers_expired") == 1, what="the hung worker to expire")
            _register_raw(flaky, "flaky")  # it resumes and registers again, with no load at all
            # (_register_raw may have read a heartbeat queued for it while it hung: wait for the listing.)
            wait_until(lambda: any(w["worker_id"] == "flaky" for w in c.status()["workers"]),
                       what="the flaky worker to be listed again")
            st = c.status()
            flaky_row = next(w for w in st["workers"] if w["worker_id"] == "flaky")
            assert flaky_row["avoided_for_s"] > 0
            # Least load alone would pick the idle newcomer; the failed worker waits its turn.
            assert {c.request(f"new{i}", "open", MODEL, 2, 0).worker_id for i in range(3)} == {"healthy"}


def test_queued_requests_of_a_dead_workers_session_fail_promptly() -> None:
    with running_broker(worker_max_in_flight=1) as b, client(b.endpoint) as c:
        with echo_workers(b.endpoint, "w1") as (w,):
            c.request("s1", "open", MODEL, 2, 0)
            w.gate.clear()
            in_flight = c.submit("s1", "decode", MODEL, 2, 1, timeout_s=LONG_S)
            wait_until(lambda: len(w.jobs) == 2, what="dispatch")
            queued = c.submit("s1", "decode", MODEL, 2, 2, timeout_s=LONG_S)
            wait_until(lambda: c.status()["queue_depth"] == 1, what="queued follower")
            start = time.monotonic()
            w.close(graceful=False)
            for rid in (in_flight, queued):
                with pytest.raises(WorkerLost):
                    c.result(rid)
            assert time.monotonic() - start < PROMPT_S


def test_failed_open_fails_its_queued_followers() -> None:
    with (
        running_broker(worker_max_in_flight=1) as b,
        echo_workers(b.endpoint, "w1") as (w,),
        client(b.endpoint) as c,
    ):
        c.request("busy", "open", MODEL, 2, 0)
        w.gate.clear()
        blocker = c.submit("busy", "decode", MODEL, 2, 1, timeout_s=LONG_S)
        wait_until(lambda: len(w.jobs) == 2, what="blocker dispatched")
        opener = c.submit("s1", "open", MODEL, 2, 0, timeout_s=0.3)
        follower = c.submit("s1", "prefill", MODEL, 2, 1, timeout_s=LONG_S)
        with pytest.raises(RequestTimeout):
            c.result(opener)
        start = time.monotonic()
        with pytest.raises(WorkerLost):
            c.result(follower)
        assert time.monotonic() - start < 1.0
        w.gate.set()
        assert c.result(blocker).step == 1


def test_a_second_live_process_with_a_workers_id_is_refused_until_the_first_is_gone(broker: Broker) -> None:
    """Two workers given one --worker-id evicted each other every heartbeat: the holder keeps it,
    and the other is told why each time it asks, until the holder leaves."""

    def register(sock: zmq.Socket, pid: int) -> None:
        sock.send_multipart(p.encode(p.Register(worker_id="dup", model_id=MODEL, layer_ranges=((0, 32),),
                                                public_key=b"", per_layer_ms=1.0, pid=pid, max_sessions=8)))

    def heartbeat(sock: zmq.Socket) -> None:
        sock.send_multipart(p.encode(p.Heartbeat(worker_id="dup", active_sessions=0, queue_depth=0, per_layer_ms=1.0)))

    with raw_dealer(broker.endpoint) as first, raw_dealer(broker.endpoint) as second, client(broker.endpoint) as c:
        register(first, 111)
        recv_until(first, p.BrokerHeartbeat)
        for _ in range(3):
            register(second, 222)
            heartbeat(second)
            assert "held by another live worker (pid 111)" in recv_until(second, p.Reregister).reason
            heartbeat(first)  # the holder still beats, and is still known
            recv_until(first, p.BrokerHeartbeat)  # the broker's next round: three span its expiry window
        status = c.status()
        assert [(w["worker_id"], w["pid"]) for w in status["workers"]] == [("dup", 111)]
        assert status["counters"]["duplicate_worker_ids_refused"] == 3 and not status["counters"].get("workers_expired")
        first.send_multipart(p.encode(p.Disconnect(worker_id="dup")))
        wait_until(lambda: not c.status()["workers"], what="the holder to leave")
        register(second, 222)
        recv_until(second, p.BrokerHeartbeat)
        assert [(w["worker_id"], w["pid"]) for w in c.status()["workers"]] == [("dup", 222)]


def test_unknown_worker_is_asked_to_reregister(broker: Broker) -> None:
    with raw_dealer(broker.endpoint) as raw:
        raw.send_multipart(p.encode(p.Heartbeat(worker_id="ghost", active_sessions=0, queue_depth=0, per_layer_ms=0.0)))
        assert "register" in recv_until(raw, p.Reregister).reason


def test_queued_request_times_out() -> None:
    with (
        running_broker(worker_max_in_flight=1) as b,
        echo_workers(b.endpoint, "w1") as (w,),
        client(b.endpoint) as c,
    ):
        c.request("s1", "open", MODEL, 2, 0)
        w.gate.clear()
        first = c.submit("s1", "decode", MODEL, 2, 1, timeout_s=LONG_S)
        with pytest.raises(RequestTimeout, match="queued"):
            c.request("s1", "decode", MODEL, 2, 2, timeout_s=0.2)
        assert c.status()["queue_depth"] == 0
        w.gate.set()
        assert c.result(first).step == 1


def test_idle_session_expiry_tells_the_worker() -> None:
    with (
        running_broker(session_idle_s=0.2) as b,
        echo_workers(b.endpoint, "w1") as (w,),
        client(b.endpoint) as c,
    ):
        c.request("s1", "open", MODEL, 2, 0)
        assert wait_until(w.conn.dropped_sessions, what="DROP_SESSION") == ["s1"]
        with pytest.raises(WorkerLost, match="idle"):
            c.request("s1", "decode", MODEL, 2, 1)


def test_worker_and_client_survive_broker_restart() -> None:
    with running_broker() as first:
        endpoint = first.endpoint
        w = EchoWorker(endpoint, "w1")
        try:
            with client(endpoint) as c:
                wait_until(lambda: c.status()["workers"], what="registration")
                w.gate.clear()
                rid = c.submit("s1", "open", MODEL, 2, 0, timeout_s=LONG_S)
                wait_until(lambda: w.jobs, what="dispatch")
                first.stop()
                assert first.wait_stopped(5.0)
                with pytest.raises(BrokerUnavailable, match="shutting down"):
                    c.result(rid)
            w.gate.set()
            with running_broker(endpoint=endpoint) as second, client(second.endpoint) as c2:
                wait_until(lambda: c2.status()["workers"], timeout_s=EXPIRY_S * 4 + 5, what="re-registration")
                assert c2.request("s2", "open", MODEL, 2, 0).worker_id == "w1"
                assert w.conn.registrations >= 2
        finally:
            w.close()


def test_client_raises_broker_unavailable_then_recovers() -> None:
    with running_broker() as b:
        endpoint = b.endpoint  # a port that was just free; nothing listens once this exits
    quick = ClientConfig(default_timeout_s=0.2, reply_grace_s=0.1)
    c = BrokerClient(endpoint, config=quick)
    try:
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="EDGECLOUD_BROKER"):
            c.request("s1", "open", MODEL, 2, 0)
        assert time.monotonic() - start < 1.0
        with pytest.raises(BrokerUnavailable):
            c.ping(0.2)
        with running_broker(endpoint=endpoint), echo_workers(endpoint, "w1"):
            assert c.ping(2.0) < 2.0
            assert c.request("s1", "open", MODEL, 2, 0, timeout_s=2.0).worker_id == "w1"
    finally:
        c.close()


def test_a_client_knows_at_once_when_nothing_listens_or_the_broker_drops_its_connection() -> None:
    with running_broker() as b:
        endpoint = b.endpoint  # nothing listens once this exits
    c = BrokerClient(endpoint, config=ClientConfig(default_timeout_s=LONG_S))
    try:
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="nothing accepts connections") as refused:
            c.request("s1", "open", MODEL, 2, 0)
        assert refused.value.gone and time.monotonic() - start < 2.0  # not the 10 s deadline
        # A broker that dies with a request in flight (a bare ROUTER standing in, closed unanswered).
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(endpoint)
        try:
            wait_until(lambda: not c.broker_gone, what="the client to reconnect")
            rid = c.submit("s1", "open", MODEL, 2, 0, timeout_s=LONG_S)
            assert router.poll(5000)
            router.recv_multipart()
        finally:
            router.close()
            ctx.term()
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="closed the connection") as dropped:
            c.result(rid)
        assert dropped.value.gone and time.monotonic() - start < 2.0
        with running_broker(endpoint=endpoint), echo_workers(endpoint, "w1"):  # and it comes back
            wait_until(lambda: not c.broker_gone, what="the client to reconnect")
            assert c.request("s2", "open", MODEL, 2, 0, timeout_s=2.0).worker_id == "w1"
    finally:
        c.close()


def test_client_drops_stale_replies() -> None:
    """A fake broker answers an old request id first; the client must skip it."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def fake_broker() -> None:
        if not router.poll(5000):
            return
        ident, *frames = router.recv_multipart()
        req = p.decode(frames)
        for rid in ("old-request", req.request_id):
            reply = p.Reply(request_id=rid, session_id=req.session_id, step=req.step, worker_id="fake", attempt=1,
                            frames=[b"ok"])  # fmt: skip
            router.send_multipart([ident, *p.encode(reply)])

    t = threading.Thread(target=fake_broker, daemon=True)
    t.start()
    c = BrokerClient(f"tcp://127.0.0.1:{port}", config=CLIENT)
    try:
        r = c.request("s1", "open", MODEL, 2, 7)
        assert (r.step, bytes(r.frames[0])) == (7, b"ok")
        assert c.stale_replies == 1 and c.pending() == 0
    finally:
        c.close()
        t.join(5.0)
        router.close()
        ctx.term()


def test_status_reports_load_and_liveness(broker: Broker) -> None:
    with echo_workers(broker.endpoint, "w1") as (w,), client(broker.endpoint) as c:
        c.request("s1", "open", MODEL, 2, 0)
        w.conn.set_active_sessions(1)
        w.gate.clear()
        c.submit("s1", "decode", MODEL, 2, 1, timeout_s=LONG_S)
        wait_until(lambda: c.status()["in_flight"] == 1, what="in-flight request")

        def reported() -> dict | None:
            (row,) = c.status()["workers"]
            return row if row["reported_sessions"] == 1 else None

        row = wait_until(reported, timeout_s=HEARTBEAT_S * 20, what="heartbeat with load")
        assert row["in_flight"] == 1 and row["sessions"] == 1 and row["last_seen_s_ago"] < EXPIRY_S
        st = c.status()
        assert st["pending_requests"] == 1 and st["sessions"] == 1 and st["uptime_s"] > 0
        assert st["protocol_version"] == p.PROTOCOL_VERSION
        w.gate.set()


def test_a_bug_in_handling_one_message_is_survived_counted_and_answered(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in a handler (a bug: bad input gets typed errors before it) fails that request
    with a typed error at once; the broker logs it, counts it, and serves everyone else."""
    from broker import broker as broker_module
    from broker.errors import RemoteError

    real = broker_module._HANDLERS[p.Request]
    calls = []

    def flaky(self: Broker, identity: bytes, msg: p.Request) -> None:
        calls.append(msg.session_id)
        if msg.session_id == "unlucky":
            raise KeyError("a bug")
        real(self, identity, msg)

    monkeypatch.setitem(broker_module._HANDLERS, p.Request, flaky)
    with echo_workers(broker.endpoint, "w1"), client(broker.endpoint) as c:
        with pytest.raises(RemoteError, match="BrokerInternalError: KeyError"):
            c.request("unlucky", "open", MODEL, 2, 0, timeout_s=LONG_S)
        assert c.request("lucky", "open", MODEL, 2, 0).worker_id == "w1"
        assert counters(c)["internal_errors"] == 1
    assert calls == ["unlucky", "lucky"]


def test_a_worker_heartbeats_at_the_brokers_period_when_it_is_shorter(broker: Broker) -> None:
    """A broker told to heartbeat every 0.1 s expires a worker silent for 0.5 s; a worker left at
    its 1 s default learns the broker's period from its heartbeats and stays registered while
    idle (it was dropped, with its sessions, every few seconds)."""
    from broker.worker_api import WorkerConfig

    slow = WorkerConfig(heartbeat_interval_s=1.0, broker_liveness=LIVENESS)
    with echo_workers(broker.endpoint, "w1", config=slow) as (w1,), client(broker.endpoint) as c:
        wait_until(lambda: w1.conn.heartbeat_s == HEARTBEAT_S, what="the worker to take the broker's period")
        # Idle, heartbeats alone keep it registered: a dozen of them span more than the broker's
        # expiry window (at the worker's own period they would take 12 s, past the wait).
        start = w1.conn.heartbeats_sent
        wait_until(lambda: w1.conn.heartbeats_sent >= start + 12, what="a dozen heartbeats at the broker's period")
        assert counters(c).get("workers_expired", 0) == 0 and counters(c)["workers_registered"] == 1
        assert c.request("s", "open", MODEL, 2, 0).worker_id == "w1"


def test_a_clusters_waits_keep_their_clients_reconnection_warnings_to_themselves(caplog):
    """LocalCluster's waits expect a broker that is not up yet: their client's warnings are routed
    to a logger of their own (errors only), without touching the shared client logger's level,
    which a second wait in the process or any other client still relies on."""
    import logging

    from cli.cluster import LocalCluster

    cluster = LocalCluster(model="tiny-llama", curve=False)  # nothing started: nobody answers
    try:
        with caplog.at_level(logging.WARNING):
            with cluster._watcher() as watcher:
                assert logging.getLogger("broker.client_api").level == logging.NOTSET
                with pytest.raises(BrokerUnavailable):
                    watcher.status(timeout_s=0.3)
            assert "resetting connection" not in caplog.text
            plain = BrokerClient(cluster.endpoint, "")  # any other client still warns
            try:
                with pytest.raises(BrokerUnavailable):
                    plain.status(timeout_s=0.3)
            finally:
                plain.close()
            assert "resetting connection" in caplog.text
    finally:
        cluster.stop()


def test_a_broker_of_another_protocol_version_is_named_in_the_clients_error() -> None:
    """Neither side can read the other: the client's error must say so, not just 'no answer'."""
    import msgpack

    ctx = zmq.Context()
    other = ctx.socket(zmq.ROUTER)  # a broker speaking the version before this one
    other.setsockopt(zmq.LINGER, 0)
    port = other.bind_to_random_port("tcp://127.0.0.1")
    c = BrokerClient(f"tcp://127.0.0.1:{port}", "", config=ClientConfig(default_timeout_s=1.0, reply_grace_s=0.2))
    try:
        rid = c.submit("s1", "open", MODEL, 2, 0, timeout_s=1.0)
        identity, *_ = other.recv_multipart()
        old = p.MAGIC + bytes([p.PROTOCOL_VERSION - 1])
        other.send_multipart([identity, old + msgpack.packb({"t": int(p.MsgType.ERROR), "request_id": rid})])
        with pytest.raises(BrokerUnavailable, match="different edgecloud versions"):
            c.result(rid)
        # Once it hears our version again, a later silence is not blamed on versions.
        rid = c.submit("s1", "open", MODEL, 2, 0, timeout_s=1.0)
        identity, *_ = other.recv_multipart()  # the client reconnected after the reset
        other.send_multipart([identity, *p.encode(p.Pong(request_id="unrelated"))])
        with pytest.raises(BrokerUnavailable) as info:
            c.result(rid)
        assert "versions" not in str(info.value)
    finally:
        c.close()
        other.close()
        ctx.term()
