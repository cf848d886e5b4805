"""Where a hybrid decode step's transport time goes, hop by hop, in a real generation.

Starts a broker and a worker as processes (as ``edgecloud demo`` does) and runs the edge CLI once.
Every process imports a ``sitecustomize`` (from a temporary directory put on PYTHONPATH) that wraps
``broker.sockets.recv_message`` and ``send_frames`` to note the monotonic time (one clock for all
processes on a machine) of every message received and of the start and end of every send. The
edge's step frames are then followed through the broker to the worker and back:

    edge send call | edge -> broker | broker: Python, send call | broker -> worker | worker compute
    | worker -> broker (its send call shown apart) | broker: Python, send call | broker -> edge

"Python" is the broker's own work on a message (decode, checks, routing, encode) from the return of
``recv_message`` to the start of its send. Compare it with the same work back to back:
``bench/bench_broker.py`` (a few tens of microseconds per message).

    .venv/bin/python bench/bench_hops.py [--model smollm2-135m] [--split 15] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROMPTS  # noqa: E402

from cli.cluster import LocalCluster  # noqa: E402

ENV = "EDGECLOUD_BENCH_HOPS"
STEP_MIN_BYTES = 1000  # a step frame of SmolLM2 at fp16 is ~1.2 kB; control messages are smaller
WORKER_SEND = "  its send call"  # within "worker -> broker"

# Runs at start-up in every child process (sitecustomize), only when ENV names an output folder.
_SITECUSTOMIZE = f'''
import atexit, os, signal, time
_out = os.environ.get("{ENV}")
if _out:
    import broker.sockets as _s
    _rec = []
    _recv, _send = _s.recv_message, _s.send_frames

    def recv_message(sock, lead):
        parts = _recv(sock, lead)
        if parts is not None:
            _rec.append((time.monotonic(), "recv", sum(len(p) for p in parts)))
        return parts

    def send_frames(sock, frames):
        _rec.append((time.monotonic(), "send0", 0))
        _send(sock, frames)
        _rec.append((time.monotonic(), "send", sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)))

    _s.recv_message, _s.send_frames = recv_message, send_frames
    import broker.broker, broker.client_api, broker.worker_api
    for _m in (broker.broker, broker.client_api, broker.worker_api):
        for _name, _fn in (("recv_message", recv_message), ("send_frames", send_frames)):
            if hasattr(_m, _name):
                setattr(_m, _name, _fn)
    _role = open("/proc/self/cmdline", "rb").read().split(b"\\0")[3].decode()

    def _dump(*_):
        with open(os.path.join(_out, f"{{_role}}-{{os.getpid()}}.txt"), "w") as f:
            f.writelines(f"{{t:.6f}} {{k}} {{n}}\\n" for t, k, n in _rec)

    atexit.register(_dump)
    signal.signal(signal.SIGTERM, lambda *_: (_dump(), os._exit(0)))
'''


def _load(path: Path) -> list[tuple[float, str, int]]:
    return [(float(t), k, int(n)) for t, k, n in (line.split() for line in path.read_text().splitlines())]


def _after(events: list[tuple[float, str, int]], t: float, kind: str, min_bytes: int = 0) -> float | None:
    for when, k, n in events:
        if when > t and k == kind and n >= min_bytes:
            return when
    return None


def hops(edge, brk, worker, step_bytes: int = STEP_MIN_BYTES) -> dict[str, list[float]]:
    """Per decode step, the time of each hop (seconds), following each step frame the edge sent."""
    out: dict[str, list[float]] = {k: [] for k in (
        "edge send call", "edge -> broker", "broker Python (request)", "broker send call (request)",
        "broker -> worker", "worker compute and reply", "worker -> broker", "broker Python (reply)",
        "broker send call (reply)", "broker -> edge")}  # fmt: skip
    chain = list(out)
    out[WORKER_SEND] = []
    sends = [t for t, k, n in edge if k == "send" and n >= step_bytes]
    for t in sends[3:]:  # skip the first steps (prefill, warm-up)
        t0 = max(x for x, k, _ in edge if k == "send0" and x <= t)
        b1 = _after(brk, t, "recv", step_bytes)
        b1s = b1 and _after(brk, b1, "send0")
        b1e = b1s and _after(brk, b1s, "send")
        w1 = b1e and _after(worker, b1e, "recv", step_bytes)
        w2 = w1 and _after(worker, w1, "send0")
        b2 = w2 and _after(brk, w2, "recv")
        b2s = b2 and _after(brk, b2, "send0")
        b2e = b2s and _after(brk, b2s, "send")
        e1 = b2e and _after(edge, b2e, "recv")
        if not e1:
            continue
        points = [t0, t, b1, b1s, b1e, w1, w2, b2, b2s, b2e, e1]
        for key, a, b in zip(chain, points[:-1], points[1:], strict=True):
            out[key].append(b - a)
        # The worker's send call, within "worker -> broker": the broker may receive the reply
        # before the call returns, so it is not a hop of its own.
        w2e = _after(worker, w2, "send")
        if w2e:
            out[WORKER_SEND].append(w2e - w2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--step-bytes", type=int, default=STEP_MIN_BYTES,
                    help="smallest message counted as a step frame (tiny-llama's are ~300 bytes)")
    ap.add_argument("--edge-args", nargs=argparse.REMAINDER, default=[],
                    help="the rest goes to the edge CLI as is, e.g. --edge-args --mini none")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hops-") as tmp:
        site, out = Path(tmp, "site"), Path(tmp, "out")
        site.mkdir()
        out.mkdir()
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        os.environ["PYTHONPATH"] = str(site) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
        os.environ[ENV] = str(out)
        with LocalCluster(model=args.model) as cluster:
            cluster.start_broker()
            cluster.add_worker()
            cluster.wait_for_workers(1)
            run = cluster.edge("--split", str(args.split), "--tokens", str(args.tokens), "--json",
                               "--prompt", PROMPTS[0], *args.edge_args)  # fmt: skip
            if run.returncode != 0:
                raise SystemExit(f"edge failed:\n{run.stderr[-2000:]}")
        by_role = {p.name.split("-")[0]: _load(p) for p in out.iterdir()}
    steps = hops(by_role["edge"], by_role["broker"], by_role["cloud"], args.step_bytes)
    med = {k: statistics.median(v) * 1e6 for k, v in steps.items() if v}
    n = len(next(iter(steps.values())))
    total = sum(v for k, v in med.items() if k not in ("worker compute and reply", WORKER_SEND))
    result = {"model": args.model, "split": args.split, "steps": n, "ms_per_token": json.loads(run.stdout)["ms_per_token"],
              "median_us": med, "transport_us_sum_of_medians": total}  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}, split {args.split}, {n} decode steps followed (medians; encryption on)")
    for k, v in med.items():
        print(f"  {k:28} {v:9.0f} us")
    print(f"  {'all but the worker':28} {total:9.0f} us")


if __name__ == "__main__":
    main()
