"""``edgecloud demo``: a broker, N cloud workers and the edge as separate processes on loopback."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated

import typer

from cli.cluster import ClusterError, LocalCluster
from cli.common import (
    EXIT_FAILED,
    MiniAdapterOpt,
    MiniDraftOpt,
    MiniFixedOpt,
    MiniModeOpt,
    MiniOpt,
    MiniPipelineOpt,
    MiniThresholdOpt,
)
from edge_worker.config import DEFAULT_ENERGY_WEIGHT, DEFAULT_LATENCY_WEIGHT, DEFAULT_MEMORY_WEIGHT


def demo(
    workers: Annotated[int, typer.Option(help="Cloud worker processes to start.")] = 1,
    split: Annotated[int | None, typer.Option("--split", "-k", help="Layers on the edge; "
                                              "without it the cost model chooses.")] = None,
    min_split: Annotated[int, typer.Option("--min-split", help="Privacy floor: never fewer layers on the edge.")] = 0,
    max_leakage: Annotated[float | None, typer.Option("--max-leakage", help="Privacy budget: no split whose "
                                                      "measured token recovery exceeds this fraction.")] = None,
    energy_weight: Annotated[float, typer.Option(help="Cost-model weight of device energy.")] = DEFAULT_ENERGY_WEIGHT,
    latency_weight: Annotated[float, typer.Option(help="Cost-model weight of latency.")] = DEFAULT_LATENCY_WEIGHT,
    memory_weight: Annotated[float, typer.Option(help="Cost-model weight of device memory.")] = DEFAULT_MEMORY_WEIGHT,
    model: Annotated[str, typer.Option("--model", "-m", help="Model (see `edge --help`).")] = "smollm2-135m",
    prompt: Annotated[str, typer.Option("--prompt", "-p")] = "Explain in two sentences why a phone might "
    "send part of a neural network to the cloud.",
    tokens: Annotated[int, typer.Option("--tokens", "-n")] = 48,
    force_local: Annotated[bool, typer.Option("--force-local")] = False,
    force_cloud: Annotated[bool, typer.Option("--force-cloud")] = False,
    no_encryption: Annotated[bool, typer.Option("--no-encryption")] = False,
    no_curve: Annotated[bool, typer.Option("--no-curve", help="Plain broker connections (no CURVE).")] = False,
    wire_dtype: Annotated[str, typer.Option(help="fp32, fp16, bf16 or int8.")] = "fp16",
    reduce_dims: Annotated[int | None, typer.Option(help="Project the activations to this many dims "
                                                    "(see `edge --help`).")] = None,
    temperature: Annotated[float, typer.Option()] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    cloud_latency: Annotated[float, typer.Option(help="Emulated extra round trip to the cloud, seconds.")] = 0.0,
    bandwidth_mbps: Annotated[float | None, typer.Option(help="Emulated link bandwidth, Mbit/s.")] = None,
    mini: MiniOpt = "none",
    mini_threshold: MiniThresholdOpt = 0.5,
    mini_mode: MiniModeOpt = "verify",
    mini_max_draft: MiniDraftOpt = 8,
    mini_fixed: MiniFixedOpt = False,
    mini_pipeline: MiniPipelineOpt = True,
    mini_adapter: MiniAdapterOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the edge's JSON object only.")] = False,
    trace_rows: Annotated[int, typer.Option("--trace-rows", help="Per-token trace rows to print.")] = 8,
) -> None:
    """Start a broker, N workers and the edge as real processes, generate once, stop them all."""

    def say(msg: str) -> None:
        if not json_out:
            typer.echo(msg, err=True)

    cluster = LocalCluster(model=model, encryption=not no_encryption, curve=not no_curve)
    try:
        t0 = time.perf_counter()
        say(f"starting broker on {cluster.endpoint} and {workers} worker(s) of {model} (logs in {cluster.workdir})")
        cluster.start_broker()
        for _ in range(workers):
            cluster.add_worker()
        if not force_local:
            st = cluster.wait_for_workers(workers)
            say(f"{len(st['workers'])} worker(s) registered after {time.perf_counter() - t0:.1f} s; running the edge")
        args = ["--prompt", prompt, "--tokens", str(tokens), "--json", "--wire-dtype", wire_dtype,
                "--temperature", str(temperature), "--seed", str(seed)]
        if force_local:
            args.append("--force-local")
        elif force_cloud:
            args.append("--force-cloud")
        elif split is not None:
            args += ["--split", str(split)]
        if min_split:
            args += ["--min-split", str(min_split)]
        if max_leakage is not None:
            args += ["--max-leakage", str(max_leakage)]
        args += ["--energy-weight", str(energy_weight), "--latency-weight", str(latency_weight),
                 "--memory-weight", str(memory_weight)]
        if no_encryption:
            args.append("--no-encryption")
        if reduce_dims is not None:
            args += ["--reduce-dims", str(reduce_dims)]
        if cloud_latency:
            args += ["--cloud-latency", str(cloud_latency)]
        if bandwidth_mbps:
            args += ["--bandwidth-mbps", str(bandwidth_mbps)]
        if mini != "none":
            args += ["--mini", mini, "--mini-threshold", str(mini_threshold), "--mini-mode", mini_mode,
                     "--mini-max-draft", str(mini_max_draft)] + (["--mini-fixed"] if mini_fixed else [])
            args.append("--mini-pipeline" if mini_pipeline else "--no-mini-pipeline")
            if mini_adapter is not None:
                args += ["--mini-adapter", str(mini_adapter)]
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
        cluster.stop()


def print_result(r: dict, trace_rows: int) -> None:
    typer.echo(r["text"])
    t = r["timings"]
    if r.get("decision"):
        d = r["decision"]
        rtt = "unknown" if d.get("rtt_ms") is None else f"{d['rtt_ms']:.1f} ms"
        typer.echo(f"\n[split {d['k']} chosen by the cost model ({d['reason']}; measured round trip {rtt})]", err=True)
    typer.echo(
        f"\n[{r['mode']}, split {r['split']}/{r['n_layers']}] {len(r['token_ids'])} tokens; first after "
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
        typer.echo(f"{'step':>4} {'pos':>4} {'token':>6} {'edge ms':>8} {'cloud ms':>9} {'wire ms':>8} "
                   f"{'sent B':>7} {'recv B':>7}", err=True)
        for i, s in enumerate(rows):
            typer.echo(f"{i:4} {s['positions']:4} {s['token']:6} {s['edge_ms']:8.2f} {s['cloud_ms']:9.2f} "
                       f"{s['transport_ms']:8.2f} {s['bytes_sent']:7} {s['bytes_received']:7}", err=True)
        if len(r["trace"]) > trace_rows:
            typer.echo(f"... {len(r['trace']) - trace_rows} more steps (--json for all)", err=True)
