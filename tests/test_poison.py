"""Poison requests: work that fails on every worker is tried on a bounded number, then refused."""

from __future__ import annotations

import re
import time

import pytest
from brokerutil import MODEL, client, counters, echo_workers, running_broker, wait_for_status, wait_until

from broker.errors import PoisonRequest, RequestTimeout, WorkerLost
from cli.cluster import LocalCluster

pytestmark = pytest.mark.timeout(120)
TASK = {"task": "gen-5"}


def test_a_task_that_kills_every_worker_it_reaches_is_refused_after_max_attempts():
    with (running_broker(max_attempts=2) as b, echo_workers(b.endpoint, "w1", "w2", "w3") as ws,
          client(b.endpoint) as c):
        by_id = {w.worker_id: w for w in ws}
        for i, expected in enumerate([WorkerLost, PoisonRequest]):
            sid = f"s{i}"
            victim = by_id[c.request(sid, "open", MODEL, 2, 0).worker_id]
            victim.gate.clear()  # it takes the step and "crashes" holding it
            rid = c.submit(sid, "step", MODEL, 2, 5, extra=TASK, timeout_s=10)
            wait_until(lambda v=victim: any(j.kind == "step" for j in v.jobs), what="the step to arrive")
            victim.close(graceful=False)
            with pytest.raises(expected) as info:
                c.result(rid)
        assert not info.value.retryable and "2 workers" in str(info.value)
        # From now on the task is refused at the door, never dispatched; other work still runs.
        survivor = by_id[c.request("s9", "open", MODEL, 2, 0).worker_id]
        seen = len(survivor.jobs)
        with pytest.raises(PoisonRequest, match="--max-attempts 2"):
            c.request("s9", "step", MODEL, 2, 5, extra=TASK)
        assert len(survivor.jobs) == seen
        assert c.request("s9", "step", MODEL, 2, 6, extra={"task": "gen-6"}).worker_id == survivor.worker_id
        n = counters(c)
        assert (n["poison_requests"], n["poison_refused"]) == (1, 1)


def test_timeouts_on_one_slow_worker_never_make_a_task_poison():
    with running_broker(max_attempts=2) as b, echo_workers(b.endpoint, "w1") as (w1,), client(b.endpoint) as c:
        c.request("s", "open", MODEL, 2, 0)
        w1.gate.clear()
        for _ in range(3):  # the edge retrying a step on its (slow) worker
            with pytest.raises(RequestTimeout):
                c.request("s", "step", MODEL, 2, 5, extra=TASK, timeout_s=0.2)
        w1.gate.set()
        assert c.request("s", "step", MODEL, 2, 5, extra=TASK).worker_id == "w1"
        assert "poison_requests" not in counters(c)


@pytest.mark.integration
def test_a_step_that_crashes_every_worker_ends_the_generation_with_a_clear_error_and_spares_the_pool():
    """Real processes: every worker SIGKILLs itself on step 5 (as a kernel bug at some shape
    would); the broker lets it take down 2 of 3 workers, then the edge stops with PoisonRequest,
    local fallback or not (running it here could crash the edge too)."""
    crash = {"EDGECLOUD_FAULT_INJECTION": "kill@before:5"}
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker("--max-attempts", "2")
        for _ in range(3):
            cluster.add_worker(env=crash)
        cluster.wait_for_workers(3, timeout_s=90)
        out = cluster.edge("--split", "2", "--tokens", "12", "--json", "--timeout", "3", timeout_s=90)
        assert out.returncode == 1, out.stdout[-500:] + out.stderr[-2000:]
        assert "Traceback" not in out.stderr
        assert "error:" in out.stderr and "failed on 2 workers" in out.stderr, out.stderr[-1500:]
        assert sum(not w.alive() for w in cluster.workers) == 2
        wait_for_status(cluster, lambda st: len(st["workers"]) == 1 and st["counters"].get("poison_requests") == 1,
                        "the survivor registered and one poison request counted")


@pytest.mark.integration
def test_a_request_that_raises_in_the_worker_is_a_typed_error_and_the_worker_carries_on():
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        cluster.add_worker(env={"EDGECLOUD_FAULT_INJECTION": "raise@before:3"})
        cluster.wait_for_workers(1, timeout_s=60)
        out = cluster.edge("--split", "2", "--tokens", "8", "--no-fallback", timeout_s=90)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        # The first step numbered 3 or later (a step verifying drafts skips numbers).
        fault = re.search(r"error: RuntimeError: injected fault at step (\d+)", out.stderr)
        assert fault and int(fault.group(1)) >= 3, out.stderr[-1500:]
        assert cluster.workers[0].alive()
        # It answered the failure and is still registered: it did not crash or wedge.
        wait_for_status(cluster, lambda st: len(st["workers"]) == 1 and st["counters"].get("worker_errors") == 1,
                        "the worker registered after one error")


@pytest.mark.integration
def test_a_step_that_hangs_every_worker_is_moved_twice_then_refused_within_the_deadline():
    """The workers keep beating (only their compute hangs), so only timeouts reveal the hang: the
    edge moves the session after two, and the broker refuses the step after two workers."""
    hang = {"EDGECLOUD_FAULT_INJECTION": "hang@before:5"}
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker("--max-attempts", "2")
        for _ in range(3):
            cluster.add_worker(env=hang)
        cluster.wait_for_workers(3, timeout_s=90)
        t0 = time.monotonic()
        out = cluster.edge("--split", "2", "--tokens", "12", "--timeout", "1", "--deadline", "30", "--no-fallback",
                           timeout_s=90)
        elapsed = time.monotonic() - t0
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "failed on 2 workers" in out.stderr, out.stderr[-1500:]
        assert elapsed < 30, elapsed  # well within the step deadline: two workers x two 1 s timeouts
        hung = [w for w in cluster.workers if "fault injection: hang" in w.log_tail(20_000)]
        assert len(hung) == 2 and all(w.alive() for w in cluster.workers)
