"""Workers join and leave at random while generations run through a real broker (a Hypothesis
state machine over real processes): every generation ends with output identical to local, or
with a typed error on one line; none hangs.

Bounded in ``make test`` (EDGECLOUD_CHURN_EXAMPLES, default 1 run of 5 steps); ``make fuzz``
runs more and longer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from functools import cache

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from cli.cluster import LocalCluster

EXAMPLES = int(os.environ.get("EDGECLOUD_CHURN_EXAMPLES", "1"))
STEPS = int(os.environ.get("EDGECLOUD_CHURN_STEPS", "5"))
TOKENS = 300  # a few seconds of decoding, so that faults land mid-generation
DEADLINE_S = 4  # per step, retries and failovers included
HANG_S = 120  # a generation still running after this hangs (its steps alone allow far less)
MAX_WORKERS = 5
PROMPTS = ("Describe a lighthouse at night.", "List three rivers and a sea.")
SIGNALS = {"term": signal.SIGTERM, "kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}

pytestmark = [pytest.mark.timeout(900), pytest.mark.integration]  # real processes


@cache
def expected(prompt: str) -> tuple[int, ...]:
    from edge_worker.generation import EdgeGenerator
    from partition.models import resolve_model
    from partition.segment import ModelSegment
    from partition.tokens import encode_prompt, eos_token_ids

    source = resolve_model("tiny-llama")
    tok = source.load_tokenizer()
    gen = EdgeGenerator(ModelSegment.load(source, 0, source.n_layers), None, tok, eos_token_ids(source, tok), "local")
    return tuple(gen.generate(encode_prompt(tok, prompt, raw=True), TOKENS).token_ids)


class WorkerChurn(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.edge: tuple[subprocess.Popen, str] | None = None
        self.cluster = LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3)
        try:
            self.cluster.start_broker()
            self.cluster.add_worker()
            self.cluster.add_worker()
            self.cluster.wait_for_workers(2, timeout_s=120)
        except BaseException:
            self.cluster.stop()
            raise

    @rule(prompt=st.sampled_from(PROMPTS), fallback=st.booleans())
    def start_generation(self, prompt: str, fallback: bool) -> None:
        self._finish()
        args = ["--split", "2", "--tokens", str(TOKENS), "--json", "--raw-prompt", "--prompt", prompt,
                "--timeout", "2", "--deadline", str(DEADLINE_S)]
        self.edge = (self.cluster.start_edge(*args, *([] if fallback else ["--no-fallback"])), prompt)

    @rule()
    def add_worker(self) -> None:
        if len(self.cluster.workers) < MAX_WORKERS:
            self.cluster.add_worker()

    @rule(index=st.integers(0, MAX_WORKERS - 1), how=st.sampled_from(sorted(SIGNALS)))
    def signal_worker(self, index: int, how: str) -> None:
        worker = self.cluster.workers[index % len(self.cluster.workers)]
        self.cluster.kill(worker, SIGNALS[how])

    @rule(pause_s=st.sampled_from([0.1, 0.5, 1.5]))
    def wait(self, pause_s: float) -> None:
        time.sleep(pause_s)

    @rule()
    def finish_generation(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if self.edge is None:
            return
        popen, prompt = self.edge
        self.edge = None
        try:
            out, err = popen.communicate(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.communicate()
            raise AssertionError(f"a generation hung for {HANG_S} s") from None
        if popen.returncode == 0:
            assert tuple(json.loads(out)["token_ids"]) == expected(prompt)
        else:
            assert popen.returncode == 1, err[-2000:]
            assert "Traceback" not in err and "error:" in err, err[-2000:]

    def teardown(self) -> None:
        try:
            self._finish()
        finally:
            self.cluster.stop()


WorkerChurn.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=list(HealthCheck),
)
test_generations_survive_workers_joining_and_leaving_at_random = WorkerChurn.TestCase
