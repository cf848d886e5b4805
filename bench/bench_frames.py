"""How long a small message waits behind a large one on the same ZeroMQ connection, with and
without CURVE: why the broker bounds frames (--max-request-mb), each client's bytes in flight
(--max-client-mb) and the bytes on their way to each worker (worker_max_in_flight_bytes), and why
edges send long prompts in frames of --max-frame-mb.

A DEALER sends a frame of N MiB and, right behind it, a 20-byte message (a heartbeat's size) to a
ROUTER on loopback, with the project's socket settings; both are timed from the send to their
arrival. Figures are medians of --repeats runs, side by side in one process.

    .venv/bin/python bench/bench_frames.py [--sizes 1,8,32,100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.sockets import make_socket  # noqa: E402


def pair(ctx: zmq.Context, curve: bool) -> tuple[zmq.Socket, zmq.Socket]:
    router, dealer = make_socket(ctx, zmq.ROUTER), make_socket(ctx, zmq.DEALER)
    if curve:
        server_pub, server_sec = zmq.curve_keypair()
        client_pub, client_sec = zmq.curve_keypair()
        router.curve_server = True
        router.curve_secretkey, router.curve_publickey = server_sec, server_pub
        dealer.curve_serverkey, dealer.curve_publickey, dealer.curve_secretkey = server_pub, client_pub, client_sec
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")
    router.recv_multipart()
    return dealer, router


def measure(dealer: zmq.Socket, router: zmq.Socket, mib: int) -> tuple[float, float]:
    """Seconds until the large frame arrived, and until the small one behind it did."""
    body = bytes(mib << 20)
    t0 = time.perf_counter()
    dealer.send(body, copy=False)
    dealer.send(b"heartbeat-sized-msg!")
    router.recv_multipart(copy=False)
    t_large = time.perf_counter() - t0
    router.recv_multipart()
    return t_large, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,8,32,100", help="frame sizes in MiB")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ctx = zmq.Context()
    print("| transport | frame | frame arrives | message behind it arrives | MiB/s |")
    print("|---|---|---|---|---|")
    for curve in (False, True):
        dealer, router = pair(ctx, curve)
        for mib in sizes:
            runs = [measure(dealer, router, mib) for _ in range(args.repeats)]
            large = statistics.median(r[0] for r in runs)
            small = statistics.median(r[1] for r in runs)
            print(f"| {'CURVE' if curve else 'plain'} | {mib} MiB | {large * 1e3:.0f} ms | {small * 1e3:.0f} ms | "
                  f"{mib / large:.0f} |")
        dealer.close()
        router.close()
    ctx.term()


if __name__ == "__main__":
    main()
