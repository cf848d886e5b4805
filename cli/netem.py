"""``edgecloud netem``: run the link-emulating proxy (broker/linkproxy.py) in front of a broker.

Point edges at ``--listen`` instead of the broker to see how they fare over
a slow or lossy link; ``tc netem`` needs a kernel module and root, this
needs neither.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
import zmq

from broker.errors import ConfigError
from cli.common import EXIT_FAILED, setup_logging, stop_on_signals, typed_errors

logger = logging.getLogger(__name__)

FAULT_DIRECTIONS = ("both", "up", "down")
# How often the main thread checks that the proxy thread is still alive while waiting for a signal.
LIVENESS_CHECK_S = 1.0


def netem(
    listen: Annotated[str, typer.Option(help="Address edges connect to.")] = "tcp://127.0.0.1:5556",
    upstream: Annotated[str, typer.Option(help="The broker's address.")] = "tcp://127.0.0.1:5555",
    rtt_ms: Annotated[float, typer.Option("--rtt-ms", help="Added round-trip time, ms.")] = 0.0,
    jitter_ms: Annotated[
        float, typer.Option("--jitter-ms", help="Uniform ± jitter of each one-way delay, ms.")
    ] = 0.0,
    uplink_mbps: Annotated[float | None, typer.Option("--uplink-mbps", help="Edge -> broker Mbit/s.")] = None,
    downlink_mbps: Annotated[
        float | None, typer.Option("--downlink-mbps", help="Broker -> edge Mbit/s.")
    ] = None,
    drop: Annotated[float, typer.Option(help="Probability a message is lost.")] = 0.0,
    duplicate: Annotated[float, typer.Option(help="Probability a message arrives twice.")] = 0.0,
    reorder: Annotated[float, typer.Option(help="Probability a message is held back (reordered).")] = 0.0,
    reorder_delay_ms: Annotated[
        float, typer.Option("--reorder-delay-ms", help="How long a reordered message is held, ms.")
    ] = 50.0,
    faults: Annotated[
        str, typer.Option(help="Directions drop/duplicate/reorder apply to: both, up, down.")
    ] = "both",
    seed: Annotated[int | None, typer.Option(help="RNG seed, to replay the same faults.")] = None,
    keys: Annotated[Path | None, typer.Option("--keys", help="Keys directory (env EDGECLOUD_KEYS): with the "
                                              "broker's keys there, both sides speak CURVE.")] = None,
    no_curve: Annotated[bool, typer.Option("--no-curve", help="Plain connections on both sides.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
) -> None:
    """Emulate a WAN link (delay, bandwidth, loss, duplication, reordering) between edges and a broker.

    With CURVE (the broker's keys in the keys directory) the proxy stands in for the broker towards
    edges: it listens with the broker's keypair and admits the keys of trusted_clients.txt, and it
    connects upstream as client-default. Workers must connect to the broker directly.
    """
    from broker.linkproxy import LinkConfig, LinkProxy
    from edge_worker.config import default_keys_dir

    setup_logging(verbose)
    with typed_errors():
        if faults not in FAULT_DIRECTIONS:
            raise ValueError(f"--faults must be one of {', '.join(FAULT_DIRECTIONS)}, got {faults!r}")
        config = LinkConfig(
            rtt_ms=rtt_ms, jitter_ms=jitter_ms, uplink_mbps=uplink_mbps, downlink_mbps=downlink_mbps,
            drop_rate=drop, duplicate_rate=duplicate, delay_rate=reorder,
            extra_delay_ms=reorder_delay_ms if reorder > 0 else 0.0, seed=seed,
            fault_uplink=faults in ("both", "up"), fault_downlink=faults in ("both", "down"),
        )  # fmt: skip
        ctx = zmq.Context()
        secured = None if no_curve else _curve_sides(ctx, keys or default_keys_dir())
        try:
            proxy = LinkProxy(listen, upstream, config, context=ctx,
                              upstream_curve=secured[0] if secured else None,
                              front_setup=secured[1] if secured else None)  # fmt: skip
        except zmq.ZMQError as exc:
            typer.echo(f"error: cannot listen on {listen}: {exc}", err=True)
            raise typer.Exit(EXIT_FAILED) from None
        stop = stop_on_signals()
        proxy.start()
        typer.echo(f"netem proxy on {proxy.endpoint} -> {upstream}: {config.describe()} (seed {proxy.seed}; "
                   f"{'CURVE' if secured else 'no CURVE'})", err=True)  # fmt: skip
        failed = False
        try:
            while not stop.wait(LIVENESS_CHECK_S):
                if secured:
                    secured[2].reload_if_changed()
                if not proxy.running:
                    failed = True  # the proxy thread logged why
                    break
        finally:
            proxy.stop()
            if secured:
                secured[3].close()
            ctx.term()
            st = proxy.stats()
            for name, d in (("uplink", st.uplink), ("downlink", st.downlink)):
                logger.info(
                    "%s: %d messages (%d bytes) in, %d delivered, %d dropped, %d duplicated, %d delayed, "
                    "%d overflow, %d undeliverable",
                    name, d.messages, d.bytes, d.delivered, d.dropped, d.duplicated, d.delayed, d.overflow,
                    d.undeliverable,
                )  # fmt: skip
            logger.info("clients open at exit %d, closed while running %d, seed %d",
                        st.clients, st.clients_evicted, st.seed)  # fmt: skip
        if failed:
            raise typer.Exit(EXIT_FAILED)


def _curve_sides(ctx: zmq.Context, keys_dir: Path):
    """(upstream client keys, front socket setup, allowlist files, ZAP handler), or None without broker keys."""
    from broker.transport import (
        BROKER_KEY_NAME,
        AllowlistFiles,
        ZapHandler,
        broker_has_keys,
        client_keys,
        setup_curve_server,
    )
    from broker.wire.crypto import load_keys

    if not broker_has_keys(keys_dir):
        return None
    upstream = client_keys(keys_dir, "client")
    if upstream is None:
        raise ConfigError(f"{keys_dir} has the broker's keys but no client-default.key to connect upstream with")
    secret = load_keys(keys_dir, "broker", BROKER_KEY_NAME).secret_key
    allow = AllowlistFiles(keys_dir)
    zap = ZapHandler(ctx, lambda: allow.current)
    return upstream, lambda sock: setup_curve_server(sock, secret), allow, zap
