"""Start-up of the edge and the worker, and a full collection's pause once they serve, with the
collector as Python leaves it next to ``cli.common.startup_heap`` (no collection while a role
imports and loads, its objects frozen afterwards).

Each run is a fresh process, as a user starts one, the two ways alternated:

- ``edge``: ``edgecloud edge --force-local --tokens 1``, wall seconds to its exit;
- ``worker``: ``edgecloud cloud-worker`` (no broker needed), wall seconds until its loading is done
  and it would start serving; there it times one ``gc.collect()`` (the pause a full collection
  makes for every session of a serving worker) and the full collections its start-up made, and
  exits.

"Python's collector" runs the same command with ``startup_heap`` replaced by a context that does
nothing, before ``cli.main`` imports it.

    .venv/bin/python bench/bench_startup.py [--reps 5] [--model smollm2-135m] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT  # noqa: E402

# The CLI in a fresh interpreter; with "off", startup_heap is a context that does nothing. The
# worker's serve() is replaced by a probe: one timed full collection, the start-up's own ones.
RUN = r"""
import contextlib, gc, json, sys, time
t0 = time.perf_counter()
if sys.argv[1] == "off":
    import cli.common
    cli.common.startup_heap = contextlib.nullcontext
full = []
def watch(phase, info, started=[0.0]):
    if phase == "start":
        started[0] = time.perf_counter()
    elif info["generation"] == 2:
        full.append((time.perf_counter() - started[0]) * 1e3)
gc.callbacks.append(watch)
def probe(self):
    start_up = list(full)
    t = time.perf_counter()
    gc.collect()
    print("PROBE " + json.dumps({"ready_s": time.perf_counter() - t0, "full_collection_ms": (time.perf_counter() - t) * 1e3,
                                 "start_up_full_collections": len(start_up), "start_up_full_ms": sum(start_up)}))
import importlib.abc, importlib.util
class PatchOnImport(importlib.abc.MetaPathFinder):  # the worker's module loads where the role loads it
    def find_spec(self, name, path, target=None):
        if name != "cloud_worker.worker":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module
        def exec_module(module):
            load(module)
            module.CloudWorker.serve = probe
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, PatchOnImport())
from cli.main import app
app(sys.argv[2:], standalone_mode=False)
"""


def run(mode: str, args: list[str]) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", RUN, mode, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} ({mode}) failed:\n{out.stderr[-2000:]}")
    probe = [line for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    return {"wall_s": wall, **(json.loads(probe[0].removeprefix("PROBE ")) if probe else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    edge = ["edge", "--model", args.model, "--force-local", "--tokens", "1", "--prompt", "Hello", "--json"]
    worker = ["cloud-worker", "--model", args.model, "--broker", "tcp://127.0.0.1:1", "--no-curve",
              "--no-encryption"]
    rows: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.reps):
        for mode in ("off", "on"):
            rows.setdefault(("edge", mode), []).append(run(mode, edge))
            rows.setdefault(("worker", mode), []).append(run(mode, worker))
    names = {"off": "Python's collector", "on": "startup_heap"}
    summary = []
    for (role, mode), runs in rows.items():
        med = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        summary.append({"role": role, "mode": mode, "runs": len(runs), **med,
                        "wall_s_all": [round(r["wall_s"], 2) for r in runs]})
    if args.json:
        for s in summary:
            print(json.dumps(s))
        return
    print(f"medians of {args.reps} fresh processes each, alternated ({args.model})")
    for s in summary:
        line = f"{s['role']:>6}  {names[s['mode']]:<18}  {s['wall_s']:6.2f} s to exit"
        if "ready_s" in s:
            line = (f"{s['role']:>6}  {names[s['mode']]:<18}  {s['ready_s']:6.2f} s to ready; start-up's full "
                    f"collections {s['start_up_full_collections']:.0f} ({s['start_up_full_ms']:.0f} ms); "
                    f"then one full collection {s['full_collection_ms']:.1f} ms")
        print(line + f"   (all: {s['wall_s_all']})")


if __name__ == "__main__":
    main()
