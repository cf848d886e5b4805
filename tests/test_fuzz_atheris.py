"""A bounded run of the atheris fuzzer (tests/fuzz_atheris.py) where atheris is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris has no wheel here; `make fuzz` says so and runs Hypothesis only")


pytestmark = pytest.mark.integration  # every test here starts real processes


def test_fuzz_atheris_finds_no_crash_in_the_network_decoders():
    script = Path(__file__).with_name("fuzz_atheris.py")
    out = subprocess.run([sys.executable, str(script), "-atheris_runs=3000", "-seed=1", "-max_len=4096"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done 3000" in out.stderr
