"""The link-emulating proxy: its timing model alone, then real clients, broker and worker through it."""

from __future__ import annotations

import random
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import zmq
from brokerutil import (
    MODEL,
    EchoWorker,
    client,
    echo_workers,
    raw_dealer,
    recv_msg,
    running_broker,
    wait_until,
)

from broker import protocol as p
from broker.broker import Broker
from broker.client_api import BrokerClient, ClientConfig
from broker.errors import BrokerUnavailable
from broker.linkproxy import DOWNLINK, UPLINK, LinkConfig, LinkDirection, LinkProxy
from cli.cluster import ROOT, child_env, cli_command, free_port

pytestmark = pytest.mark.timeout(30)

PINGS = 9  # per median: enough to shrug off one scheduling hiccup
MEGABYTE = 1_000_000
# A client that gives up quickly: the broker is local, only the emulated link is slow.
QUICK = ClientConfig(default_timeout_s=0.3, reply_grace_s=0.2)
RID = "0" * 32  # request ids are uuid4().hex: 32 characters, so every PING/PONG has one size
PING_BYTES = len(p.encode(p.Ping(request_id=p.RequestId(RID)))[0])
PONG_BYTES = len(p.encode(p.Pong(request_id=p.RequestId(RID)))[0])
CLI_START_S = 20.0  # the CLI imports typer and transformers' logging before it binds
CLI_EXIT_S = 10.0


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with running_broker() as b:
        yield b


@pytest.fixture(scope="module")
def worker(broker: Broker) -> Iterator[EchoWorker]:
    with echo_workers(broker.endpoint, "w1") as (w,):
        yield w


@contextmanager
def proxy_to(upstream: str, **config: Any) -> Iterator[LinkProxy]:
    """A started proxy on a random loopback port; always stopped (its context is its own)."""
    proxy = LinkProxy("tcp://127.0.0.1:*", upstream, LinkConfig(**config))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@contextmanager
def quick_client(endpoint: str) -> Iterator[BrokerClient]:
    c = BrokerClient(endpoint, config=QUICK)
    try:
        yield c
    finally:
        c.close()


def median_ping_s(c: BrokerClient) -> float:
    return statistics.median(c.ping(2.0) for _ in range(PINGS))


# ------------------------------------------------------------ the model alone
def direction(**kw: Any) -> LinkDirection:
    return LinkDirection.from_config(LinkConfig(**kw), UPLINK, random.Random(0))


def test_serialisation_is_fifo_and_adds_propagation_delay() -> None:
    d = direction(rtt_ms=20.0, uplink_mbps=8.0)
    assert d.admit(0.0, MEGABYTE) == [pytest.approx(1.0 + 0.010)]
    # A small message right behind it waits for the big one to leave the serialiser.
    assert d.admit(0.0, 1000) == [pytest.approx(1.001 + 0.010)]
    # After the link drained, no queueing.
    assert d.admit(5.0, 1000) == [pytest.approx(5.001 + 0.010)]
    assert direction(uplink_mbps=8.0, downlink_mbps=None).admit(0.0, MEGABYTE) == [pytest.approx(1.0)]
    down = LinkDirection.from_config(LinkConfig(uplink_mbps=8.0), DOWNLINK, random.Random(0))
    assert down.admit(0.0, MEGABYTE) == [0.0]  # downlink unlimited


def test_jitter_stays_in_bounds_and_never_reorders() -> None:
    d = direction(rtt_ms=20.0, jitter_ms=8.0)
    dues = [d.admit(i * 0.001, 100)[0] for i in range(2000)]
    assert dues == sorted(dues)
    delays = [due - i * 0.001 for i, due in enumerate(dues)]
    assert min(delays) >= 0.002 - 1e-9 and max(delays) <= 0.018 + 1e-9
    assert max(delays) - min(delays) > 0.010  # it does vary


def test_faults_and_counters() -> None:
    assert direction(drop_rate=1.0).admit(0.0, 10) == []
    assert direction(duplicate_rate=1.0, rtt_ms=2.0).admit(0.0, 10) == [0.001, 0.001]
    held = direction(delay_rate=1.0, extra_delay_ms=30.0)
    assert held.admit(0.0, 10) == [pytest.approx(0.030)]
    assert held.fifo_floor == 0.0  # the held message does not hold back the ones behind it
    d = direction(drop_rate=0.3, duplicate_rate=0.2, delay_rate=0.1, extra_delay_ms=5.0)
    for _ in range(1000):
        for _ in d.admit(0.0, 10):
            d.delivered(10, ok=True)
    s = d.snapshot()
    assert s.messages == 1000 and s.bytes == 10_000 and d.queued_bytes == 0
    assert s.delivered == 1000 - s.dropped + s.duplicated
    assert 230 < s.dropped < 370 and 90 < s.duplicated < 190 and 30 < s.delayed < 110


def test_queue_limit_tail_drops_but_passes_one_big_message() -> None:
    d = direction(uplink_mbps=1.0, max_queue_bytes=1000)
    assert d.admit(0.0, 5000)  # an empty link takes anything
    assert d.admit(0.0, 10) == []
    assert d.snapshot().overflow == 1


def test_same_seed_same_decisions() -> None:
    def decisions(seed: int) -> list[list[float]]:
        proxy = LinkProxy("tcp://127.0.0.1:*", "tcp://127.0.0.1:1",
                          LinkConfig(jitter_ms=5, drop_rate=0.3, duplicate_rate=0.3, seed=seed))  # fmt: skip
        try:
            return [proxy._dirs[UPLINK].admit(0.0, 10) for _ in range(200)]
        finally:
            proxy.stop()  # never started: closes its sockets and context

    assert decisions(3) == decisions(3) != decisions(4)


@pytest.mark.parametrize(
    "bad",
    [{"rtt_ms": -1}, {"drop_rate": 1.5}, {"uplink_mbps": 0}, {"delay_rate": 0.1}, {"max_clients": 0},
     {"jitter_ms": float("nan")}],
)  # fmt: skip
def test_config_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LinkConfig(**bad)


# ------------------------------------------------- real broker, worker, client
def test_added_rtt_matches_configuration(broker: Broker, worker: EchoWorker) -> None:
    with client(broker.endpoint) as direct:
        base = median_ping_s(direct)
    with proxy_to(broker.endpoint, rtt_ms=40.0) as proxy, client(proxy.endpoint) as c:
        added = median_ping_s(c) - base
        assert 0.030 <= added <= 0.050, f"added RTT {added * 1000:.1f} ms, configured 40 ms"
        t0 = time.perf_counter()
        r = c.request("rtt", "open", MODEL, 0, 0, [b"x"], timeout_s=2.0)
        assert 0.030 <= time.perf_counter() - t0 <= 0.5 and [bytes(f) for f in r.frames] == [b"x"]


def test_uplink_bandwidth_delays_a_big_body_and_what_queues_behind_it(
    broker: Broker, worker: EchoWorker
) -> None:
    body = b"\x5a" * MEGABYTE
    with client(broker.endpoint) as direct:
        t0 = time.perf_counter()
        direct.request("bw-direct", "open", MODEL, 0, 0, [body], timeout_s=5.0)
        base = time.perf_counter() - t0
    with proxy_to(broker.endpoint, uplink_mbps=8.0) as proxy, client(proxy.endpoint) as c:
        t0 = time.perf_counter()
        r = c.request("bw", "open", MODEL, 0, 0, [body], timeout_s=5.0)
        added = time.perf_counter() - t0 - base
        assert bytes(r.frames[0]) == body
        assert 0.9 <= added <= 1.25, f"1 MB at 8 Mbit/s added {added:.3f} s, expected ~1 s"
        # FIFO: a ping sent right behind a big body waits for it to cross the link.
        rid = c.submit("bw", "decode", MODEL, 0, 1, [body], timeout_s=5.0)
        assert 0.9 <= c.ping(5.0) <= 1.25
        c.result(rid)
        st = proxy.stats()
        assert st.uplink.bytes > 2 * MEGABYTE and st.downlink.bytes > 2 * MEGABYTE


@pytest.mark.parametrize("faults", [{}, {"fault_uplink": False}, {"fault_downlink": False}])
def test_total_loss_times_out_typed_without_hanging(broker: Broker, worker: EchoWorker, faults: dict) -> None:
    with proxy_to(broker.endpoint, drop_rate=1.0, **faults) as proxy, quick_client(proxy.endpoint) as c:
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            c.request("lost-" + ("-".join(faults) or "both"), "open", MODEL, 0, 0, [b"x"], timeout_s=0.3)
        assert time.monotonic() - t0 < 0.3 + QUICK.reply_grace_s + 0.5
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            c.ping(0.3)
        assert time.monotonic() - t0 < 0.8
        st = proxy.stats()
        assert st.dropped == 2 and st.uplink.messages == 2
        assert st.downlink.messages == (2 if "fault_uplink" in faults else 0)


def test_duplicated_replies_are_stale_and_each_request_gets_one(broker: Broker, worker: EchoWorker) -> None:
    n = 5
    with (
        proxy_to(broker.endpoint, duplicate_rate=1.0, fault_uplink=False) as proxy,
        client(proxy.endpoint) as c,
    ):
        replies = [
            c.request("dup", "open" if i == 0 else "decode", MODEL, 0, i, [bytes([i])]) for i in range(n)
        ]
        assert [(r.step, bytes(r.frames[0])) for r in replies] == [(i, bytes([i])) for i in range(n)]
        c.ping(2.0)
        c.ping(2.0)  # by now every earlier duplicate has been read (one link, in order)
        assert n + 1 <= c.stale_replies <= n + 2
        st = proxy.stats()
        assert st.downlink.duplicated == n + 2 and st.uplink.duplicated == 0
        assert st.downlink.delivered == 2 * st.downlink.messages


def test_duplicated_pings_both_ways(broker: Broker, worker: EchoWorker) -> None:
    with proxy_to(broker.endpoint, duplicate_rate=1.0) as proxy, client(proxy.endpoint) as c:
        c.ping(2.0)
        wait_until(lambda: proxy.stats().downlink.delivered == 4, what="4 pongs for one ping")
        st = proxy.stats()
        assert (st.uplink.messages, st.uplink.delivered, st.downlink.messages) == (1, 2, 2)


def test_duplicated_requests_get_one_reply_each(broker: Broker, worker: EchoWorker) -> None:
    with (
        proxy_to(broker.endpoint, duplicate_rate=1.0, fault_downlink=False) as proxy,
        client(proxy.endpoint) as c,
    ):
        for i in range(5):
            assert c.request("dup-up", "open" if i == 0 else "decode", MODEL, 0, i).step == i


def test_stats_count_messages_and_bytes(broker: Broker) -> None:
    with proxy_to(broker.endpoint) as proxy, client(proxy.endpoint) as c:
        for _ in range(10):
            c.ping(2.0)
        wait_until(lambda: proxy.stats().downlink.delivered == 10, what="10 pongs delivered")
        st = proxy.stats()
        assert (st.uplink.messages, st.uplink.bytes, st.uplink.delivered) == (10, 10 * PING_BYTES, 10)
        assert (st.downlink.messages, st.downlink.bytes) == (10, 10 * PONG_BYTES)
        assert (
            st.uplink.delivered_bytes == st.uplink.bytes and st.downlink.delivered_bytes == st.downlink.bytes
        )
        assert (st.dropped, st.duplicated, st.delayed, st.clients, st.clients_evicted) == (0, 0, 0, 1, 0)
        assert st.uplink.undeliverable == st.uplink.overflow == 0


def test_seeded_loss_and_reordering_replay_exactly(broker: Broker) -> None:
    n = 40

    def run() -> tuple[list[str], int, int]:
        with proxy_to(broker.endpoint, drop_rate=0.2, delay_rate=0.3, extra_delay_ms=100.0, seed=11,
                      fault_downlink=False) as proxy, raw_dealer(proxy.endpoint) as sock:  # fmt: skip
            for i in range(n):
                sock.send_multipart(p.encode(p.Ping(request_id=p.RequestId(f"{i:032d}"))))
            wait_until(lambda: proxy.stats().uplink.delivered + proxy.stats().uplink.dropped == n,
                       what="every ping to cross or be lost")  # fmt: skip
            st = proxy.stats()
            got = [recv_msg(sock, 2.0).request_id for _ in range(n - st.uplink.dropped)]
            return got, st.uplink.dropped, st.uplink.delayed

    got, dropped, delayed = run()
    assert dropped > 0 and delayed > 0
    sent = [f"{i:032d}" for i in range(n)]
    assert got != [s for s in sent if s in got], "held pings should arrive after later ones"
    assert len(set(got)) == n - dropped
    assert run() == (got, dropped, delayed)


def test_idle_back_sockets_are_closed_and_reopened(broker: Broker) -> None:
    with proxy_to(broker.endpoint, client_idle_s=0.2) as proxy, client(proxy.endpoint) as c:
        c.ping(2.0)
        assert proxy.stats().clients == 1
        wait_until(lambda: proxy.stats().clients == 0, what="the idle back socket to close")
        c.ping(2.0)  # same client identity, a fresh back socket
        st = proxy.stats()
        assert (st.clients, st.clients_evicted) == (1, 1)


def test_client_cap_evicts_least_recently_active(broker: Broker) -> None:
    with proxy_to(broker.endpoint, max_clients=2) as proxy:
        with client(proxy.endpoint) as a, client(proxy.endpoint) as b, client(proxy.endpoint) as c:
            for who in (a, b, c, a, c):
                who.ping(2.0)
            st = proxy.stats()
            assert st.clients == 2 and st.clients_evicted == 2
            assert st.downlink.delivered == 5


def test_stop_with_clients_and_queued_messages_is_prompt(broker: Broker, worker: EchoWorker) -> None:
    proxy = LinkProxy("tcp://127.0.0.1:*", broker.endpoint, LinkConfig(rtt_ms=4000.0))
    proxy.start()
    try:
        with quick_client(proxy.endpoint) as c, quick_client(proxy.endpoint) as d:
            c.submit("stop", "open", MODEL, 0, 0, [b"x"], timeout_s=5.0)
            d.submit("stop2", "open", MODEL, 0, 0, [b"x"], timeout_s=5.0)
            wait_until(lambda: proxy.stats().uplink.messages == 2, what="both requests in the link")
            t0 = time.monotonic()
            proxy.stop()
            assert time.monotonic() - t0 < 0.5
            assert not proxy.running
            assert proxy.stats().clients == 0
            with pytest.raises(BrokerUnavailable):
                c.ping(0.2)
    finally:
        proxy.stop()  # idempotent


def test_bind_failure_leaves_nothing_open(broker: Broker) -> None:
    with proxy_to(broker.endpoint) as proxy, pytest.raises(zmq.ZMQError):
        LinkProxy(proxy.endpoint, broker.endpoint)


# ------------------------------------------------------------------------ CLI
@pytest.fixture
def netem_process(broker: Broker) -> Iterator[tuple[subprocess.Popen, str]]:
    listen = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        cli_command("netem", "--listen", listen, "--upstream", broker.endpoint, "--rtt-ms", "30", "--seed", "5"),
        cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield proc, listen
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=CLI_EXIT_S)


@pytest.mark.integration
def test_cli_proxies_until_sigterm_and_logs_stats(netem_process: tuple[subprocess.Popen, str]) -> None:
    proc, listen = netem_process
    with client(listen) as c:
        c.ping(CLI_START_S)  # ZeroMQ reconnects until the proxy has bound
        assert c.ping(2.0) >= 0.025
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=CLI_EXIT_S)
    assert proc.returncode == 0, err[-2000:]
    assert "seed 5" in err and "uplink: 2 messages" in err and "downlink: 2 messages" in err


@pytest.mark.integration
def test_cli_rejects_bad_rates() -> None:
    out = subprocess.run(cli_command("netem", "--drop", "1.5"), cwd=ROOT, env=child_env(), capture_output=True,
                         text=True, timeout=CLI_START_S)  # fmt: skip
    assert out.returncode == 2 and "drop_rate" in out.stderr
