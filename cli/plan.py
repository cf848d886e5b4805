"""``edgecloud plan``: price every split of a model under given conditions and say which to use."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import EXIT_USAGE, Progress, setup_logging, typed_errors
from edge_worker.config import DEFAULT_ENERGY_WEIGHT, DEFAULT_LATENCY_WEIGHT, DEFAULT_MEMORY_WEIGHT

MIB = 2**20


def plan(
    model: Annotated[str, typer.Option("--model", "-m", help="Model (see `edge --help`).")] = "smollm2-135m",
    rtt_ms: Annotated[float, typer.Option("--rtt-ms", help="Edge <-> cloud round trip, ms.")] = 20.0,
    bandwidth_mbps: Annotated[float, typer.Option("--bandwidth-mbps", help="Uplink, Mbit/s.")] = 10.0,
    downlink_mbps: Annotated[float, typer.Option("--downlink-mbps", help="Downlink, Mbit/s.")] = 50.0,
    edge_cpu_load: Annotated[float, typer.Option("--edge-cpu-load", help="Other load on the edge, 0..1.")] = 0.0,
    cloud_speedup: Annotated[float, typer.Option("--cloud-speedup", help="Cloud layer speed / edge's.")] = 4.0,
    cloud_queue_ms: Annotated[float, typer.Option("--cloud-queue-ms", help="Queueing per step, ms.")] = 0.0,
    mem_available_mib: Annotated[
        float | None,
        typer.Option("--mem-available-mib", help="Edge memory budget, MiB (default: what is free now)."),
    ] = None,
    battery: Annotated[float | None, typer.Option("--battery", help="Battery level 0..1.")] = None,
    energy_weight: Annotated[float, typer.Option("--energy-weight", help="Cost-model weight of device energy.")
                             ] = DEFAULT_ENERGY_WEIGHT,
    latency_weight: Annotated[float, typer.Option("--latency-weight", help="Cost-model weight of latency.")
                              ] = DEFAULT_LATENCY_WEIGHT,
    memory_weight: Annotated[float, typer.Option("--memory-weight", help="Cost-model weight of device memory.")
                             ] = DEFAULT_MEMORY_WEIGHT,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt length to price.")] = 64,
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Tokens generated per request.")] = 64,
    wire_dtype: Annotated[str, typer.Option(help="Activation precision on the wire: fp32, fp16, bf16, "
                                            "int8 (with fp16 outlier channels).")] = "fp16",
    reduce_dims: Annotated[int | None, typer.Option("--reduce-dims", help="Price activations projected to this "
                                                    "many dims (as `edge --reduce-dims`).")] = None,
    min_split: Annotated[int, typer.Option("--min-split", help="Never fewer layers on the edge (privacy).")] = 0,
    power_preset: Annotated[str, typer.Option("--power-preset", help="Device power model: wifi or lte.")] = "wifi",
    remeasure: Annotated[bool, typer.Option("--remeasure", help="Measure the profile again.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout, nothing else.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Draw the components against k to a PNG.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
) -> None:
    """Price every split k = 0..N (latency, device energy, device memory) and mark the best one."""
    import psutil

    from partition.models import resolve_model
    from partition.planner import POWER_PRESETS, Conditions, Weights, tensor_wire_bytes, wire_width
    from partition.planner import plan as make_plan
    from partition.profile import load_or_measure_profile, profile_summary

    setup_logging(verbose, quiet=not verbose)
    progress = Progress(enabled=not json_out)
    with typed_errors(json_out):
        if power_preset not in POWER_PRESETS:
            raise ValueError(f"unknown power preset {power_preset!r}; use one of {sorted(POWER_PRESETS)}")
        tensor_wire_bytes(1, 1, wire_dtype)  # an unknown wire dtype fails here, before any measuring
        if reduce_dims is not None and reduce_dims < 1:
            raise ValueError(f"--reduce-dims must be at least 1, got {reduce_dims}")
        if plot is not None:
            _require_matplotlib()  # before minutes of work, not after
        budget = (
            int(mem_available_mib * MIB) if mem_available_mib is not None else psutil.virtual_memory().available
        )
        conditions = Conditions(
            rtt_ms=rtt_ms, bandwidth_mbps=bandwidth_mbps, downlink_mbps=downlink_mbps,
            edge_cpu_load=edge_cpu_load, edge_mem_available_bytes=budget, cloud_queue_ms=cloud_queue_ms,
            cloud_speedup=cloud_speedup, battery_fraction=battery,
        )
        weights = Weights(energy=energy_weight, latency=latency_weight, memory=memory_weight)
        progress("resolving the model")
        source = resolve_model(model)
        wire_width(source.hidden_size, reduce_dims)  # at most the model's width
        progress("loading or measuring the layer profile")
        profile = load_or_measure_profile(source, remeasure=remeasure)
        result = make_plan(
            profile, conditions, weights, power=POWER_PRESETS[power_preset], prompt_tokens=prompt_tokens,
            new_tokens=tokens, wire_dtype=wire_dtype, min_split=min_split, reduce_dims=reduce_dims,
        )
        progress.done()
        if plot is not None:
            _plot(result, plot)
    if json_out:
        out = result.to_dict()
        out["profile"] = profile_summary(profile)
        out["plot"] = str(plot) if plot is not None else None
        sys.stdout.write(json.dumps(out) + "\n")
        return
    typer.echo(_table(result, source.name, profile.machine))
    if plot is not None:
        typer.echo(f"plot written to {plot}", err=True)


def _table(result, model_name: str, machine: str) -> str:
    c, w = result.conditions, result.effective_weights
    lines = [
        f"{model_name} ({result.n_layers} layers), profile from {machine}; {result.power.name} power model",
        f"rtt {c.rtt_ms:g} ms, up {c.bandwidth_mbps:g} / down {c.downlink_mbps:g} Mbit/s, edge load "
        f"{c.edge_cpu_load:g}, cloud x{c.cloud_speedup:g}; {result.prompt_tokens} prompt + "
        f"{result.new_tokens} new tokens, {result.wire_dtype} on the wire"
        + (f", reduced to {result.reduce_dims} dims" if result.reduce_dims else ""),
        f"weights: latency {w.latency:.2f}, energy {w.energy:.2f}, memory {w.memory:.2f}"
        + (f" (after battery {c.battery_fraction:g})" if c.battery_fraction is not None else ""),
        "",
        f"{'':2}{'k':>3} {'ms/token':>9} {'prefill ms':>10} {'energy J':>9} {'mem MiB':>8} {'up B/tok':>8} "
        f"{'lat':>5} {'energy':>6} {'mem':>5} {'total':>6}",
    ]
    for row in result.table:
        mark = "*" if row.k == result.k else ("x" if not row.feasible else " ")
        lines.append(
            f"{mark:2}{row.k:>3} {row.decode_ms_per_token:>9.1f} {row.prefill_ms:>10.1f} {row.energy_j:>9.2f} "
            f"{row.memory_bytes / MIB:>8.1f} {row.uplink_bytes_per_token:>8} {row.latency_norm:>5.2f} "
            f"{row.energy_norm:>6.2f} "
            f"{row.memory_norm:>5.2f} {row.score:>6.3f}" + (f"  ({row.reason})" if not row.feasible else "")
        )
    chosen = result.chosen
    where = "local only" if result.k == result.n_layers else ("cloud only" if result.k == 0 else "hybrid")
    lines.append("")
    lines.append(
        f"choice: split {result.k} ({where}): {chosen.decode_ms_per_token:.1f} ms/token, "
        f"{chosen.energy_j:.2f} J, {chosen.memory_bytes / MIB:.1f} MiB  ->  edgecloud edge --split {result.k}"
    )
    return "\n".join(lines)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        typer.echo("error: --plot needs matplotlib, which is not installed: pip install matplotlib", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def _plot(result, path: Path) -> None:
    """The three normalised components and the weighted total against k, the choice marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    ks = [row.k for row in result.table]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, label in (("latency_norm", "latency"), ("energy_norm", "energy"), ("memory_norm", "memory")):
        ax.plot(ks, [getattr(row, name) for row in result.table], marker=".", label=label)
    ax.plot(ks, [row.score for row in result.table], color="black", linewidth=2, label="weighted total")
    infeasible = [row.k for row in result.table if not row.feasible]
    if infeasible:
        ax.scatter(infeasible, [result.table[k].score for k in infeasible], marker="x", color="red",
                   label="infeasible", zorder=3)
    ax.axvline(result.k, color="tab:purple", linestyle="--", label=f"choice k={result.k}")
    ax.set_xlabel("split k (layers on the edge)")
    ax.set_ylabel("normalised cost (/ max over feasible k)")
    c = result.conditions
    ax.set_title(f"{result.model_id}: rtt {c.rtt_ms:g} ms, {c.bandwidth_mbps:g} Mbit/s, {result.power.name}")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise ValueError(f"cannot write the plot to {path}: {exc}") from None
    finally:
        plt.close(fig)
