"""Faults injected into real processes mid-generation: the output must not change."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from cli.cluster import ClusterError, LocalCluster

pytestmark = pytest.mark.integration  # every test here starts real processes


PROMPT = "Describe a lighthouse at night."
TOKENS = "900"  # long enough (several seconds) to inject a fault mid-decode


def local_ids(cluster: LocalCluster) -> list[int]:
    out = cluster.edge("--force-local", "--tokens", TOKENS, "--raw-prompt", "--json", "--prompt", PROMPT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)["token_ids"]


def start_edge(cluster: LocalCluster, *args: str) -> subprocess.Popen:
    return cluster.start_edge("--split", "2", "--tokens", TOKENS, "--json", "--raw-prompt", "--prompt", PROMPT,
                              "--timeout", "2", *args)


def finish(edge: subprocess.Popen, cluster: LocalCluster) -> dict:
    try:
        out, err = edge.communicate(timeout=120)
    finally:
        edge.kill()
    assert edge.returncode == 0, f"{err[-3000:]}\n{cluster.log_tails()}"
    return json.loads(out)


# Where the session's worker fails, as EDGECLOUD_FAULT_INJECTION's WHEN:STEP (cloud_worker/faults.py):
# step 0 is the prefill, N the first step numbered N or later (drafts verified together skip numbers);
# "after" fires once the step's reply has left the worker.
FAULT_POINTS = {"prefill": "before:0", "mid-decode": "before:10", "after-a-reply": "after:4"}
SHORT_TOKENS = 24


@pytest.fixture(scope="module")
def expected_short(tiny_llama) -> list[int]:
    from edge_worker.generation import EdgeGenerator
    from partition.segment import ModelSegment
    from partition.tokens import encode_prompt, eos_token_ids

    tok = tiny_llama.load_tokenizer()
    gen = EdgeGenerator(ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers), None, tok,
                        eos_token_ids(tiny_llama, tok), "local")
    return gen.generate(encode_prompt(tok, PROMPT, raw=True), SHORT_TOKENS).token_ids


# kill -9 mid-decode is test_pipeline's test_generation_survives_kill_9_of_its_worker_with_identical_output.
@pytest.mark.parametrize(("action", "point"), [("kill", "prefill"), ("kill", "after-a-reply"), ("stop", "prefill"),
                                               ("stop", "mid-decode"), ("stop", "after-a-reply")])
def test_the_sessions_worker_dying_or_hanging_at_any_point_changes_no_token(tmp_path, expected_short, action, point):
    fired = tmp_path / "fired"  # the first worker to reach the point takes the fault, the other does not
    spec = {"EDGECLOUD_FAULT_INJECTION": f"{action}@{FAULT_POINTS[point]}:{fired}"}
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        cluster.add_worker(env=spec)
        cluster.add_worker(env=spec)
        cluster.wait_for_workers(2, timeout_s=60)
        out = cluster.edge("--split", "2", "--tokens", str(SHORT_TOKENS), "--json", "--raw-prompt", "--prompt",
                           PROMPT, "--timeout", "2", "--no-fallback", timeout_s=120)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout)
        assert fired.exists(), "the fault never fired"
        assert result["token_ids"] == expected_short
        victims = [w for w in cluster.workers if f"fault injection: {action}" in w.log_tail(20_000)]
        assert len(victims) == 1
        assert (not victims[0].alive()) if action == "kill" else victims[0].alive()
        # The victim answered steps before its fault, except when it failed during the prefill.
        survivor = next(w for w in cluster.workers if w is not victims[0])
        expected_workers = [survivor.name] if point == "prefill" else [victims[0].name, survivor.name]
        assert result["workers_used"] == expected_workers and result["retries"] >= 1


def test_an_opener_rerun_on_the_worker_that_hung_holding_it_is_answered_and_the_session_lives(tmp_path, expected_short):
    """The only worker hangs (SIGSTOP) with the session's opener: the broker declares it lost and
    queues the opener again under the same request id. The worker resumes, opens the session from
    its first copy (that reply is discarded) and registers again; the broker's rerun then reaches
    it, and it must answer as before, not refuse a second opener and kill the edge's session."""
    import signal

    fired = tmp_path / "fired"
    spec = {"EDGECLOUD_FAULT_INJECTION": f"stop@before:open:{fired}"}
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        worker = cluster.add_worker(env=spec)
        cluster.wait_for_workers(1, timeout_s=60)
        edge = cluster.start_edge("--split", "2", "--tokens", str(SHORT_TOKENS), "--json", "--raw-prompt",
                                  "--prompt", PROMPT, "--timeout", "20", "--no-fallback")
        cluster.wait_for(lambda st: st["counters"].get("workers_expired", 0) >= 1, "the worker was declared lost",
                         edge, timeout_s=60)
        assert fired.exists()
        cluster.kill(worker, signal.SIGCONT)
        result = finish(edge, cluster)
        assert result["token_ids"] == expected_short
        assert result["workers_used"] == [worker.name]
        assert "its opener came again" in worker.log_tail(20_000), cluster.log_tails()


def test_the_only_worker_back_from_a_hang_frees_the_lost_session_and_serves_its_reopening(tmp_path, expected_short):
    """The only worker hangs (SIGSTOP) mid-decode and is declared lost; the edge reopens. Back
    from its hang it still holds the lost session, and with room for one session it can serve the
    reopened one only because the broker tells it to free the lost one when it registers again."""
    import signal

    fired = tmp_path / "fired"
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        worker = cluster.add_worker(extra_args=("--max-sessions", "1"),
                                    env={"EDGECLOUD_FAULT_INJECTION": f"stop@before:10:{fired}"})
        cluster.wait_for_workers(1, timeout_s=60)
        edge = cluster.start_edge("--split", "2", "--tokens", str(SHORT_TOKENS), "--json", "--raw-prompt",
                                  "--prompt", PROMPT, "--timeout", "2", "--no-fallback", "--deadline", "60")
        cluster.wait_for(lambda st: st["counters"].get("workers_expired", 0) >= 1, "the worker was declared lost",
                         edge, timeout_s=60)
        cluster.kill(worker, signal.SIGCONT)
        result = finish(edge, cluster)
        assert result["token_ids"] == expected_short
        assert result["workers_used"] == [worker.name] and result["retries"] >= 1
        assert cluster.status()["counters"].get("orphans_dropped", 0) >= 1


def test_a_restarted_broker_is_found_again_by_edge_and_worker():
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        # One session at most: the edge's reopened session finds room only if the worker freed
        # the one the first broker placed (it would hold it, idle, for minutes).
        cluster.add_worker(extra_args=("--max-sessions", "1"))
        cluster.wait_for_workers(1, timeout_s=60)
        expected = local_ids(cluster)
        edge = start_edge(cluster, "--no-fallback", "--deadline", "40")
        cluster.wait_for_decoding(edge)
        cluster.kill(cluster.broker)  # kill -9
        cluster.broker.popen.wait(10)
        cluster.start_broker()  # same address; the worker re-registers, the edge reopens and replays
        try:  # fails with every log if the broker or the worker does not come back
            cluster.wait_for_workers(1, timeout_s=40)
        except ClusterError:
            edge.kill()
            raise
        result = finish(edge, cluster)
        assert result["token_ids"] == expected
        assert result["retries"] >= 1
        assert result["fallback_at_step"] is None
        # The session the first broker placed is freed on the worker when the second one beats,
        # not kept until it idles out (the edge's close never reaches it: that broker is gone).
        log = cluster.workers[0].log_tail(50_000)
        assert "the broker was restarted" in log and "freed 1 sessions opened through the broker" in log, log


def test_with_every_worker_gone_the_edge_finishes_locally():
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=60)
        expected = local_ids(cluster)
        edge = start_edge(cluster, "--deadline", "5")
        cluster.wait_for_decoding(edge)
        cluster.kill(cluster.workers[0])
        result = finish(edge, cluster)
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
        elapsed = time.monotonic() - t0
        assert elapsed < 4 + 2 + 5, (elapsed, err[-2000:])  # the deadline, one request timeout, slack
