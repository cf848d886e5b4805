"""The ``edgecloud`` command: one sub-command per role."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated

import typer

from cli.common import Progress, interrupt_on_signals, setup_logging, startup_heap, typed_errors
from cli.edge_options import with_edge_options
from edge_worker.config import EdgeConfig

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


@app.command()
@with_edge_options()
def edge(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt.")] = "What is edge computing?",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout, nothing else.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
    *,
    settings: Callable[[], EdgeConfig],
    edge_values: dict,
) -> None:
    """Generate text on this device, alone (--force-local) or with cloud workers."""
    interrupt_on_signals()
    setup_logging(verbose, quiet=not verbose)
    progress = Progress(enabled=not json_out)
    with typed_errors(json_out):
        config = settings()  # a bad option is refused here, before torch is imported
        with startup_heap():
            from edge_worker.engine import EdgeEngine

            engine = EdgeEngine(settings=config, progress=progress)
        started = False

        def on_text(piece: str) -> None:
            nonlocal started
            if not started:
                progress.done()
                started = True
            sys.stdout.write(piece)
            sys.stdout.flush()

        with engine:
            result = engine.generate(prompt, on_text=None if json_out else on_text)
        progress.done()
    if json_out:
        sys.stdout.write(result.to_json() + "\n")
    else:
        sys.stdout.write("\n")
        typer.echo(
            f"[{result.mode}, split {result.split}/{result.n_layers}: {len(result.token_ids)} tokens"
            f"{' (ended by the model)' if result.stop_reason == 'eos' else ''}, "
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
from cli import serve as serve_cmd  # noqa: E402

app.command("broker")(roles.broker)
app.command("cloud-worker")(roles.cloud_worker)
app.command("status")(roles.status)
app.command("demo")(demo_cmd.demo)
app.command("serve")(serve_cmd.serve)
app.command("netem")(netem_cmd.netem)
app.command("plan")(plan_cmd.plan)
app.command("calibrate")(calibrate_cmd.calibrate)
app.add_typer(roles.keys_app, name="keys")


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
