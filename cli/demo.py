"""``edgecloud demo``: a broker, N cloud workers and the edge as separate processes on loopback."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Annotated

import typer

from cli.cluster import ClusterError, LocalCluster
from cli.common import EXIT_FAILED, interrupt_on_signals, typed_errors
from cli.edge_options import edge_args, with_edge_options
from edge_worker.config import EdgeConfig


@with_edge_options(leave_out=frozenset({"broker", "keys", "api_key"}), defaults={"tokens": 48})
def demo(
    workers: Annotated[int, typer.Option(help="Cloud worker processes to start.")] = 1,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt.")] = "Explain in two sentences why a "
    "phone might send part of a neural network to the cloud.",
    json_out: Annotated[bool, typer.Option("--json", help="Print the edge's JSON object only.")] = False,
    trace_rows: Annotated[int, typer.Option("--trace-rows", help="Per-token trace rows to print.")] = 8,
    *,
    settings: Callable[[], EdgeConfig],
    edge_values: dict,
) -> None:
    """Start a broker, N workers and the edge as real processes, generate once, stop them all."""

    def say(msg: str) -> None:
        if not json_out:
            typer.echo(msg, err=True)

    with typed_errors():
        config = settings()  # bad options get their one-line error before any process starts
    interrupt_on_signals()  # leave through the cleanup below
    model, force_local = config.model, config.force_local
    cluster = LocalCluster(model=model, encryption=config.encryption, curve=config.curve)
    try:
        t0 = time.perf_counter()
        if force_local:  # every layer on the edge: nothing else to start
            say(f"running every layer of {model} on the edge (--force-local): no broker, no workers")
        else:
            with typed_errors():  # a model that is not there: one line, before any process starts
                prepare_model(model, say)
            say(f"starting broker on {cluster.endpoint} and {workers} worker(s) of {model} "
                f"(keys and logs in {cluster.workdir}, removed on exit)")
            cluster.start_broker()
            for _ in range(workers):
                cluster.add_worker()
            st = cluster.wait_for_workers(workers, progress=lambda up, s: say(
                f"  {up} of {workers} worker(s) registered after {s:.0f} s (each loads {model} and measures "
                "its speed before it registers; logs in the directory above)"))
            say(f"{len(st['workers'])} worker(s) registered after {time.perf_counter() - t0:.1f} s; running the edge")
        # Every edge option given to the demo reaches its edge process (the cluster adds --model
        # and the CURVE options).
        args = ["--prompt", prompt, "--json", *edge_args(edge_values, skip=frozenset({"model", "no_curve"}))]
        out = cluster.edge(*args)
        if out.returncode != 0:
            raise ClusterError(f"the edge failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
        result = json.loads(out.stdout)
        procs = [p for p in [cluster.broker, *cluster.workers] if p is not None]
        result["cluster"] = {"workdir": str(cluster.workdir), "pids": [p.popen.pid for p in procs]}
        if json_out:
            sys.stdout.write(json.dumps(result) + "\n")
        else:
            print_result(result, trace_rows)
            st = None if force_local else cluster.status()
            if st:
                typer.echo("broker: " + ", ".join(f"{k}={v}" for k, v in sorted(st.get("counters", {}).items())),
                           err=True)
    except ClusterError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: stopping every process", err=True)
        raise typer.Exit(130) from None
    finally:
        cluster.stop()  # removes its directory: the demo's keys (private ones included) and logs


def prepare_model(model: str, say: Callable[[str], None]) -> None:
    """Resolve (and on first use convert) the model here, where the user watches, before the
    workers start: transformers shows the GGUF conversion's progress in this console, and the
    workers find the converted weights cached instead of converting them each."""
    t0 = time.perf_counter()
    say(f"preparing {model} (a GGUF file is converted to safetensors once, then cached)")
    from partition.models import resolve_model

    source = resolve_model(model)
    say(f"  {model} ready in {time.perf_counter() - t0:.1f} s ({source.directory})")


def print_result(r: dict, trace_rows: int) -> None:
    typer.echo(r["text"])
    t = r["timings"]
    if r.get("decision"):
        d = r["decision"]
        rtt = "unknown" if d.get("rtt_ms") is None else f"{d['rtt_ms']:.1f} ms"
        typer.echo(f"\n[split {d['k']} chosen by the cost model ({d['reason']}; measured round trip {rtt})]", err=True)
    typer.echo(
        f"\n[{r['mode']}, split {r['split']}/{r['n_layers']}] {len(r['token_ids'])} tokens"
        f"{' (ended by the model)' if r.get('stop_reason') == 'eos' else ''}; first after "
        f"{r['ttft_ms']:.0f} ms, then {r['ms_per_token']:.1f} ms/token; {r['cloud_round_trips']} frames sent, "
        f"{r.get('cloud_waits', 0)} waits for the cloud, "
        f"{r['bytes_sent']} B sent, {r['bytes_received']} B received, {r['retries']} retries",
        err=True,
    )
    if r.get("mini"):
        rate = r.get("acceptance_rate") or 0.0
        typer.echo(f"mini-LLM ({r['mini']}, {r['mini_mode']}): {r['tokens_from_mini']} of {len(r['token_ids'])} "
                   f"tokens, {rate:.0%} of {r['tokens_drafted']} drafts kept", err=True)
    typer.echo(
        f"time: edge {t['edge_compute_ms']:.0f} ms, cloud {t['cloud_compute_ms']:.0f} ms, "
        f"transport {t['transport_ms']:.0f} ms, waiting {t['waiting_ms']:.0f} ms",
        err=True,
    )
    rows = r.get("trace", [])[:trace_rows]
    if rows:
        typer.echo(f"{'step':>4} {'positions':>9} {'token':>6} {'edge ms':>8} {'cloud ms':>9} {'wire ms':>8} "
                   f"{'sent B':>7} {'recv B':>7}", err=True)
        for i, s in enumerate(rows):
            typer.echo(f"{i:4} {s['positions']:9} {s['token']:6} {s['edge_ms']:8.2f} {s['cloud_ms']:9.2f} "
                       f"{s['transport_ms']:8.2f} {s['bytes_sent']:7} {s['bytes_received']:7}", err=True)
        if len(r["trace"]) > trace_rows:
            typer.echo(f"... {len(r['trace']) - trace_rows} more steps (--json for all)", err=True)
