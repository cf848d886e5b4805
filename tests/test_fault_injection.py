"""EDGECLOUD_FAULT_INJECTION specs: what the fault tests rely on, and clear errors for typos."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError
from cloud_worker.faults import FaultInjector, FaultSpec


def test_specs_parse_with_and_without_a_once_file():
    assert FaultSpec.parse("kill@before:0") == FaultSpec("kill", "before", 0, None)
    assert FaultSpec.parse("stop@after:12:/tmp/x/fired") == FaultSpec("stop", "after", 12, "/tmp/x/fired")


@pytest.mark.parametrize("bad", ["kill", "explode@before:1", "kill@during:1", "kill@before:x", "raise@after:2",
                                 "hang@after:2", "kill@before:-1"])
def test_a_malformed_spec_is_a_config_error_naming_the_format(bad):
    with pytest.raises(ConfigError, match="ACTION@WHEN:STEP"):
        FaultSpec.parse(bad)


def test_unset_means_no_faults(monkeypatch):
    monkeypatch.delenv("EDGECLOUD_FAULT_INJECTION", raising=False)
    assert FaultInjector.from_env().spec is None
