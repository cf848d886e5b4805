"""Fault injection for the fault tests: a worker that crashes, hangs or raises at a chosen step.

Off unless the worker process starts with ``EDGECLOUD_FAULT_INJECTION`` set (read once, at start):

    ACTION@WHEN:STEP[:ONCE_FILE]

* ACTION: ``kill`` (the worker SIGKILLs itself: a crash), ``stop`` (SIGSTOPs itself: a hang that a
  later SIGCONT ends), ``hang`` (only the compute thread stops, for an hour: heartbeats go on, as
  when a kernel deadlocks without the GIL) or ``raise`` (a RuntimeError inside the request: the
  worker must survive it);
* WHEN: ``before`` computing the step (the request is in flight; step 0 is the prefill) or
  ``after`` its reply was sent (the fault lands between two steps);
* STEP: the first step numbered STEP or later (the edge numbers a step by the tokens before it,
  so a step that verifies drafts skips numbers), or ``open`` for a session's opener. A replay
  after a failover carries the same number, so without ONCE_FILE the fault follows the request
  to every worker: a poison request;
* ONCE_FILE: fire only in the first worker that creates this file (``O_EXCL``): a one-off fault
  somewhere in a cluster, whichever worker the session landed on.

Why this lives in the worker and not in a test double: the tests need the real process to die or
hang at an exact point of the protocol (during the prefill, right after a reply), which signals
sent from outside can only hit by chance.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

from broker.errors import ConfigError
from broker.wire.session_protocol import KIND_OPEN, KIND_STEP
from broker.worker_api import Job

log = logging.getLogger(__name__)

ENV = "EDGECLOUD_FAULT_INJECTION"
ACTIONS = ("kill", "stop", "hang", "raise")
HANG_S = 3600.0
WHENS = ("before", "after")
# After a reply is handed to ZeroMQ its I/O thread still has to write it: wait this long before
# dying, so that the reply reaches the broker and the fault lands *after* it.
AFTER_REPLY_FLUSH_S = 0.1


@dataclass(frozen=True)
class FaultSpec:
    action: str
    when: str
    step: int
    once_file: str | None = None
    kind: str = KIND_STEP  # the request kind it fires on: a step (numbered ``step``) or an opener

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse ``ACTION@WHEN:STEP[:ONCE_FILE]``; ConfigError says what is wrong."""
        head, _, rest = text.partition("@")
        when, _, rest = rest.partition(":")
        step, _, once = rest.partition(":")
        if head not in ACTIONS or when not in WHENS or not (step.isdigit() or step == KIND_OPEN):
            raise ConfigError(f"{ENV}={text!r}: expected ACTION@WHEN:STEP[:ONCE_FILE] with ACTION one of "
                              f"{ACTIONS}, WHEN one of {WHENS} and STEP a step number or {KIND_OPEN!r}, "
                              "e.g. kill@before:0")
        if head in ("raise", "hang") and when == "after":
            raise ConfigError(f"{ENV}={text!r}: {head} only works before a step (ACTION@WHEN:STEP with WHEN "
                              "before): after it, nothing is waiting for the request")
        if step == KIND_OPEN:
            return cls(head, when, 0, once or None, KIND_OPEN)
        return cls(head, when, int(step), once or None)


class FaultInjector:
    """Fires a FaultSpec at most once per process."""

    def __init__(self, spec: FaultSpec | None) -> None:
        self.spec = spec
        self.fired = False

    @classmethod
    def from_env(cls) -> FaultInjector:
        text = os.environ.get(ENV, "").strip()
        return cls(FaultSpec.parse(text) if text else None)

    def before(self, job: Job) -> None:
        self._maybe_fire(job, "before")

    def after(self, job: Job) -> None:
        self._maybe_fire(job, "after")

    def _maybe_fire(self, job: Job, when: str) -> None:
        spec = self.spec
        if (spec is None or self.fired or spec.when != when or job.kind != spec.kind
                or (job.kind == KIND_STEP and job.step < spec.step)):
            return
        if spec.once_file is not None:
            try:
                os.close(os.open(spec.once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                self.fired = True
                return  # another worker (or an earlier request here) took the fault
        self.fired = True
        log.warning("fault injection: %s %s %s %d of session %s", spec.action, when, job.kind, job.step,
                    job.session_id[:8])
        if spec.action == "raise":
            raise RuntimeError(f"injected fault at step {job.step}")
        if spec.action == "hang":
            time.sleep(HANG_S)
            return
        if when == "after":
            time.sleep(AFTER_REPLY_FLUSH_S)
        os.kill(os.getpid(), signal.SIGKILL if spec.action == "kill" else signal.SIGSTOP)
