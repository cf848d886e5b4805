"""The collector during a role's start-up: off while it imports and loads, on and with the start-up's
objects frozen once it serves (``cli.common.startup_heap``)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

from cli.cluster import ROOT, child_env
from cli.common import startup_heap


@pytest.fixture()
def collector():
    """The collector as a test found it, given back afterwards (frozen objects included)."""
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_no_collection_inside_and_what_was_built_is_frozen_after(collector):
    gc.enable()
    gc.unfreeze()
    collections = gc.get_stats()[0]["collections"]
    with startup_heap():
        assert not gc.isenabled()
        built = [[i] for i in range(50_000)]  # far past the youngest generation's threshold
        assert gc.get_stats()[0]["collections"] == collections
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(built)
    gc.collect()
    assert gc.get_freeze_count() >= len(built)  # a full collection leaves them where they are


def test_an_error_inside_gives_the_collector_back(collector):
    gc.enable()
    with pytest.raises(RuntimeError, match="model missing"), startup_heap():
        raise RuntimeError("model missing")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(collector):
    gc.disable()
    with startup_heap():
        pass
    assert not gc.isenabled()


# Each long-running role, run as a user runs it, with the call it would then block in (serving)
# replaced by one that reports the collector's state and returns.
PROBE = r"""
import gc, importlib, json, sys
module, attr, args = sys.argv[1], sys.argv[2], sys.argv[3:]
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
setattr(owner, name, lambda *a, **k: print("PROBE " + json.dumps([gc.isenabled(), gc.get_freeze_count()])))
from cli.main import app
app(args, standalone_mode=False)
"""


@pytest.mark.integration
@pytest.mark.parametrize("module, attr, args", [
    ("cloud_worker.worker", "CloudWorker.serve",
     ["cloud-worker", "--model", "tiny-llama", "--broker", "tcp://127.0.0.1:1", "--no-curve", "--no-encryption"]),
    ("broker.broker", "Broker.serve_forever", ["broker", "--endpoint", "tcp://127.0.0.1:*", "--no-auth", "--no-curve"]),
    ("uvicorn", "run", ["serve", "--model", "tiny-llama", "--force-local", "--port", "1"]),
    ("edge_worker.engine", "EdgeEngine.__enter__", ["edge", "--model", "tiny-llama", "--force-local", "--tokens", "4"]),
], ids=["cloud-worker", "broker", "serve", "edge"])
def test_each_role_serves_with_the_collector_on_and_its_start_up_frozen(tiny_llama, module, attr, args):
    out = subprocess.run([sys.executable, "-c", PROBE, module, attr, *args], capture_output=True, text=True,
                         env=child_env(), cwd=ROOT, timeout=300)
    probes = [line for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    assert out.returncode == 0 and probes, out.stdout[-2000:] + out.stderr[-2000:]
    enabled, frozen = json.loads(probes[0].removeprefix("PROBE "))
    assert enabled
    assert frozen > 10_000  # the imports and the model, not a handful
