"""EDGECLOUD_FAULT_INJECTION specs: what the fault tests rely on, and clear errors for typos."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError
from cloud_worker.faults import FaultInjector, FaultSpec


def test_specs_parse_with_and_without_a_once_file():
    assert FaultSpec.parse("kill@before:0") == FaultSpec("kill", "before", 0, None)
    assert FaultSpec.parse("stop@after:12:/tmp/x/fired") == FaultSpec("stop", "after", 12, "/tmp/x/fired")
    assert FaultSpec.parse("stop@before:open:/tmp/f") == FaultSpec("stop", "before", 0, "/tmp/f", "open")


@pytest.mark.parametrize("bad", ["kill", "explode@before:1", "kill@during:1", "kill@before:x", "raise@after:2",
                                 "hang@after:2", "kill@before:-1", "kill@before:opener"])
def test_a_malformed_spec_is_a_config_error_naming_the_format(bad):
    with pytest.raises(ConfigError, match="ACTION@WHEN:STEP"):
        FaultSpec.parse(bad)


def test_unset_means_no_faults(monkeypatch):
    monkeypatch.delenv("EDGECLOUD_FAULT_INJECTION", raising=False)
    assert FaultInjector.from_env().spec is None


def job(kind: str, step: int):
    import time

    from broker.worker_api import Job

    return Job(request_id="r", session_id="s", model_id="m", step=step, attempt=1, kind=kind, layer_lo=1,
               deadline_ms=1000, extra={}, frames=[], received_at=time.monotonic())


def test_a_fault_fires_once_at_the_first_step_numbered_step_or_later():
    """A step that verifies drafts covers several positions, so the edge's step numbers skip: the
    fault must still fire mid-decode rather than wait for a number that never comes."""
    injector = FaultInjector(FaultSpec.parse("raise@before:10"))
    injector.before(job("step", 9))
    injector.after(job("step", 12))
    with pytest.raises(RuntimeError, match="injected fault at step 12"):
        injector.before(job("step", 12))
    injector.before(job("step", 13))  # once per process
    injector.before(job("step", 12))


def test_an_opener_fault_fires_on_the_opener_only():
    injector = FaultInjector(FaultSpec.parse("raise@before:open"))
    injector.before(job("step", 0))  # the prefill is step 0, not the opener
    injector.after(job("open", 0))
    with pytest.raises(RuntimeError, match="injected fault"):
        injector.before(job("open", 0))
