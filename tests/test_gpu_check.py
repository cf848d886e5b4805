"""``bench/gpu_check.sh``, the check a lent GPU machine runs (issue 17), run here on the CPU with the
same steps in small (``GPU_CHECK_DEVICE=cpu GPU_CHECK_ARGS=--quick``): the script and
``bench/bench_gpu.py`` work the day a GPU is lent, and their checks hold on this CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli.cluster import ROOT, child_env


@pytest.mark.integration
def test_the_gpu_check_runs_its_steps_on_a_cpu(tmp_path):
    env = child_env({"PYTHON": sys.executable, "OUT": str(tmp_path), "GPU_CHECK_DEVICE": "cpu",
                     "GPU_CHECK_ARGS": "--quick"})
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    smol = json.loads((tmp_path / "gpu_smollm2.json").read_text())
    one_b = json.loads((tmp_path / "gpu_1b.json").read_text())
    for report in (smol, one_b):
        assert report["all_checks_pass"] is True
        for model in report["models"]:
            assert [r["batch"] for r in model["rows"]] == [1, 2, 4]
            assert all(r["ms_per_step"] > 0 and r["logits_equal_alone"] for r in model["rows"])
            # The graph pieces, uncaptured on a CPU: every one-token step of every batch ran as them.
            assert all(r["graphs_ms_per_step"] > 0 and r["graphs_equal_alone"] for r in model["rows"])
            assert model["graphs_error"] is None and model["graphs_passes"] == 3 * 3
            assert model["split_equals_whole"]
    assert [m["dtype"] for m in smol["models"]] == ["bfloat16", "float16"]
    assert smol["cluster"] == {"device": "cpu", "dtype": "bfloat16", "worker_equals_in_process": True,
                               "batched_equals_in_process": True}
