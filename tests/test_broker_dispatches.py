"""The steps the broker routes to a worker while it reads its socket once go to that worker as one
DISPATCHES message (in order, chunked at the protocol's limits, never behind a later message).

These tests step a real broker from the test thread (no serving thread) so that what reaches its
socket before a read is known; the clients and the worker are real sockets on loopback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from broker import protocol as p
from broker.broker import Broker
from broker.sockets import recv_message
from tests.brokerutil import FAST_BROKER, MODEL, WAIT_S, client, raw_dealer


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(replace(FAST_BROKER))
    try:
        yield b
    finally:
        b._shutdown()


def _receive(b: Broker) -> list:
    """The next message that reaches the broker's socket, within WAIT_S."""
    assert b._sock.poll(int(WAIT_S * 1000)), "nothing reached the broker"
    frames = recv_message(b._sock, 1)
    assert frames is not None
    return frames


def _read(b: Broker, n: int) -> None:
    """Handle the next ``n`` messages as one read of the socket does, then end the read (what it
    holds is sent), as the broker's loop does when its socket is drained."""
    for _ in range(n):
        b._handle(_receive(b))
    b._flush()


def _raw(sock: zmq.Socket, timeout_s: float = WAIT_S) -> p.Message:
    """The next message as it came (a DISPATCHES stays one), past the heartbeat that answers a
    registration."""
    while True:
        assert sock.poll(int(timeout_s * 1000)), "nothing received"
        msg = p.decode(sock.recv_multipart())
        if type(msg) is not p.BrokerHeartbeat:
            return msg


def _send_register(sock: zmq.Socket, worker_id: str, max_batch: int = 128) -> None:
    sock.send_multipart(p.encode(p.Register(worker_id=worker_id, model_id=MODEL, layer_ranges=((0, 32),),
                                            public_key=b"", per_layer_ms=1.0, pid=os.getpid(), max_sessions=256,
                                            max_batch=max_batch)))  # fmt: skip


def _register(b: Broker, sock: zmq.Socket, worker_id: str = "w", max_batch: int = 128) -> None:
    _send_register(sock, worker_id, max_batch)
    _read(b, 1)
    assert worker_id in b._workers
    assert sock.poll(int(WAIT_S * 1000)) and type(p.decode(sock.recv_multipart())) is p.BrokerHeartbeat


def test_steps_routed_in_one_read_reach_the_worker_as_one_message_in_order(broker: Broker) -> None:
    with raw_dealer(broker.endpoint) as worker, client(broker.endpoint) as c1, client(broker.endpoint) as c2:
        _register(broker, worker)
        rids = [c1.submit("a", "open", MODEL, 2, 0, [b"a0"]), c2.submit("b", "open", MODEL, 2, 0, [b"b0", b"b1"]),
                c1.submit("c", "open", MODEL, 2, 0)]  # fmt: skip
        _read(broker, 3)
        msg = _raw(worker)
        assert type(msg) is p.Dispatches
        got = msg.split()
        assert sorted(d.request_id for d in got) == sorted(rids)
        assert {d.session_id: [bytes(f) for f in d.frames] for d in got} == {"a": [b"a0"], "b": [b"b0", b"b1"], "c": []}
        assert not worker.poll(100), "one message carried them all"
        # Answered as usual, each reaches its own client.
        worker.send_multipart(p.encode(p.WorkerReplies.of([
            p.WorkerReply(request_id=d.request_id, session_id=d.session_id, step=0, attempt=1,
                          frames=[d.session_id.encode()]) for d in got])))  # fmt: skip
        _read(broker, 1)
        for c, rid, sid in ((c1, rids[0], b"a"), (c2, rids[1], b"b"), (c1, rids[2], b"c")):
            assert [bytes(f) for f in c.result(rid).frames] == [sid]


def test_a_lone_step_goes_as_a_plain_dispatch(broker: Broker) -> None:
    with raw_dealer(broker.endpoint) as worker, client(broker.endpoint) as c:
        _register(broker, worker)
        rid = c.submit("a", "open", MODEL, 2, 0, [b"x"])
        _read(broker, 1)
        msg = _raw(worker)
        assert type(msg) is p.Dispatch and msg.request_id == rid


def test_more_steps_than_one_message_holds_go_in_several_in_order(broker: Broker) -> None:
    n = p.MAX_BODY_FRAMES + 6
    with raw_dealer(broker.endpoint) as worker, client(broker.endpoint) as c:
        _register(broker, worker, max_batch=n)
        for i in range(n):
            c.submit(f"s{i:03d}", "open", MODEL, 2, 0, [b"%d" % i])
        _read(broker, n)
        first, second = _raw(worker), _raw(worker)
        assert type(first) is p.Dispatches and len(first.dispatches) == p.MAX_BODY_FRAMES
        got = [d.session_id for d in first.split()] + (
            [d.session_id for d in second.split()] if type(second) is p.Dispatches else [second.session_id])
        assert got == [f"s{i:03d}" for i in range(n)]  # one client's requests, in the order sent


def test_a_held_step_goes_before_a_later_message_to_its_worker(broker: Broker) -> None:
    """A message for the worker that the broker sends while steps for it are held (here: told to
    free a session) must not overtake them."""
    with raw_dealer(broker.endpoint) as worker, client(broker.endpoint) as c:
        _register(broker, worker)
        rid = c.submit("a", "open", MODEL, 2, 0, [b"x"])
        broker._handle(_receive(broker))  # routed and held: the read of the socket has not ended
        assert not worker.poll(100)
        broker._send(worker_identity(broker, "w"), p.DropSession(session_id="old", reason="test"))
        first, second = _raw(worker), _raw(worker)
        assert type(first) is p.Dispatch and first.request_id == rid
        assert type(second) is p.DropSession
        assert not broker._held and broker._n_held == 0


def test_a_worker_gone_before_its_held_steps_are_sent_is_expired_and_they_go_elsewhere(broker: Broker) -> None:
    with raw_dealer(broker.endpoint) as doomed, raw_dealer(broker.endpoint) as other, \
            client(broker.endpoint) as c:
        _register(broker, doomed, "doomed")
        rid = c.submit("a", "open", MODEL, 2, 0, [b"x"])
        broker._handle(_receive(broker))
        assert broker._sessions["a"].worker_id == "doomed"
        # It vanishes (its connection closed) while the step is held; another worker is up.
        monitor = broker._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            doomed.close(linger=0)
            assert monitor.poll(int(WAIT_S * 1000)), "the broker never saw the worker's connection close"
            recv_monitor_message(monitor)
        finally:
            broker._sock.disable_monitor()
            monitor.close(linger=0)
        _send_register(other, "other", max_batch=8)
        _read(broker, 1)  # the other's registration, then what it holds is sent
        assert "doomed" not in broker._workers
        assert broker.counters["workers_expired"] == 1 and broker.counters["unroutable_sends"] == 1
        msg = _raw(other)
        assert type(msg) is p.Dispatch and msg.request_id == rid and msg.attempt == 2


def worker_identity(b: Broker, worker_id: str) -> bytes:
    return b._workers[worker_id].identity
