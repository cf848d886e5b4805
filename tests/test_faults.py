"""Faults injected into real processes mid-generation: the output must not change."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from cli.cluster import LocalCluster

PROMPT = "Describe a lighthouse at night."
TOKENS = "900"  # long enough (several seconds) to inject a fault mid-decode


def local_ids(cluster: LocalCluster) -> list[int]:
    out = cluster.edge("--force-local", "--tokens", TOKENS, "--raw-prompt", "--json", "--prompt", PROMPT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)["token_ids"]


def start_edge(cluster: LocalCluster, *args: str) -> subprocess.Popen:
    return cluster.start_edge("--split", "2", "--tokens", TOKENS, "--json", "--raw-prompt", "--prompt", PROMPT,
                              "--timeout", "2", *args)


def finish(edge: subprocess.Popen) -> dict:
    try:
        out, err = edge.communicate(timeout=120)
    finally:
        edge.kill()
    assert edge.returncode == 0, err[-3000:]
    return json.loads(out)


def test_a_stopped_worker_is_expired_and_its_session_replayed_elsewhere():
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.add_worker()
        cluster.wait_for_workers(2, timeout_s=60)
        expected = local_ids(cluster)
        edge = start_edge(cluster, "--no-fallback")
        victim = cluster.wait_for_decoding(edge)
        cluster.kill(cluster.worker_named(victim), signal.SIGSTOP)  # hangs
        result = finish(edge)
        assert result["token_ids"] == expected
        assert result["retries"] >= 1 and len(result["workers_used"]) == 2
        assert result["fallback_at_step"] is None


def test_a_restarted_broker_is_found_again_by_edge_and_worker():
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=60)
        expected = local_ids(cluster)
        edge = start_edge(cluster, "--no-fallback", "--deadline", "40")
        cluster.wait_for_decoding(edge)
        cluster.kill(cluster.broker)  # kill -9
        cluster.broker.popen.wait(10)
        cluster.start_broker()  # same address; the worker re-registers, the edge reopens and replays
        result = finish(edge)
        assert result["token_ids"] == expected
        assert result["retries"] >= 1
        assert result["fallback_at_step"] is None


def test_with_every_worker_gone_the_edge_finishes_locally():
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=60)
        expected = local_ids(cluster)
        edge = start_edge(cluster, "--deadline", "5")
        cluster.wait_for_decoding(edge)
        cluster.kill(cluster.workers[0])
        result = finish(edge)
        assert result["token_ids"] == expected
        assert result["fallback_at_step"] is not None and result["fallback_at_step"] > 0


def test_with_no_broker_coming_back_the_edge_fails_clearly_within_its_deadline():
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=60)
        edge = start_edge(cluster, "--no-fallback", "--deadline", "4")
        cluster.wait_for_decoding(edge)
        t0 = time.monotonic()
        cluster.kill(cluster.broker)
        out, err = edge.communicate(timeout=60)
        assert edge.returncode == 1
        assert "Traceback" not in err and "error:" in err
        assert time.monotonic() - t0 < 4 + 2 + 5  # the deadline, one request timeout, start-up slack
