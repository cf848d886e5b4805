"""The ``edgecloud`` command: one sub-command per role."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    MiniAdapterOpt,
    MiniDraftOpt,
    MiniFixedOpt,
    MiniModeOpt,
    MiniOpt,
    MiniPipelineOpt,
    MiniThresholdOpt,
    Progress,
    setup_logging,
    typed_errors,
)
from edge_worker.config import DEFAULT_ENERGY_WEIGHT, DEFAULT_LATENCY_WEIGHT, DEFAULT_MEMORY_WEIGHT

app = typer.Typer(
    name="edgecloud",
    help="Edge-cloud collaborative inference for LLMs: split a model between this device and cloud workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Edge-cloud collaborative inference for LLMs."""


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="smollm2-135m (default), tiny-llama, tiny-gpt2, a .gguf file, a model directory or a hub id.",
    ),
]


@app.command()
def edge(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt.")] = "What is edge computing?",
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Maximum number of tokens to generate.")] = 64,
    model: ModelOpt = "smollm2-135m",
    split: Annotated[int | None, typer.Option("--split", "-k", help="Layers to run on the edge (0..N); "
                                              "without it the cost model chooses.")] = None,
    min_split: Annotated[int, typer.Option("--min-split", help="Privacy floor: never fewer layers on the edge "
                                           "(see the leakage table in BENCHMARKS.md).")] = 0,
    max_leakage: Annotated[float | None, typer.Option("--max-leakage", help="Privacy budget: no split whose "
                                                      "measured token recovery exceeds this fraction.")] = None,
    energy_weight: Annotated[float, typer.Option(help="Cost-model weight of device energy.")] = DEFAULT_ENERGY_WEIGHT,
    latency_weight: Annotated[float, typer.Option(help="Cost-model weight of latency.")] = DEFAULT_LATENCY_WEIGHT,
    memory_weight: Annotated[float, typer.Option(help="Cost-model weight of device memory.")] = DEFAULT_MEMORY_WEIGHT,
    force_local: Annotated[bool, typer.Option("--force-local", help="Run every layer here; no broker.")] = False,
    force_cloud: Annotated[bool, typer.Option("--force-cloud", help="Only the embedding here (split 0).")] = False,
    broker: Annotated[str | None, typer.Option(help="Broker address (env EDGECLOUD_BROKER).")] = None,
    keys: Annotated[Path | None, typer.Option("--keys", help="Keys directory (env EDGECLOUD_KEYS).")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for the broker (env EDGECLOUD_API_KEY).")] = None,
    no_encryption: Annotated[bool, typer.Option("--no-encryption", help="Send activations in the clear.")] = False,
    no_curve: Annotated[bool, typer.Option("--no-curve", help="Connect to the broker without CURVE (on when "
                                           "the keys directory holds client-default.key).")] = False,
    wire_dtype: Annotated[str, typer.Option(help="Activation precision on the wire: fp32, fp16, bf16, "
                                            "int8 (with fp16 outlier channels).")] = "fp16",
    reduce_dims: Annotated[int | None, typer.Option(help="Project the activations to this many dims "
                                                    "before they leave (calibrated per model and split, "
                                                    "see `edgecloud calibrate`).")] = None,
    reductions: Annotated[Path | None, typer.Option("--reductions", help="Projection files for --reduce-dims "
                                                    "(env EDGECLOUD_REDUCTIONS, default "
                                                    "~/.cache/edgecloud/reductions).")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for sampling: the same seed gives the same text.")] = 0,
    raw_prompt: Annotated[bool, typer.Option("--raw-prompt", help="Do not apply the chat template.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout, nothing else.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds one cloud request may take before a retry.")] = 30.0,
    deadline: Annotated[float, typer.Option(help="Seconds one step may take, retries and failovers "
                                            "included, before giving up.")] = 60.0,
    no_replan: Annotated[bool, typer.Option("--no-replan", help="Keep the planned split for the whole "
                                            "generation, even when the link or the device changes.")] = False,
    adaptive_timeout: Annotated[bool, typer.Option("--adaptive-timeout/--fixed-timeout", help="Resend an "
                                                   "unanswered decode step after about one measured round trip "
                                                   "(default), or only after --timeout.")] = True,
    no_fallback: Annotated[bool, typer.Option("--no-fallback", help="Fail instead of running the rest "
                                              "of the model here when the cloud is gone.")] = False,
    cloud_latency: Annotated[float, typer.Option(help="Emulated extra round trip to the cloud, seconds.")] = 0.0,
    bandwidth_mbps: Annotated[float | None, typer.Option(help="Emulated link bandwidth, Mbit/s.")] = None,
    mini: MiniOpt = "none",
    mini_threshold: MiniThresholdOpt = 0.5,
    mini_mode: MiniModeOpt = "verify",
    mini_max_draft: MiniDraftOpt = 8,
    mini_fixed: MiniFixedOpt = False,
    mini_pipeline: MiniPipelineOpt = True,
    mini_adapter: MiniAdapterOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
) -> None:
    """Generate text on this device, alone (--force-local) or with cloud workers."""
    import os

    from edge_worker.config import EdgeConfig, default_broker, default_keys_dir
    from edge_worker.engine import EdgeEngine

    setup_logging(verbose, quiet=not verbose)
    progress = Progress(enabled=not json_out)
    with typed_errors():
        config = EdgeConfig(
            model=model, max_new_tokens=tokens, split=split, min_split=min_split, max_leakage=max_leakage,
            force_local=force_local,
            force_cloud=force_cloud, raw_prompt=raw_prompt, temperature=temperature, top_p=top_p, seed=seed,
            broker=broker or default_broker(), keys_dir=keys or default_keys_dir(),
            api_key=api_key or os.environ.get("EDGECLOUD_API_KEY"), encryption=not no_encryption,
            wire_dtype=wire_dtype, reduce_dims=reduce_dims, reductions_dir=reductions, request_timeout_s=timeout, step_deadline_s=deadline,
            adaptive_timeout=adaptive_timeout,
            fallback_local=not no_fallback, cloud_latency_s=cloud_latency,
            bandwidth_mbps=bandwidth_mbps, energy_weight=energy_weight, latency_weight=latency_weight,
            memory_weight=memory_weight, mini=mini, mini_threshold=mini_threshold, mini_mode=mini_mode,
            mini_max_draft=mini_max_draft, mini_adaptive=not mini_fixed, mini_pipeline=mini_pipeline,
            mini_adapter=mini_adapter, dynamic=not no_replan,
            curve=not no_curve,
        )
        started = False

        def on_text(piece: str) -> None:
            nonlocal started
            if not started:
                progress.done()
                started = True
            sys.stdout.write(piece)
            sys.stdout.flush()

        with EdgeEngine(settings=config, progress=progress) as engine:
            result = engine.generate(prompt, on_text=None if json_out else on_text)
        progress.done()
    if json_out:
        sys.stdout.write(result.to_json() + "\n")
    else:
        sys.stdout.write("\n")
        typer.echo(
            f"[{result.mode}, split {result.split}/{result.n_layers}: {len(result.token_ids)} tokens, "
            f"first after {result.ttft_ms:.0f} ms, then {result.ms_per_token:.1f} ms/token, "
            f"{result.cloud_round_trips} cloud round trips"
            + (f", every layer here from step {result.fallback_at_step} (the cloud was unavailable)"
               if result.fallback_at_step is not None else "")
            + (f", {result.tokens_from_mini} tokens from the mini-LLM ({result.mini}, "
               f"{result.acceptance_rate or 0:.0%} of drafts kept)" if result.mini else "") + "]",
            err=True,
        )


from cli import calibrate as calibrate_cmd  # noqa: E402
from cli import demo as demo_cmd  # noqa: E402
from cli import netem as netem_cmd  # noqa: E402
from cli import plan as plan_cmd  # noqa: E402
from cli import roles  # noqa: E402

app.command("broker")(roles.broker)
app.command("cloud-worker")(roles.cloud_worker)
app.command("status")(roles.status)
app.command("demo")(demo_cmd.demo)
app.command("netem")(netem_cmd.netem)
app.command("plan")(plan_cmd.plan)
app.command("calibrate")(calibrate_cmd.calibrate)
app.add_typer(roles.keys_app, name="keys")


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
