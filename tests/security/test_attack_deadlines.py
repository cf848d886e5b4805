"""Deadlines kept when the cloud goes away mid-generation (issue 16's finding 7: `--deadline 20`
ended 24.2 s after the broker died, and with a fallback the edge sat out the whole 60 s step
deadline before it went local). Real processes on loopback: a broker, a tiny-llama worker, edges.

Every failure ends within ``--deadline`` plus one second; with a fallback, the edge goes local
as soon as the cloud is known gone (the broker closed the connection or refuses connections, no
worker serves the model), not after the deadline.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from broker.wire.crypto import load_api_keys
from cli.cluster import LocalCluster
from edge_worker.config import EdgeConfig
from edge_worker.engine import EdgeEngine

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DEADLINE_S = 4.0
# The spec: the failure is reported within --deadline plus one second. The process then exits
# after its interpreter's teardown (torch's thread pools and all; about a second here).
REPORTED_WITHIN_S = DEADLINE_S + 1.0
EXITED_WITHIN_S = REPORTED_WITHIN_S + 3.0
PROMPT = [5, 6, 7, 8]


def _cluster() -> LocalCluster:
    cluster = LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3)
    cluster.start_broker()
    cluster.add_worker()
    cluster.wait_for_workers(1, timeout_s=60)
    return cluster


def _no_fallback_edge(cluster: LocalCluster):
    return cluster.start_edge("--split", "1", "--tokens", "900", "--json", "--raw-prompt", "--prompt", "Go on.",
                              "--no-fallback", "--deadline", str(DEADLINE_S))


def _failed_within(edge, t0: float) -> tuple[float, float]:
    """Seconds from ``t0`` until the edge printed its error, and until it exited."""
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in edge.stderr:
            lines.append((time.monotonic() - t0, line))

    reader = threading.Thread(target=read)
    reader.start()
    edge.wait(timeout=60)
    exited = time.monotonic() - t0
    reader.join(timeout=10)
    err = "".join(line for _, line in lines)
    assert edge.returncode == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    reported = next((t for t, line in lines if line.startswith("error:")), None)
    assert reported is not None, err[-2000:]
    return reported, exited


@pytest.mark.parametrize("fault", ["broker killed", "worker frozen"])
def test_without_a_fallback_the_edge_fails_within_its_deadline(fault):
    with _cluster() as cluster:
        edge = _no_fallback_edge(cluster)
        cluster.wait_for_decoding(edge)
        t0 = time.monotonic()
        if fault == "broker killed":
            cluster.kill(cluster.broker)  # kill -9: the broker's connections close
        else:
            cluster.kill(cluster.workers[0], signal.SIGSTOP)  # it still holds its connection
        try:
            reported, exited = _failed_within(edge, t0)
        finally:
            cluster.kill(cluster.workers[0], signal.SIGCONT)
    assert reported < REPORTED_WITHIN_S and exited < EXITED_WITHIN_S, (reported, exited)


def test_with_a_fallback_the_edge_goes_local_as_soon_as_the_broker_is_gone():
    with _cluster() as cluster:
        key = sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]
        # The default 60 s step deadline: going local must not wait for it.
        settings = EdgeConfig(model="tiny-llama", split=1, broker=cluster.endpoint, keys_dir=cluster.keys_dir,
                              api_key=key, max_new_tokens=300, dynamic=False)
        stamps: list[float] = []
        killed: list[float] = []
        decoding = threading.Event()

        def on_text(_: str) -> None:
            stamps.append(time.monotonic())
            if len(stamps) >= 40:
                decoding.set()

        def kill_when_decoding() -> None:
            if decoding.wait(120):
                killed.append(time.monotonic())
                cluster.kill(cluster.broker)

        with EdgeEngine("tiny-llama", settings) as engine:
            params = engine.params(ignore_eos=True)
            killer = threading.Thread(target=kill_when_decoding)
            killer.start()
            result = engine.generate(PROMPT, params, on_text=on_text)
            killer.join()
        with EdgeEngine("tiny-llama", EdgeConfig(model="tiny-llama", force_local=True)) as local:
            alone = local.generate(PROMPT, local.params(max_new_tokens=300, ignore_eos=True))
    assert result.fallback_at_step is not None and result.token_ids == alone.token_ids
    stall = max(b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True) if b >= killed[0])
    assert stall < 2.0, stall  # it was the whole 60 s step deadline


def test_with_no_broker_listening_the_cli_fails_by_its_deadline_or_goes_local_at_step_0():
    with LocalCluster(model="tiny-llama") as cluster:  # nothing started: nothing listens
        out = cluster.edge("--split", "1", "--tokens", "4", "--json", "--raw-prompt", "--prompt", "Hi",
                           "--no-fallback", "--deadline", str(DEADLINE_S))
        assert out.returncode == 1 and "nothing accepts connections" in out.stderr, out.stderr[-2000:]
        fell_back = cluster.edge("--split", "1", "--tokens", "4", "--json", "--raw-prompt", "--prompt", "Hi")
    assert fell_back.returncode == 0, fell_back.stderr[-2000:]
    result = json.loads(fell_back.stdout)
    assert result["fallback_at_step"] == 0
    # From the generation's start, not the process's: far from the 60 s step deadline it used to wait.
    assert result["total_ms"] < 30_000, result["total_ms"]
