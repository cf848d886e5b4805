"""What a split costs at 0 ms before any of our transport: the floor under the 1.05x goal.

Issue 17 asks for hybrid at split 15 within 1.05x of local-only per token at no added delay.
``bench_pipeline.py`` measures the real thing (edge, broker and worker processes, encryption);
this bench measures what any design of two processes on this host would pay, side by side in
one run, greedy, the same prompts and the same tokens in every mode:

- ``local``: every layer and the head in this process (a ``ModelSegment`` loop, nothing else);
- ``split in process``: layers ``[0, k)`` then ``[k, N)`` and the head, both in this process:
  what splitting itself costs (two segments, two caches);
- ``split over a bare pipe``: layers ``[k, N)`` and the head in a second process, reached by a
  ZeroMQ PAIR socket over TCP loopback carrying the raw float32 activations and the token back
  (no broker, no encryption, no msgpack, no sessions): the least two processes can cost;
- ``local (edge CLI)`` and ``hybrid (edge CLI)``: ``edgecloud edge`` with ``--force-local`` and
  with ``--split k`` through a real broker and worker (encryption on), as in ``bench_pipeline.py``.

ms/token is decode only: (time to the last token - time to the first) / (tokens - 1).

    .venv/bin/python bench/bench_split_floor.py [--model smollm2-135m] [--split 15] [--tokens 64] [--reps 3] [--json]
        [--modes 'split over a bare pipe' 'hybrid (edge CLI)' ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROMPTS  # noqa: E402

import cli  # noqa: E402,F401  (OpenMP settings and CPUs for every process here, before torch loads)


def _greedy(step, first_ids, tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """Generate up to ``tokens`` greedily with ``step(ids) -> next token``, stopping at an
    end-of-sequence id as the edge does; (tokens, decode ms/token)."""
    import torch

    out = [step(torch.tensor([first_ids]))]
    t_first = time.perf_counter()
    while len(out) < tokens and out[-1] not in eos:
        out.append(step(torch.tensor([[out[-1]]])))
    return out, (time.perf_counter() - t_first) * 1e3 / max(1, len(out) - 1)



def serve(model: str, split: int, port_file: str) -> None:
    """The second process: layers [split, N) and the head behind a ROUTER socket (one session at a
    time). A step is raw float32 activations (answered with 4 bytes), or, after a ``keys``
    message, a frame of our session protocol (``seal_step``, fp16 on the wire, encrypted;
    answered with ``seal_step_reply``). Messages start with an empty frame: what precedes it is
    the route back (a client's id, or the proxy's and then the client's)."""
    import torch
    import zmq

    from broker.wire.crypto import SessionCipher, generate_keypair
    from broker.wire.session_protocol import open_step, seal_step_reply
    from partition.models import resolve_model
    from partition.segment import ModelSegment

    source = resolve_model(model)
    cloud = ModelSegment.load(source, split, source.n_layers)
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    keys = generate_keypair()
    Path(port_file).write_text(f"{port} {keys.public_key.hex()}")
    cache, cipher = cloud.new_cache(), None
    while True:
        frames = sock.recv_multipart()
        cut = frames.index(b"") + 1
        route, (kind, payload, *rest) = frames[:cut], frames[cut:]
        if kind == b"quit":
            return
        if kind == b"reset":
            cache, cipher = cloud.new_cache(), None
            sock.send_multipart([*route, b""])
        elif kind == b"keys":  # payload: the edge's ephemeral public key, then the session nonce
            cipher = SessionCipher.for_worker(keys.secret_key, payload[:32], "floor", payload[32:])
            sock.send_multipart([*route, b""])
        elif cipher is not None:
            t0 = time.perf_counter()
            step = int.from_bytes(payload, "little")
            req = open_step(cipher, "floor", step, rest, source.hidden_size, vocab_size=source.vocab_size)
            t1 = time.perf_counter()
            token = int(cloud(req.hidden, cache).logits[0, -1].argmax())
            t2 = time.perf_counter()
            sock.send_multipart([*route, *seal_step_reply(cipher, "floor", step, token, cache.length,
                                                          (t2 - t1) * 1e3, (time.perf_counter() - t0) * 1e3)])
        else:
            hidden = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(1, -1, source.hidden_size)
            token = int(cloud(hidden, cache).logits[0, -1].argmax())
            sock.send_multipart([*route, token.to_bytes(4, "little")])


def proxy(port_file: str, upstream: str) -> None:
    """A third process forwarding both ways in ZeroMQ's C proxy (ROUTER to DEALER): the least a
    hop through a broker process can cost."""
    import zmq

    ctx = zmq.Context.instance()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    back.connect(upstream)
    port = front.bind_to_random_port("tcp://127.0.0.1")
    Path(port_file).write_text(str(port))
    zmq.proxy(front, back)


def generate(args: argparse.Namespace) -> None:
    """One generation in this (fresh) process, in mode ``args.generate``; prints its tokens and
    decode ms/token as JSON. The edge CLI also runs each generation in a fresh process."""
    import secrets

    import torch
    import zmq

    from broker.wire.crypto import SessionCipher, generate_keypair
    from broker.wire.session_protocol import open_step_reply, seal_step
    from partition.models import resolve_model
    from partition.segment import ModelSegment
    from partition.tokens import encode_prompt, eos_token_ids

    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    eos = eos_token_ids(source, tokenizer)
    ids = encode_prompt(tokenizer, args.prompt)
    n, k, mode = source.n_layers, args.split, args.generate
    if mode == "local":
        whole = ModelSegment.load(source, 0, n)
        cache = whole.new_cache()

        def step(x):
            return int(whole(x, cache).logits[0, -1].argmax())
    elif mode == "split in process":
        edge, cloud = ModelSegment.load(source, 0, k), ModelSegment.load(source, k, n)
        ce, cc = edge.new_cache(), cloud.new_cache()

        def step(x):
            return int(cloud(edge(x, ce, logits="none").hidden, cc).logits[0, -1].argmax())
    else:  # the second process, directly or through the proxy
        edge = ModelSegment.load(source, 0, k)
        ce = edge.new_cache()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{args.port}")

        def call(*frames: bytes) -> list[bytes]:
            sock.send_multipart([b"", *frames])
            return sock.recv_multipart()[1:]

        call(b"reset", b"")
        if mode == "bare pipe, our wire":
            eph, nonce = generate_keypair(), secrets.token_bytes(16)
            call(b"keys", eph.public_key + nonce)
            cipher = SessionCipher.for_edge(eph.secret_key, bytes.fromhex(args.worker_key), "floor", nonce)
            numbers = iter(range(1, 1 << 30))

            def step(x):
                i = next(numbers)
                hidden = edge(x, ce, logits="none").hidden
                sealed = seal_step(cipher, "floor", i, ce.length - x.shape[1], hidden, "fp16")
                return open_step_reply(cipher, "floor", i, call(b"step", i.to_bytes(4, "little"), *sealed)).token
        else:
            def step(x):
                hidden = edge(x, ce, logits="none").hidden.to(torch.float32).contiguous()
                return int.from_bytes(call(b"step", hidden.numpy().tobytes())[0], "little")
    tokens, ms = _greedy(step, ids, args.tokens, eos)
    print(json.dumps({"token_ids": tokens, "ms_per_token": ms}))


def _start(args: list[str], port_file: Path) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen([sys.executable, __file__, *args])
    deadline = time.monotonic() + 300
    while not port_file.exists() or not port_file.read_text():
        if child.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{args} did not start")
        time.sleep(0.1)
    time.sleep(0.1)
    return child, port_file.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--modes", nargs="+", metavar="MODE",
                        help="only these modes (by name, e.g. 'local' 'split over a bare pipe'); local ones are "
                             "always run, as the references")
    for hidden in ("--serve", "--generate", "--prompt", "--port", "--worker-key"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--proxy", nargs=2, metavar=("PORT_FILE", "UPSTREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.model, args.split, args.serve)
        return
    if args.proxy:
        proxy(*args.proxy)
        return
    if args.generate:
        generate(args)
        return

    import tempfile

    from cli.cluster import LocalCluster, cli_command

    tmp = Path(tempfile.mkdtemp())
    server, served = _start(["--model", args.model, "--split", str(args.split), "--serve", str(tmp / "port")],
                            tmp / "port")
    port, worker_key = served.split()
    relay, relay_port = _start(["--proxy", str(tmp / "relay"), f"tcp://127.0.0.1:{port}"], tmp / "relay")
    ours = {"local": port, "split in process": port, "split over a bare pipe": port,
            "bare pipe, our wire": port, "bare pipe via a C proxy": relay_port}
    cli_modes = {"local (edge CLI)": ["--force-local"], "hybrid (edge CLI)": ["--split", str(args.split)]}
    if args.modes:
        unknown = set(args.modes) - {*ours, *cli_modes}
        if unknown:
            raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {[*ours, *cli_modes]}")
        keep = {"local", *args.modes} | ({"local (edge CLI)"} if "hybrid (edge CLI)" in args.modes else set())
        ours = {m: v for m, v in ours.items() if m in keep}
        cli_modes = {m: v for m, v in cli_modes.items() if m in keep}
    names = [*ours, *cli_modes]
    ms: dict[str, list[float]] = {m: [] for m in names}
    try:
        with LocalCluster(model=args.model) as cluster:
            cluster.start_broker()
            cluster.add_worker()
            cluster.wait_for_workers(1)
            for rep in range(args.reps):
                for i, prompt in enumerate(PROMPTS):
                    outputs = {}
                    turn = (rep * len(PROMPTS) + i) % len(names)  # each mode runs first in turn
                    for name in names[turn:] + names[:turn]:
                        if name in ours:
                            cmd = [sys.executable, __file__, "--model", args.model, "--split", str(args.split),
                                   "--tokens", str(args.tokens), "--generate", name, "--prompt", prompt,
                                   "--port", ours[name], "--worker-key", worker_key]
                        else:
                            cmd = cli_command("edge", "--model", args.model, *cli_modes[name], "--json",
                                              "--tokens", str(args.tokens), "--prompt", prompt)
                        out = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env(), timeout=600)
                        if out.returncode != 0:
                            raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
                        r = json.loads(out.stdout.strip().splitlines()[-1])
                        outputs[name] = r["token_ids"]
                        ms[name].append(r["ms_per_token"])
                    eos_free = {m: o[:-1] if len(o) < args.tokens else o for m, o in outputs.items()}
                    if any(o != eos_free["local"] for o in eos_free.values()):
                        raise SystemExit(f"outputs differ on {prompt!r}: "
                                         f"{ {m: o[:8] for m, o in eos_free.items()} }")
    finally:
        for proc in (relay, server):
            proc.terminate()
            proc.wait(30)
    med = {m: statistics.median(v) for m, v in ms.items()}
    result = {
        "model": args.model, "split": args.split, "tokens": args.tokens, "reps": args.reps,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "ms_per_token": {m: round(v, 2) for m, v in med.items()},
        "over_local": {m: round(med[m] / med["local"], 3) for m in ours if m != "local"},
    }
    if "hybrid (edge CLI)" in med:
        result["hybrid_over_local_cli"] = round(med["hybrid (edge CLI)"] / med["local (edge CLI)"], 3)
    if args.json:
        print(json.dumps(result))
        return
    print(f"model {args.model}, split {args.split}, {args.tokens} tokens x {len(PROMPTS)} prompts x {args.reps} reps "
          f"(median decode ms/token, each generation in a fresh process; outputs identical)")
    for m, v in med.items():
        ratio = (f"{v / med['local']:.3f}x local" if m in ours else
                 f"{v / med['local (edge CLI)']:.3f}x local (edge CLI)")
        print(f"  {m:24} {v:7.2f}  {ratio}")


if __name__ == "__main__":
    main()
